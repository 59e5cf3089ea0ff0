"""Back big CPU tensors (the weights) with 2 MiB pages, so streaming them misses the TLB 512x less.

A CPU decode step reads every weight once, so it runs at the speed the memory is read. With 4 KiB pages a
stream crosses a page every 4 KiB, and each crossing walks the page tables; with transparent huge pages that
happens every 2 MiB. Measured on the mid benchmark model (bench/RESULTS.md, session 9): a 16 MiB bf16 weight
read 26.5 -> 30.2 GB/s on one thread, and bf16 decoding went ~60 -> ~67 tok/s.

Linux only, best effort: `madvise(MADV_HUGEPAGE)` (khugepaged may then merge the range later) and
`madvise(MADV_COLLAPSE)` (Linux >= 6.1: merge it now, copying each 2 MiB once). Only whole 2 MiB pages inside a
tensor's own storage are advised, so no other memory is touched; the contents stay as they are. Collapsing
copies each 2 MiB once (512 MiB: ~0.7 s), so the engine passes the weights only, not its KV cache. Where the kernel
refuses (older kernel, THP disabled, file-backed memory) nothing changes but speed. `GLMAPP_HUGE_PAGES=0` turns
it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("GLMAPP_HUGE_PAGES", "1") != "0"


def back(tensors) -> tuple[int, int]:
    """Ask for huge pages under each CPU tensor's storage (each storage once). -> (bytes now in huge pages,
    bytes the kernel refused); (0, 0) when off or not on Linux."""
    if not enabled():
        return 0, 0
    madvise = _madvise()
    seen, done, refused = set(), 0, 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_mkldnn:
            continue
        storage = t.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if start in seen or size < HUGE_PAGE:
            continue
        seen.add(start)
        lo = -(-start // HUGE_PAGE) * HUGE_PAGE
        hi = (start + size) // HUGE_PAGE * HUGE_PAGE
        if hi <= lo:
            continue
        madvise(lo, hi - lo, MADV_HUGEPAGE)
        if madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            done += hi - lo
        else:
            refused += hi - lo
    return done, refused


def back_model(model: torch.nn.Module, *extra: torch.Tensor) -> tuple[int, int]:
    """`back` over a model's parameters, buffers and the quantized copies modules hold outside them
    (cpu_linear.QuantizedOutputLinear), plus `extra` tensors; logs what happened once."""
    tensors = [*model.parameters(), *model.buffers(), *extra]
    for m in model.modules():
        copy = m.__dict__.get("quantized")
        if copy is not None:
            tensors += [*copy.parameters(), *copy.buffers()]
    done, refused = back(tensors)
    if done or refused:
        log.info("huge pages: %.0f MiB of weights moved to 2 MiB pages%s", done / 2**20,
                 f", {refused / 2**20:.0f} MiB refused by the kernel" if refused else "")
    return done, refused
