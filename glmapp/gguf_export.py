"""`glmapp export-gguf`: a ChatGLM2/ChatGLM3 checkpoint -> one GGUF file for llama.cpp's `chatglm` architecture.

Notable choices:
- The file format and the block quantizers (Q8_0, Q4_0, BF16) are the `gguf` package's (the one llama.cpp
  maintains); this module only decides names, types and metadata.
- Names and shapes are the ones llama.cpp's chatglm loader asks for: `token_embd`, `blk.N.attn_qkv` (weight and
  bias, our fused Q|K|V row order unchanged), `blk.N.attn_output`, `blk.N.ffn_up` (the fused gate|up of
  `dense_h_to_4h`, gate first as in llama.cpp's SwiGLU), `blk.N.ffn_down`, `output_norm`, `output`. The
  `inv_freq` buffer is not written (llama.cpp computes its own rotary table).
- Rotary: llama.cpp rotates `rope.dimension_count` = kv_channels / 2 dims with interleaved pairs, as ChatGLM
  (spec §3a). chatglm3-32k scales the base by rope_ratio; chatglm2-32k divides positions by it (linear scaling).
- Norms and biases stay f32 (llama.cpp's rule); a tensor whose rows do not split into 32-value blocks is written
  in the float type instead of Q8_0/Q4_0.
- The vocabulary is the SentencePiece model plus ChatGLM's special ids appended after it (spec §5.1), padded to
  the embedding's rows with unused `[PADn]` tokens; no bos is added (every prompt starts with `[gMASK] sop`).
- ChatGLM-6B (v1) is refused: llama.cpp has no architecture for its 2-D rotary and prefix-LM mask.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from glmapp.errors import CheckpointError, GlmappError

if TYPE_CHECKING:  # numpy and torch load when an export runs, not when the CLI builds its parser
    import numpy as np
    import torch


class ExportError(GlmappError):
    """A GGUF export that cannot be made as asked (bad type, unsupported model, unwritable output)."""


ARCH = "chatglm"
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # values per Q8_0 / Q4_0 block
# our layer suffix -> llama.cpp tensor name (inside blk.N.)
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attention.query_key_value.weight": "attn_qkv.weight",
    "self_attention.query_key_value.bias": "attn_qkv.bias",
    "self_attention.dense.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.dense_h_to_4h.weight": "ffn_up.weight",
    "mlp.dense_4h_to_h.weight": "ffn_down.weight",
}
TOP_NAMES = {
    "transformer.embedding.word_embeddings.weight": "token_embd.weight",
    "transformer.encoder.final_layernorm.weight": "output_norm.weight",
    "transformer.output_layer.weight": "output.weight",
}
LAYER_PREFIX = "transformer.encoder.layers."
# Chat templates (Jinja, the form llama.cpp and its bindings read from tokenizer.chat_template) written from the
# prompt formats in glmapp.prompts. The v3 one names roles through a variable, so llama.cpp's built-in template
# detection (which looks for the literal "[gMASK]sop" and no literal "<|user|>") takes it for ChatGLM3's; the v2 one
# spells the prefix in two pieces so that detection does not take it for ChatGLM3's too.
CHAT_TEMPLATES = {
    "chatglm2": ("{{ '[gMASK]' ~ 'sop' }}{% set ns = namespace(i=1) %}"
                 "{% for m in messages %}{% if m['role'] == 'user' %}"
                 "{{ '[Round ' ~ ns.i ~ ']\n\n问：' ~ m['content'] ~ '\n\n答：' }}"
                 "{% elif m['role'] == 'assistant' %}{{ m['content'] ~ '\n\n' }}{% set ns.i = ns.i + 1 %}"
                 "{% endif %}{% endfor %}"),
    "chatglm3": ("[gMASK]sop{% for m in messages %}<|{{ m['role'] }}|>\n {{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}"),
}


@dataclass
class ExportResult:
    path: Path
    type: str
    tensors: int
    bytes: int


def _qtypes():
    import gguf

    Q = gguf.GGMLQuantizationType
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}


def _file_type(type_: str):
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[type_]


def gguf_name(name: str) -> str | None:
    """Our (official) tensor name -> llama.cpp's, or None for tensors the file does not carry."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    if name.startswith(LAYER_PREFIX):
        index, _, suffix = name[len(LAYER_PREFIX):].partition(".")
        if suffix in LAYER_NAMES:
            return f"blk.{int(index)}.{LAYER_NAMES[suffix]}"
    if name.endswith("rotary_pos_emb.inv_freq"):
        return None
    raise ExportError(f"Tensor {name!r} has no place in llama.cpp's chatglm architecture (a P-tuning prefix or a "
                      f"classifier head?); export the base model.")


