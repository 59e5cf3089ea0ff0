"""GGUF export (glmapp.gguf_export, `glmapp export-gguf`): the file read back with the `gguf` package carries
llama.cpp's chatglm names, hyperparameters and vocabulary, and every tensor equals ours within its type."""

import json

import gguf  # a dependency of glmapp (requirements.txt): no skip when it is missing
import numpy as np
import pytest
import torch

from glmapp.checkpoint import iter_tensors, read_config
from glmapp.gguf_export import CHAT_TEMPLATES, ExportError, export_gguf, gguf_name, read_back
from glmapp.tokenizer import ChatGLMTokenizer


def _fields(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items()}


def _ours(path):
    return {gguf_name(k): v.float().numpy() for k, v in iter_tensors(path) if gguf_name(k) is not None}


def _block_error_bound(w: np.ndarray, type_: str) -> np.ndarray:
    """Per value, from the block's step (amax/127 for Q8_0, amax/8 for Q4_0): Q8_0 rounds to half a step (plus
    the fp16 scale's error); Q4_0's levels run -8..7 steps, so the side opposite the largest value clips by a step."""
    blocks = w.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / (127 if type_ == "q8_0" else 8)
    factor = 0.6 if type_ == "q8_0" else 1.1
    return np.broadcast_to(factor * step, blocks.shape).reshape(w.shape) + 1e-7


@pytest.mark.parametrize("type_", ["f32", "bf16", "f16", "q8_0", "q4_0"])
def test_exported_tensors_equal_ours_within_their_type(demo_v2, tmp_path, type_):
    out = export_gguf(demo_v2, tmp_path / "m.gguf", type_).path
    ours, theirs = _ours(demo_v2), read_back(out)
    config = read_config(demo_v2)
    assert set(theirs) == set(ours) and len(theirs) == 3 + 7 * config.num_layers
    reader, _ = _fields(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for name, w in ours.items():
        got = theirs[name]
        assert got.shape == w.shape, name
        if w.ndim == 1:
            assert types[name] == "F32"
            np.testing.assert_array_equal(got, w)
        elif type_ == "f32":
            np.testing.assert_array_equal(got, w)
        elif type_ in ("bf16", "f16"):
            dtype = torch.bfloat16 if type_ == "bf16" else torch.float16
            np.testing.assert_array_equal(got, torch.from_numpy(w).to(dtype).float().numpy())
        else:
            assert types[name] == type_.upper()
            bound = _block_error_bound(w, type_)
            assert (np.abs(got - w) <= bound).all(), name
            assert not np.array_equal(got, w)  # really quantized


def test_metadata_is_llama_cpp_chatglm(demo_v2, tmp_path):
    out = export_gguf(demo_v2, tmp_path / "m.gguf", "q8_0").path
    _, f = _fields(out)
    c = read_config(demo_v2)
    assert f["general.architecture"] == "chatglm"
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert f["chatglm.block_count"] == c.num_layers
    assert f["chatglm.embedding_length"] == c.hidden_size
    assert f["chatglm.feed_forward_length"] == c.ffn_hidden_size
    assert f["chatglm.attention.head_count"] == c.num_attention_heads
    assert f["chatglm.attention.head_count_kv"] == c.multi_query_group_num == 2
    assert f["chatglm.attention.key_length"] == c.kv_channels
    assert f["chatglm.rope.dimension_count"] == c.kv_channels // 2  # spec §3a: half of each head rotates
    assert f["chatglm.rope.freq_base"] == 10000.0
    assert f["chatglm.context_length"] == c.seq_length
    assert f["chatglm.attention.layer_norm_rms_epsilon"] == pytest.approx(c.layernorm_epsilon)
    assert f["tokenizer.ggml.add_bos_token"] is False


def test_ffn_up_keeps_gate_first_and_qkv_keeps_its_rows(demo_v2, tmp_path):
    out = export_gguf(demo_v2, tmp_path / "m.gguf", "f32").path
    theirs = read_back(out)
    state = dict(iter_tensors(demo_v2))
    gate_up = state["transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"].float().numpy()
    # [gate; up] as stored: llama.cpp's SwiGLU gates with the first half, as ChatGLM does (spec §3.10)
    np.testing.assert_array_equal(theirs["blk.1.ffn_up.weight"], gate_up)
    qkv_bias = state["transformer.encoder.layers.0.self_attention.query_key_value.bias"].float().numpy()
    np.testing.assert_array_equal(theirs["blk.0.attn_qkv.bias"], qkv_bias)


@pytest.mark.parametrize("fixture", ["demo_v2", "demo_v3"])
def test_vocabulary_matches_our_tokenizer(request, tmp_path, fixture):
    path = request.getfixturevalue(fixture)
    tok = ChatGLMTokenizer.from_pretrained(path)
    out = export_gguf(path, tmp_path / "m.gguf", "q4_0").path
    reader, f = _fields(out)
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    n = read_config(path).padded_vocab_size
    assert len(tokens) == len(scores) == len(types) == n == reader.get_tensor(0).shape[-1]
    assert f["tokenizer.ggml.model"] == "llama"
    for i in range(tok.sp_vocab_size):
        assert tokens[i] == tok.sp.id_to_piece(i)
        assert scores[i] == pytest.approx(tok.sp.get_score(i))
    assert types[tok.sp.piece_to_id("<0x0A>")] == int(gguf.TokenType.BYTE)
    assert types[0] == int(gguf.TokenType.UNKNOWN)
    for name, i in tok.special_tokens.items():
        clash = tok.sp.piece_to_id(name) != 0  # the demo vocab has a piece "eop": the special becomes "<eop>"
        assert tokens[i] == (f"<{name}>" if clash else name) and types[i] == int(gguf.TokenType.CONTROL)
    assert len(set(tokens)) == len(tokens)  # llama.cpp refuses a vocabulary with a text twice
    assert all(types[i] == int(gguf.TokenType.UNUSED) for i in range(tok.vocab_size, n))
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    if tok.family == "chatglm3":
        assert f["tokenizer.ggml.eot_token_id"] == tok.special_tokens["<|user|>"]
    else:
        assert "tokenizer.ggml.eot_token_id" not in f
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATES[tok.family]


def test_chat_templates_render_our_prompt_text():
    jinja2 = pytest.importorskip("jinja2")
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗨"},
                {"role": "user", "content": "再见"}]
    env = jinja2.Environment()
    v2 = env.from_string(CHAT_TEMPLATES["chatglm2"]).render(messages=messages, add_generation_prompt=True)
    assert v2 == "[gMASK]sop[Round 1]\n\n问：你好\n\n答：嗨\n\n[Round 2]\n\n问：再见\n\n答："
    v3 = env.from_string(CHAT_TEMPLATES["chatglm3"]).render(messages=messages, add_generation_prompt=True)
    assert v3 == "[gMASK]sop<|user|>\n 你好<|assistant|>\n 嗨<|user|>\n 再见<|assistant|>"
    # llama.cpp's built-in detection must not take the v2 template for ChatGLM3's
    assert "[gMASK]sop" not in CHAT_TEMPLATES["chatglm2"] and "[gMASK]sop" in CHAT_TEMPLATES["chatglm3"]
    assert "<|user|>" not in CHAT_TEMPLATES["chatglm3"]


