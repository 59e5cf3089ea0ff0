"""InlineEngine: the engine without a thread of its own, for ZeroGPU (CUDA exists only inside a decorated call).

Notable choices:
- The reader's thread runs the steps: requests submitted together (`submit_together`: one chat reply, or all
  columns of a Compare run) form one `InlineRun`, and a reader of any of its handles runs steps
  (`RequestHandle.drive`) until its handle has a delta. Whichever reader drives, every request of the run
  advances in the same batch, so a Compare run read by one thread per column is still one batch.
- A run is the threaded engine's step logic (`Engine._iteration` and what it calls: scheduling, chunked prefill,
  out-of-memory shrinking, failure isolation, finishing) on a KV cache of its own, sized for its requests
  (prompt + max new tokens each, capped by the same budget as the threaded engine) and dropped when its last
  request ends: between calls the engine holds no KV memory. Same inputs, same token ids as the threaded engine.
- Steps of concurrent runs (two users at once) take turns under one lock (the adapter rows of a step are held
  on the model, and on CPU one compute thread pool at a time is faster); calls are not batched with each other.
- No static decode (CUDA graphs): a captured graph is bound to one cache's buffers, and a cache lives for one call.
- A cancel ends the request at once in the cancelling thread: the reader that would drive may be the one leaving.
- The decode rate of finished requests (`DecodeRate`, in `stats()`) sizes the next ZeroGPU call
  (`glmapp.ui.zero_gpu`); it lives in shared memory because ZeroGPU runs each call in a forked worker process.
"""

from __future__ import annotations

import multiprocessing
import threading

import torch

from glmapp import cpu_linear, quant_kernels
from glmapp.adapters import AdapterManager
from glmapp.cpu_threads import claim_compute_threads, single_threaded
from glmapp.engine.engine import OUTPUT_QUANT, Engine, EngineConfig, _kv_budget_bytes
from glmapp.engine.kv_cache import BlockAllocator, PagedKVCache
from glmapp.engine.request import Delta
from glmapp.engine.runner import ModelRunner
from glmapp.engine.scheduler import Scheduler
from glmapp.errors import EngineStopped

LOST = "The inline engine ended this request's run without an answer for it (an engine bug); send it again."


class DecodeRate:
    """Tokens per second after the first token, averaged over finished requests (0.0 until one finished).

    In shared memory: a ZeroGPU call runs in a worker forked from this process, and what it measures must reach
    the main process, which sizes the next call."""

    WEIGHT = 0.3  # of the newest request in the running average

    def __init__(self):
        self._value = multiprocessing.Value("d", 0.0)

    @property
    def value(self) -> float:
        return self._value.value

    def record(self, tokens_per_s: float) -> None:
        if tokens_per_s <= 0:
            return
        with self._value.get_lock():
            old = self._value.value
            self._value.value = tokens_per_s if old == 0 else (1 - self.WEIGHT) * old + self.WEIGHT * tokens_per_s


