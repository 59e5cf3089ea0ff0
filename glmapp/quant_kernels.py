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
  its own tiled layout of the int4 weight. On CPU that layout is the module's only copy while it serves:
  `to_kernel_layout` (called by `cpu_linear.pack`, i.e. when the engine starts) rewrites `weight` in
  place as uint8 in `_convert_weight_to_int4pack_for_cpu`'s layout (same bytes as the official int8
  [N, K/2]; the dtype marks it), plus bf16 [K/256, N, 2] scales and zeros (+3% at K = 1024);
  `to_official_layout` (`cpu_linear.unpack`, and QuantizedLinear before saving, `.to()` or loading)
  restores the official bytes exactly. The layout is checked against ATen's packer once per process
  (`cpu_layout`); if it ever differs, weights stay official and the copy-free kernels run.
  Kernels other than tinygemm read an official view built for the call (`official_weight`): with the
  kernel layout they run only above tinygemm's row bound, where that conversion is a small share.
- On CUDA tinygemm's layout is a second copy (+100% of the int4 weight bytes), built at first use and
  cached on the module as an `Int4Pack`, never in the state dict, keyed on the weight's and scale's
  storage and version counter (writes through `.data` that bypass it: call `module.drop_packed()`).
  That copy is allowed on CUDA only (`INT4_PACKED_COPY`), where it is the only fast int4 path.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glmapp import cpu_kernels, cpu_linear

log = logging.getLogger(__name__)

DEQUANTIZE = "dequantize"  # F.linear(x, dequantize(weight)): the reference, runs anywhere

# (device type, bits, activation dtype) -> ((most rows or None for any, kernel), ...): the first entry
# that covers the call's rows and whose kernel can run this weight wins; anything else dequantizes.
# CPU bounds: the last row count of 1/8/16/32/64 at which the kernel was the fastest on both of the mid
# model's big linears (bench/RESULTS.md). CUDA bounds are guesses to measure: tinygemm loses to a
# dense GEMM past ~64 rows in torchao's A6000 numbers (torchao/prototype/hqq/README.md).
# "gemv" (glmapp's own few-row kernels, `cpu_kernels`) comes first on CPU where it is built; it reads the official
# layout, so `cpu_linear.pack` leaves int4 weights official then and tinygemm/layout_dense are not usable.
_GEMV8, _GEMV4 = (cpu_kernels.MAX_ROWS[cpu_kernels.W_INT8], "gemv"), (cpu_kernels.MAX_ROWS[cpu_kernels.W_INT4], "gemv")
# "dense_c" (many rows: the weight dequantized by glmapp's kernel in one parallel pass, then one GEMM) comes before
# int4's torch-op dequantizations (0.83-0.90x their time on the mid model's linears at 512 rows, 2 threads; int4
# prefill 1.00 -> 1.15x llama.cpp); int8's rowscale (cast, GEMM, scale the output) stayed faster than it.
DISPATCH: dict[tuple[str, int, torch.dtype], tuple[tuple[int | None, str], ...]] = {
    ("cpu", 8, torch.float32): (_GEMV8, (16, "int8pack_bf16"), (None, "rowscale_bf16"), (None, "rowscale")),
    ("cpu", 8, torch.bfloat16): (_GEMV8, (32, "int8pack"), (None, "rowscale")),
    ("cpu", 8, torch.float16): (_GEMV8,),
    ("cpu", 4, torch.float32): (_GEMV4, (32, "tinygemm_bf16"), (None, "layout_dense"), (32, "nibbles_int8pack_bf16"),
                                (None, "dense_c"), (None, "split_bf16"), (None, "split")),
    ("cpu", 4, torch.bfloat16): (_GEMV4, (32, "tinygemm"), (None, "layout_dense"), (16, "nibbles_int8pack"),
                                 (None, "dense_c"), (None, "split")),
    ("cpu", 4, torch.float16): (_GEMV4,),
    ("cuda", 8, torch.bfloat16): ((8, "int8pack"),),
    ("cuda", 8, torch.float16): ((8, "int8pack"),),
    ("cuda", 8, torch.float32): ((8, "int8pack"),),
    ("cuda", 4, torch.bfloat16): ((64, "tinygemm"),),
}

# May int4 keep tinygemm's second copy of its weight on this device type? (see the module docstring; on CPU
# the weight itself is put in tinygemm's layout instead, by `to_kernel_layout`)
INT4_PACKED_COPY = {"cpu": False, "cuda": True}
CPU_GROUP_SIZE = 256  # the largest group the CPU kernel takes: fewest scale/zero pairs (all rows' scales alike)

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
    w = official_weight(m)
    y = F.linear(x[:, 0::2], (w >> 4).to(x.dtype)) + F.linear(x[:, 1::2], ((w << 4) >> 4).to(x.dtype))
    return y * m.weight_scale.to(x.dtype)


def int8pack(m, x: torch.Tensor) -> torch.Tensor:
    """int8: ATen's int8 weight × per-row scale kernel, on the official int8 weight as it is."""
    return torch._weight_int8pack_mm(x.contiguous(), m.weight, m.weight_scale.to(x.dtype))


