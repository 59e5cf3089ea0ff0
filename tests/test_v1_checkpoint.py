"""ChatGLM-6B (v1) checkpoints: the demo's official layout, glmapp.load, Auto classes, int4/int8 layouts."""

import json

import pytest
import torch
from safetensors import safe_open

import glmapp
from glmapp.checkpoint import iter_tensors
from glmapp.demo import make_demo
from glmapp.errors import CheckpointError
from glmapp.checkpoint import write_quantized_checkpoint
from glmapp.quant import QuantizedLinear, dequantize, layer_linear_names, quantize_weight


@pytest.fixture(scope="module")
def v1_demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("v1") / "chatglm1-demo", family="chatglm1")


def test_demo_has_the_official_v1_layout(v1_demo):
    cfg = json.loads((v1_demo / "config.json").read_text())
    assert cfg["model_type"] == "chatglm" and cfg["position_encoding_2d"] is True
    assert {"inner_hidden_size", "max_sequence_length", "gmask_token_id", "mask_token_id"} <= set(cfg)
    assert (v1_demo / "ice_text.model").is_file() and not (v1_demo / "tokenizer.model").exists()
    tensors = dict(iter_tensors(v1_demo))
    layers = cfg["num_layers"]
    assert len(tensors) == 13 * layers + 4  # 368 for 28 layers
    assert "transformer.layers.1.attention.rotary_emb.inv_freq" in tensors
    assert tensors["transformer.layers.0.input_layernorm.bias"].dtype == torch.float32  # as the official file
    assert tensors["transformer.layers.0.attention.query_key_value.weight"].dtype == torch.float16
    assert torch.equal(tensors["lm_head.weight"], tensors["transformer.word_embeddings.weight"])
    index = json.loads((v1_demo / "model.safetensors.index.json").read_text())
    first = v1_demo / index["weight_map"]["transformer.word_embeddings.weight"]
    with safe_open(first, "pt") as f:
        assert "transformer.word_embeddings.weight" in f.keys()


def test_load_gives_the_v1_chat_model_and_tokenizer(v1_demo):
    model, tok = glmapp.load(str(v1_demo))
    assert type(model).__name__ == "ChatModel1" and tok.family == "chatglm1" and model.config.family == "chatglm1"
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert model.config.bos_token_id == tok.bos_token_id and model.config.gmask_token_id == tok.gmask_token_id
    ids = torch.tensor([tok.encode("你好\nhello")])
    assert torch.isfinite(model(ids).logits).all()


def test_auto_classes_load_v1_without_remote_code(v1_demo):
    from transformers import AutoConfig, AutoModelForCausalLM

    from glmapp.models.chatglm1 import ChatGLM1Config

    assert isinstance(AutoConfig.from_pretrained(v1_demo), ChatGLM1Config)
    auto = AutoModelForCausalLM.from_pretrained(v1_demo, dtype=torch.float32)
    ours, tok = glmapp.load(str(v1_demo))
    ids = torch.tensor([tok.encode("auto classes")])
    torch.testing.assert_close(auto(ids).logits, ours(ids).logits)


def test_a_wrong_family_is_refused(v1_demo):
    with pytest.raises(CheckpointError, match="does not fit this checkpoint"):
        glmapp.load(str(v1_demo), family="chatglm2")


@pytest.mark.parametrize("bits", [4, 8])
def test_official_quantized_layout_loads(v1_demo, tmp_path, bits):
    full, tok = glmapp.load(str(v1_demo))  # (a fresh copy: its weights are changed below)
    ids = torch.tensor([tok.encode("quantized 量化 model")])
    out = write_quantized_checkpoint(v1_demo, tmp_path / f"int{bits}", bits)  # the chatglm-6b-int4/-int8 layout
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    qkv = state["transformer.layers.0.attention.query_key_value.weight"]
    assert qkv.dtype == torch.int8 and qkv.shape[1] == full.config.hidden_size * bits // 8  # int4: two per byte
    assert "transformer.layers.0.attention.query_key_value.weight_scale" in state
    model, _ = glmapp.load(str(out))  # as it lies on disk
    assert model.config.quantization_bit == bits
    runtime, _ = glmapp.load(str(v1_demo), quant=f"int{bits}")  # --quant on the full checkpoint: the same tensors
    torch.testing.assert_close(runtime.state_dict(), model.state_dict(), atol=0, rtol=0)
    assert isinstance(model.transformer.layers[0].mlp.dense_4h_to_h, QuantizedLinear)
    with torch.no_grad():  # the same network with every quantized linear's weight replaced by q * scale
        for path in layer_linear_names(full.config.num_layers, v1=True):
            linear = full.get_submodule(path)
            linear.weight.copy_(dequantize(*quantize_weight(linear.weight.half(), bits), bits))
        # CPU kernels run few-row matmuls in bf16, and the v1 demo's large random weights amplify that rounding
        # (1e-5 on one weight moves the logits by 2e-4), hence the tolerance: a wrong layout is off by ~0.5.
        torch.testing.assert_close(model(ids).logits, full(ids).logits, atol=0.05, rtol=0)


def test_quantized_embeddings_are_refused_clearly(v1_demo, tmp_path):
    import shutil

    copy = tmp_path / "qe"
    shutil.copytree(v1_demo, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(quantization_bit=4, quantization_embeddings=True)
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantized embeddings"):
        glmapp.load(str(copy))
