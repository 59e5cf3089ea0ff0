"""The matmul behind `glmapp.quant.QuantizedLinear`: one kernel per call, chosen by device, activation
dtype and number of activation rows (`DISPATCH`).

Notable choices:
- CPU choices are measured (bench/quant.py; figures in bench/RESULTS.md "Quantization"): ATen's packed
  kernels win in bf16 at few rows and lose badly in fp32 (tinygemm's x86 vector code is bf16 only).
  So fp32 activations take a bf16 detour (`in_bf16`, on CPUs with bf16 hardware), much faster at every
  row count; the rounding of x to bf16 is finer than the weight's own quantization step.
  fp16 on CPU dequantizes first, as before: fp16 x @ q.T can overflow before the scale, and ATen's
  kernels are slow in fp16 there.
- CUDA choices are NOT measured (no GPU was lent to the session that wrote them): int8 rows <= 8 use
  ATen's `_weight_int8pack_mm` CUDA kernel, int4 bf16 rows <= 64 use tinygemm
  (`_weight_int4pack_mm`, sm80+, as gpt-fast/torchao). A kernel that is missing or raises at its
  first call is switched off for that device type with one logged warning and the call is redone by
  the next choice of its `DISPATCH` row, or by dequantize + one GEMM (the reference) where there is
  none, as for every CUDA row; after a kernel's first success, its errors propagate.
- Kernels read the official tensors (`weight`, `weight_scale`) as they lie, except tinygemm: it needs
  its own tiled layout of the int4 weight, a second copy (+100% of the int4 weight bytes, plus
  [K/group, N, 2] scales) built at first use and cached on the module as an `Int4Pack`, never in
  the state dict. The cache is keyed on the weight's and scale's storage and version counter, so
  `copy_`/`load_state_dict`/`weight.data = ...` rebuild it; writes through `.data` that bypass the
  version counter do not: call `module.drop_packed()` after those.
- That copy is on by default on CUDA only (`INT4_PACKED_COPY`): there it is the only fast int4 path
  (dequantize + GEMM moves several times the bytes tinygemm reads), at the price of int4 needing int8's
  memory. On CPU the copy-free kernels are fast enough that int4 keeps its memory (int4 is chosen for
  memory); the copy makes CPU int4 decode faster than int8 (bench/RESULTS.md). Set it True for speed.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glmapp import cpu_linear

log = logging.getLogger(__name__)

DEQUANTIZE = "dequantize"  # F.linear(x, dequantize(weight)): the reference, runs anywhere

# (device type, bits, activation dtype) -> ((most rows or None for any, kernel), ...): the first entry
# that covers the call's rows and whose kernel can run this weight wins; anything else dequantizes.
# CPU bounds: the last row count of 1/8/16/32/64 at which the kernel was the fastest on both of the mid
# model's big linears (bench/RESULTS.md). CUDA bounds are guesses to measure: tinygemm loses to a
# dense GEMM past ~64 rows in torchao's A6000 numbers (torchao/prototype/hqq/README.md).
DISPATCH: dict[tuple[str, int, torch.dtype], tuple[tuple[int | None, str], ...]] = {
    ("cpu", 8, torch.float32): ((16, "int8pack_bf16"), (None, "rowscale_bf16"), (None, "rowscale")),
    ("cpu", 8, torch.bfloat16): ((32, "int8pack"), (None, "rowscale")),
    ("cpu", 4, torch.float32): ((32, "nibbles_int8pack_bf16"), (None, "split_bf16"), (None, "split")),
    ("cpu", 4, torch.bfloat16): ((32, "tinygemm"), (16, "nibbles_int8pack"), (None, "split")),
    ("cuda", 8, torch.bfloat16): ((8, "int8pack"),),
    ("cuda", 8, torch.float16): ((8, "int8pack"),),
    ("cuda", 8, torch.float32): ((8, "int8pack"),),
    ("cuda", 4, torch.bfloat16): ((64, "tinygemm"),),
}

# May int4 keep tinygemm's second copy of its weight on this device type? (see the module docstring)
INT4_PACKED_COPY = {"cpu": False, "cuda": True}

# ATen's CPU `_weight_int8pack_mm` (torch 2.13, AVX-512) crashes or returns wrong sums unless K is a
# multiple of its 16-wide vectors (K = 2, 4: segfault; K = 8, 24: wrong results; every K % 16 == 0 right,
# any N and rows). ChatGLM's K (4096, 13696 -> 6848 per nibble plane) are multiples; other shapes go elsewhere.
INT8PACK_K_MULTIPLE = 16

GROUP_SIZES = (256, 128, 64, 32)  # what both tinygemm kernels accept; the scale is per row anyway
INNER_K_TILES = (8, 4, 2)  # CUDA tinygemm's packing: K must be a multiple of 16 * inner k-tiles

_PROVEN: set[tuple[str, str]] = set()  # (kernel, device type) that ran once: errors propagate
_BROKEN: set[tuple[str, str]] = set()  # (kernel, device type) that failed at first use: not chosen


# ---- kernels on the official tensors ----------------------------------------------------------------
# Each takes the QuantizedLinear and x [rows, in_features] and returns x @ W.T [rows, out_features].
def dequantize_linear(m, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.dequantized_weight(x.dtype))


def rowscale(m, x: torch.Tensor) -> torch.Tensor:
    """int8: (x @ q.T) * scale, the scale applied to the output rows, never to the weight."""
    return F.linear(x, m.weight.to(x.dtype)) * m.weight_scale.to(x.dtype)


def split(m, x: torch.Tensor) -> torch.Tensor:
    """int4: even input columns times the high nibbles plus odd columns times the low ones (spec §7
    packing), then * scale: two half-width matmuls instead of interleaving the nibbles back."""
    w = m.weight
    y = F.linear(x[:, 0::2], (w >> 4).to(x.dtype)) + F.linear(x[:, 1::2], ((w << 4) >> 4).to(x.dtype))
    return y * m.weight_scale.to(x.dtype)


def int8pack(m, x: torch.Tensor) -> torch.Tensor:
    """int8: ATen's int8 weight × per-row scale kernel, on the official int8 weight as it is."""
    return torch._weight_int8pack_mm(x.contiguous(), m.weight, m.weight_scale.to(x.dtype))


