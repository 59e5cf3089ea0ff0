"""RequestHandle: the reader's end of one engine request (a queue of `Delta`s) and its cancel."""

from __future__ import annotations

import queue

from glmapp.engine.request import Delta, Usage


class RequestHandle:
    """Iterate to read `Delta`s until one has `finish_reason`; `cancel()` stops it at the next step.

    With `engine_alive` (a callable), a reader waiting on a silent stream checks every `POLL_S` seconds that
    the engine thread still runs, and ends with an error if it is gone: it never waits forever.
    """

    POLL_S = 1.0

    def __init__(self, request_id: str, canceller, engine_alive=None):
        self.id = request_id
        self._queue: queue.Queue[Delta] = queue.Queue()
        self._cancel = canceller
        self._engine_alive = engine_alive
        self.done = False
        self.usage: Usage | None = None

    def put(self, delta: Delta) -> None:
        self._queue.put(delta)

    def cancel(self) -> None:
        self._cancel(self.id)

    def _next(self) -> Delta:
        if self._engine_alive is None:
            return self._queue.get()
        while True:
            try:
                return self._queue.get(timeout=self.POLL_S)
            except queue.Empty:
                if self._engine_alive():
                    continue
            try:  # the engine thread ended: whatever it put before ending is already here
                return self._queue.get_nowait()
            except queue.Empty:
                return Delta(finish_reason="error", error="The engine stopped without ending this request; "
                                                          "reload the model or restart the app.")

    def __iter__(self):
        while not self.done:
            delta = self._next()
            if delta.finish_reason is not None:
                self.done = True
                self.usage = delta.usage
            yield delta
