"""Decode attention over the paged KV cache: one new query token per row, keys/values read through block tables.

Layout (see `PagedKVCache`), per layer:
    q: [B, H, D]   k_cache, v_cache: [num_slots, G, D] with slot = block * block_size + offset
    block_tables: [B, W] int32 (padded with any valid block id)   context_lens: [B] int32 (1..W*block_size)
Query head h reads KV group h // (H // G) (spec §3.6). The new token's k/v is already in the cache.

`paged_decode_reference` gathers each row's keys and masks by length (pure torch, any device).
`paged_decode_triton` is split-K "flash decoding":
  1. `_partial` kernel, grid (B, G, P) with P = cdiv(W * block_size, PARTITION_SIZE): each program
     takes the H // G query heads of one group together as the rows of one `tl.dot` (padded to >= 16
     rows, the smallest MMA tile; padded rows read q = 0 and are never stored), walks its partition in
     tiles of TILE_SIZE tokens (several blocks; each token's slot looked up in the block table) with an
     online softmax in fp32, and writes its unnormalised (max, sum, acc) to scratch. Programs whose
     partition starts past the row's length return at once.
  2. `_reduce` kernel, grid (B, H): rescales and sums the row's used partitions.
  When one partition covers the whole table (P == 1, known from shapes) step 1 writes the output directly.
CUDA-graph friendly: the grid depends only on (B, G, W), the kernels read lengths on the device, and the
host never reads tensor values. Scratch (fp32, [B, H, P] and [B, H, P, D]) is allocated per call with
`torch.empty`; shapes are static, so under graph capture it comes from the graph's private pool.
PARTITION_SIZE = 512 tokens: a 4k-token batch of 32 rows on ChatGLM2 (G = 2) gives 32*2*8 = 512 programs,
enough to fill an H100's 132 SMs, while each program still streams 32 blocks per q load and partial write
(vLLM's paged attention v2 uses the same size). Rows shorter than 512 tokens cost one program per group.
Triton is imported, and the kernels JIT-decorated, on first use: importing this module never needs Triton
(CPU installs use the reference), and under TRITON_INTERPRET=1 the kernels run on CPU tensors (the tests).
"""

from __future__ import annotations

import functools
import logging

import torch

from glmapp import cpu_kernels

tl = None  # triton.language, imported by `_kernels` on first use

PARTITION_SIZE = 512  # tokens per split-K program, a power of two >= 16 (tests shrink it)
TILE_SIZE = 64  # tokens per inner iteration: K and V tiles of 64 x 128 fp16 are 16 KiB each
_LOG2E = 1.4426950408889634
log = logging.getLogger(__name__)


def paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, block_size: int,
                           scale: float | None = None) -> torch.Tensor:
    """Decode attention by gathering every table entry and masking positions >= context_len (fp32 softmax)."""
    b, h, d = q.shape
    g = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    pos = torch.arange(block_tables.shape[1] * block_size, device=q.device)
    slots = block_tables.long().repeat_interleave(block_size, dim=1) * block_size + pos % block_size  # [B, L]
    valid = pos[None, :] < context_lens[:, None].long()  # [B, L]
    keys = k_cache[slots].float()  # [B, L, G, D]
    values = torch.where(valid[:, :, None, None], v_cache[slots].float(), 0.0)  # padding may hold NaN
    scores = torch.einsum("bgqd,blgd->bgql", q.float().view(b, g, h // g, d), keys) * scale
    probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bgql,blgd->bgqd", probs, values).reshape(b, h, d).to(q.dtype)


def paged_decode_rows(q, k_cache, v_cache, row_slots: list[torch.Tensor], scale: float | None = None) -> torch.Tensor:
    """Decode attention row by row over exactly each row's context slots (`row_slots[b]`, in order): no
    padding, no mask, no padded slot read. The CPU path where rows are few or long (see `rows_cheaper`)."""
    if (scale is None and k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype
            and cpu_kernels.fused_usable(q, k_cache)):
        return cpu_kernels.attend(q, k_cache, v_cache, row_slots)  # the same computation in one call
    return paged_decode_rows_torch(q, k_cache, v_cache, row_slots, scale)


def paged_decode_rows_torch(q, k_cache, v_cache, row_slots: list[torch.Tensor], scale: float | None = None):
    b, h, d = q.shape
    g = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    qg = q.float().view(b, g, h // g, d)
    out = torch.empty_like(q)
    for i, slots in enumerate(row_slots):
        keys, values = k_cache[slots].float(), v_cache[slots].float()  # [L, G, D]
        probs = (torch.einsum("gqd,lgd->gql", qg[i], keys) * scale).softmax(-1)
        out[i] = torch.einsum("gql,lgd->gqd", probs, values).reshape(h, d)
    return out


# CPU cost model of the two torch decode paths, µs per layer, fitted to the table in bench/RESULTS.md "Decode
# attention at long contexts on CPU": the reference pays once per call plus per padded token of every row,
# `paged_decode_rows` pays per row plus per real token.
_REFERENCE_CALL_US, _REFERENCE_TOKEN_US = 60.0, 0.36
_ROW_US, _ROW_TOKEN_US = 33.0, 0.21


def rows_cheaper(lengths: list[int], block_size: int) -> bool:
    """Is `paged_decode_rows` expected to beat the reference for decode rows of these context lengths?
    (one row: always; many short rows: no; long or uneven rows: yes)"""
    padded = -(-max(lengths) // block_size) * block_size
    reference = _REFERENCE_CALL_US + _REFERENCE_TOKEN_US * padded * len(lengths)
    return _ROW_US * len(lengths) + _ROW_TOKEN_US * sum(lengths) < reference


def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, block_size: int,
                        scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Split-K Triton decode attention (see the module docstring); writes into `out` when given."""
    b, h, d = q.shape
    g, w = k_cache.shape[1], block_tables.shape[1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"paged_decode_triton needs a power-of-two head dim >= 16, got {d}")
    if h % g:
        raise ValueError(f"query heads ({h}) must be a multiple of KV groups ({g})")
    if PARTITION_SIZE < 16 or PARTITION_SIZE & (PARTITION_SIZE - 1):
        raise ValueError(f"PARTITION_SIZE must be a power of two >= 16, got {PARTITION_SIZE}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("paged_decode_triton needs the `triton` package (pip install triton)")
    partial_kernel, reduce_kernel = kernels
    scale = d ** -0.5 if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    parts = -(-w * block_size // PARTITION_SIZE)
    maxes = torch.empty((b, h, parts), dtype=torch.float32, device=q.device)  # log2-domain score max
    sums = torch.empty_like(maxes)  # sum of exp2(score - max)
    acc = torch.empty((b, h, parts, d), dtype=torch.float32, device=q.device)  # unnormalised p @ v
    partial_kernel[(b, g, parts)](
        q, k_cache, v_cache, block_tables, context_lens, out, maxes, sums, acc, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        H=h, HEADS_PER_GROUP=h // g, HEADS_PAD=max(16, 1 << (h // g - 1).bit_length()), D=d,
        BLOCK_SIZE=block_size, PARTITION=PARTITION_SIZE, TILE=min(TILE_SIZE, PARTITION_SIZE), NUM_PARTITIONS=parts,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
    )
    if parts > 1:
        reduce_kernel[(b, h)](context_lens, out, maxes, sums, acc, out.stride(0), out.stride(1),
                              H=h, D=d, PARTITION=PARTITION_SIZE, NUM_PARTITIONS=parts)
    return out


def triton_available() -> bool:
    """Triton imports and its kernel has not failed in this process."""
    return _TRITON["state"] != "broken" and _kernels() is not None


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, block_size: int, scale=None) -> torch.Tensor:
    """Triton kernel on CUDA when Triton is available, else the torch reference.

    A kernel that fails at its first call (e.g. a Triton/driver combination it cannot compile for) is
    switched off for the process with one logged warning, and the reference serves; once it has run,
    its errors propagate."""
    if _wants_triton(q):
        if _TRITON["state"] == "proven":
            return paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)
        try:
            out = paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)
            _TRITON["state"] = "proven"
            return out
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any compile/launch failure: fall back, keep serving
            _TRITON["state"] = "broken"
            log.warning("the Triton paged decode kernel failed (%s: %s); using the torch reference",
                        type(e).__name__, e)
    return paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)


_TRITON = {"state": "untried"}  # untried | proven | broken (this process)


def _wants_triton(q: torch.Tensor) -> bool:
    return q.is_cuda and _TRITON["state"] != "broken" and _kernels() is not None


def _partial(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, maxes_ptr, sums_ptr, acc_ptr, qk_scale,
             stride_qb, stride_qh, stride_ks, stride_kg, stride_vs, stride_vg, stride_tb, stride_ob, stride_oh,
             H: tl.constexpr, HEADS_PER_GROUP: tl.constexpr, HEADS_PAD: tl.constexpr, D: tl.constexpr,
             BLOCK_SIZE: tl.constexpr, PARTITION: tl.constexpr, TILE: tl.constexpr,
             NUM_PARTITIONS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    row, group, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(lens_ptr + row)
    start = part * PARTITION
    if start >= context_len:
        return
    heads = group * HEADS_PER_GROUP + tl.arange(0, HEADS_PAD)
    head_ok = tl.arange(0, HEADS_PAD) < HEADS_PER_GROUP
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=head_ok[:, None], other=0.0)
    m_i = tl.full([HEADS_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS_PAD], tl.float32)
    acc = tl.zeros([HEADS_PAD, D], tl.float32)
    num_tiles = tl.cdiv(tl.minimum(context_len - start, PARTITION), TILE)
    for i in range(num_tiles):  # every tile holds >= 1 valid token, so m_i is finite after the first
        pos = start + i * TILE + tl.arange(0, TILE)
        valid = pos < context_len
        block = tl.load(tables_ptr + row * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        k = tl.load(k_ptr + slot[None, :] * stride_ks + group * stride_kg + dims[:, None], mask=valid[None, :],
                    other=0.0)  # [D, TILE]
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # log2 domain
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + group * stride_vg + dims[None, :], mask=valid[:, None],
                    other=0.0)  # [TILE, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    if NUM_PARTITIONS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:
        at = (row * H + heads) * NUM_PARTITIONS + part  # index into [B, H, P]
        tl.store(maxes_ptr + at, m_i, mask=head_ok)
        tl.store(sums_ptr + at, l_i, mask=head_ok)
        tl.store(acc_ptr + at[:, None] * D + dims[None, :], acc, mask=head_ok[:, None])


def _reduce(lens_ptr, out_ptr, maxes_ptr, sums_ptr, acc_ptr, stride_ob, stride_oh,
            H: tl.constexpr, D: tl.constexpr, PARTITION: tl.constexpr, NUM_PARTITIONS: tl.constexpr):
    row, head = tl.program_id(0), tl.program_id(1)
    used = tl.cdiv(tl.load(lens_ptr + row), PARTITION)  # partitions past the length were never written
    first = (row * H + head) * NUM_PARTITIONS
    dims = tl.arange(0, D)
    m = tl.load(maxes_ptr + first)
    total = tl.load(sums_ptr + first)
    acc = tl.load(acc_ptr + first * D + dims)
    for part in range(1, used):
        m_p = tl.load(maxes_ptr + first + part)
        m_new = tl.maximum(m, m_p)
        alpha, beta = tl.exp2(m - m_new), tl.exp2(m_p - m_new)
        total = total * alpha + tl.load(sums_ptr + first + part) * beta
        acc = acc * alpha + tl.load(acc_ptr + (first + part) * D + dims) * beta
        m = m_new
    tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, (acc / total).to(out_ptr.dtype.element_ty))


@functools.cache
def _kernels():
    """Import Triton and JIT the kernels on first use; None without Triton.

    Importing late keeps CPU-only processes free of Triton, and TRITON_INTERPRET is read when Triton is first
    imported (its own library functions are JIT-decorated then), so it must be set before that moment.
    """
    global tl
    try:
        import triton
        import triton.language
    except ImportError:
        return None
    tl = triton.language
    return triton.jit(_partial), triton.jit(_reduce)