def nibbles_int8pack(m, x: torch.Tensor) -> torch.Tensor:
    """int4 without a second copy: each nibble plane, sign-extended to int8 for this call only, through
    the int8 kernel with its half of the input columns."""
    w, scale = m.weight, m.weight_scale.to(x.dtype)
    return (torch._weight_int8pack_mm(x[:, 0::2].contiguous(), w >> 4, scale)
            + torch._weight_int8pack_mm(x[:, 1::2].contiguous(), (w << 4) >> 4, scale))


def tinygemm(m, x: torch.Tensor) -> torch.Tensor:
    """int4 through tinygemm, on the module's cached copy of the weight in the kernel's layout."""
    pack = int4_pack(m, x.device, x.dtype)
    if x.device.type == "cuda":
        return torch._weight_int4pack_mm(x.contiguous(), pack.weight, pack.group_size, pack.scales_and_zeros)
    return torch._weight_int4pack_mm_for_cpu(x.contiguous(), pack.weight, pack.group_size, pack.scales_and_zeros)


def in_bf16(kernel):
    """`kernel` run on x rounded to bf16, the result back in x's dtype: for fp32 activations on CPU, where
    ATen's packed kernels are fast in bf16 only. bf16 keeps 8 mantissa bits: its rounding (2^-9 relative)
    is several times finer than the int8 weight's own (half a step of max|row|/127) and int4's."""

    def run(m, x: torch.Tensor) -> torch.Tensor:
        return kernel(m, x.to(torch.bfloat16)).to(x.dtype)

    run.__name__ = run.__qualname__ = f"{kernel.__name__}_bf16"
    return run


