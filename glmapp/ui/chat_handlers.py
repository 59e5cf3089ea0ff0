"""Chat tab event handlers as plain functions (generators yield the new UI state; testable without a browser).

The session's conversation is a list of OpenAI-style {"role", "content"} dicts (user/assistant), kept
in `gr.State`; it is converted to the model family's history format for each request, so a long
conversation stays fully visible even when the oldest rounds no longer fit the prompt.

In the page a message goes through two steps: `accept` moves it from the box into the conversation at
once (the box is cleared only then), then `reply` streams the answer without touching the box, so what
the user types meanwhile stays. While a tab's reply streams, a new message from that tab is refused
with a notice and stays in the box (press Stop, or send it when the reply ends).

Every value from the page or the HTTP API is checked here (`SettingRange`), so a bad one gets a message
that names the field and its allowed range. Streaming handlers yield `(chatbot, messages, textbox, stats)`.
"""

from __future__ import annotations

import html
import math
import threading
import time
from dataclasses import dataclass

import gradio as gr

from glmapp import prompts
from glmapp.choices import DEMO_DEFAULTS
from glmapp.engine.sampling import SamplingParams
from glmapp.errors import GlmappError
from glmapp.ui import notices
from glmapp.ui.i18n import ENGLISH, lang_of, number, t
from glmapp.ui.render import chatbot_messages, response_text, safe_markdown
from glmapp.ui.sessions import ActiveRequests, session_id

STREAM_INTERVAL_S = 0.05  # at most ~20 UI updates per second, however fast tokens arrive
SEED_MAX = 2**63 - 1  # the engine hashes seeds as int64
BUSY = t("notice.busy")  # in English; the page shows t("notice.busy", lang)
BUSY_REPLY = t("notice.busy_reply")


@dataclass(frozen=True)
class SettingRange:
    """A setting's label in the page and its allowed values; `check` turns a raw value into one of them."""

    label: str
    minimum: float
    maximum: float
    whole: bool = False  # a whole number (sliders with step 1, the seed)
    key: str = ""  # its translation key (`setting.<name>`); "" = the label in every language

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        return f"{self.label} must be {kind} from {_num(self.minimum)} to {_num(self.maximum)}"

    def check(self, value, lang: str = ENGLISH) -> int | float:
        """Raise gr.Error naming the field and range unless `value` (number or numeric text) is in range."""
        number = _to_number(value)
        if (number is None or not math.isfinite(number) or not self.minimum <= number <= self.maximum
                or (self.whole and number != int(number))):
            shown = html.escape(repr(value)[:40])  # toasts render HTML: show the value as text
            raise gr.Error(t("error.setting_range", lang, label=t(self.key, lang) if self.key else self.label,
                             kind=t("error.whole_number" if self.whole else "error.a_number", lang),
                             low=_num(self.minimum), high=_num(self.maximum), got=shown))
        return int(number) if self.whole else float(number)


def setting_ranges(context_length: int, max_new_tokens: int | None = None) -> dict[str, SettingRange]:
    """The allowed values of every generation setting; the sliders are built from the same table."""
    return {
        "max_length": SettingRange("Max length", min(16, context_length), context_length, True, "setting.max_length"),
        "max_new_tokens": SettingRange("Max new tokens", 1, max_new_tokens or context_length, True,
                                       "setting.max_new_tokens"),
        "temperature": SettingRange("Temperature", 0, 1.5, key="setting.temperature"),
        "top_p": SettingRange("Top p", 0.01, 1, key="setting.top_p"),
        "top_k": SettingRange("Top k", 0, 200, True, "setting.top_k"),
        "repetition_penalty": SettingRange("Repetition penalty", 0.5, 2, key="setting.repetition_penalty"),
        "seed": SettingRange("Seed", -1, SEED_MAX, True, "setting.seed"),  # -1 = random
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

    @classmethod
    def from_inputs(cls, ranges: dict[str, SettingRange], *, system="", adapter=None, seed=None, lang=ENGLISH,
                    **values) -> ChatSettings:
        """Settings from raw page or API values, each checked against `ranges` (gr.Error names a bad one)."""
        checked = {name: ranges[name].check(value, lang) for name, value in values.items()}
        seed = None if seed is None or seed == "" else ranges["seed"].check(seed, lang)
        return cls(**checked, seed=None if seed is None or seed < 0 else seed,
                   system=system if isinstance(system, str) else "", adapter=adapter or None)

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k),
                              repetition_penalty=float(self.repetition_penalty), seed=self.seed)


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
               adapter: str | None = None, lang: str = ENGLISH) -> str:
    model = t("stats.adapter", lang, name=safe_markdown(adapter)) if adapter else t("stats.base_model", lang)
    memory = t("stats.memory", lang, memory=memory)
    if usage is None:
        return " · ".join((model, t("stats.failed" if finish_reason == "error" else "stats.waiting", lang), memory))
    used = usage.prompt_tokens + usage.completion_tokens
    line = " · ".join((model, t("stats.speed", lang, rate=number(usage.tokens_per_second, lang, 1)),
                       t("stats.context", lang, used=number(used, lang), limit=number(max_length, lang),
                         new=usage.completion_tokens), memory))
    if finish_reason in ("length", "cancelled", "error"):
        return f"{line} · {t(f'stats.end_{finish_reason}', lang)}"
    return line


