"""glmapp's own CPU kernels for decoding (`kernels/cpu_kernels.c`): linears at a few activation rows, and the
rest of a decode step fused (RMSNorm, rotary embedding, SwiGLU, attention over the paged cache).

Decoding reads every weight once per token, so its speed is the speed at which the linears stream their
weights from memory. ATen's kernels did not get near it at one row (bench/RESULTS.md, "Session 8"): on the
[65024, 1024] output layer, one thread, oneDNN's packed bf16 read 14 GB/s, `_weight_int8pack_mm` 9 GB/s and
the int4 tinygemm kernel 10 GB/s, where a plain read of the same bytes runs at ~20 GB/s. The C loops here read
each weight row front to back with 4 accumulators (bf16/int8: each thread's rows as 4 interleaved streams, for
more reads in flight), decode int4 nibbles into bf16 with one ternary-logic op each (or, for rows past 4096
columns, multiply them as bytes on AVX512-VNNI), and run the whole decode step's layers in one call
(`glm_decode_layers`, used by glmapp/engine/cpu_decode.py).

Notable choices:
- Built on the user's machine at first use (`cc -O3 -march=native -fopenmp`, under a second), cached in the
  glmapp cache folder under a key of the source, the compiler and the CPU's flags; loaded with ctypes (the call
  releases the GIL). A machine without a C compiler, without AVX-512, or whose build fails the self-test keeps
  ATen's kernels, with one logged line saying why. `GLMAPP_CPU_KERNELS=torch` opts out.
- The library links libgomp by soname, so it joins torch's OpenMP runtime instead of starting a second one
  (two teams on few cores stop spinning and wait on each other: `cpu_threads`), and runs with the calling
  thread's torch thread count.
- Weights are read as the model holds them (bf16 [N, K]; int8 [N, K]; int4 in the official packing [N, K/2]),
  so no second copy and no layout change: saving, merging and training see the same tensors.
- Numerics: fp32 sums. bf16 weights and int4 on short rows take x in bf16 (as ATen's bf16 kernels did); int8 and
  int4 on long rows take x as int16 with a power-of-two scale per row (AVX512-VNNI: x keeps 14-15 significant
  bits, finer than bf16's 8, and is exact for |x| >= max|x|/64 in bf16 models). CPUs with AVX-512 but without
  BF16/VNNI get fp32 FMA loops on x as it is; others scalar C (both built and self-tested in the test suite).
- Callers decide when to use it (`MAX_ROWS`, `MAX_K`, `takes`: past those ATen's kernels were faster).
- The rest of a decode step was as slow as its linears: ~60 small torch ops per layer at a few µs of dispatch
  each (6-7 ms of a 15 ms int4 step on the mid model). `rms_norm`, `rope`, `swiglu` and `attend` do one layer's
  norm, rotary, activation and attention in one call each, in fp32, rounding where the torch code rounds
  (`-ffp-contract=off` keeps each product rounded as torch's). They run for CPU calls without autograd;
  the modules fall back to their torch code otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from glmapp.cpu_threads import single_threaded
from glmapp.paths import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "cpu_kernels.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
W_BF16, W_INT8, W_INT4 = 0, 1, 2
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Most activation rows for which these loops beat ATen's kernels, by weight kind (bench/cpu_kernels.py on the mid
# model's linears and the 65k output layer, 1 thread; bench/RESULTS.md "Session 8"): bf16 1.2-1.9x at 1-2 rows,
# oneDNN ahead from 4; int8 1.2-2.6x at 1-4 rows, even at 8; int4 1.3-1.5x at 1-8 rows, even at 16.
MAX_ROWS = {W_BF16: 2, W_INT8: 4, W_INT4: 8}
# Longest rows (K) for which they win at one row: past ~8k columns the activation row fills L1 beside the streamed
# weights, and oneDNN's bf16 / ATen's int8 kernels were ahead (0.77-0.95x at K = 13696, ChatGLM-6B's 4h -> h);
# int4 still won there (1.2-1.7x).
MAX_K = {W_BF16: 8192, W_INT8: 8192, W_INT4: None}


def takes(kind: int, in_features: int) -> bool:
    """Are these loops the faster choice for a weight of `kind` with `in_features` columns (at few rows)?"""
    return (MAX_K[kind] is None or in_features <= MAX_K[kind]) and (kind != W_INT4 or in_features % 2 == 0)


def cache_dir() -> Path:
    return cache_root() / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(out_dir: Path | None = None, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile `kernels/cpu_kernels.c` for this machine (or find the cached build); -> the shared library's path.
    Raises RuntimeError with the compiler's message when it cannot be built. (Tests pass other `flags` to build the
    loops of older CPUs: AVX-512 without BF16/VNNI, or none.)"""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C compiler {cc} does not run ({e})") from e
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, version.encode(), _cpu_flags().encode(), " ".join(flags).encode()]))
    out_dir = out_dir or cache_dir()
    target = out_dir / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # each builder its own file; the rename is atomic
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"building the CPU kernels failed ({e})") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.glm_gemv_isa.restype = ctypes.c_int
    lib.glm_gemv.restype = ctypes.c_int
    vp, i, long_ = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.glm_gemv.argtypes = [i, vp, vp, i, vp, i, vp, i, vp, i, long_, long_, long_]
    lib.glm_rmsnorm.restype = lib.glm_swiglu.restype = lib.glm_rope.restype = None
    lib.glm_rmsnorm.argtypes = [vp, i, vp, i, vp, i, long_, long_, ctypes.c_float]
    lib.glm_swiglu.argtypes = [vp, i, vp, long_, long_]
    lib.glm_rope.argtypes = [vp, i, long_, vp, vp, long_, long_, long_, long_]
    lib.glm_dequant.restype = None
    lib.glm_dequant.argtypes = [i, vp, vp, i, vp, i, long_, long_]
    lib.glm_argmax.restype = None
    lib.glm_argmax.argtypes = [vp, i, long_, long_, vp]
    lib.glm_attend.restype = ctypes.c_int
    lib.glm_attend.argtypes = [vp, i, vp, vp, i, vp, vp, vp, long_, long_, long_, long_, ctypes.c_float]
    return lib


