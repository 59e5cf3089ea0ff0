"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /health and /metrics.

They run on the web app's own server (Gradio's FastAPI app, see `glmapp.ui.serve`) and submit to the
same engine as the browser chat, so API and browser requests batch together.

Notable choices:
- Bodies are parsed here (not by FastAPI's dependency injection), so a bad field is a 400 in OpenAI's
  error format that names the field, and nothing changes Gradio's own error answers.
- The model id is the served model's name (a local folder shows only its folder name, never the server's
  path); every adapter in the adapters folder and every loaded adapter is a model of its own with
  `parent` = the base, as vLLM lists LoRA modules. The API loads adapters only from the adapters folder
  and never downloads from the hub.
- A client that goes away cancels its requests: a stream when the next chunk cannot be sent, a
  non-streamed request as soon as the server sees the disconnect.
- Every answer of these routes is counted for /metrics by route and status (`metrics.py`); generation
  requests pass the rate limits (`limits.py`) after they are parsed and their tokens counted, and before
  anything is submitted. A deterministic request is then looked up in the response cache (`cache.py`): a hit
  is replayed (charged like a request that generated as much) and never reaches the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from glmapp.api.cache import cache_key, deterministic
from glmapp.api.generation import (APIError, Choice, chat_prompt, chat_visible, completion_prompt_ids,
                                   stream_choices, submit_choices, token_budget)
from glmapp.api.keys import KeyCheck
from glmapp.api.limits import RateLimiter, RateLimited
from glmapp.api.metrics import APIMetrics
from glmapp.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, UsageInfo
from glmapp.api.tools import reply_parts
from glmapp.choices import DEMO_DEFAULTS
from glmapp.engine.request import Usage
from glmapp.engine.sampling import SamplingParams
from glmapp.errors import AdapterError, EngineStopped, GlmappError
from glmapp.errors import ModelLoadFailed, ModelLoading, ModelReloading

MAX_CHOICES = 64  # prompts x n of one request
_LOADERS = anyio.CapacityLimiter(2)  # adapter loads (file reads) run off the event loop, apart from Gradio's pool
_REDIS_CALLS = anyio.CapacityLimiter(16)  # rate limit and cache lookups in Redis, off the event loop


def require_served(backend, details: bool = True) -> None:
    """ModelLoading / ModelLoadFailed (503) while the first load is under way or after it failed."""
    state = backend.loading
    if state is None or state.done:
        return
    if state.error:
        raise ModelLoadFailed(state.describe() if details else
                              "The model could not be loaded; the web page and the server log say why.")
    raise ModelLoading(state.describe() if details else f"The model is still loading ({state.fraction:.0%}).")


class _ErrorsAsJSON(APIRoute):
    """Turns APIError (and the model reloading) into OpenAI's error body, for the routes of this router only,
    and counts every answer in `metrics` (a subclass per router sets it)."""

    metrics: APIMetrics

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                response = await handler(request)
            except ModelReloading as e:  # loading at start, a failed start (the message says why), reloading
                code = {ModelLoading: "model_loading", ModelLoadFailed: "model_load_failed"}.get(type(e),
                                                                                                 "model_reloading")
                error = APIError(503, str(e), code=code)
            except EngineStopped as e:
                error = APIError(503, str(e), code="engine_stopped")
            except APIError as e:
                error = e
            else:
                self.metrics.answered(self.path, getattr(response, "status_code", 200))
                return response
            self.metrics.answered(self.path, error.status)
            headers = error.headers() if isinstance(error, RateLimited) else None
            return JSONResponse(error.body(), status_code=error.status, headers=headers)

        return route