def test_output_type_overrides_the_output_layer_only(demo_v2, tmp_path):
    out = export_gguf(demo_v2, tmp_path / "m.gguf", "q4_0", output_type="bf16").path
    reader, _ = _fields(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output.weight"] == "BF16"
    assert types["token_embd.weight"] == types["blk.0.ffn_up.weight"] == "Q4_0"


def test_adapter_is_merged_into_the_export(demo_v2, peft_adapters_dir, tmp_path):
    from glmapp.adapters import export_merged

    base = read_back(export_gguf(demo_v2, tmp_path / "base.gguf", "f32").path)
    merged_gguf = read_back(export_gguf(demo_v2, tmp_path / "lora.gguf", "f32", adapter="qkv",
                                        adapters_dir=peft_adapters_dir).path)
    merged = export_merged(str(demo_v2), "qkv", tmp_path / "merged", peft_adapters_dir)  # as `glmapp merge` does
    ours = _ours(merged)
    name = "blk.0.attn_qkv.weight"
    assert not np.allclose(merged_gguf[name], base[name])
    np.testing.assert_array_equal(merged_gguf[name], ours[name])
    np.testing.assert_array_equal(merged_gguf["blk.0.ffn_up.weight"], base["blk.0.ffn_up.weight"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".glmapp")] == []  # the merged copy is gone


def test_v1_is_refused_with_a_clear_message(make_checkpoint, tmp_path):
    v1 = make_checkpoint("chatglm1")
    with pytest.raises(ExportError, match=r"ChatGLM-6B \(v1\).*llama\.cpp"):
        export_gguf(v1, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_bad_type_and_unwritable_out_are_clear_errors(demo_v2, tmp_path):
    with pytest.raises(ExportError, match="Unknown GGUF type 'q5_k'.*q8_0"):
        export_gguf(demo_v2, tmp_path / "m.gguf", "q5_k")
    with pytest.raises(ExportError, match="does not exist"):
        export_gguf(demo_v2, tmp_path / "missing" / "m.gguf")
    with pytest.raises(ExportError, match="is a folder"):
        export_gguf(demo_v2, tmp_path)
    (tmp_path / "busy.gguf.part").mkdir()  # the file's temporary name is taken by a folder: the write fails
    with pytest.raises(ExportError, match="Cannot write .*busy.gguf"):
        export_gguf(demo_v2, tmp_path / "busy.gguf")
    assert not (tmp_path / "busy.gguf").exists()


def test_cli_export_gguf(demo_v3, tmp_path, capsys):
    from glmapp.cli import main

    out = tmp_path / "v3.gguf"
    assert main(["export-gguf", "--model", str(demo_v3), "--out", str(out), "--type", "q8_0"]) == 0
    assert "Wrote" in capsys.readouterr().out
    _, f = _fields(out)
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert main(["export-gguf", "--model", str(demo_v3), "--out", str(tmp_path / "no" / "x.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    config = json.loads((demo_v3 / "config.json").read_text())
    assert config["model_type"] == "chatglm"


def test_prequantized_checkpoint_is_refused(demo_v2, tmp_path):
    from glmapp.checkpoint import write_int4_checkpoint

    int4 = write_int4_checkpoint(demo_v2, tmp_path / "int4")
    with pytest.raises(ExportError, match="pre-quantized.*full-precision"):
        export_gguf(int4, tmp_path / "m.gguf", "q4_0")


def test_tensor_types_norms_f32_and_unblockable_rows_stay_float():
    from glmapp.gguf_export import tensor_type

    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0", None) == "f32"
    assert tensor_type("blk.0.ffn_down.weight", (64, 160), "q8_0", None) == "q8_0"
    assert tensor_type("blk.0.ffn_down.weight", (64, 100), "q8_0", None) == "bf16"  # 100 values: no 32-blocks
    assert tensor_type("output.weight", (4032, 64), "q4_0", "f16") == "f16"
    assert tensor_type("token_embd.weight", (4032, 64), "q4_0", "f16") == "q4_0"
