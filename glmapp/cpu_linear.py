"""oneDNN-prepacked weights for the full-precision linears of a model on CPU.

`F.linear` on CPU sends fp32 to the BLAS (MKL in the PyTorch wheels); bf16 goes to oneDNN but on the plain
layout. oneDNN's own blocked layout (`mkldnn._reorder_linear_weight`, what inductor's weight prepacking uses)
reads big weights faster, in fp32 and bf16, at one row and at many (`bench/cpu_linear.py`; figures in
bench/RESULTS.md "Prepacked CPU linears"). Small weights stay plain (`PACK_MIN_ELEMENTS`).

`pack(model)` swaps each plain `nn.Linear` with a CPU fp32/bf16 weight for a `PackedLinear` whose weight
Parameter holds the packed tensor *instead of* the plain one (same size, ±5%), and puts each CPU int4
`QuantizedLinear`'s weight in ATen's int4 kernel layout in place (`quant_kernels.to_kernel_layout`: its
fastest CPU kernel, without a second copy); `unpack(model)` restores plain `nn.Linear`s and official int4.
The engine packs when it starts and unpacks when it stops. `state_dict()` (so
`save_pretrained`) gives plain copies, `load_state_dict` and `.to()`/`.half()` work; code that changes
weights in place (quantize, merge) calls `unpack` first: a packed tensor can only be multiplied.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from glmapp import cpu_kernels, quant_kernels
from glmapp.errors import QuantizationError

log = logging.getLogger(__name__)

# The row count oneDNN is told to expect when it picks the layout; 64 was as fast as 1 at one row and
# as fast as 512 at 512 rows in fp32 and bf16 (the layout barely depends on it past 8).
ROWS_HINT = 64

# Which weights are worth packing (bench/cpu_linear.py at one row; bench/RESULTS.md "Which linears to pack").
# A packed call has a fixed cost that MKL does not have, so small weights are faster plain: packing pays
# from about 2^16 elements in fp32 (and earlier in bf16); 2^17 leaves a margin. With 64 input features MKL
# is faster at any size, so such weights (the demo models' output layers) stay plain too.
PACK_MIN_ELEMENTS = 1 << 17
PACK_MIN_IN_FEATURES = 128


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose weight is oneDNN-packed (or plain again while `unpack` runs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not w.is_mkldnn:
            return F.linear(x, w, self.bias)
        if x.dtype != w.dtype or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            # (the packed op has no autograd formula: a backward through it, e.g. LoRA training, goes plain)
            return F.linear(x, w.to_dense().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")

    # The rest of torch sees a plain linear: state_dict()/save_pretrained() write plain weights,
    # load_state_dict() loads plain weights and packs them again, .to()/.half()/... unpack first.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if destination[key].is_mkldnn:
            destination[key] = destination[key].to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        packed = self.weight.is_mkldnn
        if packed:
            self._unpack_weight()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if packed:
            self.weight = nn.Parameter(_packed(self.weight), requires_grad=False)

    def _apply(self, fn, recurse=True):
        if self.weight.is_mkldnn:
            self._unpack_weight()
        return super()._apply(fn, recurse)

    def _unpack_weight(self) -> None:
        requires_grad = self.__dict__.get("plain_requires_grad", False)
        self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=requires_grad)


class GemvLinear(nn.Linear):
    """A plain bf16 `nn.Linear` whose few-row calls (decoding) run glmapp's CPU kernel (`cpu_kernels`), which reads
    the weight as it lies; more rows (prefill) go to `F.linear`. Nothing else changes: state_dict, `.to()`,
    training and merging see an ordinary linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype and cpu_kernels.usable(cpu_kernels.W_BF16, x, w, self.bias):
            y = cpu_kernels.linear(cpu_kernels.W_BF16, x, w, None, self.bias)
            if y is not None:
                return y
        return F.linear(x, w, self.bias)


class QuantizedOutputLinear(nn.Linear):
    """The output layer while `pack(output_bits=)` holds a W8A16/W4A16 copy of its weight: decoding reads the
    copy (half or a quarter of the bf16 bytes), everything else (saving, merging, training, another
    engine) sees the unchanged full-precision `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized = self.__dict__.get("quantized")  # not a submodule: state_dict and .to() never see it
        if quantized is None or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return quantized(x)

    def _apply(self, fn, recurse=True):
        _unquantize_output(self)  # moved or cast: the copy would be stale
        return super()._apply(fn, recurse)


def _quantize_output(m: nn.Linear, bits: int, gemv: bool) -> bool:
    """Give the plain CPU output layer `m` a `bits`-bit copy that its forward uses; False when it cannot."""
    from glmapp.quant import QuantizedLinear

    if type(m) is not nn.Linear or m.weight.device.type != "cpu" or not m.weight.dtype.is_floating_point:
        return False
    try:
        quantized = QuantizedLinear.from_float(m, bits)
    except QuantizationError as e:
        log.warning("output layer stays in %s (%s)", m.weight.dtype, e)
        return False
    if not gemv:
        quant_kernels.to_kernel_layout(quantized)  # int4: ATen's CPU kernel layout, as the layers' weights
    m.__dict__["quantized"] = quantized
    m.__class__ = QuantizedOutputLinear
    return True


def _unquantize_output(m: nn.Module) -> bool:
    if type(m) is not QuantizedOutputLinear:
        return False
    m.__class__ = nn.Linear  # the class first: a forward meanwhile takes the full-precision path
    m.__dict__.pop("quantized", None)
    return True


def _packed(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), ROWS_HINT)


@functools.cache
def cpu_has_bf16() -> bool:
    """bf16 compute in hardware (AVX-512 and up), as oneDNN reports it."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def supported(dtype: torch.dtype) -> str | None:
    """None when this build and CPU can run packed linears in `dtype`, else why not."""
    if dtype == torch.float32:
        ok = torch.backends.mkldnn.is_available()
    elif dtype == torch.bfloat16:
        ok = cpu_has_bf16()
    else:
        return f"{dtype} linears are not packed (oneDNN packing is used for float32 and bfloat16)"
    if not ok:
        return f"this PyTorch build or CPU has no oneDNN {dtype} support"
    try:  # a missing or broken op must not reach a request
        gen = torch.Generator().manual_seed(0)  # not the global generator: users' seeded streams stay as they are
        w, x = torch.randn(8, 16, generator=gen).to(dtype), torch.randn(3, 16, generator=gen).to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, ROWS_HINT),
                                               None, "none", [], "")
        if not torch.allclose(y.float(), F.linear(x, w).float(), atol=0.1, rtol=0.05):
            return "oneDNN's packed linear gave wrong results on this machine"
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        return f"oneDNN packed linear unavailable ({type(e).__name__}: {e})"
    return None