def tensor_type(gguf_tensor: str, shape: tuple[int, ...], type_: str, output_type: str | None) -> str:
    """The GGUF type of one tensor: f32 for 1-D (norms, biases), the float type where blocks do not fit."""
    if len(shape) == 1:
        return "f32"
    wanted = (output_type or type_) if gguf_tensor == "output.weight" else type_
    if wanted in ("q8_0", "q4_0") and shape[-1] % BLOCK:
        return "bf16"
    return wanted


def _encoded_info(shape: tuple[int, ...], type_: str):
    """(shape, numpy dtype, bytes, GGML type) of `encode_tensor`'s result, known before encoding."""
    import gguf
    import numpy as np

    qtype = _qtypes()[type_]
    values = int(np.prod(shape))
    if type_ in ("f32", "f16"):
        dtype = np.float32 if type_ == "f32" else np.float16
        return shape, np.dtype(dtype), values * np.dtype(dtype).itemsize, qtype
    byte_shape = tuple(gguf.quants.quant_shape_to_byte_shape(shape, qtype))
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype


def encode_tensor(t: torch.Tensor, type_: str) -> np.ndarray:
    """A float tensor -> the array (float or block bytes) the gguf writer stores for `type_`."""
    import gguf
    import numpy as np
    import torch

    data = t.detach().to(torch.float32).cpu().numpy()
    if type_ == "f32":
        return data
    if type_ == "f16":
        return data.astype(np.float16)
    return gguf.quants.quantize(data, _qtypes()[type_])


def vocabulary(tokenizer, n_vocab: int):
    """(tokens as bytes, scores, token types) for ids 0..n_vocab-1 of a ChatGLM2/3 tokenizer."""
    import gguf

    T = gguf.TokenType
    sp = tokenizer.sp
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        if i < tokenizer.sp_vocab_size:
            piece, score = sp.id_to_piece(i), sp.get_score(i)
            kind = (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i)
                    else T.UNUSED if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL)
        elif i in tokenizer.id_to_special:
            piece, score, kind = tokenizer.id_to_special[i], 0.0, T.CONTROL
            if sp.piece_to_id(piece) != sp.unk_id():  # llama.cpp needs unique texts; a small vocab may hold "eop"
                piece = f"<{piece}>"
        else:  # embedding rows past the tokenizer (65024 vs 64798 in the official models)
            piece, score, kind = f"[PAD{i}]", 0.0, T.UNUSED
        tokens.append(piece.encode("utf-8"))
        scores.append(float(score))
        types.append(int(kind))
    return tokens, scores, types


def _check_model(path: Path):
    from glmapp.checkpoint import read_config

    config = read_config(path)
    if config.family == "chatglm1":
        raise ExportError("ChatGLM-6B (v1) cannot be exported to GGUF: llama.cpp's chatglm architecture runs "
                          "ChatGLM2/ChatGLM3 only (v1's 2-D rotary, prefix-LM mask and GELU MLP have no "
                          "llama.cpp implementation). Use a ChatGLM2-6B or ChatGLM3-6B checkpoint.")
    if config.quantization_bit:
        raise ExportError(f"{path.name!r} is stored pre-quantized (quantization_bit={config.quantization_bit}); "
                          "export from the full-precision checkpoint and pick --type q8_0 or q4_0.")
    if config.kv_channels * config.num_attention_heads != config.hidden_size:
        raise ExportError(f"llama.cpp's chatglm needs num_attention_heads x kv_channels = hidden_size; this model "
                          f"has {config.num_attention_heads} x {config.kv_channels} != {config.hidden_size}.")
    return config