def _self_test(lib) -> str | None:
    """None when the built loops agree with torch on every weight kind and activation dtype, else why not."""
    from glmapp.quant import dequantize, quantize_weight

    gen = torch.Generator().manual_seed(0)
    for kind, bits in ((W_BF16, None), (W_INT8, 8), (W_INT4, 4)):
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            for rows, n, k in ((1, 37, 192), (3, 8, 320), (6, 5, 128), (1, 3, 50), (5, 4, 170), (1, 3, 4226),
                              (3, 2, 4160)):  # the last two: int4's long-row (VNNI) loops
                w = torch.randn(n, k, generator=gen).to(torch.bfloat16 if kind == W_BF16 else dtype)
                x = torch.randn(rows, k, generator=gen).to(dtype)
                bias = torch.randn(n, generator=gen).to(dtype)
                if bits is None:
                    weight, scale, ref_w = w, None, w.float()
                else:
                    weight, scale = quantize_weight(w, bits)
                    ref_w = dequantize(weight, scale, bits, torch.float32)
                ref = x.to(torch.bfloat16 if kind != W_INT8 else dtype).float() @ ref_w.T + bias.float()
                got = _call(lib, kind, x, weight, scale, bias)
                # within 2% of the largest output: the CPU's loops may take x in bf16 (AVX512-BF16) or exactly
                if got is None or (got.float() - ref).abs().max() > 0.02 * ref.abs().max() + 0.05:
                    return f"the built kernels disagree with torch ({kind=}, {dtype}, {rows} rows)"
                if bits is not None and not torch.equal(_dequantize(lib, kind, weight, scale, dtype),
                                                        dequantize(weight, scale, bits, dtype)):
                    return f"dequantization disagrees with torch ({kind=}, {dtype})"
    return None


@functools.cache
def library():
    """The loaded kernels, or None (the reason logged once)."""
    # Often first called from the thread that builds an engine: the self-test's torch ops must not give that
    # thread an OpenMP team (a second team beside the engine thread's made 2-thread int4 decoding 25% slower).
    with single_threaded():
        return _load()


def _load():
    if os.environ.get("GLMAPP_CPU_KERNELS", "auto").lower() == "torch":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.info("glmapp's CPU kernels are written for x86-64; ATen's kernels run on %s", platform.machine())
        return None
    try:
        lib = _bind(build())
    except (RuntimeError, OSError) as e:
        log.warning("glmapp's CPU decode kernels are unavailable, ATen's run instead: %s", e)
        return None
    if lib.glm_gemv_isa() < 512:
        log.info("this CPU has no AVX-512: ATen's kernels run for few-row linears")
        return None
    problem = _self_test(lib) or _self_test_fused(lib)
    if problem:
        log.warning("glmapp's CPU decode kernels are off: %s", problem)
        return None
    return lib


