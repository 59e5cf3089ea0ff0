"""The engine: one background thread owns the model, the KV memory and the scheduler.

Clients call `submit(handle, request)` / `cancel(id)` from any thread; the loop admits new requests
between steps (continuous batching), runs one step, turns sampled ids into text deltas and pushes
them to each request's handle. A failure inside one request ends that request with an error and the
engine goes on; an out-of-memory error ends the newest request and shrinks the batch.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from glmapp import cpu_linear, quant_kernels
from glmapp.adapters import AdapterManager
from glmapp.cpu_threads import claim_compute_threads, single_threaded
from glmapp.engine.kv_cache import BlockAllocator, PagedKVCache
from glmapp.engine.request import Delta, Usage
from glmapp.engine.runner import ModelRunner
from glmapp.engine.sampling import SamplingParams
from glmapp.engine.scheduler import Scheduler, Sequence
from glmapp.engine.static_decode import StaticDecoder, static_decode_supported
from glmapp.tokenizer import StreamDecoder

log = logging.getLogger(__name__)


@dataclass
class SamplingState:
    params: SamplingParams
    seed: int
    seen: torch.Tensor | None = None  # [V] tokens of prompt + output, only when a penalty applies

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0

    @property
    def penalised(self) -> bool:
        return self.params.repetition_penalty != 1.0

    def seen_mask(self, vocab: int, device) -> torch.Tensor:
        return self.seen if self.seen is not None else torch.zeros(vocab, dtype=torch.bool, device=device)


@dataclass
class RequestState:
    handle: object
    sampling: SamplingState
    stop_ids: frozenset
    decoder: StreamDecoder
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


@dataclass
class EngineConfig:
    kv_cache_mb: float | None = None  # None: 90% of free GPU memory, or 512 MB on CPU
    block_size: int = 16
    max_seqs: int = 32
    max_batch_tokens: int | None = None  # prefill chunk budget per step (None: 2048 on CUDA, 512 on CPU)
    num_threads: int | None = None  # CPU intra-op threads of the engine thread (None: the process's count)
    static_decode: bool | None = None  # decode steps in fixed buffers (None: on CUDA, see static_decode.py)
    cuda_graphs: bool = True  # replay captured CUDA graphs for static decode steps
    compile: bool = False  # torch.compile the static decode step
    prepack: bool | None = None  # oneDNN-packed CPU linears while the engine runs (None: on CPU unless compiling)

    def __post_init__(self):
        if self.block_size < 1 or self.max_seqs < 1 or (self.max_batch_tokens or 1) < 1:
            raise ValueError("block_size, max_seqs and max_batch_tokens must be positive")


def _kv_budget_bytes(cfg: EngineConfig, device: torch.device) -> int:
    if cfg.kv_cache_mb is not None:
        return int(cfg.kv_cache_mb * 2**20)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return 512 * 2**20


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or EngineConfig()
        weight = model.transformer.output_layer.weight
        device = weight.device
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float16
        with single_threaded():
            quant_kernels.prepare(model, dtype)  # int4 kernel copies first: the KV budget is what stays free
        per_block = PagedKVCache.bytes_per_block(model.config, self.config.block_size, dtype)
        num_blocks = max(1, _kv_budget_bytes(self.config, device) // per_block)
        with single_threaded():  # filling the cache must not give this thread an OpenMP team
            # One block more than the allocator hands out: static decode steps pad their batch with
            # rows that write there.
            self.cache = PagedKVCache(model.config.num_layers, num_blocks + 1, self.config.block_size,
                                      model.config.num_kv_groups, model.config.kv_channels, dtype, device)
        self.allocator = BlockAllocator(num_blocks, self.config.block_size)
        # A GPU runs a 2048-token chunk about as fast as a 512-token one; a CPU needs short chunks to keep
        # running streams flowing while a long prompt is read.
        budget = self.config.max_batch_tokens or (2048 if device.type == "cuda" else 512)
        self.scheduler = Scheduler(self.allocator, self.config.max_seqs, budget)
        self.runner = ModelRunner(model, self.cache, self._static_decoder(model, num_blocks))
        self.capacity_tokens = num_blocks * self.config.block_size
        self.context_length = int(model.config.seq_length)
        self.vocab = int(model.config.padded_vocab_size)
        self._inbox: list[Sequence] = []
        self._calls: list[tuple[object, Future]] = []
        self._cancels: set[str] = set()
        self._wake = threading.Condition()
        self._alive = True
        self._restore_weights = True
        self.steps = 0
        self.error_count = 0
        self._thread = threading.Thread(target=self._loop, name="glmapp-engine", daemon=True)
        self._thread.start()
        self.packed_linears = 0
        try:  # in the engine thread, with its compute threads; before any request
            self.packed_linears = self.call(self._pack)
        except BaseException:
            self.shutdown()
            raise
        # A daemon thread killed inside a torch op at interpreter exit aborts the process: stop cleanly.
        ref = weakref.ref(self)
        atexit.register(lambda: (engine := ref()) is not None and engine.shutdown(restore_weights=False))

    def _static_decoder(self, model, num_blocks: int) -> StaticDecoder | None:
        cfg, device = self.config, self.cache.k.device
        use = cfg.static_decode if cfg.static_decode is not None else device.type == "cuda"
        why_not = static_decode_supported(device)
        if not use or why_not:
            if use:
                log.warning("static decode is off: %s", why_not)
            return None
        max_blocks = min(num_blocks, -(-int(model.config.seq_length) // cfg.block_size))
        return StaticDecoder(model, self.cache, num_blocks, cfg.max_seqs, max_blocks, cfg.cuda_graphs, cfg.compile)

    # ---- client side (any thread) --------------------------------------------------------------------
    def submit(self, handle, request) -> None:
        error = self._validate(request)
        if error:
            handle.put(Delta(finish_reason="error", error=error, usage=Usage(len(request.prompt_ids))))
            return
        params = request.params
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        state = SamplingState(params, seed)
        if state.penalised:
            state.seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.runner.device)
            state.seen[torch.tensor(request.prompt_ids, device=self.runner.device)] = True
        max_new = min(request.max_new_tokens, self.context_length - len(request.prompt_ids),
                      self.capacity_tokens - len(request.prompt_ids))
        seq = Sequence(handle.id, list(request.prompt_ids), max_new, request.adapter)
        if request.adapter is not None:
            seq.adapter_uid = AdapterManager.of(self.model).uid(request.adapter)
        seq.payload = RequestState(handle, state, frozenset(request.stop_ids or self.tokenizer.stop_ids),
                                   StreamDecoder(self.tokenizer))
        with self._wake:
            self._inbox.append(seq)
            self._wake.notify()

    def _validate(self, request) -> str | None:
        n = len(request.prompt_ids)
        if n == 0:
            return "The prompt is empty."
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= self.vocab:
            return f"Prompt token ids must be in [0, {self.vocab})."
        if n >= self.context_length:
            return f"The prompt has {n} tokens; this model's context holds {self.context_length}."
        if n + 1 > self.capacity_tokens:
            return (f"The prompt needs {n + 1} tokens of KV memory but the whole KV cache holds "
                    f"{self.capacity_tokens} tokens; raise --kv-cache-mb or shorten the prompt.")
        if request.max_new_tokens < 1:
            return "max_new_tokens must be at least 1."
        if request.adapter is not None and not self._has_adapter(request.adapter):
            loaded = ", ".join(AdapterManager.of(self.model).names()) or "none"
            return f"Adapter {request.adapter!r} is not loaded (loaded: {loaded})."
        return None

    def _has_adapter(self, name: str) -> bool:
        return AdapterManager.of(self.model).uid(name) is not None

    def cancel(self, request_id: str) -> None:
        with self._wake:
            self._cancels.add(request_id)
            self._wake.notify()

    def call(self, fn, timeout: float | None = None):
        """Run `fn()` on the engine thread between steps and return its result (or raise its error).

        For work that must not overlap a step (swapping weights) or that should share the engine
        thread's CPU thread pool (benchmark baselines): on CPU, a second thread running torch code
        makes both slower, because each thread that runs parallel regions gets its own OpenMP team.
        """
        future: Future = Future()
        with self._wake:
            if not self._alive:
                raise RuntimeError("the engine is shut down")
            self._calls.append((fn, future))
            self._wake.notify()
        return future.result(timeout)

    def shutdown(self, restore_weights: bool = True) -> None:
        """Stop the engine thread; it ends what is queued or running and, unless told not to (exiting),
        gives the model its plain CPU weights back."""
        with self._wake:
            self._restore_weights = restore_weights
            self._alive = False
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def stats(self) -> dict:
        return {"free_blocks": self.allocator.num_free, "num_blocks": self.allocator.num_blocks,
                "waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "steps": self.steps, "capacity_tokens": self.capacity_tokens}

    # ---- engine thread ---------------------------------------------------------------------------------
    def _pack(self) -> int:
        cfg = self.config
        use = cfg.prepack if cfg.prepack is not None else not cfg.compile
        if not use or self.cache.k.device.type != "cpu":
            return 0
        return cpu_linear.pack(self.model)

    def _loop(self) -> None:
        claim_compute_threads(self.config.num_threads)
        while True:
            with self._wake:
                while self._alive and not (self._inbox or self._cancels or self._calls or self.scheduler.has_work()):
                    self._wake.wait()
                if not self._alive:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, set()
                calls, self._calls = self._calls, []
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)
            for seq in inbox:
                self.scheduler.add(seq)
            if cancels:
                self._cancel_now(cancels)
            if self.scheduler.has_work():
                self._step()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting) + self._inbox:
            self._finish(seq, "cancelled", "The engine was shut down.")
        for _, future in self._calls:
            future.set_exception(RuntimeError("the engine was shut down"))
        if self.packed_linears and self._restore_weights:  # the model leaves as it came: plain weights
            cpu_linear.unpack(self.model)

    def _cancel_now(self, ids: set[str]) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if seq.id in ids:
                self._finish(seq, "cancelled")

    def _step(self) -> None:
        work = self.scheduler.schedule()
        if not work:
            return
        try:
            tokens = self.runner.step(work)
        except torch.OutOfMemoryError:
            victim = self.scheduler.running[-1]
            self.scheduler.max_seqs = max(1, len(self.scheduler.running) // 2)
            self._finish(victim, "error", "Out of GPU memory: this request was stopped and the batch shrunk; "
                                          "try again with a shorter prompt or fewer new tokens.")
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            return
        except Exception:  # noqa: BLE001 - find the request that fails, keep the others going
            self._isolate_failure(work)
            return
        self.steps += 1
        self._advance(work, tokens)

    def _isolate_failure(self, work) -> None:
        """Re-run each sequence's part alone; the ones that fail again end with an error."""
        for w in work:
            if w.seq.status != "running":
                continue
            try:
                tokens = self.runner.step([w])
            except Exception as e:  # noqa: BLE001 - reported to that request only
                self.error_count += 1
                self._finish(w.seq, "error", f"Generation failed: {type(e).__name__}: {e}")
                continue
            self._advance([w], tokens)

    def _advance(self, work, tokens: list[int]) -> None:
        it = iter(tokens)
        for w in work:
            seq = w.seq
            if seq.num_computed < len(seq.prompt_ids):
                seq.prefilled_tokens += min(w.num_tokens, len(seq.prompt_ids) - seq.num_computed)
            seq.num_computed += w.num_tokens
            self.scheduler.publish(seq)
            if not w.samples:
                continue
            token = next(it)
            state: RequestState = seq.payload
            if state.first_token is None:
                state.first_token = time.perf_counter()
            if token in state.stop_ids:
                self._finish(seq, "stop")
                continue
            seq.output_ids.append(token)
            if state.sampling.seen is not None:
                state.sampling.seen[token] = True
            text = state.decoder.push(token)
            if len(seq.output_ids) >= seq.max_new_tokens:
                self._finish(seq, "length", text=text, token_ids=[token])
            else:
                state.handle.put(Delta(text, [token], usage=self._usage(seq)))

    def _usage(self, seq: Sequence):
        state: RequestState = seq.payload
        first = state.first_token - state.submitted if state.first_token is not None else 0.0
        return Usage(len(seq.prompt_ids), len(seq.output_ids), seq.cached_tokens,
                     time.perf_counter() - state.submitted, first)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, text: str = "",
                token_ids: list[int] | None = None) -> None:
        state: RequestState = seq.payload
        self.scheduler.finish(seq)
        text += state.decoder.flush()  # the reply is the full decode, U+FFFD included
        state.handle.put(Delta(text, token_ids or [], reason, error, self._usage(seq)))
