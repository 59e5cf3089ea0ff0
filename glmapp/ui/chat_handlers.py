"""Chat tab event handlers as plain functions (generators yield the new UI state; testable without a browser).

The session's conversation is a list of OpenAI-style {"role", "content"} dicts (user/assistant), kept
in `gr.State`; it is converted to the model family's history format for each request, so a long
conversation stays fully visible even when the oldest rounds no longer fit the prompt.

Every streaming handler yields `(chatbot, messages, textbox, stats)`.
"""

from __future__ import annotations

import html
import time
from dataclasses import asdict, dataclass

import gradio as gr

from glmapp import prompts
from glmapp.engine.sampling import SamplingParams
from glmapp.errors import GlmappError
from glmapp.ui.render import chatbot_messages, response_text, safe_markdown
from glmapp.ui.sessions import ActiveRequests, session_id

STREAM_INTERVAL_S = 0.05  # at most ~20 UI updates per second, however fast tokens arrive

# Defaults of the official web demos (THUDM/ChatGLM2-6B web_demo.py, THUDM/ChatGLM3 web_demo_gradio.py).
DEMO_DEFAULTS = {
    "chatglm2": dict(max_length=8192, top_p=0.8, temperature=0.95),
    "chatglm3": dict(max_length=8192, top_p=0.8, temperature=0.6),
}


@dataclass
class ChatSettings:
    """What the sliders, seed box and system prompt hold (Hugging Face names)."""

    max_length: int = 8192
    max_new_tokens: int = 2048
    temperature: float = 0.95
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    system: str = ""
    adapter: str | None = None  # LoRA adapter of this browser session; None = base model

    @classmethod
    def defaults(cls, family: str, context_length: int, max_new_tokens: int) -> ChatSettings:
        d = DEMO_DEFAULTS.get(family, DEMO_DEFAULTS["chatglm2"])
        return cls(max_length=min(d["max_length"], context_length), max_new_tokens=max_new_tokens,
                   temperature=d["temperature"], top_p=d["top_p"])

    def sampling(self) -> SamplingParams:
        seed = None if self.seed is None or self.seed < 0 else int(self.seed)
        return SamplingParams(temperature=float(self.temperature), top_p=float(self.top_p) or 1.0,
                              top_k=int(self.top_k), repetition_penalty=float(self.repetition_penalty), seed=seed)


def to_family_history(family: str, messages: list[dict]) -> list:
    """role/content messages -> (query, response) tuples (v2) or v3 role dicts, complete rounds only."""
    rounds, query = [], None
    for m in messages:
        if m["role"] == "user":
            query = m["content"]
        elif m["role"] == "assistant" and query is not None:
            rounds.append((query, m["content"]))
            query = None
    if family == "chatglm2":
        return rounds
    out = []
    for q, r in rounds:
        out += [{"role": "user", "content": q}, {"role": "assistant", "metadata": "", "content": r}]
    return out


def clean_input(text) -> str:
    """Pasted text made safe for the tokenizer: control characters and lone surrogates dropped."""
    return prompts.normalize_text(text if isinstance(text, str) else "")


def stats_line(usage, max_length: int, memory: str, finish_reason: str | None = None,
               adapter: str | None = None) -> str:
    model = f"adapter {safe_markdown(adapter)}" if adapter else "base model"
    if usage is None:
        return (f"{model} · failed · memory {memory}" if finish_reason == "error"
                else f"{model} · … waiting for the model · memory {memory}")
    used = usage.prompt_tokens + usage.completion_tokens
    line = (f"{model} · {usage.tokens_per_second:.1f} tokens/s · {used:,} / {max_length:,} tokens of context "
            f"({usage.completion_tokens} new) · memory {memory}")
    endings = {"length": "stopped at the length limit", "cancelled": "stopped", "error": "failed"}
    return f"{line} · {endings[finish_reason]}" if finish_reason in endings else line