def nibbles_int8pack(m, x: torch.Tensor) -> torch.Tensor:
    """int4 without a second copy: each nibble plane, sign-extended to int8 for this call only, through
    the int8 kernel with its half of the input columns."""
    w, scale = official_weight(m), m.weight_scale.to(x.dtype)
    return (torch._weight_int8pack_mm(x[:, 0::2].contiguous(), w >> 4, scale)
            + torch._weight_int8pack_mm(x[:, 1::2].contiguous(), (w << 4) >> 4, scale))


def tinygemm(m, x: torch.Tensor) -> torch.Tensor:
    """int4 through tinygemm, on the module's cached copy of the weight in the kernel's layout."""
    pack = int4_pack(m, x.device, x.dtype)
    if x.device.type == "cuda":
        return torch._weight_int4pack_mm(x.contiguous(), pack.weight, pack.group_size, pack.scales_and_zeros)
    return torch._weight_int4pack_mm_for_cpu(x.contiguous(), pack.weight, pack.group_size, pack.scales_and_zeros)


def layout_dense(m, x: torch.Tensor) -> torch.Tensor:
    """int4 in the CPU kernel's layout, many rows: dequantized straight from that layout (no official copy in
    between), then one dense GEMM, whose cost the dequantization is small against at these row counts."""
    q = _untile(m.weight, *cpu_layout()).to(x.dtype).sub_(8)
    return F.linear(x, q.mul_(m.weight_scale.to(x.dtype)[:, None]))


def gemv(m, x: torch.Tensor) -> torch.Tensor:
    """int8/int4 through glmapp's own few-row CPU kernel (`cpu_kernels`), on the official weight as it is."""
    y = cpu_kernels.linear(cpu_kernels.W_INT8 if m.bits == 8 else cpu_kernels.W_INT4, x, m.weight, m.weight_scale)
    if y is None:
        raise RuntimeError(f"glmapp's CPU kernel refused a {tuple(m.weight.shape)} weight")
    return y


def dense_c(m, x: torch.Tensor) -> torch.Tensor:
    """Many rows: the official weight dequantized by glmapp's CPU kernel in x's dtype, then one GEMM."""
    kind = cpu_kernels.W_INT8 if m.bits == 8 else cpu_kernels.W_INT4
    return F.linear(x, cpu_kernels.dequantize(kind, m.weight, m.weight_scale, x.dtype))


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
           "tinygemm_bf16": in_bf16(tinygemm), "layout_dense": layout_dense,
           "rowscale_bf16": in_bf16(rowscale), "split_bf16": in_bf16(split), "gemv": gemv, "dense_c": dense_c}


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
    shared: bool = False  # `weight` is the module's own (CPU kernel layout), not a second copy

    @property
    def nbytes(self) -> int:
        """Bytes beyond the module's parameters."""
        return sum(t.numel() * t.element_size() for t in ((self.scales_and_zeros,) if self.shared
                                                           else (self.weight, self.scales_and_zeros)))


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
    """The module's tinygemm copy, (re)built when the weight or scale changed since it was made; for a
    weight in the CPU kernel's layout, the pack `to_kernel_layout` made."""
    if in_kernel_layout(m):
        return m._int4_pack
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


# ---- the CPU int4 weight in tinygemm's layout, in place of the official one --------------------------
# `_convert_weight_to_int4pack_for_cpu` (aten/src/ATen/native/cpu/int4mm_kernel.cpp) tiles the rows in
# blocks of BLOCK_N (64 with AVX-512, else 32), each block stored k by k as BLOCK_N/2 bytes: "halves"
# (vector builds): byte j holds row j in its low nibble and row j + BLOCK_N/2 in its high one; "pairs"
# (the scalar build, and the last partial block everywhere): byte j holds rows 2j (low) and 2j+1 (high).
LAYOUTS = ((64, True), (32, True), (32, False))  # (BLOCK_N, halves): checked against ATen's packer


def _nibbles(weight: torch.Tensor) -> torch.Tensor:
    """Official int4 int8 [N, K/2] -> uint8 [N, K], each q + 8 in [0, 15] (see `tinygemm_inputs`)."""
    u = weight.view(torch.uint8) ^ 0x88
    return torch.stack((u >> 4, u & 0x0F), dim=-1).flatten(-2)


def _from_nibbles(u: torch.Tensor) -> torch.Tensor:
    """Inverse of `_nibbles`."""
    return (((u[:, 0::2] << 4) | u[:, 1::2]) ^ 0x88).view(torch.int8)