class EventStream(StreamingResponse):
    """Server-sent events whose source is closed as soon as sending stops (the client went away)."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close):
        super().__init__(content)
        self.on_close = on_close

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()
            self.on_close()  # also when the client left before the first chunk (the body never started)


def base_model_id(name: str) -> str:
    path = Path(name)
    return path.name if path.is_dir() else name  # a local checkpoint: its folder name, not the server's path


def build_router(backend, keys: KeyCheck, limiter: RateLimiter | None = None, cache=None) -> APIRouter:
    """The API's routes for the model `backend` serves; `keys` says who may call them, `limiter` how often,
    `cache` (a `cache.MemoryCache` or `RedisCache`, None for none) keeps deterministic answers."""
    metrics = APIMetrics(backend)
    router = APIRouter(route_class=type("APIRoute", (_ErrorsAsJSON,), {"metrics": metrics}))

    def authorize(request: Request) -> str:
        """Who is calling, for the rate limits: the key's "key:N", or the client's address when open."""
        key = keys.check(request.headers.get("authorization"))
        return key or f"address:{request.client.host if request.client else 'unknown'}"

    async def admit(client: str, prompt_ids: list[list[int]], budgets: list[int], n: int) -> _Meter:
        meter = _Meter(metrics, limiter, client, time.perf_counter(),
                       sum(len(p) for p in prompt_ids) + n * sum(budgets))
        if limiter is not None:
            await _io(limiter, limiter.admit, client, meter.charged)
        return meter

    async def cached(kind: str, body, prompt_ids, budgets, adapter, tools: bool) -> tuple[str | None, dict | None]:
        """(cache key, cached entry) of a deterministic request; (None, None) when it is not cached."""
        if cache is None or not deterministic(body):
            return None, None
        info = backend.info()
        key = cache_key({"route": kind, "model": [info.name, info.dtype, info.quant], "adapter": adapter,
                         "prompts": prompt_ids, "budgets": budgets, "tools": tools, "n": body.n, "stop": body.stop,
                         "sampling": [body.temperature, body.top_p, body.top_k, body.repetition_penalty, body.seed]})
        entry = await _io(cache, cache.get, key)
        metrics.cache_lookup(entry is not None)
        return key, entry

    @router.get("/health")
    async def health():
        """For load balancers, so without a key or login: says only whether the model is being served."""
        require_served(backend, details=False)  # no details without a key: the page and the log have them
        backend.context_length  # raises ModelReloading (503) while the model reloads
        return {"status": "ok"}

    @router.get("/metrics")
    async def metrics_page(request: Request):
        """Prometheus' text format; it shows the server's load, so it takes a key like /v1 when one is set."""
        authorize(request)
        text, content_type = metrics.page()
        return Response(text, media_type=content_type)

    @router.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        require_served(backend)  # nothing to list before the model is served
        base = base_model_id(backend.name)
        context = backend.context_length
        return ModelList(data=[ModelCard(id=base, root=base, max_model_len=context)] +
                         [ModelCard(id=name, root=name, parent=base, max_model_len=context)
                          for name in _adapter_names(backend, base)])

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        client = authorize(request)
        require_served(backend)
        body = await _parse(request, ChatCompletionRequest)
        adapter = await _adapter(backend, body.model)
        tools = body.tools if body.tool_choice != "none" else None
        prompt = chat_prompt(backend.tokenizer, body.messages, tools)
        budgets = [token_budget(backend, prompt.ids, body.token_limit(), "messages")]
        meter = await admit(client, [prompt.ids], budgets, body.n)
        with meter.refund_on_error():
            key, entry = await cached("chat.completion", body, [prompt.ids], budgets, adapter, prompt.tools)
            run = _Run(backend, body, [prompt.ids], budgets, adapter, meter, "chat.completion",
                       chat_visible(backend.family, prompt.tools), prompt.history if prompt.tools else None,
                       cache=(cache, key, entry))
        return await run.respond(request)

    @router.post("/v1/completions")
    async def completions(request: Request):
        client = authorize(request)
        require_served(backend)
        body = await _parse(request, CompletionRequest)
        adapter = await _adapter(backend, body.model)
        texts = body.prompts()
        if not texts or len(texts) * body.n > MAX_CHOICES:
            raise APIError(400, f"Give 1 to {MAX_CHOICES // body.n} prompts with n={body.n}.", "prompt")
        ids = [completion_prompt_ids(backend.tokenizer, text, "prompt") for text in texts]
        budgets = [token_budget(backend, p, body.token_limit(), "prompt") for p in ids]
        meter = await admit(client, ids, budgets, body.n)
        with meter.refund_on_error():
            key, entry = await cached("text_completion", body, ids, budgets, adapter, False)
            run = _Run(backend, body, ids, budgets, adapter, meter, "text_completion", cache=(cache, key, entry))
        return await run.respond(request)

    return router


# ---- request parts -------------------------------------------------------------------------------------
async def _io(store, fn, *args):
    """`fn(*args)` of a limiter or cache, off the event loop when it waits on the network (Redis)."""
    if store.blocking:
        return await anyio.to_thread.run_sync(fn, *args, limiter=_REDIS_CALLS)
    return fn(*args)


def _later(store, fn, *args) -> None:
    """`fn(*args)` that nothing waits for (a refund, a cache write): on a worker thread when it is Redis'."""
    if store.blocking:
        asyncio.get_running_loop().run_in_executor(None, fn, *args)
    else:
        fn(*args)