def reply_meta(update, settings: ChatSettings) -> dict:
    """A finished reply's adapter, tokens, tokens/s and finish reason (kept with it, shown beside it)."""
    usage = update.usage
    return {"adapter": settings.adapter, "finish_reason": update.finish_reason,
            "tokens": usage.completion_tokens if usage else 0,
            "tokens_per_second": round(usage.tokens_per_second, 2) if usage else 0.0}


class ChatHandlers:
    def __init__(self, backend, active: ActiveRequests | None = None, max_new_tokens: int | None = None):
        self.backend = backend
        self.active = active or ActiveRequests()
        self.max_new_tokens = max_new_tokens  # the server's cap (--max-new-tokens); None = the context length
        self._lock = threading.Lock()
        self._replying: set[str] = set()  # sessions with a reply between `accept` and its end

    def settings(self, system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                 adapter=None, lang: str = ENGLISH) -> ChatSettings:
        """The settings panel's raw values, checked (gr.Error names the first bad one and its range)."""
        try:
            context_length = self.backend.context_length
        except GlmappError as e:
            raise notices.error(e, lang) from None
        return ChatSettings.from_inputs(
            setting_ranges(context_length, self.max_new_tokens), system=system, adapter=adapter, seed=seed, lang=lang,
            max_length=max_length, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, repetition_penalty=repetition_penalty)

    # ---- the page's two steps: accept, then reply --------------------------------------------------------
    def accept(self, message, messages, system, max_length, max_new_tokens, temperature, top_p, top_k,
               repetition_penalty, seed, adapter=None, request: gr.Request = None):
        """Enter / Send: check the message and settings, then show it as the next turn -> (chatbot, messages,
        textbox). Refused with a notice (the text stays in the box) while this tab's reply streams."""
        lang = lang_of(request)
        settings = self.settings(system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                 seed, adapter, lang)
        messages = list(messages or [])
        query = self._checked_query(message, messages, settings, lang)
        if not self._claim(session_id(request)):
            gr.Warning(t("notice.busy", lang))
            # Ends this step without a second pop-up, so the chained `reply` does not run.
            raise gr.Error(t("notice.busy", lang), visible=False, print_exception=False)
        messages.append({"role": "user", "content": query})
        return chatbot_messages(messages), messages, ""

    def reply(self, messages, system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
              seed, adapter=None, request: gr.Request = None):
        """Stream the answer to the last message, which `accept` added; the textbox is left as the user has it."""
        sid, lang = session_id(request), lang_of(request)
        try:
            messages = list(messages or [])
            if not messages or messages[-1]["role"] != "user":
                return
            query = messages[-1]["content"]
            try:
                settings = self.settings(system, max_length, max_new_tokens, temperature, top_p, top_k,
                                         repetition_penalty, seed, adapter, lang)
                yield from self._stream(messages[:-1], query, settings, sid, restore_text=query, lang=lang)
            except gr.Error:  # refused before anything streamed (e.g. the model was reloaded meanwhile)
                yield chatbot_messages(messages[:-1]), messages[:-1], query, gr.skip()
                raise
        finally:
            self._release(sid)

    def send(self, message, messages, system, max_length, max_new_tokens, temperature, top_p, top_k,
             repetition_penalty, seed, adapter=None, request: gr.Request = None):
        """Both steps in one call (the HTTP API, scripts): yields (chatbot, messages, textbox, stats)."""
        args = (system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, adapter)
        chatbot, messages, textbox = self.accept(message, messages, *args, request=request)
        yield chatbot, messages, textbox, ""
        yield from self.reply(messages, *args, request=request)

    def api_chat(self, message: str, system: str = "", max_length: float = 8192, max_new_tokens: float = 256,
                 temperature: float = 0.95, top_p: float = 0.8, top_k: float = 0, repetition_penalty: float = 1.0,
                 seed: float = -1, request: gr.Request = None) -> dict:
        """/gradio_api/call/chat: one message on a new conversation with the base model; streams
        {"messages": role/content dicts, "stats": the stats line}.

        Values arrive as sent (no component conversion), so text or NaN gets the same named-range message
        as in the page."""
        for _, messages, _, stats in self.send(message, [], system, max_length, max_new_tokens, temperature, top_p,
                                               top_k, repetition_penalty, seed, None, request=request):
            yield {"messages": messages, "stats": stats}

    # ---- streaming -------------------------------------------------------------------------------
    def _checked_query(self, query, before: list[dict], settings: ChatSettings, lang: str = ENGLISH) -> str:
        """The cleaned query; raises gr.Error when it is empty or does not fit the prompt."""
        query = _non_empty(query, lang)
        try:
            backend = self.backend
            backend.prepare_chat(query, to_family_history(backend.family, before), self._system(backend, settings),
                                 settings.max_length)
        except GlmappError as e:
            raise notices.error(e, lang) from None
        return query

    @staticmethod
    def _system(backend, settings: ChatSettings) -> str | None:
        return (settings.system.strip() or None) if backend.family == "chatglm3" else None

    def _stream(self, before: list[dict], query: str, settings: ChatSettings, sid: str, restore_text: str = "",
                lang: str = ENGLISH):
        """Generate a reply to `query` after `before`; yields (chatbot, messages, textbox, stats).

        The textbox is only written when a failed reply puts the message back; otherwise it is gr.skip().
        The tab's reply slot is freed before the last yield: once the page shows the reply ended, a new
        message from it is accepted."""
        query = _non_empty(query, lang)
        try:
            backend = self.backend
            if settings.adapter:  # instant when resident; loads it again if a model reload could not keep it
                self.backend.load_adapter(settings.adapter)
            params = settings.sampling()
            history = to_family_history(backend.family, before)
            handles = []
            track = self.active.track(sid)
            stream = backend.chat_stream(
                query, history, system=self._system(backend, settings), max_length=settings.max_length,
                max_new_tokens=settings.max_new_tokens, params=params, adapter=settings.adapter,
                on_handle=lambda h: (handles.append(h), track(h)))
            first = next(stream)  # raises InputError/InputTooLong before anything is shown
        except GlmappError as e:
            raise notices.error(e, lang) from None
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
                    yield (chatbot_messages(messages), messages, gr.skip(),
                           t("stats.generating", lang) + " · " + self._stats(update, settings, lang))
        finally:
            stream.close()  # a closed tab stops here: chat_stream's own finally cancels the request
            for h in handles:
                self.active.done(sid, h)
            self._release(sid)
        if update.finish_reason == "error":
            notices.warning(t("notice.generation_failed", lang,
                              error=update.error or t("notice.generation_failed_default", lang)))
            if not messages[-1]["content"]:
                messages = messages[:-2]
                yield chatbot_messages(messages), messages, restore_text or query, self._stats(update, settings, lang)
                return
        messages[-1]["meta"] = reply_meta(update, settings)  # what the conversation store keeps with the reply
        done = self._stats(update, settings, lang) + (f" · {handles[0].id}" if handles else "")
        yield chatbot_messages(messages), messages, gr.skip(), done

    def _stats(self, update, settings: ChatSettings, lang: str = ENGLISH) -> str:
        return stats_line(update.usage, int(settings.max_length), self.backend.memory(), update.finish_reason,
                          settings.adapter, lang)

    def _claim(self, sid: str) -> bool:
        with self._lock:
            if sid in self._replying:
                return False
            self._replying.add(sid)
            return True

    def _release(self, sid: str) -> None:
        with self._lock:
            self._replying.discard(sid)

    def regenerate(self, messages, system, max_length, max_new_tokens, temperature, top_p, top_k,
                   repetition_penalty, seed, adapter=None, request: gr.Request = None):
        """Drop the last reply and generate it again (with the current settings)."""
        messages = list(messages or [])
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        lang = lang_of(request)
        if last_user is None:
            raise gr.Error(t("error.nothing_to_regenerate", lang))
        settings = self.settings(system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                 seed, adapter, lang)
        yield from self._exclusive(messages, messages[:last_user], messages[last_user]["content"], settings, request)

    def edit(self, messages, system, max_length, max_new_tokens, temperature, top_p, top_k,
             repetition_penalty, seed, adapter=None, edit: gr.EditData = None, request: gr.Request = None):
        """A past user message was edited: drop everything after it and continue from the new text."""
        messages = list(messages or [])
        index = edit.index if isinstance(edit.index, int) else edit.index[0]
        if not 0 <= index < len(messages) or messages[index]["role"] != "user":
            raise gr.Error(t("error.edit_own_only", lang_of(request)))
        # The chatbot shows escaped Markdown (see render.py); edits come back in that form.
        text = html.unescape(str(edit.value)).replace("\u200b", "")
        settings = self.settings(system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                 seed, adapter, lang_of(request))
        yield from self._exclusive(messages, messages[:index], text, settings, request)

    def _exclusive(self, messages, before, query, settings: ChatSettings, request):
        """Regenerate / edit: one reply per tab at a time, like `accept`; a refused one leaves the chat as it was."""
        sid, lang = session_id(request), lang_of(request)
        if not self._claim(sid):
            gr.Warning(t("notice.busy_reply", lang))
            yield chatbot_messages(messages), messages, gr.skip(), gr.skip()
            return
        try:
            yield from self._stream(before, query, settings, sid, lang=lang)
        finally:
            self._release(sid)

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
        """The tab was closed or reloaded: free its generations (and its reply slot, if a step never ran)."""
        sid = session_id(request)
        self.active.cancel(sid)
        self._release(sid)


def _non_empty(query, lang: str = ENGLISH) -> str:
    """The cleaned query; gr.Error when nothing is left to send."""
    query = clean_input(query)
    if not query.strip():
        raise gr.Error(t("error.empty_message", lang))
    return query


def _to_number(value) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value.strip())
            except ValueError:
                continue
    return None


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) and abs(x) < 1e15 else f"{x}"


def _chain(first, rest):
    yield first
    yield from rest
