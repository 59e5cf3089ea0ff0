"""LocalBackend: the Backend protocol on a `ModelHost` in this process (our engine on our native model).

The chat-level helper `chat_stream` turns a query + history into prompt ids (one template per family),
submits them and yields the growing, post-processed response with the history the official API would
return. The backend object stays the same across reloads; what it serves is whatever its host serves now.
"""

from __future__ import annotations

import itertools

from glmapp import prompts
from glmapp.backends.base import Capabilities, ChatUpdate, ModelInfo, ReloadResult
from glmapp.backends.handle import RequestHandle
from glmapp.engine.request import GenerationRequest
from glmapp.engine.sampling import SamplingParams
from glmapp.errors import InputError

_REQUEST_IDS = itertools.count(1)  # process-wide: ids stay unique across backends and reloads


class LocalBackend:
    """The Backend protocol on one ModelHost (see glmapp.host): adapters, reloads and the one engine."""

    def __init__(self, host):
        self.host = host

    @classmethod
    def for_model(cls, model, tokenizer, engine_config=None) -> LocalBackend:
        """A backend on the host that serves `model` (the running one if there is one: one engine per model)."""
        from glmapp.host import ModelHost

        return cls(ModelHost.of(model, tokenizer, engine_config))

    @classmethod
    def load(cls, model: str | None = None, **kwargs) -> LocalBackend:
        """`ModelHost.load` (--model, else the cached default, else the demo checkpoint) behind a backend."""
        from glmapp.host import ModelHost

        return cls(ModelHost.load(model, **kwargs))

    @classmethod
    def start(cls, model: str | None = None, **kwargs) -> LocalBackend:
        """`ModelHost.start`: as `load`, with the load in the background (`loading` says how far it is)."""
        from glmapp.host import ModelHost

        return cls(ModelHost.start(model, **kwargs))

    # ---- what is served (names that hold during a reload come first) --------------------------------------
    loading = property(lambda self: self.host.loading)
    name = property(lambda self: self.host.name)
    demo = property(lambda self: self.host.demo)
    notice = property(lambda self: self.host.notice)
    adapters_dir = property(lambda self: self.host.adapters_dir)
    dtype_choice = property(lambda self: self.host.dtype_choice)
    family = property(lambda self: self.host.family)
    context_length = property(lambda self: self.host.context_length)
    max_input_tokens = property(lambda self: self.host.max_input_tokens)
    tokenizer = property(lambda self: self.host.tokenizer)

    @property
    def model(self):
        """The torch model (for scripts and tests on this process; the UI and the API never use it)."""
        return self.host.model

    @property
    def engine(self):
        return self.host.engine

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def info(self) -> ModelInfo:
        return self.host.info()

    def memory(self) -> str:
        return self.host.memory()

    def stats(self) -> dict:
        return self.host.engine.stats()

    def list_adapters(self):
        return self.host.list_adapters()

    def loaded_adapters(self) -> list[str]:
        return self.host.loaded_adapters()

    def load_adapter(self, spec: str, *, reload: bool = False, download=None):
        return self.host.load_adapter(spec, reload=reload, download=download)

    def quant_choices(self) -> dict[str, str | None]:
        return self.host.quant_choices()

    def reload(self, dtype: str, progress=None) -> ReloadResult:
        return self.host.reload(dtype, progress)

    def quantize(self, mode: str, progress=None) -> ReloadResult:
        return self.host.quantize(mode, progress)

    def close(self) -> None:
        self.host.close()

    # ---- token level ----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        return self.host.submit(f"req-{next(_REQUEST_IDS)}", request, self.cancel)

    def cancel(self, request_id: str) -> None:
        self.host.cancel(request_id)

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
        family = self.family  # fixed for this stream, whatever reloads
        handle = self.submit(self._request(prompt_ids, max_length, max_new_tokens, params, adapter))
        if on_handle is not None:
            on_handle(handle)
        yield from self._updates(handle, family, history, query)

    def chat_streams(self, query: str, history, columns: list[dict], *, system: str | None = None,
                     on_handle=None) -> list:
        """One `chat_stream` per column (its keyword arguments: max_length, max_new_tokens, params, adapter), all
        submitted now, together: one batch (one call with the inline engine). -> their `ChatUpdate` iterators."""
        prompt_ids, kept, query = self.prepare_chat(query, history, system)
        family = self.family
        requests = [self._request(prompt_ids, c.get("max_length"), c.get("max_new_tokens"), c.get("params"),
                                  c.get("adapter")) for c in columns]
        handles = self.host.submit_together([(f"req-{next(_REQUEST_IDS)}", r) for r in requests], self.cancel)
        for handle in handles:
            if on_handle is not None:
                on_handle(handle)
        return [self._updates(handle, family, kept, query) for handle in handles]

    def _request(self, prompt_ids, max_length, max_new_tokens, params, adapter) -> GenerationRequest:
        context_length = self.context_length
        limit = min(max_length or context_length, context_length)
        budget = limit - len(prompt_ids)
        if max_new_tokens is not None:
            budget = min(budget, int(max_new_tokens))
        return GenerationRequest(prompt_ids, params or SamplingParams(), budget, adapter=adapter)

    @staticmethod
    def _updates(handle, family: str, history, query: str):
        text = ""
        try:
            for delta in handle:
                text += delta.text
                response = prompts.process_response(family, text, history)
                yield ChatUpdate(response, prompts.append_history(family, history, query, response),
                                 delta.usage, delta.finish_reason, delta.error, delta.token_ids, bool(delta.text))
        finally:
            if not handle.done:  # the consumer went away (closed tab, generator dropped): free the slot
                handle.cancel()
