"""The engine: one background thread owns the model, the KV memory and the scheduler.

Clients call `submit(handle, request)` / `cancel(id)` from any thread; the loop admits new requests
between steps (continuous batching), runs one step and hands each request's new token ids to its handle,
all of a step's deltas in one `deliver` call. The engine speaks token ids: readers detokenize (see
`glmapp.engine.delivery`, `glmapp.backends.handle`), so the engine thread spends no time on text.

The engine thread survives its own bugs: an exception in any part of a step (queueing, cancelling,
scheduling, the forward, advancing, finishing) is logged with its traceback and ends the requests it
touched with an error (all open ones when there is no telling which); the scheduler's queues and the
block reference counts are then put right and the engine goes on. If the thread dies anyway, every open
stream ends with an error and `submit` raises `EngineStopped`. An out-of-memory step shrinks the batch
limits (the newest sequences wait again) and they double back after calm steps.
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

from glmapp import cpu_linear, hugepages, quant_kernels
from glmapp.adapters import AdapterManager
from glmapp.cpu_threads import claim_compute_threads, single_threaded
from glmapp.engine.kv_cache import BlockAllocator, PagedKVCache
from glmapp.engine.delivery import deliver
from glmapp.engine.request import Delta, Usage
from glmapp.engine.runner import ModelRunner
from glmapp.engine.sampling import SamplingParams
from glmapp.engine.scheduler import FINISHED, Scheduler, Sequence
from glmapp.errors import EngineStopped
from glmapp.engine.static_decode import StaticDecoder, static_decode_supported

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
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


OUTPUT_QUANT = {"none": None, "int8": 8, "int4": 4}  # EngineConfig.output_quant -> bits


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
    oom_regrow_steps: int = 16  # successful steps after an out-of-memory before the batch limits double back
    inline: bool = False  # no engine thread: readers run the steps (glmapp.engine.inline, for ZeroGPU)
    # "int8"/"int4": while the engine runs on CPU, decoding reads a quantized copy of the output layer (its
    # biggest weight with a 65k vocabulary); "none" keeps it as loaded. bench/RESULTS.md "Quantized output layer".
    output_quant: str = "none"

    def __post_init__(self):
        if (self.block_size < 1 or self.max_seqs < 1 or (self.max_batch_tokens or 1) < 1
                or self.oom_regrow_steps < 1):
            raise ValueError("block_size, max_seqs, max_batch_tokens and oom_regrow_steps must be positive")
        if self.output_quant not in OUTPUT_QUANT:
            raise ValueError(f"output_quant must be one of {', '.join(OUTPUT_QUANT)} (got {self.output_quant!r})")


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
        self.scheduler = Scheduler(self.allocator, self.config.max_seqs, budget, self.config.oom_regrow_steps)
        self.runner = ModelRunner(model, self.cache, self._static_decoder(model, num_blocks))
        self.capacity_tokens = num_blocks * self.config.block_size
        self.context_length = int(model.config.seq_length)
        self.vocab = int(model.config.padded_vocab_size)
        self._inbox: list[Sequence] = []
        self._calls: list[tuple[object, Future]] = []
        self._cancels: set[str] = set()
        self._wake = threading.Condition()
        self._alive = True
        self._stop_reason = ""  # why submit is refused once the engine stops
        self._open: dict[str, Sequence] = {}  # every request the engine thread took and has not ended yet
        self._outbox: list[tuple[object, Delta]] = []  # this iteration's deltas, delivered together after it
        self._restore_weights = True
        self.steps = 0
        self.error_count = 0  # requests ended by an engine failure (not by bad input)
        self.packed_linears = 0
        self._thread = threading.Thread(target=self._loop, name="glmapp-engine", daemon=True)
        self._thread.start()
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
        handle.decode_with(self.tokenizer)
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
        seq.v1_context = self.runner.v1_context(seq.prompt_ids)  # None unless ChatGLM-6B (2-D positions)
        if request.adapter is not None:
            seq.adapter_uid = AdapterManager.of(self.model).uid(request.adapter)
            seq.prefix = AdapterManager.of(self.model).prefix(request.adapter)  # P-tuning: None for LoRA
        seq.payload = RequestState(handle, state, frozenset(request.stop_ids or self.tokenizer.stop_ids))
        with self._wake:
            if not self._alive:
                raise EngineStopped(self._stop_reason)
            self._inbox.append(seq)
            self._wake.notify()

    def submit_together(self, pairs) -> None:
        """Submit (handle, request) pairs at once (the inline engine runs them as one call; here they queue)."""
        for handle, request in pairs:
            self.submit(handle, request)

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
                raise EngineStopped(self._stop_reason)
            self._calls.append((fn, future))
            self._wake.notify()
        return future.result(timeout)

    def shutdown(self, restore_weights: bool = True) -> None:
        """Stop the engine thread; it ends what is queued or running and, unless told not to (exiting),
        gives the model its plain CPU weights back."""
        with self._wake:
            self._restore_weights = restore_weights
            if self._alive:
                self._stop_reason = "The engine is shut down; reload the model to serve again."
            self._alive = False
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def is_running(self) -> bool:
        """The engine thread is alive (it may still be ending its requests after a shutdown)."""
        return self._thread.is_alive()

    def stats(self) -> dict:
        sched = self.scheduler
        return {"free_blocks": self.allocator.num_free, "num_blocks": self.allocator.num_blocks,
                "waiting": len(sched.waiting), "running": len(sched.running), "steps": self.steps,
                "capacity_tokens": self.capacity_tokens, "errors": self.error_count,
                "max_seqs": sched.max_seqs, "max_batch_tokens": sched.max_batch_tokens}

    # ---- engine thread ---------------------------------------------------------------------------------
    def _pack(self) -> int:
        cfg = self.config
        if self.cache.k.device.type != "cpu":
            return 0
        use = cfg.prepack if cfg.prepack is not None else not cfg.compile
        packed = cpu_linear.pack(self.model, output_bits=OUTPUT_QUANT[cfg.output_quant]) if use else 0
        # decoding streams the weights: fewer TLB misses. Not the KV cache: collapsing copies every page once
        # (its default 512 MiB: 0.7 s at every engine start, far more on a busy machine), for a cache that
        # decoding reads a few rows at a time.
        hugepages.back_model(self.model)
        return packed

    def _loop(self) -> None:
        died: BaseException | None = None
        try:
            claim_compute_threads(self.config.num_threads)
            while True:
                with self._wake:
                    while self._alive and not (self._inbox or self._cancels or self._calls
                                               or self.scheduler.has_work()):
                        self._wake.wait()
                    if not self._alive:
                        break
                    inbox, self._inbox = self._inbox, []
                    cancels, self._cancels = self._cancels, set()
                    calls, self._calls = self._calls, []
                for seq in inbox:  # from here on, _close ends it whatever happens
                    self._open[seq.id] = seq
                for fn, future in calls:
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        future.set_exception(e)
                try:
                    self._iteration(inbox, cancels)
                except Exception as e:  # noqa: BLE001 - a bug outside the guarded parts: no telling whom it hit
                    self._internal_error(e, "running a step", list(self._open.values()))
                self._deliver()
        except BaseException as e:  # noqa: BLE001 - the thread ends here; _close tells every reader
            died = e
            log.critical("The engine thread died; every open request ends with an error.", exc_info=e)
        finally:
            self._close(died)

    def _iteration(self, inbox: list[Sequence], cancels: set[str]) -> None:
        failed = []
        for seq in inbox:
            try:
                self.scheduler.add(seq)
            except Exception as e:  # noqa: BLE001 - reported to that request, once all the others are queued
                failed.append((seq, e))
        for seq, e in failed:
            self._internal_error(e, "queueing it", [seq])
        for request_id in cancels:
            seq = self._open.get(request_id)
            if seq is not None:
                self._finish(seq, "cancelled")
        if self.scheduler.has_work():
            self._step()
        elif self._open:  # requests the engine took that the scheduler no longer knows: they would wait forever
            self._internal_error(RuntimeError("requests were lost from the scheduler's queues"), "scheduling",
                                 list(self._open.values()))

    def _step(self) -> None:
        try:
            work = self.scheduler.schedule()
        except Exception as e:  # noqa: BLE001 - no telling which request it was about: all open ones end
            self._internal_error(e, "scheduling", list(self._open.values()))
            return
        if not work:
            if not self.scheduler.running:  # with nothing running the first waiting request always fits
                self._internal_error(RuntimeError("no request could be scheduled while none was running"),
                                     "scheduling", list(self._open.values()))
            return
        try:
            tokens = self.runner.step(work)
        except torch.OutOfMemoryError:
            self._out_of_memory(work)
            return
        except Exception as e:  # noqa: BLE001 - find the request that fails, keep the others going
            self._isolate_failure(work, e)
            return
        self.steps += 1
        self.scheduler.regrow()
        self._advance(work, tokens)

    def _out_of_memory(self, work) -> None:
        """Shrink the batch and retry; a request that runs out of memory alone, in the smallest chunk, ends."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        sched = self.scheduler
        if sched.shrink(sum(w.num_tokens for w in work)):
            log.warning("Out of memory: the batch shrinks to %d sequences and %d tokens per step until %d steps "
                        "pass without it.", sched.max_seqs, sched.max_batch_tokens, sched.regrow_steps)
            return
        self.error_count += 1
        self._finish(sched.running[-1], "error", "Out of memory even with this request running alone: it was "
                                                  "stopped; try a shorter prompt or fewer new tokens.")

    def _isolate_failure(self, work, error: Exception) -> None:
        """Re-run each sequence's part alone; the ones that fail again end with an error."""
        log.error("A model step of %d requests failed; running each alone to find the failing one.", len(work),
                  exc_info=error)
        for w in work:
            if w.seq.status != "running":
                continue
            try:
                tokens = self.runner.step([w])
            except Exception as e:  # noqa: BLE001 - reported to that request only
                self.error_count += 1
                log.error("Request %s fails alone too: %s: %s", w.seq.id, type(e).__name__, e)
                self._finish(w.seq, "error", f"Generation failed: {type(e).__name__}: {e}")
                continue
            self._advance([w], tokens)

    def _advance(self, work, tokens: list[int]) -> None:
        it = iter(tokens)
        for w in work:
            token = next(it) if w.samples else None
            try:
                self._advance_one(w.seq, w.num_tokens, token)
            except Exception as e:  # noqa: BLE001 - reported to that request, the others go on
                self._internal_error(e, "advancing it", [w.seq])

    def _advance_one(self, seq: Sequence, num_tokens: int, token: int | None) -> None:
        if seq.num_computed < len(seq.prompt_ids):
            seq.prefilled_tokens += min(num_tokens, len(seq.prompt_ids) - seq.num_computed)
        seq.num_computed += num_tokens
        self.scheduler.publish(seq)
        if token is None:
            return
        state: RequestState = seq.payload
        if state.first_token is None:
            state.first_token = time.perf_counter()
        if token in state.stop_ids:
            self._finish(seq, "stop")
            return
        seq.output_ids.append(token)
        if state.sampling.seen is not None:
            state.sampling.seen[token] = True
        if len(seq.output_ids) >= seq.max_new_tokens:
            self._finish(seq, "length", token_ids=[token])
        else:
            self._outbox.append((state.handle, Delta("", [token], usage=self._usage(seq))))

    def _deliver(self) -> None:
        outbox, self._outbox = self._outbox, []
        if outbox:
            deliver(outbox)

    def _usage(self, seq: Sequence):
        state: RequestState = seq.payload
        first = state.first_token - state.submitted if state.first_token is not None else 0.0
        return Usage(len(seq.prompt_ids), len(seq.output_ids), seq.cached_tokens,
                     time.perf_counter() - state.submitted, first)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None,
                token_ids: list[int] | None = None) -> None:
        state: RequestState = seq.payload
        try:
            self.scheduler.finish(seq)
            delta = Delta("", token_ids or [], reason, error, self._usage(seq))
        except Exception as e:  # noqa: BLE001 - reported to that request
            self._internal_error(e, "cancelling it" if reason == "cancelled" else "ending it", [seq])
            return
        self._open.pop(seq.id, None)
        self._outbox.append((state.handle, delta))

    # ---- failures -----------------------------------------------------------------------------------
    def _internal_error(self, error: BaseException, doing: str, seqs: list[Sequence]) -> None:
        """An engine bug hit `seqs` while `doing`: end them with an error, then put the queues and the
        block counts right for the requests still open (and end any the scheduler lost)."""
        log.error("The engine hit an internal error while %s; %d request(s) end with an error and the engine "
                  "keeps serving.", doing, len(seqs), exc_info=error)
        message = (f"The engine hit an internal error while {doing} ({type(error).__name__}: {error}); "
                   "this request was stopped. Other requests go on.")
        ended = [self._abort(seq) for seq in seqs]
        queued = {id(s) for s in self.scheduler.running} | {id(s) for s in self.scheduler.waiting}
        ended += [self._abort(s) for s in list(self._open.values()) if id(s) not in queued or s.status == FINISHED]
        wrong = self.scheduler.reconcile(list(self._open.values()))
        if wrong:
            log.warning("%d KV blocks had wrong reference counts after the error; corrected.", wrong)
        for seq, usage in ended:  # last: a reader told of the error finds the engine already set right
            self._outbox.append((seq.payload.handle, Delta(finish_reason="error", error=message, usage=usage)))

    def _abort(self, seq: Sequence) -> tuple[Sequence, Usage | None]:
        """Take `seq` out without trusting the parts that may have failed (nothing is published)."""
        self._open.pop(seq.id, None)
        self.error_count += 1
        try:
            self.scheduler.drop(seq)
        except Exception:  # noqa: BLE001 - reconcile() sets the blocks right after
            log.exception("Dropping request %s failed too.", seq.id)
        try:
            return seq, self._usage(seq)
        except Exception:  # noqa: BLE001 - the error matters more than its token counts
            return seq, None

    def _close(self, died: BaseException | None) -> None:
        """The thread ends (shutdown or death): every open request and pending call gets its answer."""
        with self._wake:
            if died is not None:
                self._stop_reason = (f"The engine stopped after an internal error ({type(died).__name__}: {died}); "
                                     "reload the model or restart the app.")
            self._alive = False
            inbox, self._inbox = self._inbox, []
            calls, self._calls = self._calls, []
        for seq in inbox:
            self._open[seq.id] = seq
        for seq in list(self._open.values()):
            try:
                if died is None:
                    self._finish(seq, "cancelled", "The engine was shut down.")
                else:  # the scheduler may be what broke: tell the reader without it
                    self._open.pop(seq.id, None)
                    seq.payload.handle.put(Delta(finish_reason="error", error=self._stop_reason))
            except Exception:  # noqa: BLE001 - the next reader still gets its answer
                log.exception("Ending request %s at engine stop failed.", seq.id)
        self._deliver()
        for _, future in calls:
            future.set_exception(EngineStopped(self._stop_reason))
        if self.packed_linears and self._restore_weights:  # the model leaves as it came: plain weights
            try:
                cpu_linear.unpack(self.model)
            except Exception:  # noqa: BLE001 - the engine is gone either way; the model keeps packed weights
                log.exception("Restoring the plain CPU weights at engine stop failed.")
