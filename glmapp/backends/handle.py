"""RequestHandle: the reader's end of one engine request (its `Delta`s) and its cancel.

Notable choices:
- The engine speaks token ids: its deltas carry `token_ids` and no text. The reader decodes them, on its own
  thread, with a `StreamDecoder` (the engine names the tokenizer at submit, `decode_with`), so detokenizing
  never holds up the engine thread. `Delta.text` is filled in as the reader takes each delta.
- Two ways to read: iterate in a thread (waits on the handle's condition), or in an event loop `listen` with
  an `asyncio.Event` and `take()` what arrived when it is set (see `glmapp.engine.delivery`: the engine wakes
  each loop once per step, whatever the number of its streams).
- With the inline engine (`glmapp.engine.inline`) there is no engine thread: `drive` (set by that engine) runs
  steps in the reader's thread until its handle has a delta; an event-loop reader must not block, so `listen`
  starts a thread that drives the request to its end.
- A reader never waits forever: with `engine_alive`, a silent stream checks every `POLL_S` seconds that the
  engine thread still runs and ends with an error if it is gone.
"""

from __future__ import annotations

import threading

from glmapp.engine.delivery import Mailbox
from glmapp.engine.request import Delta, Usage
from glmapp.tokenizer import StreamDecoder

ENGINE_GONE = "The engine stopped without ending this request; reload the model or restart the app."


class RequestHandle(Mailbox):
    """Read `Delta`s until one has `finish_reason`; `cancel()` stops the request at the engine's next step."""

    POLL_S = 1.0
    drive = None  # the inline engine's: drive(handle) runs steps here until the handle has a delta

    def __init__(self, request_id: str, canceller, engine_alive=None, tokenizer=None):
        super().__init__()
        self.id = request_id
        self._cancel = canceller
        self._engine_alive = engine_alive
        self._decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.done = False
        self.usage: Usage | None = None

    def decode_with(self, tokenizer) -> None:
        """The tokenizer whose ids this request streams (the engine's; named before any delta is read)."""
        if self._decoder is None:
            self._decoder = StreamDecoder(tokenizer)

    def cancel(self) -> None:
        self._cancel(self.id)

    def listen(self, event) -> None:
        super().listen(event)
        if self.drive is not None:
            threading.Thread(target=self.drive.__self__.drive_to_end, daemon=True, name=f"inline-{self.id}").start()

    def _decoded(self, delta: Delta) -> Delta:
        if self._decoder is not None:
            text = "".join(self._decoder.push(t) for t in delta.token_ids)
            if delta.finish_reason is not None:
                text += self._decoder.flush()  # the reply is the full decode, U+FFFD included
            delta.text += text
        if delta.finish_reason is not None:
            self.done = True
            self.usage = delta.usage
        return delta

    def _engine_gone(self) -> bool:
        """Nothing more can come: the engine thread ended (what it put before ending is already here)."""
        return self._engine_alive is not None and not self._deltas and not self._engine_alive()

    def take(self) -> list[Delta]:
        """The deltas that arrived, decoded, without waiting; when the engine is gone, the error that ends it."""
        out = []
        while not self.done and self._deltas:
            out.append(self._decoded(self._deltas.popleft()))
        if not out and not self.done and self._engine_gone():
            out.append(self._decoded(Delta(finish_reason="error", error=ENGINE_GONE)))
        return out

    def _next(self) -> Delta:
        if self.drive is not None:
            self.drive(self)
        with self._ready:
            while not self._deltas:
                if not self._ready.wait(None if self._engine_alive is None else self.POLL_S) and self._engine_gone():
                    return self._decoded(Delta(finish_reason="error", error=ENGINE_GONE))
            return self._decoded(self._deltas.popleft())

    def __iter__(self):
        while not self.done:
            yield self._next()