def _tile(u: torch.Tensor, block: int, halves: bool) -> torch.Tensor:
    """uint8 [N, K] nibble values -> uint8 [N, K/2] in the CPU kernel's layout."""
    n, k = u.shape
    full = n // block * block
    parts = []
    if full:
        t = u[:full].view(n // block, block, k).transpose(1, 2)  # [blocks, K, block]
        low, high = (t[..., :block // 2], t[..., block // 2:]) if halves else (t[..., 0::2], t[..., 1::2])
        parts.append(((high << 4) | low).reshape(-1))
    if n > full:
        t = u[full:].t()
        parts.append(((t[:, 1::2] << 4) | t[:, 0::2]).reshape(-1))
    return torch.cat(parts).view(n, k // 2)


def _untile(p: torch.Tensor, block: int, halves: bool) -> torch.Tensor:
    """Inverse of `_tile`: uint8 [N, K/2] in the kernel's layout -> uint8 [N, K] nibble values."""
    n, k = p.shape[0], p.shape[1] * 2
    full = n // block * block
    flat = p.reshape(-1)
    parts = []
    if full:
        b = flat[:full * k // 2].view(n // block, k, block // 2)
        low, high = b & 0x0F, b >> 4
        t = torch.cat((low, high), -1) if halves else torch.stack((low, high), -1).flatten(-2)
        parts.append(t.transpose(1, 2).reshape(full, k))
    if n > full:
        b = flat[full * k // 2:].view(k, (n - full) // 2)
        parts.append(torch.stack((b & 0x0F, b >> 4), -1).flatten(-2).t())
    return torch.cat(parts)


@functools.cache
def cpu_layout() -> tuple[int, bool] | None:
    """The (BLOCK_N, halves) that reproduces ATen's CPU int4 packer in this process, or None (the op is
    missing or packs some other way: then weights keep the official layout)."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (112, 64), generator=gen, dtype=torch.uint8)  # one full block of 64, a partial one
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 1).view(torch.uint8)
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        log.warning("CPU int4 packing unavailable (%s: %s); int4 keeps the official layout", type(e).__name__, e)
        return None
    for layout in LAYOUTS:
        if torch.equal(_tile(u, *layout), packed.reshape(112, 32)):
            return layout
    log.warning("ATen's CPU int4 packer uses an unknown layout; int4 keeps the official layout")
    return None


def in_kernel_layout(m) -> bool:
    """Is this int4 module's weight held in the CPU kernel's layout (uint8) instead of the official int8?"""
    return m.weight.dtype == torch.uint8


def official_weight(m) -> torch.Tensor:
    """The official int8 weight: the module's own, or one rebuilt for the caller from the kernel layout."""
    if not in_kernel_layout(m):
        return m.weight
    return _from_nibbles(_untile(m.weight, *cpu_layout()))


def to_kernel_layout(m, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Put an int4 CPU module's weight in the CPU kernel's layout in place (no second copy) with its
    scales and zeros for `dtype` activations; -> whether it was converted."""
    if (m.bits != 4 or in_kernel_layout(m) or m.weight.device.type != "cpu" or ("tinygemm", "cpu") in _BROKEN
            or m.in_features % CPU_GROUP_SIZE or m.out_features % 16 or cpu_layout() is None):
        return False
    with torch.no_grad():
        tiled = _tile(_nibbles(m.weight), *cpu_layout())
        s = m.weight_scale.to(dtype).expand(m.in_features // CPU_GROUP_SIZE, m.out_features)
        scales_and_zeros = torch.stack((s, torch.zeros_like(s)), dim=-1).contiguous()
        m.weight = torch.nn.Parameter(tiled, requires_grad=False)
    m._int4_pack = Int4Pack(("kernel layout", dtype), m.weight, scales_and_zeros, CPU_GROUP_SIZE, shared=True)
    return True


def to_official_layout(m) -> bool:
    """Undo `to_kernel_layout`: the official int8 bytes back in `weight`; -> whether it was converted."""
    if not in_kernel_layout(m):
        return False
    with torch.no_grad():
        m.weight = torch.nn.Parameter(official_weight(m), requires_grad=False)
    m._int4_pack = None
    return True


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
    if kernel == "dense_c":
        return (device.type == "cpu" and not in_kernel_layout(m) and m.weight.is_contiguous()
                and cpu_kernels.available())
    if kernel == "gemv":
        kind = cpu_kernels.W_INT8 if m.bits == 8 else cpu_kernels.W_INT4
        return (device.type == "cpu" and not in_kernel_layout(m) and m.weight.is_contiguous()
                and cpu_kernels.takes(kind, m.in_features) and cpu_kernels.available())
    if kernel.startswith("int8pack") and m.in_features % INT8PACK_K_MULTIPLE:
        return False
    if kernel.startswith("nibbles_int8pack") and (m.in_features // 2) % INT8PACK_K_MULTIPLE:
        return False
    if kernel.endswith("_bf16") and device.type == "cpu" and not cpu_linear.cpu_has_bf16():
        return False  # without bf16 hardware the detour is emulated and was never measured
    if kernel in ("layout_dense", "tinygemm_bf16"):  # only with the weight in the CPU layout (measured so)
        return in_kernel_layout(m)
    if not kernel.startswith("tinygemm"):
        return True
    if in_kernel_layout(m):
        return device.type == "cpu"
    return INT4_PACKED_COPY.get(device.type, False) and tinygemm_fits(m.out_features, m.in_features, device, dtype)


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
        if not to_official_layout(m):
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
