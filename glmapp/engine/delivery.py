"""How the engine hands deltas to the readers of its requests, one call per step (`deliver`).

Notable choices:
- A `Mailbox` is the engine's side of a request's handle: a deque of `Delta`s, a condition for a reader in
  a thread, and optionally an asyncio listener. The engine appends and wakes; it never waits on a reader.
- An asyncio reader `listen`s with an `asyncio.Event`; each event loop has one `LoopWaker`, and `deliver`
  wakes each loop once per step however many of its streams got deltas (one `call_soon_threadsafe`, no
  worker thread per stream hopping for each token).
"""

from __future__ import annotations

import asyncio
import collections
import threading

from glmapp.engine.request import Delta


class LoopWaker:
    """Wakes the asyncio readers of one event loop: the engine thread marks the readers' events, then `wake()`s
    the loop once (a second wake before the loop ran is dropped)."""

    _of_loop: dict[int, LoopWaker] = {}
    _of_loop_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._marked: list[asyncio.Event] = []
        self._pending = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopWaker:
        with cls._of_loop_lock:
            waker = cls._of_loop.get(id(loop))
            if waker is None or waker.loop is not loop:
                if len(cls._of_loop) > 64:  # loops of finished tests and benches
                    cls._of_loop = {k: w for k, w in cls._of_loop.items() if not w.loop.is_closed()}
                waker = cls._of_loop[id(loop)] = cls(loop)
            return waker

    def mark(self, event: asyncio.Event) -> None:
        with self._lock:
            self._marked.append(event)

    def wake(self) -> None:
        with self._lock:
            if self._pending or not self._marked:
                return
            self._pending = True
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop is closed: nobody is left to read
            pass

    def _run(self) -> None:
        with self._lock:
            self._pending = False
            marked, self._marked = self._marked, []
        for event in marked:
            event.set()


class Mailbox:
    """The deltas of one request on their way to its reader."""

    def __init__(self):
        self._deltas: collections.deque[Delta] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._listener: tuple[LoopWaker, asyncio.Event] | None = None

    def put(self, delta: Delta) -> None:
        deliver([(self, delta)])

    def listen(self, event: asyncio.Event) -> None:
        """From now on, `event` is set (on the running loop) when deltas arrive; set at once if some have."""
        self._listener = (LoopWaker.of(asyncio.get_running_loop()), event)
        if self._deltas:
            event.set()


def deliver(pairs: list[tuple[Mailbox, Delta]]) -> None:
    """Hand (mailbox, delta) pairs to their readers: each thread reader notified once, each loop woken once."""
    touched: dict[int, Mailbox] = {}
    for box, delta in pairs:
        box._deltas.append(delta)
        touched[id(box)] = box
    wakers: dict[int, LoopWaker] = {}
    for box in touched.values():
        listener = box._listener
        if listener is None:
            with box._ready:
                box._ready.notify_all()
        else:
            waker, event = listener
            waker.mark(event)
            wakers[id(waker)] = waker
    for waker in wakers.values():
        waker.wake()