async def _parse(request: Request, schema):
    try:
        data = await request.json()
    except ValueError:
        raise APIError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        body = schema.model_validate(data)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        param = _param(error["loc"])
        raise APIError(400, f"{param}: {error['msg']}.", param) from None
    if (name := body.unsupported()) is not None:
        raise APIError(400, f"{name} is not supported by this server.", name)
    return body


def _param(loc) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; the type tags pydantic adds for unions are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict"):
            out += ("." if out else "") + part
        else:
            break
    return out


def _adapter_names(backend, base: str) -> list[str]:
    names = [info.name for info in backend.list_adapters() if info.error is None]
    names += [name for name in backend.loaded_adapters() if name not in names]
    return [name for name in names if name != base]


async def _adapter(backend, model: str) -> str | None:
    """The adapter `model` names (loaded if need be), None for the base model; 404 for anything else."""
    base = base_model_id(backend.name)
    if model == base:
        return None
    if model in backend.loaded_adapters():
        return model
    infos = {info.name: info for info in backend.list_adapters()}
    if model not in infos:
        served = ", ".join([base, *_adapter_names(backend, base)])
        raise APIError(404, f"The model {model!r} does not exist here. Models served: {served}.", "model",
                       "model_not_found")
    if infos[model].error:
        raise APIError(400, f"Adapter {model!r} cannot be used: {infos[model].error}", "model")
    try:
        # Confined to the adapters folder; no `download`, so a hub id is never fetched from the API.
        await anyio.to_thread.run_sync(backend.load_adapter, model, limiter=_LOADERS)
    except AdapterError as e:
        raise APIError(400, f"Adapter {model!r} cannot be used: {e}", "model") from None
    return model


def _sampling(family: str, body) -> SamplingParams:
    """Unset temperature / top_p take the official demo's values for the family, as the web chat's sliders."""
    defaults = DEMO_DEFAULTS[family]
    try:
        return SamplingParams(temperature=body.temperature if body.temperature is not None else defaults["temperature"],
                              top_p=body.top_p if body.top_p is not None else defaults["top_p"], top_k=body.top_k,
                              repetition_penalty=body.repetition_penalty, seed=body.seed)
    except GlmappError as e:
        raise APIError(400, str(e)) from None