def _plain_linears(model: nn.Module):
    return [m for m in model.modules() if type(m) is nn.Linear]


def _int4_linears(model: nn.Module):
    return [m for m in model.modules() if getattr(m, "bits", None) == 4 and hasattr(m, "_int4_pack")]


def pack(model: nn.Module, min_elements: int = PACK_MIN_ELEMENTS, min_in_features: int = PACK_MIN_IN_FEATURES,
         output_bits: int | None = None, gemv: bool | None = None) -> int:
    """Prepare the CPU linears of `model` for serving, in place; -> how many linears were changed.

    With glmapp's CPU kernels (`gemv`, default: when `cpu_kernels.available()`): bf16 linears they take
    (`cpu_kernels.takes`) become `GemvLinear`s (same weight), int4 weights keep the official layout those kernels
    read; other bf16 linears are packed as below. Without them: every plain CPU
    fp32/bf16 `nn.Linear` whose weight is big enough for packing to pay (see `PACK_MIN_ELEMENTS`; tests lower the
    bounds to pack small ones) is oneDNN-packed, and CPU int4 weights are put in ATen's int4 kernel layout.
    fp32 linears are packed either way. With `output_bits` (8 or 4) the output layer gets a quantized copy that
    decoding reads instead (`QuantizedOutputLinear`)."""
    gemv = cpu_kernels.available() if gemv is None else gemv
    count = 0 if gemv else sum(quant_kernels.to_kernel_layout(m) for m in _int4_linears(model))
    if output_bits:
        with torch.no_grad():
            # v1 (ChatGLM-6B) projects through `lm_head`, tied to the embedding; v2/v3 through output_layer
            head = model.lm_head if isinstance(getattr(model, "lm_head", None), nn.Linear) \
                else model.transformer.output_layer
            count += _quantize_output(head, output_bits, gemv)
    with torch.no_grad():
        for m in _plain_linears(model):
            w = m.weight
            if gemv and w.device.type == "cpu" and w.dtype == torch.bfloat16 and (
                    m.bias is None or m.bias.dtype == w.dtype) and cpu_kernels.takes(cpu_kernels.W_BF16, w.shape[1]):
                m.__class__ = GemvLinear
                count += 1
                continue
            if w.device.type != "cpu" or w.is_mkldnn or supported(w.dtype):
                continue
            if w.numel() < min_elements or w.shape[1] < min_in_features:
                continue
            if m.bias is not None and m.bias.dtype != w.dtype:
                continue
            try:
                packed = _packed(w)
            except RuntimeError as e:  # a shape oneDNN refuses: that linear stays plain, the rest go on
                log.warning("linear %s stays unpacked (%s)", tuple(w.shape), e)
                continue
            m.plain_requires_grad = w.requires_grad
            m.weight = nn.Parameter(packed, requires_grad=False)
            m.__class__ = PackedLinear
            count += 1
    return count


def unpack(model: nn.Module) -> int:
    """Give every `PackedLinear` of `model` its plain weight back, and int4 weights their official layout;
    -> how many were unpacked."""
    count = sum(quant_kernels.to_official_layout(m) for m in _int4_linears(model))
    count += sum(_unquantize_output(m) for m in list(model.modules()))
    for m in model.modules():
        if type(m) is GemvLinear:
            m.__class__ = nn.Linear
            count += 1
    with torch.no_grad():
        for m in model.modules():
            if type(m) is not PackedLinear:
                continue
            if m.weight.is_mkldnn:
                m._unpack_weight()  # the plain weight first, then the class: a forward meanwhile sees either
            m.__class__ = nn.Linear
            m.__dict__.pop("plain_requires_grad", None)
            count += 1
    return count


def is_packed(model: nn.Module) -> bool:
    return (any(type(m) in (PackedLinear, QuantizedOutputLinear, GemvLinear) for m in model.modules())
            or any(quant_kernels.in_kernel_layout(m) for m in _int4_linears(model)))