class InlineEngine:
    """The `Engine` interface (`submit`, `cancel`, `call`, `stats`, `shutdown`) run by the readers' threads."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or EngineConfig()
        weight = model.transformer.output_layer.weight
        self.device = weight.device
        self.dtype = weight.dtype if weight.dtype.is_floating_point else torch.float16
        with single_threaded():
            quant_kernels.prepare(model, self.dtype)
        self.block_bytes = PagedKVCache.bytes_per_block(model.config, self.config.block_size, self.dtype)
        self.context_length = int(model.config.seq_length)
        self.vocab = int(model.config.padded_vocab_size)
        self.lock = threading.RLock()  # one step (or `call`) at a time, whichever run it belongs to
        self._runs: dict[str, InlineRun] = {}  # request id -> its run, while the run is open
        self._alive = True
        self._stop_reason = ""
        self._restore_weights = True
        self.steps = 0
        self.error_count = 0
        self.decode_rate = DecodeRate()
        use_pack = self.config.prepack if self.config.prepack is not None else not self.config.compile
        self.packed_linears = (cpu_linear.pack(model, output_bits=OUTPUT_QUANT[self.config.output_quant])
                               if use_pack and self.device.type == "cpu" else 0)

    @property
    def capacity_tokens(self) -> int:
        """KV tokens one run may hold: the threaded engine's budget (free GPU memory is read now)."""
        return self._max_blocks() * self.config.block_size

    def _max_blocks(self) -> int:
        return max(1, _kv_budget_bytes(self.config, self.device) // self.block_bytes)

    # ---- client side -------------------------------------------------------------------------------
    def submit(self, handle, request) -> None:
        self.submit_together([(handle, request)])

    def submit_together(self, pairs) -> None:
        """(handle, request) pairs that run as one batch; their readers drive it (see the module docstring)."""
        if not self._alive:
            raise EngineStopped(self._stop_reason)
        max_blocks = self._max_blocks()
        bs, manager = self.config.block_size, AdapterManager.of(self.model)
        cap = max_blocks * bs
        need, prefixes = 0, {}
        for _, request in pairs:
            prefix = manager.prefix(request.adapter) if request.adapter is not None else None
            p = prefix.length if prefix is not None else 0
            if prefix is not None:
                prefixes[prefix.uid] = -(-p // bs)
            n = len(request.prompt_ids)
            need += -(-(p + min(n + max(request.max_new_tokens, 1), self.context_length, cap)) // bs)
        run = InlineRun(self, min(max_blocks, max(1, need + sum(prefixes.values()))), cap)
        with self.lock:
            for handle, request in pairs:
                run.submit(handle, request)
                handle.drive = run.drive
            run.take_inbox()
            for seq_id in run.open_ids():
                self._runs[seq_id] = run
            run.release_if_done()

    def cancel(self, request_id: str) -> None:
        with self.lock:
            run = self._runs.get(request_id)
            if run is not None:
                run.cancel(request_id)

    def call(self, fn, timeout: float | None = None):
        """Run `fn()` between steps, in this thread (`timeout` is accepted for the threaded engine's signature)."""
        with self.lock:
            if not self._alive:
                raise EngineStopped(self._stop_reason)
            return fn()

    def shutdown(self, restore_weights: bool = True) -> None:
        """Open requests end as cancelled, no new ones are taken; the model gets its plain CPU weights back."""
        with self.lock:
            if self._alive:
                self._stop_reason = "The engine is shut down; reload the model to serve again."
            self._alive = False
            for run in set(self._runs.values()):
                run.end_all("cancelled", "The engine was shut down.")
            if self.packed_linears and restore_weights:
                cpu_linear.unpack(self.model)
                self.packed_linears = 0

    def is_running(self) -> bool:
        return self._alive

    def stats(self) -> dict:
        with self.lock:
            runs = set(self._runs.values())
            return {"free_blocks": sum(r.allocator.num_free for r in runs),
                    "num_blocks": sum(r.allocator.num_blocks for r in runs),
                    "waiting": sum(len(r.scheduler.waiting) for r in runs),
                    "running": sum(len(r.scheduler.running) for r in runs), "steps": self.steps,
                    "capacity_tokens": self.capacity_tokens, "errors": self.error_count,
                    "max_seqs": self.config.max_seqs, "max_batch_tokens": self.config.max_batch_tokens or 0,
                    "runs": len(runs), "kv_bytes": sum(r.kv_bytes for r in runs),
                    "decode_tokens_per_s": self.decode_rate.value}

    def _forget(self, run: InlineRun) -> None:
        for seq_id in [i for i, r in self._runs.items() if r is run]:
            del self._runs[seq_id]


class InlineRun(Engine):
    """One call's requests on a KV cache of their own: `Engine`'s step logic, driven by its readers.

    `Engine.__init__` is not called (it starts the engine thread and allocates the engine-lifetime cache): this
    sets the attributes the inherited step methods use."""

    def __init__(self, engine: InlineEngine, num_blocks: int, capacity_tokens: int):
        cfg, model = engine.config, engine.model
        self.engine, self.model, self.tokenizer, self.config = engine, model, engine.tokenizer, cfg
        with single_threaded():
            self.cache = PagedKVCache(model.config.num_layers, num_blocks, cfg.block_size,
                                      model.config.num_kv_groups, model.config.kv_channels, engine.dtype, engine.device)
        self.kv_bytes = self.cache.k.numel() * self.cache.k.element_size() * 2
        self.allocator = BlockAllocator(num_blocks, cfg.block_size)
        budget = cfg.max_batch_tokens or (2048 if engine.device.type == "cuda" else 512)
        self.scheduler = Scheduler(self.allocator, cfg.max_seqs, budget, cfg.oom_regrow_steps)
        self.runner = ModelRunner(model, self.cache, None)
        self.capacity_tokens = capacity_tokens  # what validation and max_new_tokens see: as the threaded engine
        self.context_length, self.vocab = engine.context_length, engine.vocab
        self._inbox, self._calls, self._cancels = [], [], set()
        self._wake = threading.Condition()
        self._alive, self._stop_reason = True, ""
        self._open, self._outbox = {}, []
        self.steps = self.error_count = 0
        self._threads: set[int] = set()  # reader threads that claimed the compute threads for this run

    def take_inbox(self) -> None:
        """Queue what `submit` accepted (under the engine's lock)."""
        inbox, self._inbox = self._inbox, []
        for seq in inbox:
            self._open[seq.id] = seq
        failed = []
        for seq in inbox:
            try:
                self.scheduler.add(seq)
            except Exception as e:  # noqa: BLE001 - reported to that request
                failed.append((seq, e))
        for seq, e in failed:
            self._internal_error(e, "queueing it", [seq])
        self._deliver()

    def open_ids(self) -> list[str]:
        return list(self._open)

    def drive(self, handle) -> None:
        """Run steps in this (the reader's) thread until `handle` has a delta."""
        while not handle._deltas:
            with self.engine.lock:
                if handle._deltas or handle.done:
                    return
                if not self._open:  # every request of the run ended, this one without a word
                    handle.put(Delta(finish_reason="error", error=LOST))
                    return
                self._step_once()

    def _step_once(self) -> None:
        """One step of the run (under the engine's lock); its deltas delivered, its memory freed if it ended."""
        if threading.get_ident() not in self._threads:
            self._threads.add(threading.get_ident())
            claim_compute_threads(self.config.num_threads)
        before = (self.steps, self.error_count)
        try:
            self._iteration([], set())
        except Exception as e:  # noqa: BLE001 - as the engine thread: the run's open requests end
            self._internal_error(e, "running a step", list(self._open.values()))
        self.engine.steps += self.steps - before[0]
        self.engine.error_count += self.error_count - before[1]
        self._deliver()
        self.release_if_done()

    def drive_to_end(self) -> None:
        """Run steps until every request of the run ended (for readers in an event loop, from a thread of their own)."""
        while self._open:
            with self.engine.lock:
                if not self._open:
                    return
                self._step_once()

    def _finish(self, seq, reason: str, error: str | None = None, token_ids: list[int] | None = None) -> None:
        super()._finish(seq, reason, error, token_ids)
        if reason in ("stop", "length") and self._outbox and self._outbox[-1][0] is seq.payload.handle:
            usage = self._outbox[-1][1].usage  # what the reader is told
            self.engine.decode_rate.record(usage.decode_tokens_per_second if usage is not None else 0.0)

    def cancel(self, request_id: str) -> None:
        seq = self._open.get(request_id)
        if seq is not None:
            self._finish(seq, "cancelled")
            self._deliver()
        self.release_if_done()

    def end_all(self, reason: str, error: str | None) -> None:
        for seq in list(self._open.values()):
            self._finish(seq, reason, error)
        self._deliver()
        self.release_if_done()

    def release_if_done(self) -> None:
        """With no request left open, give the KV memory back and leave the engine's table."""
        if self._open or self.cache is None:
            return
        self.engine._forget(self)
        self.cache = self.runner = None
        self.kv_bytes = 0
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()
