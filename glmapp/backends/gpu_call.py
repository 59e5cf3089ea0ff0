"""GpuCallBackend: on ZeroGPU, each generation runs inside one `spaces.GPU` call; nothing else does.

On ZeroGPU, CUDA exists only inside a call to a function decorated with `spaces.GPU`, and that call runs in a
worker process forked from the main one. So the seam is drawn around the model work alone: a chat reply, or a
Compare run's columns together (one batch), is one call that generates with the inline engine in the worker
and sends back `ChatUpdate`s; the UI's handlers, per-tab sessions, the conversation store, request ids, and the
check of a prompt (tokenizing it) stay in the main process. A handler wrapped whole would instead write the
database from the worker and update session state the main process never sees.

Notable choices:
- The call gets only picklable arguments (ZeroGPU sends them to its worker): the backend is found in a module
  registry by key (the worker inherits the registry from the fork), sampling params are plain dataclasses.
- Stop reaches the worker through a shared array of cancel flags (allocated before any fork, one slot per
  running request); the worker checks its slots after each update and cancels its engine request.
- The duration asked for is that of the longest column (`glmapp.ui.zero_gpu.gpu_duration`), at the decode rate
  the inline engine measured in earlier calls (kept in shared memory: it is measured in the workers).
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import threading

from glmapp.backends.local import _REQUEST_IDS

SLOTS = 256  # requests running at once (each Compare column takes one)
BNB_ON_ZERO_GPU = ("bitsandbytes quantizes on the GPU, which ZeroGPU lends only during a call: use int8 or int4 "
                   "(glmapp's own kernels)")
_BACKENDS: dict[int, object] = {}
_CANCEL = multiprocessing.Array("b", SLOTS)  # created at import, before any worker is forked
_KEYS = itertools.count(1)


class CallHandle:
    """The main process's handle on a request that runs in a GPU call: its id, cancel, and whether it ended."""

    def __init__(self, request_id: str, slot: int):
        self.id, self.slot, self.done = request_id, slot, False

    def cancel(self) -> None:
        _CANCEL[self.slot] = 1


class GpuCallBackend:
    """`backend` with its chat generation run through `gpu(fn)` (spaces.GPU with a duration); the rest is the
    backend's own (attribute access passes through)."""

    gpu_calls = True  # the app does not serve /v1 on it (the API's engine requests would run outside a call)

    def __init__(self, backend, gpu):
        self._backend = backend
        self._key = next(_KEYS)
        _BACKENDS[self._key] = backend
        self._call = gpu(generate_in_call)
        self._free = queue.Queue()
        for slot in range(SLOTS):
            self._free.put(slot)

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def quant_choices(self) -> dict[str, str | None]:
        """The backend's, less bitsandbytes: it quantizes when weights move to the GPU, which on ZeroGPU happens
        only inside a call, so the main process cannot hold bnb weights between calls."""
        choices = dict(self._backend.quant_choices())
        for mode in choices:
            if mode.startswith("bnb-"):
                choices[mode] = BNB_ON_ZERO_GPU
        return choices

    def chat_stream(self, query: str, history=None, system: str | None = None, *, max_length: int | None = None,
                    max_new_tokens: int | None = None, params=None, adapter: str | None = None, on_handle=None):
        column = dict(max_length=max_length, max_new_tokens=max_new_tokens, params=params, adapter=adapter)
        return self.chat_streams(query, history, [column], system=system, on_handle=on_handle)[0]

    def chat_streams(self, query: str, history, columns: list[dict], *, system: str | None = None,
                     on_handle=None) -> list:
        history = list(history or [])
        lengths = [c.get("max_length") for c in columns if c.get("max_length")]
        self._backend.prepare_chat(query, history, system, min(lengths) if lengths else None)  # errors: here
        slots = [self._free.get() for _ in columns]
        for slot in slots:
            _CANCEL[slot] = 0
        handles = [CallHandle(f"req-{next(_REQUEST_IDS)}", slot) for slot in slots]
        for handle in handles:
            if on_handle is not None:
                on_handle(handle)
        inboxes = [queue.Queue() for _ in columns]
        call = self._call(self._key, query, history, columns, system, slots)

        def pump():
            try:
                for i, update in call:
                    inboxes[i].put(update)
            except BaseException as e:  # noqa: BLE001 - each column's reader raises it
                for inbox in inboxes:
                    inbox.put(e)
            finally:
                for inbox in inboxes:
                    inbox.put(None)
                for slot in slots:
                    self._free.put(slot)

        threading.Thread(target=pump, daemon=True, name="gpu-call").start()
        return [read(inbox, handle) for inbox, handle in zip(inboxes, handles)]


def read(inbox: queue.Queue, handle: CallHandle):
    try:
        while (item := inbox.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                handle.done = True
    finally:
        if not handle.done:  # the reader went away (closed tab, Stop): end it in the worker too
            handle.cancel()


def generate_in_call(key: int, query: str, history: list, columns: list[dict], system, slots: list[int]):
    """Inside the GPU call (ZeroGPU's worker): generate every column together -> (column, ChatUpdate)..."""
    backend = _BACKENDS[key]
    handles: list = []
    streams = backend.chat_streams(query, history, columns, system=system, on_handle=handles.append)
    out: queue.Queue = queue.Queue()

    def column(i: int):
        try:
            for update in streams[i]:
                out.put((i, update))
                if _CANCEL[slots[i]]:
                    handles[i].cancel()
        except BaseException as e:  # noqa: BLE001 - sent to the main process
            out.put((i, e))
        finally:
            out.put((i, None))

    threads = [threading.Thread(target=column, args=(i,), daemon=True) for i in range(len(columns))]
    for thread in threads:
        thread.start()
    ended = 0
    while ended < len(columns):
        i, item = out.get()
        if item is None:
            ended += 1
        elif isinstance(item, BaseException):
            raise item
        else:
            yield i, item


def on_gpu_calls(backend, duration_of):
    """`backend` wrapped for ZeroGPU: `duration_of(max_new_tokens)` -> seconds asked for each call."""
    import spaces  # type: ignore[import-not-found]

    def duration(key, query, history, columns, system, slots) -> int:
        return duration_of(max((c.get("max_new_tokens") or 0) for c in columns))

    return GpuCallBackend(backend, lambda fn: spaces.GPU(duration=duration)(fn))
