"""The simplest engine: one background thread serving requests one after another (dense KV cache).

Same contract as the batching engine: `submit(handle, request)`, `cancel(id)`, `shutdown()`; results
are pushed to the handle as `Delta`s.
"""

from __future__ import annotations

import queue
import threading
import time

from glmapp.chat import ConversationCache, GenerationStats, _cache_for, generate_tokens
from glmapp.tokenizer import StreamDecoder


class SerialEngine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self._queue: queue.Queue = queue.Queue()
        self._cancelled: set[str] = set()
        self._conv: ConversationCache | None = None
        self._thread = threading.Thread(target=self._loop, name="glmapp-engine", daemon=True)
        self._thread.start()

    def submit(self, handle, request) -> None:
        self._queue.put((handle, request))

    def cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)

    def shutdown(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        from glmapp.backends import Delta, Usage

        while (item := self._queue.get()) is not None:
            handle, request = item
            t0 = time.perf_counter()
            stats = GenerationStats(prompt_tokens=len(request.prompt_ids))
            usage = lambda: Usage(len(request.prompt_ids), stats.new_tokens, stats.reused_tokens,  # noqa: E731
                                  time.perf_counter() - t0)
            try:
                limit = len(request.prompt_ids) + request.max_new_tokens
                self._conv, stats.reused_tokens = _cache_for(self.model, self._conv, request.prompt_ids, limit)
                decoder = StreamDecoder(self.tokenizer)
                stop = request.stop_ids or self.tokenizer.stop_ids
                for tid in generate_tokens(self.model, self._conv, request.prompt_ids, request.params, stop,
                                           request.max_new_tokens, stats):
                    if handle.id in self._cancelled:
                        stats.finish_reason = "cancelled"
                        break
                    text = decoder.push(tid)
                    handle.put(Delta(text, [tid], usage=usage()))
                tail = decoder.flush().rstrip("\ufffd")
                handle.put(Delta(tail, [], stats.finish_reason, usage=usage()))
            except Exception as e:  # noqa: BLE001 - one request's failure must not stop the engine
                self._conv = None
                handle.put(Delta(finish_reason="error", error=f"Generation failed: {e}", usage=usage()))
            finally:
                self._cancelled.discard(handle.id)
