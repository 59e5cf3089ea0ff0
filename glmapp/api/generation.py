"""From an API request to engine requests and back: prompt ids, `n` choices, stop strings, async streaming.

Notable choices:
- Chat prompts are built by `glmapp.prompts` (the one chat format). Unlike the web chat, the API never
  drops earlier turns to make a prompt fit: a prompt over the limit is a 400 that says the limit.
- `n` choices are `n` engine requests submitted together, so they batch in the engine (as do requests of
  other API clients and browser users). A seeded request gives choice i the seed `seed + i`.
- Stop strings are matched on the text the client sees; text that may be the start of a stop string is
  held back until it is known not to be one, so a stop string never reaches a stream.
- The engine's deltas are read in the event loop itself: each request's handles `listen` with one
  `asyncio.Event`, the engine wakes the loop once per step (`glmapp.engine.delivery`), and each wake-up
  turns all the deltas a choice got into one piece of text (one SSE chunk), not one per token. No thread
  per stream: with many streams, per-token thread hops held the GIL the engine thread needs (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

from glmapp import prompts
from glmapp.api.tools import ToolMessageError, streamed_text, system_turn, tool_call_turn
from glmapp.engine.request import GenerationRequest, Usage
from glmapp.engine.sampling import SamplingParams

POLL_S = 1.0  # a stream silent this long checks that the engine still runs (RequestHandle.take)

class APIError(Exception):
    """An answer in OpenAI's error format: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


# ---- prompts ----------------------------------------------------------------------------------------
@dataclass
class ChatPrompt:
    ids: list[int]
    history: list  # the family's history the prompt was built from (v3: starts with the tools' system turn)
    tools: bool = False  # the prompt offers tools (ChatGLM3): replies may be tool calls


def chat_history(family: str, messages, tools=None) -> tuple[list, str, str]:
    """OpenAI messages -> (history in the family's format, last message's text, its ChatGLM role); APIError
    names a bad message."""
    last = len(messages) - 1
    ends = ("user", "tool") if family == "chatglm3" else ("user",)
    if messages[last].role not in ends:
        raise APIError(400, f"The last message must come from the {' or '.join(ends)} (messages[{last}] is "
                            f"{messages[last].role!r}).", f"messages[{last}].role")
    texts = [prompts.normalize_text(m.text()) for m in messages]
    if not texts[last].strip():
        raise APIError(400, f"The last {messages[last].role} message is empty.", f"messages[{last}].content")
    if family == "chatglm3":
        return _v3_history(messages, texts, tools), texts[last], "observation" if messages[last].role == "tool" \
            else "user"
    if tools:
        raise APIError(400, "Tool calls need a ChatGLM3 model; this server serves a ChatGLM2 model.", "tools")
    history, query = [], None
    for i, m in enumerate(messages[:last]):
        if m.role in ("system", "tool"):
            raise APIError(400, f"ChatGLM2 models have no {m.role} role: put the instructions in the first user "
                                "message instead.", f"messages[{i}].role")
        expected = "user" if query is None else "assistant"
        if m.role != expected:
            raise APIError(400, f"ChatGLM2 conversations alternate user and assistant messages; messages[{i}] "
                                f"should be {expected!r}, not {m.role!r}.", f"messages[{i}].role")
        if query is None:
            query = texts[i]
        else:
            history.append((query, texts[i]))
            query = None
    if query is not None:
        raise APIError(400, f"messages[{last - 1}] and messages[{last}] are both from the user; ChatGLM2 "
                            "conversations alternate user and assistant messages.", f"messages[{last}].role")
    return history, texts[last], "user"


def _v3_history(messages, texts: list[str], tools) -> list[dict]:
    history = []
    for i, (m, text) in enumerate(zip(messages[:-1], texts)):
        if m.role == "system" and tools and i == 0:
            continue  # its text goes into the tools' system turn
        if m.role == "assistant" and m.tool_calls:
            if text.strip():
                history.append({"role": "assistant", "metadata": "", "content": text})
            for j, call in enumerate(m.tool_calls):
                try:
                    history.append(tool_call_turn(call.function.name, call.function.arguments,
                                                  f"messages[{i}].tool_calls[{j}].function.arguments"))
                except ToolMessageError as e:
                    raise APIError(400, str(e), e.param) from None
        elif m.role == "tool":
            history.append({"role": "observation", "content": text})
        else:
            history.append({"role": m.role, "content": text} | ({"metadata": ""} if m.role == "assistant" else {}))
    if tools:
        system = texts[0] if messages[0].role == "system" and len(messages) > 1 else None
        history.insert(0, system_turn(tools, system))
    return history


def chat_prompt(tokenizer, messages, tools=None) -> ChatPrompt:
    """The prompt of a chat request; `tools` (OpenAI function tools, ChatGLM3 only) are offered to the model."""
    history, query, role = chat_history(tokenizer.family, messages, tools)
    return ChatPrompt(prompts.build_prompt_ids(tokenizer, query, history, role=role), history, bool(tools))


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    return chat_prompt(tokenizer, messages).ids


def completion_prompt_ids(tokenizer, prompt: str, param: str) -> list[int]:
    """A raw prompt: the tokenizer's ids with ChatGLM's `[gMASK] sop` prefix, no chat template."""
    if not prompt:
        raise APIError(400, "The prompt is empty.", param)
    return tokenizer.encode(prompts.normalize_text(prompt))


