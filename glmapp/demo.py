"""Builds small ChatGLM checkpoints in exactly the official on-disk layout (random weights).

What is written: config.json (official keys), tokenizer.model (SentencePiece trained on the
corpus in assets/corpus with the official special-token layout), tokenizer_config.json, and
weights as safetensors shards + index (default), one safetensors file, or pytorch_model .bin
shards + index. Same arguments give byte-identical files.
ChatGLM-6B (v1, `family="chatglm1"`) gets its own layout: the v1 config keys, `ice_text.model` (a v1-style
tokenizer, see `glmapp.tokenizer.train_demo_tokenizer_v1`), 368-style tensor names with LayerNorm weights in fp32
as in the official file (spec §2.3) and `lm_head.weight` equal to the embedding (tied).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from glmapp.choices import DEMO_FORMATS
from glmapp.checkpoint import write_weights
from glmapp.paths import cache_root
from glmapp.errors import CheckpointError
from glmapp.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration
from glmapp.models.chatglm1 import RESIDUAL_ALPHA, ChatGLM1Config, ChatGLM1ForConditionalGeneration
from glmapp.tokenizer import V1_VOCAB_FILE, ChatGLM1Tokenizer, train_demo_tokenizer, train_demo_tokenizer_v1

CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"
FORMATS = DEMO_FORMATS
# name -> network shape; the tokenizer decides the vocabulary.
SIZES = {
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, ffn_hidden_size=160),
    "small": dict(num_layers=4, hidden_size=256, num_attention_heads=8, kv_channels=32, ffn_hidden_size=688),
    "mid": dict(num_layers=12, hidden_size=1024, num_attention_heads=16, kv_channels=64, ffn_hidden_size=2816),
}
TOKENIZER_VOCAB = 4000


def demo_config(family: str, size: str, sp_vocab: int) -> dict:
    """config.json content with the official keys (spec §1) around a small network."""
    if family not in ("chatglm1", "chatglm2", "chatglm3"):
        raise CheckpointError(f"Unknown family {family!r}: use chatglm1, chatglm2 or chatglm3.")
    if size not in SIZES:
        raise CheckpointError(f"Unknown demo size {size!r}: use one of {', '.join(SIZES)}.")
    padded = (sp_vocab + 9 + 63) // 64 * 64  # room for the 5 (v2) / 9 (v3) special tokens
    return {
        "_name_or_path": f"glmapp/{family}-demo-{size}",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "eos_token_id": 2,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "original_rope": True,
        "pad_token_id": 0,
        "padded_vocab_size": padded,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 8192 if family == "chatglm3" else 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.30.2",
        "use_cache": True,
        "glmapp_demo": True,
        **SIZES[size],
    }


def demo_config_v1(size: str, tokenizer: ChatGLM1Tokenizer) -> dict:
    """config.json of a v1 demo with the official v1 keys (spec §1); special ids from the demo tokenizer."""
    if size not in SIZES:
        raise CheckpointError(f"Unknown demo size {size!r}: use one of {', '.join(SIZES)}.")
    shape = SIZES[size]
    return {
        "_name_or_path": f"glmapp/chatglm1-demo-{size}",
        "architectures": ["ChatGLMModel"],
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "gmask_token_id": tokenizer.gmask_token_id,
        "hidden_size": shape["hidden_size"],
        "inner_hidden_size": 4 * shape["hidden_size"],
        "layernorm_epsilon": 1e-05,
        "mask_token_id": tokenizer.mask_token_id,
        "max_sequence_length": 2048,
        "model_type": "chatglm",
        "num_attention_heads": shape["num_attention_heads"],
        "num_layers": shape["num_layers"],
        "pad_token_id": tokenizer.pad_token_id,
        "position_encoding_2d": True,
        "torch_dtype": "float16",
        "transformers_version": "4.27.1",
        "use_cache": True,
        "vocab_size": (tokenizer.sp_vocab_size + 63) // 64 * 64,
        "glmapp_demo": True,
    }


def random_state_dict(config: ChatGLMConfig | ChatGLM1Config, seed: int, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Deterministic random weights with the official names and shapes (norms 1, biases small).

    v1: LayerNorm tensors stay fp32 as in the official file, and `lm_head.weight` is the embedding (tied)."""
    v1 = isinstance(config, ChatGLM1Config)
    with torch.device("meta"):
        skeleton = (ChatGLM1ForConditionalGeneration if v1 else ChatGLMForConditionalGeneration)(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in skeleton.state_dict().items():
        if name.endswith("inv_freq"):
            t = skeleton.get_submodule(name.removesuffix(".inv_freq")).compute_inv_freq(torch.device("cpu"))
        elif name == "lm_head.weight" and v1:
            state[name] = state["transformer.word_embeddings.weight"]
            continue
        elif "layernorm" in name:
            t = torch.ones(meta.shape) if name.endswith("weight") else torch.zeros(meta.shape)
        else:
            std = 0.02 if name.endswith("weight") else 0.01
            if v1 and name.endswith("weight") and "word_embeddings" not in name:
                # v1 adds alpha * LN(x) (alpha ~ 7.5) around every block and ties lm_head to the embedding: with
                # small random linears a demo only echoes its last token. Weights of this size let the layers count.
                std = (RESIDUAL_ALPHA / config.hidden_size) ** 0.5
            t = torch.randn(meta.shape, generator=gen) * std
        keep_fp32 = v1 and "layernorm" in name
        state[name] = t.to(torch.float32 if keep_fp32 else dtype).contiguous()
    return state


def make_demo(out: str | os.PathLike, family: str = "chatglm2", size: str = "tiny",
              fmt: str = "safetensors-sharded", seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a demo checkpoint to `out` and return its path."""
    out = Path(out)
    if family == "chatglm1":
        return _make_demo_v1(out, size, fmt, seed, dtype)
    config_dict = demo_config(family, size, TOKENIZER_VOCAB)  # validates family/size before any work
    out.mkdir(parents=True, exist_ok=True)
    train_demo_tokenizer(CORPUS_DIR, out / "tokenizer.model", vocab_size=TOKENIZER_VOCAB)
    import sentencepiece as spm

    sp_vocab = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()
    config_dict = demo_config(family, size, sp_vocab)
    config_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, ensure_ascii=False) + "\n")
    tok_cfg = {
        "name_or_path": config_dict["_name_or_path"],
        "remove_space": False,
        "do_lower_case": False,
        "padding_side": "left",
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    cfg = ChatGLMConfig(**{**config_dict, "family": family})
    write_weights(random_state_dict(cfg, seed, dtype), out, fmt)
    return out


def _make_demo_v1(out: Path, size: str, fmt: str, seed: int, dtype: torch.dtype) -> Path:
    if size not in SIZES:
        raise CheckpointError(f"Unknown demo size {size!r}: use one of {', '.join(SIZES)}.")
    out.mkdir(parents=True, exist_ok=True)
    train_demo_tokenizer_v1(CORPUS_DIR, out / V1_VOCAB_FILE, vocab_size=TOKENIZER_VOCAB)
    tokenizer = ChatGLM1Tokenizer(out / V1_VOCAB_FILE)
    config_dict = demo_config_v1(size, tokenizer)
    config_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, ensure_ascii=False) + "\n")
    tok_cfg = {  # the official chatglm-6b tokenizer_config.json keys
        "name_or_path": config_dict["_name_or_path"],
        "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>", "gmask_token": "[gMASK]",
        "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
        "remove_space": False, "do_lower_case": False, "num_image_tokens": 0, "padding_side": "left",
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    state = random_state_dict(ChatGLM1Config(**config_dict), seed, dtype)
    # safetensors refuses tensors that share memory: the tied lm_head is written as its own copy, as in the file.
    state["lm_head.weight"] = state["lm_head.weight"].clone()
    write_weights(state, out, fmt)
    return out


def default_demo_dir(family: str = "chatglm2") -> Path:
    return cache_root() / f"{family}-demo-tiny"


def ensure_demo(family: str = "chatglm2") -> Path:
    """The demo checkpoint the app falls back to, built once into the glmapp cache folder."""
    path = default_demo_dir(family)
    if not (path / "model.safetensors.index.json").is_file():
        make_demo(path, family=family)
    return path