# ---- answers ------------------------------------------------------------------------------------------
class _Meter:
    """One generation request's share of /metrics and of its client's token budget."""

    def __init__(self, metrics: APIMetrics, limiter: RateLimiter | None, client: str, arrived: float,
                 charged: int):
        self.metrics, self.limiter, self.client, self.arrived = metrics, limiter, client, arrived
        self.charged = charged  # tokens taken from the client's budget at admission: prompt + n x max_tokens
        self.prompt_tokens = charged  # set by the run; until then nothing is given back
        self.generated: dict[int, int] = {}  # completion tokens seen so far, per choice
        self.closed = False

    def saw(self, choice: Choice) -> None:
        replayed = choice.handle is None  # from the response cache: nothing was generated
        if not self.generated and not replayed:
            self.metrics.time_to_first_token.observe(time.perf_counter() - self.arrived)
        new = choice.usage.completion_tokens - self.generated.get(choice.index, 0)
        self.generated[choice.index] = choice.usage.completion_tokens
        if new > 0 and not replayed:
            self.metrics.generated_tokens.inc(new)

    def close(self) -> None:
        """The request ended: give back the tokens it was charged for but did not use (once)."""
        if self.closed:
            return
        self.closed = True
        if self.limiter is not None:
            _later(self.limiter, self.limiter.refund, self.client,
                   self.charged - self.prompt_tokens - sum(self.generated.values()))

    @contextlib.contextmanager
    def refund_on_error(self):
        """Everything back if the request fails before it runs (say, the engine stopped)."""
        try:
            yield
        except BaseException:
            self.prompt_tokens = 0
            self.close()
            raise


