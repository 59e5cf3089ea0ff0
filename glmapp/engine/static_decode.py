"""Decode steps with static shapes: what CUDA graphs (and torch.compile) need.

A decode-only step (every row adds one token and samples, no LoRA rows) is copied into fixed buffers
sized for the largest batch, padded up to a "bucket" batch size, and run through the model with a
cache context whose attention is the paged decode kernel (`paged_attention.paged_decode`):
    ids, positions, slots [bucket]   block tables [bucket, W] int32   lengths [bucket] int32
Padding rows write their key/value into a spare block that no request owns and attend to it alone.

On CUDA each bucket is captured once as a CUDA graph (lazily, at its first use) and replayed: one
pinned host→device copy of the packed inputs, one replay, and the caller reads the sampled ids —
the only synchronisation of a step. W is then the model's whole context in blocks, so a graph serves
every length (the kernel skips the blocks a row does not use). `compile=True` runs the step through
`torch.compile` first (before capture on CUDA; attention and the cache write stay outside the compiled
graphs, which fuse the rest of each layer); off by default because compiling takes minutes and only a
long-running server earns it back.

On CPU there is nothing to capture; the path runs eagerly with W = the batch's widest table rounded up
to a power of two, and exists there so its results can be tested against the varlen step.
Steps with prefill chunks or adapter rows take the varlen path (`runner.StepContext`): LoRA row groups
have data-dependent shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from glmapp.engine.kv_cache import PagedKVCache
from glmapp.engine.paged_attention import paged_decode, triton_available

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class StaticDecodeContext:
    """`KVCache.attend` for a padded decode batch: q/k/v [bucket, 1, heads|groups, d]."""

    cache: PagedKVCache
    slots: torch.Tensor  # [bucket] int64
    tables: torch.Tensor  # [bucket, W] int32
    lengths: torch.Tensor  # [bucket] int32

    # Outside torch.compile: traced, the in-place write into the cache (a tensor the compiled graph does not
    # own) was functionalised into a copy of the whole cache every step (bench/RESULTS.md, "Static-shape
    # decode"). Compiled graphs now end and restart around attention; the rest of each layer is still fused.
    @torch.compiler.disable
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc.index_copy_(0, self.slots, k[:, 0])
        vc.index_copy_(0, self.slots, v[:, 0])
        out = paged_decode(q[:, 0], kc, vc, self.tables, self.lengths, self.cache.block_size)
        return out[:, None]


def static_decode_supported(device: torch.device) -> str | None:
    """None when static decode can run on `device`, else why not."""
    if device.type == "cuda" and not triton_available():
        return "Triton is not installed (the paged decode kernel needs it)"
    return None


class StaticDecoder:
    def __init__(self, model, cache: PagedKVCache, spare_block: int, max_batch: int, max_blocks: int,
                 graphs: bool, compile: bool = False):
        self.model, self.cache = model, cache
        self.device = cache.k.device
        self.block_size = cache.block_size
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self.graphs = graphs and self.device.type == "cuda"
        self.spare_block = spare_block
        self._forward = self._compiled if compile else self._eager_forward
        self._compiled_forward = torch.compile(self._eager_forward) if compile else None
        # Inputs packed in one int64 row per sequence: id, position, slot, length, W table entries.
        self._host = torch.zeros(max_batch, 4 + max_blocks, dtype=torch.int64,
                                 pin_memory=self.device.type == "cuda")
        self._inputs = torch.zeros(max_batch, 4 + max_blocks, dtype=torch.int64, device=self.device)
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.steps = 0  # decode steps run here (tests and benchmarks read these two)
        self.replays = 0  # of which replayed a captured CUDA graph

    def accepts(self, work) -> bool:
        if not work or len(work) > self.max_batch:
            return False
        for w in work:
            seq = w.seq
            if (w.num_tokens != 1 or not w.samples or seq.num_computed == 0 or seq.adapter is not None
                    or -(-(seq.num_computed + 1) // self.block_size) > self.max_blocks):
                return False
        return True

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.inference_mode()
    def run(self, work) -> torch.Tensor:
        """Logits [len(work), vocab] of one decode-only step (see `accepts`)."""
        n, bs = len(work), self.block_size
        self.steps += 1
        b = self.bucket(n)
        widest = max(w.seq.num_computed // bs + 1 for w in work)
        width = self.max_blocks if self.graphs else min(self.max_blocks, 1 << (widest - 1).bit_length())
        rows = []
        for w in work:
            seq = w.seq
            pos = seq.num_computed
            table = seq.block_table[:pos // bs + 1]
            rows.append([seq.token_slice(pos, pos + 1)[0], pos, table[-1] * bs + pos % bs, pos + 1, *table,
                         *[self.spare_block] * (width - len(table))])
        pad = [0, 0, self.spare_block * bs, 1] + [self.spare_block] * width
        host = self._host[:b, :4 + width]
        host.copy_(torch.tensor(rows + [pad] * (b - n)))
        inputs = self._inputs[:b, :4 + width]
        inputs.copy_(host, non_blocking=True)
        if not self.graphs:
            return self._forward(*self._views(inputs))[:n]
        if b not in self._captured:
            try:
                self._capture(b)
            except torch.OutOfMemoryError:
                raise
            except Exception:  # a model that cannot be captured still runs eagerly
                log.exception("capturing the decode step failed; decoding without CUDA graphs")
                self.graphs = False
                return self._forward(*self._views(inputs))[:n]
        graph, logits = self._captured[b]
        graph.replay()
        self.replays += 1
        return logits[:n]

    def _views(self, inputs: torch.Tensor):
        return (inputs[:, 0:1], inputs[:, 1:2], inputs[:, 2], inputs[:, 3].to(torch.int32),
                inputs[:, 4:].to(torch.int32))

    def _compiled(self, *inputs):
        # Layers differ only by `layer_number`, which dynamo would treat as a constant: one compiled graph
        # per layer, and past the recompile limit the rest would silently run uncompiled.
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            return self._compiled_forward(*inputs)

    def _eager_forward(self, ids, positions, slots, lengths, tables):
        ctx = StaticDecodeContext(self.cache, slots, tables, lengths)
        return self.model.forward_cached(ids, positions, ctx)

    def _capture(self, b: int) -> None:
        """Record the decode step for bucket `b` reading from the first `b` rows of the input buffer.
        Warm-up runs (and any compilation) happen on a side stream first, as CUDA graphs require; they
        run this step's own inputs, so they write the same keys/values the replay then writes again."""
        inputs = self._inputs[:b]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(*self._views(inputs))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if not triton_available():  # the kernel failed in the warm-up: the reference over W blocks is no graph
            raise RuntimeError("the Triton paged decode kernel is unavailable")
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(*self._views(inputs))
        self._captured[b] = (graph, logits)
        log.info("captured the decode step for batch %d", b)
