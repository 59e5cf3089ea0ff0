"""Finding and loading checkpoints: every official layout, the HF cache, and every way it can go wrong."""

import gc
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import glmapp
from glmapp.checkpoint import load_model, resolve
from glmapp.errors import CheckpointError, TokenizerError
from glmapp.models.chatglm import ChatGLMForConditionalGeneration


def logits_of(path, text="你好, ChatGLM! 123"):
    model, tokenizer = glmapp.load(str(path))
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fmt", ["safetensors", "bin-sharded"])
def test_every_official_weight_layout_gives_identical_logits(make_checkpoint, demo_v2, fmt):
    other = make_checkpoint("chatglm2", fmt)
    assert torch.equal(logits_of(other), logits_of(demo_v2))


def test_bin_shards_are_what_the_index_says(make_checkpoint):
    path = make_checkpoint("chatglm2", "bin-sharded")
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"].values()) == {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"}
    assert index["metadata"]["total_size"] > 0


def test_family_is_detected_from_the_checkpoint(demo_v2, demo_v3, loaded_v3):
    model, tokenizer = loaded_v3
    assert model.config.family == "chatglm3" and tokenizer.family == "chatglm3"
    assert "<|user|>" in tokenizer.special_tokens
    m2, t2 = glmapp.load(str(demo_v2))
    assert m2.config.family == "chatglm2" and "<|user|>" not in t2.special_tokens


def test_dtype_and_device_overrides(demo_v2):
    model, _ = glmapp.load(str(demo_v2), dtype="bfloat16", device="cpu")
    assert model.transformer.output_layer.weight.dtype == torch.bfloat16
    auto, _ = glmapp.load(str(demo_v2))
    assert auto.transformer.output_layer.weight.dtype == torch.float32  # auto = fp32 on CPU
    with pytest.raises(CheckpointError, match="Unknown dtype 'float8'"):
        glmapp.load(str(demo_v2), dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="CUDA is not available"):
            glmapp.load(str(demo_v2), device="cuda")


def test_hub_id_resolves_through_the_hf_cache_offline(demo_v2, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    repo = tmp_path / "models--THUDM--chatglm2-6b"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(demo_v2, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    found = resolve("THUDM/chatglm2-6b")
    assert found.source == "hf-cache" and found.path == snapshot
    model, tokenizer = glmapp.load("THUDM/chatglm2-6b")
    assert model.chat(tokenizer, "hi", max_new_tokens=3, do_sample=False)[0] is not None


def test_unknown_hub_id_offline_says_what_was_looked_for():
    with pytest.raises(CheckpointError) as e:
        glmapp.load("THUDM/no-such-model")
    msg = str(e.value)
    assert "THUDM/no-such-model" in msg and "Hugging Face cache" in msg and "make-demo" in msg


def test_nonexistent_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="Model folder not found"):
        glmapp.load(str(tmp_path / "nope"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unsupported_model_type(demo_v2, tmp_path):
    path = _copy(demo_v2, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="Unsupported model_type 'llama'"):
        glmapp.load(str(path))


def test_broken_config_json(demo_v2, tmp_path):
    path = _copy(demo_v2, tmp_path / "m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        glmapp.load(str(path))


def test_missing_shard_is_named(demo_v2, tmp_path):
    path = _copy(demo_v2, tmp_path / "m")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        glmapp.load(str(path))


@pytest.mark.parametrize("fmt,name", [("safetensors-sharded", "model-00002-of-00002.safetensors"),
                                      ("bin-sharded", "pytorch_model-00002-of-00002.bin")])
def test_truncated_shard_is_named_and_nothing_stays_loaded(make_checkpoint, tmp_path, fmt, name):
    path = _copy(make_checkpoint("chatglm2", fmt), tmp_path / "m")
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    gc.collect()
    before = sum(isinstance(o, ChatGLMForConditionalGeneration) for o in gc.get_objects())
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as e:
        glmapp.load(str(path))
    assert "truncated" in str(e.value) or "corrupt" in str(e.value)
    del e
    gc.collect()
    after = sum(isinstance(o, ChatGLMForConditionalGeneration) for o in gc.get_objects())
    assert after == before


def test_wrong_tensor_shape_names_tensor_and_both_shapes(demo_v2, tmp_path):
    path = _copy(demo_v2, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["ffn_hidden_size"] += 8
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        glmapp.load(str(path))
    msg = str(e.value)
    assert "mlp.dense_h_to_4h.weight" in msg or "mlp.dense_4h_to_h.weight" in msg
    assert "(320, 64)" in msg and "(336, 64)" in msg or "(64, 160)" in msg and "(64, 168)" in msg


def test_missing_tensor_is_reported(demo_v2, tmp_path):
    path = _copy(demo_v2, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_layers"] += 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing .* tensors.*layers.2"):
        glmapp.load(str(path))


def test_tokenizer_that_is_not_sentencepiece(demo_v2, tmp_path):
    path = _copy(demo_v2, tmp_path / "m")
    (path / "tokenizer.model").write_text("this is not a sentencepiece model")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        glmapp.load(str(path))


def test_v1_config_over_v2_files_and_prequantized_configs_are_refused_clearly(demo_v2, tmp_path):
    path = _copy(demo_v2, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    # v1 (ChatGLM-6B, #12) and v2 keys in one config.json
    (path / "config.json").write_text(json.dumps({**cfg, "position_encoding_2d": True}))
    with pytest.raises(CheckpointError, match="mixes ChatGLM-6B"):
        glmapp.load(str(path))
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_bit": 3}))
    with pytest.raises(CheckpointError, match="quantization_bit=3"):
        load_model(path)
    # quantization_bit 4 promises the official int4 layout (tests/test_quant.py); full-precision weights
    # under such a config are named as the mismatch they are.
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_bit": 4}))
    with pytest.raises(CheckpointError, match="quantization_bit=4"):
        load_model(path)


# VmHWM is the peak RSS of this process image (ru_maxrss would include the forking parent's peak).
PEAK_SCRIPT = textwrap.dedent("""
    import pathlib, sys, psutil
    from glmapp.checkpoint import load_model
    hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    before = psutil.Process().memory_info().rss
    assert hwm() - before < 50e6, "peak before loading should be the current size"
    model = load_model(pathlib.Path(sys.argv[1]), dtype="float16")
    print(before, hwm(), sum(p.numel() * p.element_size() for p in model.parameters()))
""")


@pytest.mark.slow
def test_peak_host_memory_while_loading_stays_within_1_3x_of_disk_size(make_checkpoint):
    path = make_checkpoint("chatglm2", "safetensors", "mid")
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert disk >= 200e6
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    before, peak, weights = map(int, out)
    assert weights >= 0.99 * disk  # the whole checkpoint really is in memory
    ratio = (peak - before) / disk
    print(f"load peak / disk size = {ratio:.3f}")
    assert ratio <= 1.3