def token_budget(backend, prompt_ids: list[int], max_tokens: int | None, param: str) -> int:
    """New tokens this prompt may have; APIError (400, says the limit) when it does not fit."""
    limit = min(backend.max_input_tokens, backend.context_length - 1)
    if len(prompt_ids) > limit:
        raise APIError(400, f"The prompt is {len(prompt_ids)} tokens, over this server's limit of {limit} "
                            f"tokens (the model's context is {backend.context_length} tokens). Shorten it.",
                       param, "context_length_exceeded")
    room = backend.context_length - len(prompt_ids)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"This model's context is {backend.context_length} tokens: the prompt takes "
                            f"{len(prompt_ids)}, so at most {room} new tokens fit, but {max_tokens} were asked "
                            f"for. Lower max_tokens.", "max_tokens", "context_length_exceeded")
    return max_tokens if max_tokens is not None else room


# ---- running choices ----------------------------------------------------------------------------------
@dataclass
class Choice:
    index: int
    prompt_tokens: int
    handle: object = None
    raw: str = ""  # the engine's text so far
    text: str = ""  # the client-visible text sent so far (or, once finished, all of it)
    finish_reason: str | None = None  # OpenAI's: "stop" | "length"; or "error"
    error: str | None = None
    retry: bool = False  # the error is passing (the model is being reloaded)
    tool_calls: list[dict] | None = None  # OpenAI's, once a reply to a prompt with tools is parsed
    usage: Usage = field(default_factory=Usage)


def chat_visible(family: str, tools: bool = False) -> Callable[[str, bool], str]:
    """The chat reply as the web chat shows it (the family's post-processing), from the raw text and whether
    it is all there; with tools, only text known not to be a tool call (`tools.streamed_text`)."""
    if tools:
        return streamed_text

    def visible(raw: str, final: bool) -> str:
        reply = prompts.process_response(family, raw)
        return reply if isinstance(reply, str) else str(reply.get("content", ""))
    return visible


def _raw(raw: str, final: bool) -> str:
    return raw


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def submit_choices(backend, prompts_ids: list[list[int]], params: SamplingParams, n: int, budgets: list[int],
                   adapter: str | None) -> list[Choice]:
    """Submit n requests per prompt, all before the first is read (they batch); raises EngineStopped."""
    choices = []
    try:
        for p, ids in enumerate(prompts_ids):
            for j in range(n):
                seed = params.seed + j if params.seed is not None else None
                request = GenerationRequest(ids, SamplingParams(params.temperature, params.top_p, params.top_k,
                                                                params.repetition_penalty, seed), budgets[p],
                                            adapter=adapter)
                choices.append(Choice(len(choices), len(ids), backend.submit(request)))
    except BaseException:
        for choice in choices:
            choice.handle.cancel()
        raise
    return choices


async def stream_choices(choices: list[Choice], stops: list[str], visible: Callable[[str, bool], str] = _raw):
    """Yield (choice, new visible text) as text arrives, and each choice once more with its `finish_reason`
    set. Closing the generator (the client went away) cancels what still runs."""
    arrived = asyncio.Event()
    for choice in choices:
        choice.handle.listen(arrived)
    try:
        running = list(choices)
        while running:
            try:
                async with asyncio.timeout(POLL_S):
                    await arrived.wait()
            except TimeoutError:
                pass  # silent for a while: take() below tells a dead engine apart
            arrived.clear()
            for choice in running:
                deltas = choice.handle.take()
                if not deltas:
                    continue
                last = deltas[-1]
                choice.raw += "".join(d.text for d in deltas)
                choice.usage = last.usage or choice.usage
                new, stopped = _advance(choice, visible, stops, final=last.finish_reason is not None)
                if new:
                    yield choice, new
                if not stopped and last.finish_reason is None:
                    continue
                if stopped:
                    choice.finish_reason = "stop"
                    choice.handle.cancel()
                elif last.finish_reason in ("stop", "length"):
                    choice.finish_reason = last.finish_reason
                else:  # "error", or "cancelled" by a model reload (never by us: we stop reading first)
                    choice.finish_reason = "error"
                    choice.error = last.error or "The generation was cancelled (the model is being reloaded)."
                    choice.retry = last.finish_reason == "cancelled"
                yield choice, ""
            running = [c for c in running if c.finish_reason is None]
    finally:
        for choice in choices:
            if not choice.handle.done:
                choice.handle.cancel()


def _advance(choice: Choice, visible: Callable[[str, bool], str], stops: list[str],
             final: bool) -> tuple[str, bool]:
    """New client-visible text of `choice` and whether a stop string ended it."""
    text = visible(choice.raw, final)
    start = max(0, len(choice.text) - max((len(s) for s in stops), default=0))
    cuts = [i for s in stops if (i := text.find(s, start)) >= 0]
    if cuts:
        text = text[:min(cuts)]
    elif not final:
        text = text[:len(text) - _held_back(text, stops)]
    if not text.startswith(choice.text):  # post-processing rewrote shown text (rare): send nothing more
        return "", bool(cuts)
    new, choice.text = text[len(choice.text):], text
    return new, bool(cuts)