def _self_test_fused(lib) -> str | None:
    """None when the fused kernels agree with the torch code they replace, else why not."""
    import torch.nn.functional as F

    from glmapp.engine.paged_attention import paged_decode_rows_torch
    from glmapp.models.chatglm import apply_rotary

    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        x, w = torch.randn(3, 96, generator=gen).to(dtype), torch.rand(96, generator=gen).to(dtype)
        ref = F.rms_norm(x.float(), (96,), w.float(), 1e-5).to(dtype)
        if not torch.allclose(_rms_norm(lib, x, w, 1e-5).float(), ref.float(), atol=0.02, rtol=0.01):
            return f"RMSNorm disagrees with torch ({dtype})"
        h = torch.randn(2, 1, 2 * 80, generator=gen).to(dtype)
        gate, up = h.chunk(2, dim=-1)
        if not torch.allclose(_swiglu(lib, h).float(), (F.silu(gate) * up).float(), atol=0.02, rtol=0.01):
            return f"SwiGLU disagrees with torch ({dtype})"
        qkv = torch.randn(1, 2, 5 * 32 + 8, generator=gen).to(dtype)
        angles = torch.rand(1, 2, 1, 8, generator=gen) * 6
        rotations = torch.stack((angles.cos(), angles.sin()), -1)
        ref = apply_rotary(qkv[..., :5 * 32].unflatten(-1, (5, 32)), rotations)
        if not torch.allclose(_rope(lib, qkv, 5, 32, rotations).float(), ref.float(), atol=0.02, rtol=0.01):
            return f"the rotary embedding disagrees with torch ({dtype})"
        logits = torch.randn(3, 2500, generator=gen).to(dtype)
        logits[1, 7] = logits[1, 2000] = 9.0  # a tie: the first one wins
        logits[2, 1500] = float("nan")
        if _argmax(lib, logits).tolist() != logits.float().argmax(-1).tolist():
            return f"argmax disagrees with torch ({dtype})"
        kc, vc = torch.randn(20, 2, 32, generator=gen).to(dtype), torch.randn(20, 2, 32, generator=gen).to(dtype)
        q = torch.randn(2, 4, 32, generator=gen).to(dtype)
        rows = [torch.tensor([3, 1, 7]), torch.arange(5, 17)]
        ref = paged_decode_rows_torch(q, kc, vc, rows)
        if not torch.allclose(_attend(lib, q, kc, vc, rows).float(), ref.float(), atol=0.02, rtol=0.01):
            return f"decode attention disagrees with torch ({dtype})"
    return None


def available() -> bool:
    return library() is not None


def _call(lib, kind: int, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
          bias: torch.Tensor | None) -> torch.Tensor | None:
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    n = weight.shape[0]
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    xd = DTYPES[x.dtype]
    rc = lib.glm_gemv(kind, weight.data_ptr(),
                      None if scale is None else scale.data_ptr(), DTYPES.get(getattr(scale, "dtype", None), 0),
                      None if bias is None else bias.data_ptr(), DTYPES.get(getattr(bias, "dtype", None), 0),
                      x2.data_ptr(), xd, y.data_ptr(), xd, x2.shape[0], n, k)
    if rc != 0:
        return None
    return y.view(*x.shape[:-1], n)


