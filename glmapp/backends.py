"""Backends: what the UI, CLI and API talk to. `submit(request) -> stream of deltas`, `cancel(id)`.

`LocalBackend` runs our engine in this process. The chat-level helper `chat_stream` turns a
query + history into prompt ids (one template per family), submits them and yields the growing,
post-processed response with the history the official API would return.
"""

from __future__ import annotations

import itertools
import queue
from dataclasses import dataclass, field

from glmapp import prompts
from glmapp.engine.request import Delta, GenerationRequest, Usage
from glmapp.engine.sampling import SamplingParams
from glmapp.errors import InputError


_REQUEST_IDS = itertools.count(1)  # process-wide: ids stay unique when a reload replaces the backend


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



@dataclass
class ChatUpdate:
    response: str | dict
    history: list
    usage: Usage | None = None
    finish_reason: str | None = None
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)  # the new ids of this update
    new_text: bool = False  # this update added text (a stream that shows only changes can skip the rest)


class LocalBackend:
    """Runs requests on a local model in one background thread (the engine owns the model)."""

    def __init__(self, model, tokenizer, max_input_tokens: int | None = None, engine_config=None):
        self.model = model
        self.tokenizer = tokenizer
        self.family = tokenizer.family
        self.context_length = int(model.config.seq_length)
        self.max_input_tokens = max_input_tokens or self.context_length
        self._ids = _REQUEST_IDS
        self._engine = _make_engine(model, tokenizer, engine_config)

    @property
    def engine(self):
        return self._engine

    # ---- token level ----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        handle = RequestHandle(f"req-{next(self._ids)}", self.cancel, self._engine.is_running)
        self._engine.submit(handle, request)
        return handle

    def cancel(self, request_id: str) -> None:
        self._engine.cancel(request_id)

    def close(self) -> None:
        self._engine.shutdown()

    # ---- chat level -----------------------------------------------------------------------------
    def prepare_chat(self, query: str, history, system: str | None = None, max_length: int | None = None):
        """-> (prompt ids, kept history, normalised query); raises InputError / InputTooLong."""
        query = prompts.normalize_text(query if isinstance(query, str) else "")
        if not query.strip():
            raise InputError("Empty message: type something to send.")
        limit = min(max_length or self.context_length, self.context_length)
        budget = min(self.max_input_tokens, limit - 1)
        ids, kept = prompts.fit_prompt(self.tokenizer, query, list(history or []), system, budget)
        return ids, kept, query

    def chat_stream(self, query: str, history=None, system: str | None = None, *, max_length: int | None = None,
                    max_new_tokens: int | None = None, params: SamplingParams | None = None,
                    adapter: str | None = None, on_handle=None):
        """Yield `ChatUpdate`s with the growing response; the last one has `finish_reason`."""
        prompt_ids, kept, query = self.prepare_chat(query, history, system, max_length)
        yield from self.stream_prompt(prompt_ids, kept, query, max_length=max_length, max_new_tokens=max_new_tokens,
                                      params=params, adapter=adapter, on_handle=on_handle)

    def stream_prompt(self, prompt_ids: list[int], history, query: str, *, max_length: int | None = None,
                      max_new_tokens: int | None = None, params: SamplingParams | None = None,
                      adapter: str | None = None, on_handle=None):
        """Generate after ready prompt ids for the round (`history` + `query`): `ChatUpdate`s as in chat_stream."""
        limit = min(max_length or self.context_length, self.context_length)
        budget = limit - len(prompt_ids)
        if max_new_tokens is not None:
            budget = min(budget, int(max_new_tokens))
        handle = self.submit(GenerationRequest(prompt_ids, params or SamplingParams(), budget, adapter=adapter))
        if on_handle is not None:
            on_handle(handle)
        text = ""
        try:
            for delta in handle:
                text += delta.text
                response = prompts.process_response(self.family, text, history)
                yield ChatUpdate(response, prompts.append_history(self.family, history, query, response),
                                 delta.usage, delta.finish_reason, delta.error, delta.token_ids, bool(delta.text))
        finally:
            if not handle.done:  # the consumer went away (closed tab, generator dropped): free the slot
                handle.cancel()

def _make_engine(model, tokenizer, config=None):
    from glmapp.engine.engine import Engine

    return Engine(model, tokenizer, config)