def _metadata(writer, config, tokenizer, name: str, type_: str) -> None:
    import gguf

    heads = config.num_attention_heads
    kv_heads = config.multi_query_group_num if config.multi_query_attention else heads
    writer.add_name(name)
    writer.add_context_length(int(config.seq_length))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.ffn_hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(config.kv_channels)
    writer.add_value_length(config.kv_channels)
    writer.add_layer_norm_rms_eps(float(config.layernorm_epsilon))
    writer.add_rope_dimension_count(config.kv_channels // 2)
    ratio = float(getattr(config, "rope_ratio", None) or 1.0)
    if ratio != 1.0 and config.family == "chatglm2":  # chatglm2-32k: positions / ratio (spec §3a)
        writer.add_rope_freq_base(10000.0)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(ratio)
    else:  # chatglm3-*-32k scales the base
        writer.add_rope_freq_base(10000.0 * ratio)
    writer.add_file_type(_file_type(type_))

    tokens, scores, types = vocabulary(tokenizer, config.padded_vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("chatglm-spm")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if config.family == "chatglm3":  # a reply ends where the next user turn would start
        writer.add_eot_token_id(tokenizer.special_tokens["<|user|>"])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATES[config.family])


def export_gguf(model: str | Path, out: str | Path, type_: str = "bf16", output_type: str | None = None,
                adapter: str | None = None, adapters_dir: str | Path = "adapters") -> ExportResult:
    """Write `model` (a ChatGLM2/3 checkpoint folder or hub id; with `adapter` merged in) as a GGUF file.

    `type_`: f32, f16, bf16, q8_0 or q4_0 for the 2-D weights; `output_type` overrides it for the output layer
    (e.g. q4_0 weights with a bf16 output layer)."""
    for t in (type_, output_type):
        if t is not None and t not in TYPES:
            raise ExportError(f"Unknown GGUF type {t!r}: use one of {', '.join(TYPES)}.")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name such as {out / 'model.gguf'}.")
    if not out.parent.is_dir():
        raise ExportError(f"Cannot write {out}: its folder {out.parent} does not exist.")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ExportError("GGUF export needs the `gguf` package: pip install gguf") from None
    from glmapp.checkpoint import resolve

    src = resolve(str(model)).path
    if adapter is not None:
        _check_model(src)
        # The merged checkpoint `glmapp merge` would write (the base's dtype), next to the output: at 6B it is
        # 12 GB, and the output's folder is where the user made room.
        with tempfile.TemporaryDirectory(prefix=".glmapp-gguf-merge-", dir=out.parent) as tmp:
            from glmapp.adapters import export_merged

            merged = export_merged(str(src), adapter, Path(tmp) / "merged", adapters_dir)
            return _export(merged, out, type_, output_type, name=f"{src.name}+{Path(adapter).name}")
    return _export(src, out, type_, output_type, name=src.name)


def _export(src: Path, out: Path, type_: str, output_type: str | None, name: str) -> ExportResult:
    import gguf

    from glmapp.checkpoint import iter_tensors
    from glmapp.tokenizer import ChatGLMTokenizer

    config = _check_model(src)
    tokenizer = ChatGLMTokenizer.from_pretrained(src, family=config.family)
    # Two passes over the checkpoint, so that one tensor at a time is in memory (the writer would otherwise hold
    # them all until the end): the first plans names, shapes and types in the checkpoint's order, the second
    # encodes and writes each tensor in that same order.
    plan = [(key, target, tuple(t.shape), tensor_type(target, tuple(t.shape), type_, output_type))
            for key, t in iter_tensors(src) if (target := gguf_name(key)) is not None]
    count, expected = len(plan), 3 + 7 * config.num_layers
    if count != expected:
        raise CheckpointError(f"{src.name!r} gave {count} tensors for GGUF, expected {expected} "
                              f"({config.num_layers} layers); is the checkpoint complete?")
    tmp = out.with_name(out.name + ".part")  # the file appears under its name only when complete
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        _metadata(writer, config, tokenizer, name, type_)
        for _, target, shape, kind in plan:
            writer.add_tensor_info(target, *_encoded_info(shape, kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        todo = iter(plan)
        for key, tensor in iter_tensors(src):
            if gguf_name(key) is None:
                continue
            planned, _, shape, kind = next(todo)
            if key != planned or tuple(tensor.shape) != shape:
                raise CheckpointError(f"{src.name!r} changed while it was exported ({key!r} where {planned!r} "
                                      "was read before); export again.")
            writer.write_tensor_data(encode_tensor(tensor, kind))
        writer.close()
        tmp.replace(out)
    except OSError as e:
        raise ExportError(f"Cannot write {out}: {e.strerror or e}.") from None
    finally:
        if writer is not None:
            writer.close()  # closes what is open; nothing after a successful close
        if tmp.is_file():
            tmp.unlink()
    return ExportResult(out, type_, count, out.stat().st_size)


def read_back(path: str | Path) -> dict[str, np.ndarray]:
    """GGUF file -> {llama.cpp name: float32 array in our row-major shape} (dequantized), for checks."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    return out
