"""Weight-only quantization as module swaps: ChatGLM's own int8/int4 scheme and bitsandbytes modes.

Notable choices:
- The four encoder linears per layer (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) are
  swapped; embeddings and output_layer never are (spec §7). The model file is not touched.
- `QuantizedLinear` stores the official tensors (`weight` int8, packed two int4 per byte for int4,
  `weight_scale` per output row, `bias`), so a quantized model's state dict is the official
  `chatglm2-6b-int4` layout (spec §2.2) and that checkpoint loads as it lies on disk.
- The matmul is `glmapp.quant_kernels.linear`: a kernel per call by device, activation dtype and
  rows (CPU: ATen's packed int8/int4 kernels in bf16 at few rows, `(x @ q.T) * scale` otherwise;
  CUDA, untested here: ATen's int8 GEMV and tinygemm int4 at few rows, else dequantize + one GEMM).
  Kernel-layout copies (tinygemm's) are caches beside the module, never in its state dict.
  (THUDM's own CUDA kernels are a compiled blob loaded through cpm_kernels; we do not ship it.)
- Loading quantizes tensor by tensor as the checkpoint streams in (`QuantizingLoader`): a
  full-precision copy of one linear at most exists at a time, never the whole model.
- bitsandbytes modes reuse transformers' `BitsAndBytesConfig` for their settings and swap in
  `bnb.nn.Linear8bitLt` / `bnb.nn.Linear4bit`, quantized on the target device as each weight is read.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import logging
from collections.abc import Callable

import torch
from torch import nn

from glmapp import cpu_linear, quant_kernels
from glmapp.choices import QUANT_MODES
from glmapp.errors import CheckpointError, QuantizationError

MODES = QUANT_MODES
BITS = {"int8": 8, "int4": 4}
LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
V1_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")  # ChatGLM-6B
ALTERNATIVE = {"bnb-int8": "int8", "bnb-nf4": "int4", "int8": "bnb-int8", "int4": "bnb-nf4"}
Progress = Callable[[float, str], None]


# ---- the scheme (spec §7) ----------------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (q int8 [out, in] (8 bits) or packed [out, in/2] (4 bits), scale [out]).

    scale = max|row| / (2^(bits-1) - 1) in the weight's dtype; q = round(W / scale), half to even,
    no clamp (|W/scale| <= 2^(bits-1)-1 up to the scale's rounding, well below the next half step).
    """
    if bits not in (4, 8):
        raise QuantizationError(f"quantization bits must be 4 or 8, not {bits}.")
    scale = (weight.float().abs().amax(dim=-1) / (2 ** (bits - 1) - 1)).to(weight.dtype)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()  # all-zero row -> q = 0
    q = torch.round(weight.float() / safe[:, None]).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] with values in [-8, 7] -> [out, in/2]: column 2j in the high nibble, 2j+1 low."""
    if q.shape[-1] % 2:
        raise QuantizationError(f"int4 packing needs an even number of input columns, got {q.shape[-1]}.")
    return ((q[..., 0::2] << 4) | (q[..., 1::2] & 0x0F)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: both nibbles sign-extended by arithmetic shifts."""
    high, low = packed >> 4, (packed << 4) >> 4
    return torch.stack((high, low), dim=-1).flatten(-2)


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W ≈ q · scale[row] in `dtype` (q packed when bits == 4)."""
    q = unpack_int4(q) if bits == 4 else q
    return q.to(dtype) * scale.to(dtype)[:, None]


class QuantizedLinear(nn.Module):
    """W4A16 / W8A16 linear with the official tensor names: weight, weight_scale, bias."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = False,
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        if bits not in (4, 8) or (bits == 4 and in_features % 2):
            raise QuantizationError(f"Cannot quantize a {in_features}-column linear to {bits} bits.")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        cols = in_features // 2 if bits == 4 else in_features
        self.weight = nn.Parameter(torch.empty(out_features, cols, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self._int4_pack: quant_kernels.Int4Pack | None = None

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        module = cls(linear.in_features, linear.out_features, bits, linear.bias is not None,
                     dtype=linear.weight.dtype, device=linear.weight.device)
        q, scale = quantize_weight(linear.weight.detach(), bits)
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = quant_kernels.official_weight(self)
        return dequantize(weight, self.weight_scale, self.bits, dtype or self.weight_scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_kernels.linear(self, x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    # tinygemm's copy of the weight (quant_kernels.Int4Pack) is a cache: dropped whenever the tensors
    # may be replaced or moved, and rebuilt by the next forward that needs it. A CPU weight held in the
    # kernel's layout instead (quant_kernels.to_kernel_layout) goes back to the official bytes then.
    def drop_packed(self) -> None:
        """Free the kernel-layout copy of the weight (after writes the version counter misses)."""
        if not quant_kernels.to_official_layout(self):
            self._int4_pack = None

    def packed_bytes(self) -> int:
        return 0 if self._int4_pack is None else self._int4_pack.nbytes

    def _apply(self, fn, recurse=True):
        self.drop_packed()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        relayout = quant_kernels.in_kernel_layout(self)
        self.drop_packed()
        super()._load_from_state_dict(*args, **kwargs)
        if relayout:
            quant_kernels.to_kernel_layout(self)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if quant_kernels.in_kernel_layout(self):  # the state dict keeps the official layout
            destination[prefix + "weight"] = quant_kernels.official_weight(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class _PendingLinear(nn.Module):
    """Placeholder without tensors where a bitsandbytes linear will go once its weight is read."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias

    def forward(self, x):
        raise QuantizationError("This linear layer was never loaded (bitsandbytes placeholder).")


# ---- modes and availability -------------------------------------------------------------------------
@functools.cache
def _bnb_import_error() -> str | None:
    # Only whether it is installed: importing it costs seconds and logs about optional kernels on every
    # start, so it is imported when a bnb mode is actually loaded (`_import_bitsandbytes`).
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed; pip install bitsandbytes==0.50.2"
    return None


class _DropOptionalKernelNotice(logging.Filter):
    """bitsandbytes' CPU backend logs a warning at import when the optional `kernels` package (a faster
    4-bit CPU kernel from the hub) is absent; its own kernel is used instead, so the user has nothing to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def _import_bitsandbytes():
    """bitsandbytes, imported on first use of a bnb mode; a broken install raises QuantizationError."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelNotice())
    try:
        import bitsandbytes
    except Exception as e:  # noqa: BLE001 - a broken install raises anything; the reason is reported
        raise QuantizationError(f"bitsandbytes cannot be imported ({type(e).__name__}: {e}); "
                                f"pip install bitsandbytes==0.50.2, or use {ALTERNATIVE['bnb-int8']!r} / "
                                f"{ALTERNATIVE['bnb-nf4']!r} instead.") from None
    return bitsandbytes


def _bnb_unavailable_reason(device: torch.device) -> str | None:
    if device.type not in ("cpu", "cuda"):
        return f"bitsandbytes modes run on CPU or CUDA, not {device.type}"
    return _bnb_import_error()


def available_modes(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """mode -> None when it can run on `device`, else why not (for the UI to show next to the option)."""
    device = torch.device(device)
    bnb_reason = _bnb_unavailable_reason(device)
    return {"none": None, "int8": None, "int4": None, "bnb-int8": bnb_reason, "bnb-nf4": bnb_reason}


def resolve_mode(quant: str | None, quantization_bit: int, device: torch.device) -> str:
    """The mode to load with: `quant`, or for a pre-quantized checkpoint its own int4/int8.

    Raises QuantizationError for an unknown or unavailable mode, naming what to use instead."""
    stored = f"int{quantization_bit}" if quantization_bit else None
    mode = quant or stored or "none"
    if mode not in MODES:
        raise QuantizationError(f"Unknown quantization {mode!r}: use one of {', '.join(MODES)}.")
    if stored and mode != stored:
        raise QuantizationError(
            f"This checkpoint is stored pre-quantized as {stored} (quantization_bit={quantization_bit}) and "
            f"loads only as {stored}; for {mode!r} load the full-precision checkpoint (e.g. THUDM/chatglm2-6b).")
    reason = available_modes(device)[mode]
    if reason is not None:
        raise QuantizationError(f"Quantization {mode!r} is not available on {device}: {reason}. "
                                f"Use {ALTERNATIVE[mode]!r} instead (same memory class, no extra dependency).")
    if mode.startswith("bnb-"):
        _import_bitsandbytes()  # a broken install fails here, before any weight is read
    return mode


def bnb_config(mode: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for a bnb mode: its field names and defaults, one place."""
    from transformers import BitsAndBytesConfig

    if mode == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=True)


def bnb_linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str, device: torch.device,
               dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes linear holding `weight` quantized on `device` (bias kept in `dtype`)."""
    bnb = _import_bitsandbytes()
    cfg = bnb_config(mode, dtype)
    out_features, in_features = weight.shape
    with torch.device("meta"):
        if mode == "bnb-int8":
            module = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None,
                                         has_fp16_weights=False, threshold=cfg.llm_int8_threshold)
        else:
            module = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                                       compress_statistics=cfg.bnb_4bit_use_double_quant,
                                       quant_type=cfg.bnb_4bit_quant_type)
    w = weight.to(dtype)  # quantized from the model dtype, as from_pretrained would
    if mode == "bnb-int8":
        module.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device)
    else:
        module.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=cfg.bnb_4bit_quant_type,
                                          compress_statistics=cfg.bnb_4bit_use_double_quant,
                                          module=module).to(device)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    return module


# ---- swapping modules -------------------------------------------------------------------------------
def layer_linear_names(num_layers: int, v1: bool) -> list[str]:
    """Module paths of the quantizable linears: transformer.encoder.layers.N.<LINEARS> (v1:
    transformer.layers.N.<V1_LINEARS>)."""
    if v1:
        return [f"transformer.layers.{i}.{name}" for i in range(num_layers) for name in V1_LINEARS]
    return [f"transformer.encoder.layers.{i}.{name}" for i in range(num_layers) for name in LINEARS]


def linear_names(model: nn.Module) -> list[str]:
    """Module paths of the model's quantizable linears (`layer_linear_names`)."""
    v1 = not hasattr(model.transformer, "encoder")
    layers = model.transformer.layers if v1 else model.transformer.encoder.layers
    return layer_linear_names(len(layers), v1)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base", module)  # a LoRA wrapper keeps the quantizable module as `base`


def swap_for_loading(model: nn.Module, mode: str) -> None:
    """On a meta-device skeleton: replace the linears with empty modules of `mode` before allocation."""
    if mode == "none":
        return
    for path in linear_names(model):
        linear = model.get_submodule(path)
        has_bias = linear.bias is not None
        if mode in BITS:
            new = QuantizedLinear(linear.in_features, linear.out_features, BITS[mode], has_bias,
                                  dtype=torch.float16, device="meta")
        else:
            new = _PendingLinear(linear.in_features, linear.out_features, has_bias)
        _set(model, path, new)


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Quantize an already loaded full-precision model in place (each linear replaced as it goes)."""
    if mode not in MODES:
        raise QuantizationError(f"Unknown quantization {mode!r}: use one of {', '.join(MODES)}.")
    device = model.transformer.output_layer.weight.device
    dtype = model.transformer.output_layer.weight.dtype
    resolve_mode(mode, 0, device)
    if mode == "none":
        return model
    cpu_linear.unpack(model)
    for path in linear_names(model):
        linear = model.get_submodule(path)
        if not isinstance(linear, nn.Linear):
            raise QuantizationError(f"{path} is already {type(linear).__name__}; quantize a full-precision model.")
        if mode in BITS:
            new = QuantizedLinear.from_float(linear, BITS[mode])
        else:
            new = bnb_linear(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                             mode, device, dtype)
        _set(model, path, new)
        del linear
    if mode in BITS:
        model.config.quantization_bit = BITS[mode]
    return model


def model_mode(model: nn.Module) -> str:
    """The quantization mode a loaded model runs in, read from its first encoder linear."""
    module = _base(model.get_submodule(linear_names(model)[0]))
    if isinstance(module, QuantizedLinear):
        return f"int{module.bits}"
    kind = type(module).__name__
    if kind == "Linear8bitLt":
        return "bnb-int8"
    if kind == "Linear4bit":
        return "bnb-nf4"
    return "none"


class QuantizingLoader:
    """Takes the full-precision tensors of the swapped linears while a checkpoint streams in.

    int8/int4: each weight is quantized on the target device as it is read and written into its
    QuantizedLinear (biases load through the normal path). bnb: weight and bias are held until both
    are read, then the bitsandbytes module replaces its placeholder.
    """

    def __init__(self, model: nn.Module, mode: str, device: torch.device, dtype: torch.dtype):
        self.model, self.mode, self.device, self.dtype = model, mode, device, dtype
        self.modules: dict[str, str] = {}  # tensor name -> module path
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        if mode == "none":
            return
        for path in linear_names(model):
            module = model.get_submodule(path)
            self.modules[f"{path}.weight"] = path
            if mode not in BITS and module.has_bias:
                self.modules[f"{path}.bias"] = path

    def take(self, name: str, tensor: torch.Tensor) -> list[str]:
        """Consume one tensor; returns the model tensor names it filled."""
        path = self.modules[name]
        module = self.model.get_submodule(path)
        expected = (module.out_features, module.in_features) if name.endswith(".weight") else (module.out_features,)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"Tensor {name!r} has shape {tuple(tensor.shape)}, but this config expects "
                                  f"{expected}: the weights and config.json disagree.")
        if self.mode in BITS:
            if not tensor.is_floating_point():
                raise CheckpointError(f"Tensor {name!r} is {tensor.dtype}, not full precision; a pre-quantized "
                                      f"checkpoint needs quantization_bit in its config.json.")
            q, scale = quantize_weight(tensor.to(self.device), module.bits)
            module.weight.copy_(q)
            module.weight_scale.copy_(scale)
            return [name, f"{path}.weight_scale"]
        parts = self._pending.setdefault(path, {})
        parts[name.rpartition(".")[2]] = tensor
        if "weight" in parts and ("bias" in parts or not module.has_bias):
            del self._pending[path]
            _set(self.model, path, bnb_linear(parts["weight"], parts.get("bias"), self.mode, self.device, self.dtype))
        return [name]


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the quantizable linears (weights, scales, biases, bnb quantization state, and the
    kernel-layout copies QuantizedLinear builds at first use)."""
    seen: set[int] = set()
    total = 0

    def add(t):
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = id(t) if t.is_mkldnn else t.data_ptr()  # a packed CPU weight (glmapp.cpu_linear) has no storage
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for path in linear_names(model):
        module = _base(model.get_submodule(path))
        if isinstance(module, QuantizedLinear):
            total += module.packed_bytes()
        for t in list(module.parameters()) + list(module.buffers()):
            add(t)
            state = getattr(t, "quant_state", None)  # bnb 4-bit: absmax (+ nested absmax), code table
            while state is not None:
                add(state.absmax)
                add(state.code)
                state = getattr(state, "state2", None)
            add(getattr(t, "SCB", None))  # bnb int8 row scales
    return total


# ---- switching at runtime ---------------------------------------------------------------------------
def release_weights(model: nn.Module) -> None:
    """Drop every parameter and buffer of `model` (replaced by empty meta tensors) and free the memory."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.drop_packed()
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is not None:
                    empty = torch.empty(0, dtype=t.dtype, device="meta")
                    store[name] = nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty
        if hasattr(module, "quant_state"):
            module.quant_state = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