def usable(kind: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Can (and should) these loops run this call? CPU, few rows, a shape and dtypes they take, and no autograd
    (they have no backward: a call where x, the weight or the bias needs a gradient goes to torch)."""
    rows = x.numel() // max(x.shape[-1], 1)
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if needs_grad and torch.is_grad_enabled():
        return False
    return (rows <= MAX_ROWS[kind] and x.device.type == "cpu" and x.dtype in DTYPES and weight.device.type == "cpu"
            and takes(kind, x.shape[-1]) and weight.is_contiguous() and library() is not None)


def linear(kind: int, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ W.T (· scale per output row) + bias with W of `kind`; None when the loops refused the call (the caller
    then runs its torch path). Check `usable` first."""
    if (scale is not None and not scale.is_contiguous()) or (bias is not None and not bias.is_contiguous()):
        return None
    return _call(library(), kind, x, weight, scale, bias)


# ---- the fused parts of a decode step ---------------------------------------------------------------------
def fused_usable(*tensors: torch.Tensor) -> bool:
    """May the fused kernels run on these tensors? CPU, a dtype they take, no autograd, the library built."""
    return (all(t.device.type == "cpu" and t.dtype in DTYPES and not (t.requires_grad and torch.is_grad_enabled())
                for t in tensors) and library() is not None)


def _rms_norm(lib, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xc = x.contiguous()
    y = torch.empty_like(xc)
    h = x.shape[-1]
    lib.glm_rmsnorm(xc.data_ptr(), DTYPES[x.dtype], weight.contiguous().data_ptr(), DTYPES[weight.dtype],
                    y.data_ptr(), DTYPES[x.dtype], xc.numel() // h, h, eps)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.rms_norm(x.float(), weight.float()).to(x.dtype)` in one call."""
    return _rms_norm(library(), x, weight, eps)


def _swiglu(lib, h: torch.Tensor) -> torch.Tensor:
    hc = h.contiguous()
    f = h.shape[-1] // 2
    y = torch.empty(*h.shape[:-1], f, dtype=h.dtype)
    lib.glm_swiglu(hc.data_ptr(), DTYPES[h.dtype], y.data_ptr(), hc.numel() // (2 * f), f)
    return y


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up` of h = [gate | up] (last dim) in one call."""
    return _swiglu(library(), h)


def _rope(lib, qkv: torch.Tensor, heads: int, head_dim: int, rotations: torch.Tensor) -> torch.Tensor:
    rows = qkv.reshape(-1, qkv.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    rot = rotations.float().contiguous()
    r2 = rot.shape[-2]
    y = torch.empty(*qkv.shape[:-1], heads, head_dim, dtype=qkv.dtype)
    lib.glm_rope(rows.data_ptr(), DTYPES[qkv.dtype], rows.stride(0), y.data_ptr(), rot.data_ptr(), rows.shape[0],
                 heads, head_dim, r2)
    return y


def rope(qkv: torch.Tensor, heads: int, head_dim: int, rotations: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` of the first `heads` heads of each row of qkv [..., >= heads * head_dim] (rotations
    [b, t, 1, rot/2, 2] fp32, one per row), as a new [..., heads, head_dim] tensor, in one call."""
    return _rope(library(), qkv, heads, head_dim, rotations)


def _attend(lib, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, row_slots: list[torch.Tensor],
            scale: float | None = None) -> torch.Tensor:
    b, h, d = q.shape
    g = k_cache.shape[1]
    qc = q.contiguous()
    slots = torch.cat(row_slots).to(torch.int64).contiguous()
    offsets = torch.tensor([0] + [len(s) for s in row_slots], dtype=torch.int64).cumsum(0)
    out = torch.empty_like(qc)
    rc = lib.glm_attend(qc.data_ptr(), DTYPES[q.dtype], k_cache.data_ptr(), v_cache.data_ptr(),
                        DTYPES[k_cache.dtype], slots.data_ptr(), offsets.data_ptr(), out.data_ptr(), b, h, g, d,
                        d ** -0.5 if scale is None else scale)
    if rc != 0:
        raise MemoryError("decode attention could not allocate its work buffers")
    return out


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           row_slots: list[torch.Tensor]) -> torch.Tensor:
    """`paged_attention.paged_decode_rows` in one call: q [B, H, D], caches [slots, G, D] (contiguous)."""
    return _attend(library(), q, k_cache, v_cache, row_slots)


def _argmax(lib, x: torch.Tensor) -> torch.Tensor:
    xc = x.contiguous()
    out = torch.empty(xc.numel() // x.shape[-1], dtype=torch.int64)
    lib.glm_argmax(xc.data_ptr(), DTYPES[x.dtype], out.shape[0], x.shape[-1], out.data_ptr())
    return out.view(x.shape[:-1])


def argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` in one pass (ATen's took 230 µs on 65k bf16 logits at one thread, this 10-20)."""
    return _argmax(library(), x)


def _dequantize(lib, kind: int, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = weight.shape[0]
    k = weight.shape[1] * (2 if kind == W_INT4 else 1)
    out = torch.empty(n, k, dtype=dtype)
    lib.glm_dequant(kind, weight.data_ptr(), scale.contiguous().data_ptr(), DTYPES[scale.dtype], out.data_ptr(),
                    DTYPES[dtype], n, k)
    return out


def dequantize(kind: int, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`glmapp.quant.dequantize` of an int8 or official int4 weight, in one parallel pass (prefill chunks)."""
    return _dequantize(library(), kind, weight, scale, dtype)