KERNELS = {DEQUANTIZE: dequantize_linear, "rowscale": rowscale, "split": split, "int8pack": int8pack,
           "nibbles_int8pack": nibbles_int8pack, "tinygemm": tinygemm,
           "int8pack_bf16": in_bf16(int8pack), "nibbles_int8pack_bf16": in_bf16(nibbles_int8pack),
           "rowscale_bf16": in_bf16(rowscale), "split_bf16": in_bf16(split)}


# ---- tinygemm's copy of an int4 weight ---------------------------------------------------------------
@dataclass
class Int4Pack:
    """One int4 weight in tinygemm's layout, for one device and activation dtype.

    CPU: uint8 [N, K/2] (`_convert_weight_to_int4pack_for_cpu`, tiled by the CPU's vector width).
    CUDA: int32 [N/8, K/(16·inner k-tiles), 32, inner k-tiles/2] (`_convert_weight_to_int4pack`).
    scales_and_zeros [K/group_size, N, 2] in the activation dtype."""
    key: tuple
    weight: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales_and_zeros))


def group_size(in_features: int) -> int | None:
    """The largest group size tinygemm takes that divides K (every group of a row has its scale)."""
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def inner_k_tiles(in_features: int) -> int | None:
    """CUDA tinygemm's inner k-tiles: the largest of 8/4/2 with K a multiple of 16 × it."""
    return next((t for t in INNER_K_TILES if in_features % (16 * t) == 0), None)


