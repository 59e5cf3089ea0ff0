"""RemoteBackend: the Backend protocol over OpenAI-compatible servers (vLLM serving ChatGLM2/3 with
`--enable-lora --lora-modules`, another glmapp's API, or anything that speaks the protocol).

Notable choices:
- Replicas: several base URLs of servers serving the same model. Each request goes to the healthy replica
  with the fewest requests in flight from this process. A replica that refuses a connection or drops a
  stream is taken out for `retry_s` seconds, then probed (`GET /models`) before it gets traffic again. A
  request that could not even connect is retried on the next replica; one that already streamed text ends
  with a clear error (the text so far stays), because replaying it elsewhere would repeat or change it.
- Models and adapters come from `/v1/models`: the entry without `parent` is the base model, entries whose
  `parent` is the base are adapters (how vLLM lists LoRA modules and how glmapp lists its adapters). The
  list is cached for `MODELS_TTL_S` so that a page of pickers does not hit the server per widget.
- ChatGLM3 on vLLM: ChatGLM3's turn tokens `<|user|>` and `<|observation|>` are sent as stop strings and a
  leftover `<|observation|>` is stripped from replies (vLLM otherwise runs past the end of the turn).
- Token-level access (prompt ids, the tokenizer), quantization, dtype reloads, adapter loading and training
  belong to the model server: `capabilities()` says so, and those calls raise `Unavailable` with the reason.
- Messages shown to web users name "the model server" (and which replica), never its address or key: the
  address is the operator's and is logged instead.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import httpx

from glmapp import prompts
from glmapp.adapters import AdapterInfo
from glmapp.backends.base import Capabilities, ChatUpdate, ModelInfo, ReloadResult
from glmapp.engine.request import Usage
from glmapp.engine.sampling import SamplingParams
from glmapp.errors import AdapterError, GlmappError, InputError, Unavailable

log = logging.getLogger(__name__)

MODELS_TTL_S = 2.0
DEFAULT_CONTEXT = 8192  # when the server does not say (`max_model_len` is vLLM's and glmapp's field)
CHATGLM3_STOPS = ["<|user|>", "<|observation|>"]
_ON_SERVER = "is set on the model server (it runs the model; restart it with other options)"
_IDS = itertools.count(1)


class RemoteError(GlmappError):
    """No model server could be reached, or one answered with an error."""


@dataclass
class Replica:
    url: str  # ".../v1", no trailing slash
    index: int
    in_flight: int = 0
    dead_until: float = 0.0  # monotonic time before which it gets no traffic
    failures: int = 0

    def label(self, count: int) -> str:
        return "the model server" + (f" (replica {self.index + 1} of {count})" if count > 1 else "")


@dataclass
class _Models:
    base: str
    adapters: list[str]
    context_length: int
    fetched: float = field(default_factory=time.monotonic)


class RemoteHandle:
    """A running remote request: `cancel()` closes its stream (the server sees the disconnect and stops)."""

    def __init__(self):
        self.id = f"req-remote-{next(_IDS)}"  # "req-" like local ids: the stats line ends with it
        self.done = False
        self.cancelled = False
        self._response: httpx.Response | None = None

    def cancel(self) -> None:
        self.cancelled = True
        response = self._response
        if response is not None:
            try:
                response.close()
            except Exception:  # closing from another thread while it is being read
                pass


class RemoteBackend:
    def __init__(self, urls: list[str] | str, key: str | None = None, *, family: str | None = None,
                 retry_s: float = 5.0, connect_timeout_s: float = 5.0, read_timeout_s: float = 300.0):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise RemoteError("Give at least one --backend-url.")
        self.replicas = [Replica(_normalise(url), i) for i, url in enumerate(urls)]
        self._key = key
        self._family = family
        self.retry_s = retry_s
        self._client = httpx.Client(timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
                                    limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))
        self._lock = threading.Lock()
        self._models: _Models | None = None
        self.demo = False
        self.notice = ""
        self.adapters_dir = "(on the model server)"
        self.dtype_choice = "auto"
        self.loading = None  # the model server loads its own model; its replicas are probed per request
        self._models_now()  # fail at start, with the reason, when no replica answers

    # ---- what is served ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        models = self._models
        return models.base if models is not None else "remote model"

    @property
    def family(self) -> str:
        if self._family:
            return self._family
        return "chatglm3" if "chatglm3" in self.name.lower() else "chatglm2"

    @property
    def context_length(self) -> int:
        return self._models_now().context_length

    @property
    def max_input_tokens(self) -> int:
        return self.context_length

    @property
    def tokenizer(self):
        raise Unavailable(self.capabilities().tokenization)

    def capabilities(self) -> Capabilities:
        return Capabilities(
            quantization=f"Quantization {_ON_SERVER}.", dtype_switch=f"The dtype {_ON_SERVER}.",
            adapter_loading="Adapters come from the model server (vLLM: --lora-modules name=path); "
                            "they appear here when it lists them.",
            training="Training runs where the model is loaded; this app forwards to a model server.",
            tokenization="This app forwards to a model server and has no tokenizer of its own.")

    def info(self) -> ModelInfo:
        models = self._models_now()
        where = ", ".join(r.url for r in self.replicas)
        return ModelInfo(name=models.base, family=self.family, parameters=0, dtype="(server)", device="remote",
                         weight_bytes=0, context_length=models.context_length, demo=False, quant="(server)",
                         backend=f"{len(self.replicas)} OpenAI-compatible server(s): {where}")

    def memory(self) -> str:
        up = sum(1 for r in self.replicas if r.dead_until <= time.monotonic())
        return f"remote ({up}/{len(self.replicas)} replicas up)"

    def stats(self) -> dict:
        return {"running": sum(r.in_flight for r in self.replicas), "waiting": 0, "free_blocks": 0,
                "num_blocks": 0, "errors": sum(r.failures for r in self.replicas)}

    # ---- adapters -------------------------------------------------------------------------------------
    def list_adapters(self) -> list[AdapterInfo]:
        models = self._models_now()
        return [AdapterInfo(name=name, path="", base_model=models.base) for name in models.adapters]

    def loaded_adapters(self) -> list[str]:
        return list(self._models_now().adapters)

    def load_adapter(self, spec: str, *, reload: bool = False, download=None) -> AdapterInfo:
        spec = (spec or "").strip()
        for info in self.list_adapters():
            if info.name == spec:
                return info
        served = ", ".join(self.loaded_adapters()) or "none"
        raise AdapterError(f"The model server does not serve an adapter named {spec!r} (it serves: {served}). "
                           "Adapters are added on the model server (vLLM: --lora-modules name=path).")

    # ---- the model's life belongs to the server ---------------------------------------------------------
    def quant_choices(self) -> dict[str, str | None]:
        from glmapp.choices import QUANT_MODES

        return {mode: self.capabilities().quantization for mode in QUANT_MODES}

    def reload(self, dtype: str, progress=None) -> ReloadResult:
        raise Unavailable(self.capabilities().dtype_switch)

    def quantize(self, mode: str, progress=None) -> ReloadResult:
        raise Unavailable(self.capabilities().quantization)

    def submit(self, request):
        raise Unavailable(self.capabilities().tokenization)

    def cancel(self, request_id: str) -> None:
        pass  # remote requests are cancelled through their handle (closing the stream)

    def close(self) -> None:
        self._client.close()

    # ---- chat ------------------------------------------------------------------------------------------
    def prepare_chat(self, query: str, history, system: str | None = None, max_length: int | None = None):
        """Checks what can be checked here (the server counts tokens): -> (None, history, normalised query)."""
        query = prompts.normalize_text(query if isinstance(query, str) else "")
        if not query.strip():
            raise InputError("Empty message: type something to send.")
        return None, list(history or []), query

    def chat_streams(self, query: str, history, columns: list[dict], *, system: str | None = None,
                     on_handle=None) -> list:
        """One `chat_stream` per column (Compare): separate requests, which the model server batches itself; each
        starts when its iterator is first read. A bad message is refused here, before any request."""
        self.prepare_chat(query, history, system)
        return [self.chat_stream(query, history, system, on_handle=on_handle, **column) for column in columns]

    def chat_stream(self, query: str, history=None, system: str | None = None, *, max_length: int | None = None,
                    max_new_tokens: int | None = None, params: SamplingParams | None = None,
                    adapter: str | None = None, on_handle=None):
        """Yield `ChatUpdate`s with the growing response; the last one has `finish_reason` (errors included)."""
        _, history, query = self.prepare_chat(query, history, system, max_length)
        family, models = self.family, self._models_now()
        if adapter and adapter not in models.adapters:
            self.load_adapter(adapter)  # raises AdapterError naming what the server serves
        body = self._body(family, messages_of(family, history, query, system), models, params or SamplingParams(),
                          max_new_tokens, max_length, adapter)
        handle = RemoteHandle()
        if on_handle is not None:
            on_handle(handle)
        text, usage, start = "", Usage(), time.perf_counter()
        try:
            for kind, value in self._stream(body, handle):
                if kind == "text":
                    if not usage.first_token_seconds:
                        usage.first_token_seconds = time.perf_counter() - start
                    text += value
                    usage.completion_tokens += 1  # one chunk per token on vLLM and glmapp; usage corrects it
                    usage.seconds = time.perf_counter() - start
                    response = prompts.process_response(family, _clean(text), history)
                    yield ChatUpdate(response, prompts.append_history(family, history, query, response), usage,
                                     new_text=True)
                    continue
                if kind == "usage":
                    usage.prompt_tokens = int(value.get("prompt_tokens") or 0)
                    usage.completion_tokens = int(value.get("completion_tokens") or usage.completion_tokens)
                    continue
                usage.seconds = time.perf_counter() - start
                response = prompts.process_response(family, _clean(text), history)
                reason, error = value
                yield ChatUpdate(response, prompts.append_history(family, history, query, response), usage,
                                 reason, error)
                return
        finally:
            handle.done = True
            handle.cancel()  # the consumer went away: the server sees the disconnect

    # ---- HTTP ------------------------------------------------------------------------------------------
    def _body(self, family, messages, models: _Models, params: SamplingParams, max_new_tokens, max_length,
              adapter) -> dict:
        body = {"model": adapter or models.base, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": params.temperature,
                "top_p": params.top_p}
        if params.top_k:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if params.seed is not None:
            body["seed"] = params.seed
        if max_new_tokens is not None:
            body["max_tokens"] = int(max_new_tokens)
        if family == "chatglm3":
            body["stop"] = list(CHATGLM3_STOPS)
        return body

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def _stream(self, body: dict, handle: RemoteHandle):
        """('text', str) per chunk, ('usage', dict), then ('end', (finish_reason, error or None))."""
        tried: set[int] = set()
        while True:
            replica = self._pick(tried)
            if replica is None:
                yield "end", ("error", self._none_up_message())
                return
            tried.add(replica.index)
            streamed = False
            with self._lock:
                replica.in_flight += 1
            try:
                with self._client.stream("POST", replica.url + "/chat/completions", json=body,
                                         headers=self._headers()) as response:
                    handle._response = response
                    if response.status_code != 200:
                        yield "end", ("error", _error_message(response, replica.label(len(self.replicas))))
                        return
                    pending = ("error", "The model server ended the reply without saying why.")
                    for event in _events(response):
                        if event is None:
                            yield "end", pending
                            return
                        if event.get("usage"):
                            yield "usage", event["usage"]
                        for choice in event.get("choices") or []:
                            delta = (choice.get("delta") or {}).get("content")
                            if delta:
                                streamed = True
                                yield "text", delta
                            if choice.get("finish_reason"):
                                reason = choice["finish_reason"]
                                pending = ("stop" if reason in ("stop", "tool_calls") else
                                           "length" if reason == "length" else "error", None)
                    yield "end", pending
                    return
            except (httpx.TransportError, httpx.StreamClosed, RuntimeError) as e:
                if handle.cancelled:
                    yield "end", ("cancelled", None)
                    return
                self._mark_dead(replica, e)
                if streamed:
                    yield "end", ("error", f"Lost the connection to {replica.label(len(self.replicas))} "
                                           "mid-reply; the text so far is kept. Send again when it is back.")
                    return
            finally:
                with self._lock:
                    replica.in_flight -= 1
                handle._response = None

    def _pick(self, tried: set[int]) -> Replica | None:
        """The live replica with the fewest requests in flight; a dead one whose wait is over is probed."""
        now = time.monotonic()
        for replica in self.replicas:
            if replica.index not in tried and 0 < replica.dead_until <= now and self._probe(replica):
                replica.dead_until = 0.0
        with self._lock:
            live = [r for r in self.replicas if r.index not in tried and r.dead_until == 0.0]
            return min(live, key=lambda r: (r.in_flight, r.index)) if live else None

    def _probe(self, replica: Replica) -> bool:
        try:
            ok = self._client.get(replica.url + "/models", headers=self._headers(), timeout=2.0).status_code == 200
        except httpx.HTTPError:
            ok = False
        if not ok:
            replica.dead_until = time.monotonic() + self.retry_s
        return ok

    def _mark_dead(self, replica: Replica, error: BaseException) -> None:
        log.warning("model server %s failed (%s: %s); retrying it in %.0f s", replica.url, type(error).__name__,
                    error, self.retry_s)
        with self._lock:
            replica.failures += 1
            replica.dead_until = time.monotonic() + self.retry_s

    def _none_up_message(self) -> str:
        count = len(self.replicas)
        return ("The model server is not reachable" if count == 1 else f"None of the {count} model servers is "
                "reachable") + f"; the app retries every {self.retry_s:g} s. Send again in a moment."

    def _models_now(self) -> _Models:
        """The served models (cached for MODELS_TTL_S); RemoteError when no replica answers."""
        models = self._models
        if models is not None and time.monotonic() - models.fetched < MODELS_TTL_S:
            return models
        tried: set[int] = set()
        while (replica := self._pick(tried)) is not None:
            tried.add(replica.index)
            try:
                response = self._client.get(replica.url + "/models", headers=self._headers(), timeout=10.0)
            except httpx.HTTPError as e:
                self._mark_dead(replica, e)
                continue
            if response.status_code != 200:
                raise RemoteError(_error_message(response, replica.label(len(self.replicas))))
            self._models = _parse_models(response.json())
            return self._models
        if models is not None:
            return models  # keep showing the last list; generation requests say the servers are down
        raise RemoteError(self._none_up_message())


# ---- helpers ------------------------------------------------------------------------------------------------
def _normalise(url: str) -> str:
    url = (url or "").strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise RemoteError(f"--backend-url must start with http:// or https:// (got {url!r}).")
    return url if url.endswith("/v1") else url + "/v1"


def _parse_models(data: dict) -> _Models:
    cards = [c for c in (data.get("data") or []) if isinstance(c, dict) and c.get("id")]
    bases = [c for c in cards if not c.get("parent")]
    if not bases:
        raise RemoteError("The model server lists no base model at /v1/models.")
    base = bases[0]
    adapters = [c["id"] for c in cards if c.get("parent") == base["id"]]
    context = int(base.get("max_model_len") or DEFAULT_CONTEXT)
    return _Models(base["id"], adapters, context)


def _events(response: httpx.Response):
    """The JSON objects of a server-sent event stream; None for `[DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        try:
            yield json.loads(data)
        except ValueError:
            continue


def _error_message(response: httpx.Response, who: str) -> str:
    try:
        response.read()
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError, httpx.HTTPError):
        message = f"HTTP {response.status_code}"
    return f"{who[0].upper() + who[1:]} refused the request: {message}"


def _clean(text: str) -> str:
    """vLLM with ChatGLM3 can leave the end-of-turn token in the text."""
    return text.replace("<|observation|>", "").replace("<|user|>", "")


def messages_of(family: str, history, query: str, system: str | None) -> list[dict]:
    """A family-format history (v2 (query, reply) pairs, v3 role dicts) + the new query -> OpenAI messages."""
    messages = [{"role": "system", "content": system}] if system else []
    for item in history or []:
        if isinstance(item, dict):
            role = {"observation": "tool"}.get(item.get("role"), item.get("role"))
            content = item.get("content")
            if role in ("system", "user", "assistant", "tool"):
                messages.append({"role": role, "content": content if isinstance(content, str) else
                                 json.dumps(content, ensure_ascii=False)})
        else:
            q, a = item
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": query})
    return messages