class _Run:
    """One API request's choices, answered as one JSON body or as server-sent events."""

    def __init__(self, backend, body, prompt_ids, budgets, adapter, meter: _Meter, kind: str, visible=None,
                 tools_history=None, cache=(None, None, None)):
        self.backend, self.body, self.kind, self.meter = backend, body, kind, meter
        self.tools_history = tools_history  # the prompt offered tools: the history to parse replies with
        self.cache, self.cache_key, entry = cache
        if entry is not None:
            self.events = _replay(entry)
        else:
            choices = submit_choices(backend, prompt_ids, _sampling(backend.family, body), body.n, budgets, adapter)
            self.events = stream_choices(choices, body.stop, **({"visible": visible} if visible else {}))
        self.cacheable = entry is None and self.cache_key is not None
        self.expected_choices = len(prompt_ids) * body.n
        self.prompt_tokens = meter.prompt_tokens = sum(len(p) for p in prompt_ids)
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def usage(self, choices) -> UsageInfo:
        return UsageInfo.of(self.prompt_tokens, sum(c.usage.completion_tokens for c in choices))

    async def respond(self, request: Request):
        if self.body.stream:
            return EventStream(self.sse(), on_close=self.meter.close)
        try:
            return await _unless_disconnected(request, self.whole())
        finally:
            self.meter.close()

    async def whole(self) -> JSONResponse:
        finished: dict[int, Choice] = {}
        async with contextlib.aclosing(self.events):
            async for choice, _ in self.events:
                self.meter.saw(choice)
                if choice.finish_reason is not None:
                    self._tool_calls(choice)
                    finished[choice.index] = choice
        choices = [finished[i] for i in sorted(finished)]
        failed = next((c for c in choices if c.finish_reason == "error"), None)
        if failed is not None:
            raise self._failure(failed)
        await self._store(choices)
        return JSONResponse({"id": self.id, "object": self.kind, "created": self.created, "model": self.body.model,
                             "choices": [self._choice(c, c.text) for c in choices],
                             "usage": self.usage(choices).model_dump()})

    async def sse(self):
        chunk_kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        started, finished = set(), []
        async with contextlib.aclosing(self.events):
            async for choice, text in self.events:
                self.meter.saw(choice)
                if choice.finish_reason == "error":
                    yield _event(self._failure(choice).body())
                    break
                if not text and choice.finish_reason is None:
                    continue
                if self.kind == "chat.completion" and choice.index not in started:
                    started.add(choice.index)
                    yield _event(self._chunk(chunk_kind, choice, "", None, role=True, include_usage=include_usage))
                if text:
                    yield _event(self._chunk(chunk_kind, choice, text, None, include_usage=include_usage))
                if choice.finish_reason is not None:
                    finished.append(choice)
                    if self._tool_calls(choice):
                        if choice.index not in started:
                            started.add(choice.index)
                            yield _event(self._chunk(chunk_kind, choice, "", None, role=True,
                                                     include_usage=include_usage))
                        yield _event(self._chunk(chunk_kind, choice, "", None, include_usage=include_usage,
                                                 tool_calls=True))
                    yield _event(self._chunk(chunk_kind, choice, "", choice.finish_reason,
                                             include_usage=include_usage))
        if include_usage:
            yield _event({"id": self.id, "object": chunk_kind, "created": self.created, "model": self.body.model,
                          "choices": [], "usage": self.usage(finished).model_dump()})
        await self._store(finished)
        yield "data: [DONE]\n\n"

    async def _store(self, choices: list[Choice]) -> None:
        """Keep a deterministic answer whose every choice ended normally (before the client has all of it, so
        the same request made next finds it)."""
        if not self.cacheable or len(choices) != self.expected_choices or \
                any(c.finish_reason not in ("stop", "length", "tool_calls") for c in choices):
            return
        await _io(self.cache, self.cache.put, self.cache_key, {"choices": [
            {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "tool_calls": c.tool_calls or [],
             "prompt_tokens": c.prompt_tokens, "completion_tokens": c.usage.completion_tokens} for c in choices]})

    def _tool_calls(self, choice: Choice) -> list[dict]:
        """A finished choice of a request with tools: its tool calls (finish_reason "tool_calls" if any)."""
        if choice.tool_calls is None and self.tools_history is not None and choice.finish_reason in ("stop", "length"):
            content, choice.tool_calls = reply_parts(self.tools_history, choice.raw)
            if choice.tool_calls:
                choice.finish_reason, choice.text = "tool_calls", content or ""
        return choice.tool_calls or []

    def _choice(self, choice: Choice, text: str, finish_reason="", role=False, tool_calls=False) -> dict:
        reason = choice.finish_reason if finish_reason == "" else finish_reason
        if self.kind == "text_completion":
            return {"index": choice.index, "text": text, "logprobs": None, "finish_reason": reason}
        if finish_reason == "":  # a whole message
            message = {"role": "assistant", "content": text}
            if choice.tool_calls:
                message.update(content=text or None, tool_calls=choice.tool_calls)
            return {"index": choice.index, "message": message, "logprobs": None, "finish_reason": reason}
        if tool_calls:
            delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(choice.tool_calls)]}
        else:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": reason}

    def _chunk(self, kind, choice, text, finish_reason, role=False, include_usage=False, tool_calls=False) -> dict:
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.body.model,
                 "choices": [self._choice(choice, text, finish_reason, role, tool_calls)]}
        if include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last
        return chunk

    def _failure(self, choice: Choice) -> APIError:
        if choice.retry:  # cancelled by a model reload
            return APIError(503, f"{choice.error} Try again in a moment.", code="model_reloading")
        return APIError(500, f"Generation failed: {choice.error}", code="generation_failed")


async def _replay(entry: dict):
    """A cached answer as `stream_choices` yields a live one: each choice's text, then its end."""
    for c in entry["choices"]:
        choice = Choice(c["index"], c["prompt_tokens"], usage=Usage(c["prompt_tokens"], c["completion_tokens"]),
                        tool_calls=c["tool_calls"])
        if c["text"]:
            choice.text = c["text"]
            yield choice, c["text"]
        choice.finish_reason = c["finish_reason"]
        yield choice, ""


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _unless_disconnected(request: Request, work):
    """Await `work` unless the client disconnects first; then cancel it (its requests are cancelled)."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return JSONResponse(APIError(400, "The client closed the connection.").body(), status_code=499)
    return task.result()