def tinygemm_inputs(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """Official int4 (int8 [N, K/2]: column 2j in the high nibble, 2j+1 in the low one, signed) and
    per-row scale -> what both tinygemm packers take, on the weight's device:

    - uint8 [N, K/2], same nibble order, each nibble q + 8 in [0, 15]: XOR 0x88 flips both nibbles'
      sign bits, which for a 4-bit two's-complement q is adding 8 (CUDA's `_convert_weight_to_int4pack`
      reads column 2j from the high nibble too: aten/src/ATen/native/cuda/int4mm.cu, and
      `_group_quantize_tensor` in torch.testing._internal.common_quantization packs it that way);
    - scales_and_zeros [K/g, N, 2] in `dtype`: the row's scale in every group and zero 0, so the
      kernels' w = (u - 8) · scale + zero is q · scale[row], the official dequantization;
    - g, the group size.
    """
    n, k = weight.shape[0], weight.shape[1] * 2
    g = group_size(k)
    if g is None:
        raise ValueError(f"tinygemm needs K divisible by 32, got {k}")
    offset = weight.view(torch.uint8) ^ 0x88
    s = scale.to(dtype).expand(k // g, n)
    return offset, torch.stack((s, torch.zeros_like(s)), dim=-1).contiguous(), g


def tinygemm_fits(out_features: int, in_features: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Shapes, activation dtypes (and GPU generation) each packer and kernel accepts (checked in
    aten/src/ATen/native/cuda/int4mm.cu and native/cpu/int4mm_kernel.cpp)."""
    if group_size(in_features) is None:
        return False
    if device.type == "cpu":
        return out_features % 16 == 0  # "_convert_weight_to_int4pack_cpu: expect N to be dividable by 16"
    if device.type == "cuda":
        return (dtype == torch.bfloat16 and out_features % 8 == 0 and inner_k_tiles(in_features) is not None
                and _sm80(device))
    return False


@functools.cache
def _sm80(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)  # tinygemm uses bf16 mma.sync (Ampere+)


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors have no version counter


def int4_pack(m, device: torch.device, dtype: torch.dtype) -> Int4Pack:
    """The module's tinygemm copy, (re)built when the weight or scale changed since it was made."""
    w, s = m.weight, m.weight_scale
    key = (device, dtype, w.data_ptr(), _version(w), s.data_ptr(), _version(s))
    pack = m._int4_pack
    if pack is not None and pack.key == key:
        return pack
    m._int4_pack = None  # free the stale copy before building the new one
    offset, scales_and_zeros, g = tinygemm_inputs(w.to(device), s.to(device), dtype)
    if device.type == "cuda":
        packed = torch._convert_weight_to_int4pack(offset.contiguous(), inner_k_tiles(m.in_features))
    else:  # the CPU packer takes one int32 in [0, 15] per weight, not bytes
        packed = torch._convert_weight_to_int4pack_for_cpu(
            torch.stack((offset >> 4, offset & 0x0F), dim=-1).flatten(-2).to(torch.int32), 1)
    m._int4_pack = Int4Pack(key, packed, scales_and_zeros, g)
    return m._int4_pack


# ---- dispatch ---------------------------------------------------------------------------------------
def choose(m, x: torch.Tensor) -> str:
    """Name of the kernel for this call (x is [rows, in_features])."""
    rows, device = x.shape[0], x.device
    if rows == 0 or (x.requires_grad and torch.is_grad_enabled()):
        return DEQUANTIZE  # the packed ops have no autograd formulas
    for most, kernel in DISPATCH.get((device.type, m.bits, x.dtype), ()):
        if (most is None or rows <= most) and _usable(kernel, m, device, x.dtype):
            return kernel
    return DEQUANTIZE


def _usable(kernel: str, m, device: torch.device, dtype: torch.dtype) -> bool:
    """May `kernel` run this module's weight on this device, for activations of `dtype`?"""
    if (kernel, device.type) in _BROKEN:
        return False
    if kernel.startswith("int8pack") and m.in_features % INT8PACK_K_MULTIPLE:
        return False
    if kernel.startswith("nibbles_int8pack") and (m.in_features // 2) % INT8PACK_K_MULTIPLE:
        return False
    if kernel.endswith("_bf16"):  # without bf16 hardware the detour is emulated and was never measured
        return device.type != "cpu" or cpu_linear.cpu_has_bf16()
    return kernel != "tinygemm" or (INT4_PACKED_COPY.get(device.type, False)
                                    and tinygemm_fits(m.out_features, m.in_features, device, dtype))


def linear(m, x: torch.Tensor) -> torch.Tensor:
    """x [rows, in_features] @ W.T for a QuantizedLinear `m`, through the kernel `choose` picks."""
    kernel = choose(m, x)
    if kernel == DEQUANTIZE or (kernel, x.device.type) in _PROVEN:
        return KERNELS[kernel](m, x)
    return _first_use(kernel, m, x)


def _first_use(kernel: str, m, x: torch.Tensor) -> torch.Tensor:
    key = (kernel, x.device.type)
    try:
        y = KERNELS[kernel](m, x)
    except torch.OutOfMemoryError:
        raise  # not a missing kernel
    except (RuntimeError, NotImplementedError, AttributeError) as e:  # op absent from this build, or refused
        _BROKEN.add(key)
        m._int4_pack = None
        log.warning("quantized linear kernel %r failed at its first use on %s (%s: %s); it is switched off "
                    "there and the next choice runs instead (dequantize + GEMM if none)",
                    kernel, x.device.type, type(e).__name__, e)
        return linear(m, x)  # `choose` now skips it
    _PROVEN.add(key)
    return y


def prepare(model, dtype: torch.dtype) -> int:
    """Build the tinygemm copies now for every int4 linear that will use them; -> bytes added.

    The engine calls this before it sizes its KV cache from the free GPU memory: built lazily at the first
    forward, the copies would have to fit in what the cache left over."""
    added = 0
    for m in model.modules():
        if getattr(m, "bits", None) != 4 or not hasattr(m, "_int4_pack"):
            continue
        device = m.weight.device
        listed = any(kernel == "tinygemm" for _, kernel in DISPATCH.get((device.type, 4, dtype), ()))
        if not listed or not _usable("tinygemm", m, device, dtype):
            continue  # `choose` would never pick tinygemm here: a copy would only cost memory
        try:
            added += int4_pack(m, device, dtype).nbytes
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            _BROKEN.add(("tinygemm", device.type))
            log.warning("cannot pack int4 weights for tinygemm on %s (%s: %s); int4 dequantizes instead",
                        device.type, type(e).__name__, e)
            break
    return added
