"""CPU thread pools: keep heavy torch work on one thread per process.

Each thread that runs parallel torch code gets its own OpenMP team. With two teams on a machine that
has few cores, libgomp stops spinning and every parallel region pays a thread wake-up (figures in
bench/RESULTS.md, "Engine"). The engine thread is where glmapp computes, so other threads (loading,
request handlers) run torch code single-threaded, and the engine thread takes the process's thread count.
"""

from __future__ import annotations

import contextlib

import torch

PROCESS_THREADS = torch.get_num_threads()  # captured at import, before glmapp changes anything


@contextlib.contextmanager
def single_threaded():
    """Run the block with one intra-op thread in this thread (no OpenMP team is created for it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def claim_compute_threads(n: int | None = None) -> None:
    """Call from the thread that does the heavy work (the engine thread)."""
    torch.set_num_threads(n or PROCESS_THREADS)