class ChatHandlers:
    def __init__(self, manager, active: ActiveRequests | None = None):
        self.manager = manager
        self.active = active or ActiveRequests()

    # ---- streaming -------------------------------------------------------------------------------
    def _stream(self, before: list[dict], query: str, settings: ChatSettings, sid: str, restore_text: str = ""):
        """Generate a reply to `query` after `before`; yields (chatbot, messages, textbox, stats)."""
        query = clean_input(query)
        if not query.strip():
            raise gr.Error("Empty message: type something to send (control characters are removed).")
        try:
            backend = self.manager.backend
            if settings.adapter:  # instant when resident; loads it again if a model reload could not keep it
                self.manager.load_adapter(settings.adapter)
            params = settings.sampling()
            history = to_family_history(backend.family, before)
            handles = []
            track = self.active.track(sid)
            stream = backend.chat_stream(
                query, history, system=(settings.system.strip() or None) if backend.family == "chatglm3" else None,
                max_length=int(settings.max_length), max_new_tokens=int(settings.max_new_tokens), params=params,
                adapter=settings.adapter or None, on_handle=lambda h: (handles.append(h), track(h)))
            first = next(stream)  # raises InputError/InputTooLong before anything is shown
        except GlmappError as e:
            raise gr.Error(str(e)) from None
        messages = [*before, {"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        last_yield = 0.0
        update = first
        try:
            for update in _chain(first, stream):
                messages[-1]["content"] = response_text(update.response)
                now = time.monotonic()
                if update.finish_reason is None and now - last_yield < STREAM_INTERVAL_S:
                    continue
                last_yield = now
                if update.finish_reason is None:
                    yield chatbot_messages(messages), messages, "", "generating… · " + self._stats(update, settings)
        finally:
            stream.close()  # a closed tab stops here: chat_stream's own finally cancels the request
            for h in handles:
                self.active.done(sid, h)
        if update.finish_reason == "error":
            gr.Warning(f"{update.error or 'Generation failed.'} The app keeps running; try again.")
            if not messages[-1]["content"]:
                messages = messages[:-2]
                yield chatbot_messages(messages), messages, restore_text or query, self._stats(update, settings)
                return
        done = self._stats(update, settings) + (f" · {handles[0].id}" if handles else "")
        yield chatbot_messages(messages), messages, "", done

    def _stats(self, update, settings: ChatSettings) -> str:
        return stats_line(update.usage, int(settings.max_length), self.manager.memory(), update.finish_reason,
                          settings.adapter)

    def send(self, message, messages, system, max_length, max_new_tokens, temperature, top_p, top_k,
             repetition_penalty, seed, adapter=None, request: gr.Request = None):
        """Enter / Send: stream a reply to `message` after the conversation so far (`adapter`: this tab's)."""
        settings = ChatSettings(max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                _seed(seed), system or "", adapter or None)
        yield from self._stream(list(messages or []), message, settings, session_id(request), restore_text=message)

    def regenerate(self, messages, system, max_length, max_new_tokens, temperature, top_p, top_k,
                   repetition_penalty, seed, adapter=None, request: gr.Request = None):
        """Drop the last reply and generate it again (with the current settings)."""
        messages = list(messages or [])
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise gr.Error("Nothing to regenerate yet: send a message first.")
        settings = ChatSettings(max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                _seed(seed), system or "", adapter or None)
        yield from self._stream(messages[:last_user], messages[last_user]["content"], settings, session_id(request))

    def edit(self, messages, system, max_length, max_new_tokens, temperature, top_p, top_k,
             repetition_penalty, seed, adapter=None, edit: gr.EditData = None, request: gr.Request = None):
        """A past user message was edited: drop everything after it and continue from the new text."""
        messages = list(messages or [])
        index = edit.index if isinstance(edit.index, int) else edit.index[0]
        if not 0 <= index < len(messages) or messages[index]["role"] != "user":
            raise gr.Error("Only your own messages can be edited.")
        # The chatbot shows escaped Markdown (see render.py); edits come back in that form.
        text = html.unescape(str(edit.value)).replace("\u200b", "")
        settings = ChatSettings(max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                _seed(seed), system or "", adapter or None)
        yield from self._stream(messages[:index], text, settings, session_id(request))

    # ---- instant actions -------------------------------------------------------------------------
    def stop(self, request: gr.Request = None) -> None:
        """Cancel this session's running generation; the partial reply stays."""
        self.active.cancel(session_id(request))

    def undo(self, messages):
        """Remove the last round and put its message back in the textbox -> (chatbot, messages, textbox)."""
        messages = list(messages or [])
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            return chatbot_messages(messages), messages, ""
        text = messages[last_user]["content"]
        messages = messages[:last_user]
        return chatbot_messages(messages), messages, text

    def clear(self, request: gr.Request = None):
        """Forget the conversation -> (chatbot, messages, textbox, stats)."""
        self.active.cancel(session_id(request))
        return [], [], "", ""

    def closed(self, request: gr.Request = None) -> None:
        """The tab was closed or reloaded: free its generations."""
        self.active.cancel(session_id(request))


def _seed(value) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise gr.Error(f"Seed must be a whole number (got {value!r}); use -1 for a random seed.") from None


def _chain(first, rest):
    yield first
    yield from rest


def settings_dict(settings: ChatSettings) -> dict:
    return asdict(settings)
