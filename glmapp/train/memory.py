"""How much memory a training job needs, and whether it fits in what is free beside the served model.

Notable choices:
- Counted from config.json and the settings alone (no weights read): the base weights in the chosen
  quantization, the LoRA matrices with their gradients and AdamW states (fp32: 16 bytes per parameter),
  and the activations autograd keeps for one micro-batch of `batch_size` rows of `max_length` tokens.
- Activations per token and layer are the tensors our layers save for backward (norm inputs and outputs,
  q/k/v and the attention output, the MLP's gate/up products, the LoRA inputs and dropout masks), in the
  activation dtype; attention runs through SDPA's flash/memory-efficient kernels, so no [t, t] scores.
  With gradient checkpointing a layer keeps only its input and one layer is recomputed at a time. The
  logits and the loss's fp32 log-softmax and gradients (about 14-16 bytes per vocabulary entry per token)
  are counted apart: with a small model and a large vocabulary they are most of it.
- `overhead` is the process itself (Python, torch, the CUDA context), not measured per machine.
- On CPU the figure is what the job holds under tcmalloc, which training jobs use when the system has it
  (`glmapp.allocator`); under glibc's malloc a job can hold up to three times as much, and the check says so.
- What is free: on CPU the available RAM (psutil), on CUDA the device's free memory (the served model and
  its KV cache already hold theirs). The check leaves 10% of it as headroom.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glmapp.errors import GlmappError
from glmapp.train.config import TrainConfig

GB = 2 ** 30
HEADROOM = 0.9  # share of the free memory a job may plan to use
OVERHEAD = {"cpu": 0.5 * GB, "cuda": 0.75 * GB}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes per weight of the quantized layer linears (bnb-nf4: 4 bits + an fp32 absmax per 64 weights).
_QUANT_BYTES = {"int8": 1.0, "int4": 0.5, "bnb-int8": 1.0, "bnb-nf4": 0.5 + 4 / 64}


class TrainMemoryError(GlmappError):
    """A training job would not fit in the memory that is free: the estimate and what to change."""


def gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


@dataclass
class MemoryEstimate:
    device: str  # "cpu" or "cuda"
    weights: int
    adapter: int  # LoRA weights + gradients + AdamW states
    activations: int
    overhead: int
    tokens: str  # "batch 4 × 1024 tokens"

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.overhead

    def describe(self, quant: str, dtype: str) -> str:
        base = f"in {quant}" if quant != "none" else f"in {dtype}"
        return (f"about {gb(self.total)} (weights {gb(self.weights)} {base}, adapter and optimizer "
                f"{gb(self.adapter)}, activations {gb(self.activations)} at {self.tokens}, process "
                f"{gb(self.overhead)})")


def _shape(model_config) -> dict:
    c = model_config
    qkv = c.kv_channels * (c.num_attention_heads + 2 * c.num_kv_groups)
    return {"H": c.hidden_size, "F": c.ffn_hidden_size, "L": c.num_layers, "V": c.padded_vocab_size,
            "qkv": qkv, "attn": c.num_attention_heads * c.kv_channels, "kv": 2 * c.num_kv_groups * c.kv_channels,
            "tied": bool(getattr(c, "tie_word_embeddings", False))}


def _linears(s: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of one layer, by its checkpoint name."""
    return {"query_key_value": (s["H"], s["qkv"]), "dense": (s["attn"], s["H"]),
            "dense_h_to_4h": (s["H"], 2 * s["F"]), "dense_4h_to_h": (s["F"], s["H"])}


def estimate(config: TrainConfig, model_config, device: str, dtype: str, checkpointing: bool) -> MemoryEstimate:
    """The memory `config` needs on `device` ("cpu"/"cuda") with activations in `dtype` (a DTYPES name)."""
    s = _shape(model_config)
    a = _DTYPE_BYTES[dtype]
    linears = _linears(s)
    layer_linear = sum(i * o for i, o in linears.values()) + s["qkv"]  # + the qkv bias
    other = (1 if s["tied"] else 2) * s["V"] * s["H"] + (2 * s["L"] + 1) * s["H"]
    per_weight = _QUANT_BYTES.get(config.quant, a)
    scales = 0 if config.quant == "none" else s["L"] * sum(o for _, o in linears.values()) * a
    weights = int(s["L"] * layer_linear * per_weight + scales + other * a)

    targets = config.target_modules()
    adapter = 16 * s["L"] * config.rank * sum(sum(linears[t]) for t in targets)

    tokens = config.batch_size * config.max_length
    # Saved for backward, elements per token in one layer: two RMSNorms (input and output each), q/k/v and
    # rotary q/k, SDPA's q, k, v and output, the MLP's gate, up, silu(gate) and product, and for each LoRA
    # target its input after dropout plus the dropout mask.
    per_layer = (4 * s["H"] + s["qkv"] + (s["qkv"] - s["kv"] // 2) + s["qkv"] + s["attn"] + 2 * s["F"] + 3 * s["F"]
                 + sum(2 * linears[t][0] for t in targets))
    layers = (s["L"] * s["H"] + per_layer) if checkpointing else s["L"] * per_layer
    logits = tokens * s["V"] * (a + 12)  # logits, the loss's fp32 shifted copy and log-softmax, one gradient
    activations = int(tokens * (layers + 2 * s["H"]) * a + logits)
    return MemoryEstimate(device, weights, int(adapter), activations, int(OVERHEAD[device]),
                          f"batch {config.batch_size} × {config.max_length} tokens")


def free_memory(device) -> int:
    """Bytes free for a new process: available RAM on CPU, the device's free memory on CUDA."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check(config: TrainConfig, model_folder) -> str:
    """Raise TrainMemoryError when the job `config` describes will not fit beside what runs here; else a line
    saying what it needs of what is free. `model_folder`: the local folder of `config.model` (its config.json)."""
    from glmapp.allocator import tcmalloc_path
    from glmapp.checkpoint import read_config, resolve_device
    from glmapp.train.run import model_dtype

    device = resolve_device(None if config.device == "auto" else config.device)
    model_config = read_config(Path(model_folder))
    if not hasattr(model_config, "ffn_hidden_size"):
        return ""  # ChatGLM-6B v1: training refuses it with its own message
    checkpointing = config.gradient_checkpointing if config.gradient_checkpointing is not None \
        else device.type == "cuda"
    dtype = model_dtype(config, device)
    need = estimate(config, model_config, device.type, dtype, checkpointing)
    free = free_memory(device)
    where = "of RAM is available" if device.type == "cpu" else f"is free on {device}"
    glibc = "" if device.type != "cpu" or tcmalloc_path() else (
        " (with glibc's malloc a CPU job can hold up to three times this; install libtcmalloc-minimal4)")
    if need.total <= free * HEADROOM:
        return f"Needs {need.describe(config.quant, dtype)}{glibc}; {gb(free)} {where}."
    advice = []
    if need.activations >= need.weights:
        advice.append("a smaller batch size (raise grad accumulation to keep the same global batch)")
        advice.append("a shorter max length")
        if not checkpointing:
            advice.append("gradient checkpointing (glmapp train --gradient-checkpointing)")
    if config.quant in ("none", "int8", "bnb-int8"):
        advice.append("a 4-bit base (quant int4 or bnb-nf4)")
    advice.append("stopping the chat server and training from the command line")
    raise TrainMemoryError(f"This job needs {need.describe(config.quant, dtype)}{glibc}, but only {gb(free)} {where} "
                           f"beside the served model. Try {'; '.join(advice)}.")
