"""Chat conversations kept in the store: the list beside the chat, opening one, versions, saving as it goes.

Notable choices:
- Owner: the logged-in user with --auth ("user:NAME"), else a random id the browser keeps in localStorage
  (gr.BrowserState; "browser:ID"). The prefixes keep the two kinds apart; every store query filters on the
  owner, so two browsers never see each other's conversations.
- The tab's messages (role/content dicts, as ChatHandlers uses them) also carry the store's message `id` and a
  reply's `meta`, so the next message knows its parent and a branch stays a branch.
- The user message is stored when it is accepted (before generating), a reply when its stream ends and before
  the page is told it ended. A tab closed mid-reply stores nothing of that reply.
- Regenerate stores the new reply as a sibling of the old one; an edit stores the new text as a sibling of the
  old message. The versions bar shows the focused message's `‹ n/m ›` and its adapter, tokens and tokens/s;
  its buttons switch versions (store.switch) and the conversation continues from the version shown.
- The wrappers pass ChatHandlers' outputs through: generation and its checks stay in one place.
- Export writes the Chat tab's JSON format (one conversation, or all of the owner's as `glmapp.conversations/1`);
  import reads such a file as new conversations of the current owner, all or none. A bad file is named by what is
  wrong in it (not UTF-8, the JSON error's line and column, the record and field), never by its server path.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import gradio as gr

from glmapp.errors import GlmappError
from glmapp.store import StoreError
from glmapp.ui import notices
from glmapp.ui.adapter_handlers import dropdown_value
from glmapp.ui.loading import page_ready_updates
from glmapp.ui.chat_handlers import ChatHandlers
from glmapp.ui.export import write_json
from glmapp.ui.i18n import ENGLISH, lang_of, t, table
from glmapp.ui.render import chatbot_messages, safe_markdown

SETTINGS = ("system", "max_length", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
SAMPLING = SETTINGS[1:]
BROWSER_STORAGE_KEY = "glmapp-owner"
# BrowserState sends its secret to the page, so it protects nothing: the id's randomness is what keeps others out.
BROWSER_SECRET = "glmapp-owner-id"
_BROWSER_ID = re.compile(r"[0-9a-f]{32}")
UNTITLED = "New chat"


def new_browser_id(current=None) -> str:
    """The browser's owner id: kept when it has one, else a new random one."""
    return current if isinstance(current, str) and _BROWSER_ID.fullmatch(current) else uuid.uuid4().hex


def owner_of(browser_id, request) -> str:
    """The logged-in user with --auth, else the browser's random id; gr.Error when the page has neither yet."""
    user = getattr(request, "username", None)
    if user:
        return f"user:{user}"
    if isinstance(browser_id, str) and _BROWSER_ID.fullmatch(browser_id):
        return f"browser:{browser_id}"
    raise gr.Error(t("conv.error_no_browser_id", lang_of(request)))


def label(summary, lang: str = ENGLISH) -> str:
    when = summary.updated_at.strftime("%Y-%m-%d %H:%M")  # ISO order reads the same in both languages
    untitled = t("conv.new", lang) if summary.title in (None, "", UNTITLED) else summary.title
    return f"{untitled} · {summary.adapter or t('stats.base_model', lang)} · {when}"


def describe(view, lang: str = ENGLISH) -> str:
    """The model, adapter and settings a conversation uses, as one Markdown line."""
    parts = [t("conv.model", lang, name=view.model["name"])] if view.model.get("name") else []
    parts.append(t("stats.adapter", lang, name=view.adapter) if view.adapter else t("stats.base_model", lang))
    parts += [f"{k.replace('_', ' ')} {v}" for k, v in view.settings.items() if k in SAMPLING]
    return safe_markdown(" · ".join(parts))


def tab_messages(view) -> list[dict]:
    """A stored branch as the tab's messages (role/content plus the store's id and meta)."""
    return [{"role": m.role, "content": m.content, "id": m.id, **({"meta": m.meta} if m.role == "assistant" else {})}
            for m in view.messages]


def versions_bar(view, focus_id=None, lang: str = ENGLISH) -> tuple[str, int | None]:
    """(the bar's text, the focused message id): the focused message, else the last one with versions."""
    messages = view.messages
    target = (next((m for m in messages if m.id == focus_id), None)
              or next((m for m in reversed(messages) if m.versions > 1), None)
              or (messages[-1] if messages else None))
    if target is None:
        return "", None
    parts = [t("conv.message_yours" if target.role == "user" else "conv.message_reply", lang,
               n=messages.index(target) + 1),
             t("conv.version", lang, version=target.version, versions=target.versions)]
    meta = target.meta or {}
    if target.role == "assistant" and meta:
        parts += [t("stats.adapter", lang, name=meta["adapter"]) if meta.get("adapter") else t("stats.base_model", lang),
                  t("conv.tokens", lang, n=meta.get("tokens", 0)),
                  t("stats.speed", lang, rate=f"{meta.get('tokens_per_second', 0):.1f}")]
        if meta.get("finish_reason") not in (None, "stop"):
            reason = str(meta["finish_reason"])
            parts.append(t(f"finish.{reason}", lang) if lang != ENGLISH and f"finish.{reason}" in table(lang) else reason)
    return safe_markdown(" · ".join(parts)), target.id


def reply_lines(messages, request: gr.Request = None) -> list[str]:
    """One plain-text line per reply (adapter, tokens, tokens/s), "" while it streams; the page shows each under
    its reply (REPLY_LINES_JS), outside the reply's text."""
    lines, lang = [], lang_of(request)
    for m in messages or []:
        if m.get("role") == "assistant":
            meta = m.get("meta") or {}
            lines.append(" · ".join([meta.get("adapter") or t("stats.base_model", lang),
                                     t("conv.tokens", lang, n=meta.get("tokens", 0)),
                                     t("stats.speed", lang, rate=f"{meta.get('tokens_per_second', 0):.1f}")])
                         if meta else "")
    return lines


# Puts each reply's line after its message (textContent: inert), replacing the lines shown before.
REPLY_LINES_JS = """(lines) => {
  document.querySelectorAll('#chatbot .reply-meta').forEach((e) => e.remove());
  document.querySelectorAll('#chatbot [data-testid="bot"]').forEach((bot, i) => {
    if (!lines || !lines[i]) return;
    const line = document.createElement('div');
    line.className = 'reply-meta';
    line.textContent = lines[i];
    bot.insertAdjacentElement('afterend', line);
  });
}"""


class ConversationHandlers:
    """Chat-tab handlers that keep the conversation in `store`; generation goes through `chat`."""

    def __init__(self, store, chat: ChatHandlers, backend):
        self.conversations = store.conversations
        self.chat = chat
        self.backend = backend

    # ---- the list ------------------------------------------------------------------------------------------
    def page_load(self, browser_id, query="", request: gr.Request = None):
        """A new page: give the browser an id if it has none, list its conversations, and only then open the chat
        box (it starts disabled: a message sent before the page has its owner id could not be saved), or, while
        the model is still loading, start the timer that opens it when it is ready -> (id, list, chat box,
        loading timer)."""
        box, timer = page_ready_updates(self.backend)
        user, lang = getattr(request, "username", None), lang_of(request)
        browser_id = gr.skip() if user else new_browser_id(browser_id)
        try:
            listing = self.listing(owner_of(None if user else browser_id, request), query, lang=lang)
        except StoreError as e:  # the chat still works; its conversations are not listed (and say why)
            notices.warning(t("conv.list_failed", lang, error=e))
            listing = gr.skip()
        return browser_id, listing, box, timer

    def listing(self, owner: str, query: str = "", current: str | None = None, lang: str = ENGLISH):
        found = self.conversations.list(owner, query=str(query or ""))
        ids = [c.id for c in found]
        return gr.update(choices=[(label(c, lang), c.id) for c in found], value=current if current in ids else None)

    def search(self, query, conversation, browser_id, request: gr.Request = None):
        return self.listing(owner_of(browser_id, request), query, conversation, lang_of(request))

    def open(self, conversation, browser_id, request: gr.Request = None):
        """Restore a conversation exactly: messages, system prompt, sampling settings, adapter.
        -> (chatbot, messages, conversation, title, info, bar, focus, stats, adapter, the Chat tab's and the Model
        tab's adapter dropdowns, *SETTINGS widgets)."""
        owner = owner_of(browser_id, request)
        if not conversation:
            return (gr.skip(),) * (11 + len(SETTINGS))
        self.chat.stop(request)  # a reply still streaming into the page would overwrite what is opened
        try:
            view = self.conversations.get(owner, conversation)
        except StoreError as e:
            raise notices.error(e, lang_of(request)) from None
        messages = tab_messages(view)
        bar, focus = versions_bar(view, lang=lang_of(request))
        values = [gr.update(value=view.system_prompt)]
        values += [gr.update(value=view.settings[k]) if k in view.settings else gr.skip() for k in SAMPLING]
        return (chatbot_messages(messages), messages, view.id, view.title, describe(view, lang_of(request)), bar,
                focus, "",
                view.adapter, dropdown_value(view.adapter), dropdown_value(view.adapter), *values)

    def new_chat(self, request: gr.Request = None):
        """New chat (and Clear): stop this tab's reply, empty the chat, no conversation open.
        -> (chatbot, messages, textbox, stats, conversation, title, info, bar, focus, list value)."""
        self.chat.clear(request)
        return [], [], "", "", None, "", "", "", None, gr.update(value=None)

    def rename(self, conversation, title, query, browser_id, request: gr.Request = None):
        owner = owner_of(browser_id, request)
        if not conversation:
            raise gr.Error(t("conv.error_rename", lang_of(request)))
        try:
            self.conversations.rename(owner, conversation, clean_title(title))
        except StoreError as e:
            raise notices.error(e) from None
        return self.listing(owner, query, conversation, lang_of(request))

    def delete(self, conversation, query, browser_id, request: gr.Request = None):
        """Delete the open conversation (undo brings it back) -> new_chat's outputs + (list, deleted, undo)."""
        owner = owner_of(browser_id, request)
        if not conversation:
            raise gr.Error(t("conv.error_delete", lang_of(request)))
        try:
            self.conversations.delete(owner, conversation)
        except StoreError as e:
            raise notices.error(e) from None
        return (*self.new_chat(request)[:-1], self.listing(owner, query, lang=lang_of(request)),
                conversation, gr.update(visible=True))

    def undo_delete(self, deleted, query, browser_id, request: gr.Request = None):
        """-> (list, deleted, undo button)."""
        owner = owner_of(browser_id, request)
        if not deleted:
            raise gr.Error(t("conv.error_undo", lang_of(request)))
        try:
            self.conversations.restore(owner, deleted)
        except StoreError as e:
            raise notices.error(e) from None
        return self.listing(owner, query, lang=lang_of(request)), None, gr.update(visible=False)

    # ---- export / import ----------------------------------------------------------------------------------
    def export_one(self, conversation, browser_id, request: gr.Request = None):
        """The open conversation as a JSON file -> the download widget."""
        owner = owner_of(browser_id, request)
        if not conversation:
            raise gr.Error(t("conv.error_export", lang_of(request)))
        try:
            record = self.conversations.export(owner, conversation)
        except StoreError as e:
            raise notices.error(e) from None
        return gr.update(value=write_json(record, "conversation"), visible=True)

    def export_every(self, browser_id, request: gr.Request = None):
        """All of this owner's conversations in one JSON file -> the download widget."""
        data = self.conversations.export_all(owner_of(browser_id, request))
        if not data["conversations"]:
            raise gr.Error(t("conv.error_export_all", lang_of(request)))
        return gr.update(value=write_json(data, "conversations"), visible=True)

    def import_file(self, path, query, browser_id, request: gr.Request = None):
        """Store the conversations of an exported JSON file as new ones of this owner, all or none -> the list."""
        owner = owner_of(browser_id, request)
        if not path:
            raise gr.Error(t("conv.error_import", lang_of(request)))
        try:
            ids = self.conversations.import_records(owner, read_export(path))
        except StoreError as e:
            raise notices.error(f"{Path(path).name} was not imported: {e}") from None
        notices.info(t("conv.imported" if len(ids) == 1 else "conv.imported_n", lang_of(request), n=len(ids),
                       file=Path(path).name))
        return self.listing(owner, query, lang=lang_of(request))

    # ---- versions ------------------------------------------------------------------------------------------
    def focus(self, conversation, browser_id, evt: gr.SelectData, request: gr.Request = None):
        """A message was clicked: the bar shows its versions and meta -> (bar, focus)."""
        if not conversation:
            return "", None
        view = self.conversations.get(owner_of(browser_id, request), conversation)
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        focus_id = view.messages[index].id if 0 <= index < len(view.messages) else None
        return versions_bar(view, focus_id, lang_of(request))

    def switch(self, step: int, conversation, focus, browser_id, request: gr.Request = None):
        """Show the focused message's previous (-1) or next (+1) version -> (chatbot, messages, bar, focus)."""
        owner, lang = owner_of(browser_id, request), lang_of(request)
        if not conversation or focus is None:
            raise gr.Error(t("conv.error_versions", lang))
        try:
            view = self.conversations.get(owner, conversation)
            target = next((m for m in view.messages if m.id == focus), None)
            if target is None:
                raise gr.Error(t("conv.error_branch", lang))
            position = target.version - 1 + step
            if not 0 <= position < target.versions:
                raise gr.Error(t("conv.error_no_earlier" if step < 0 else "conv.error_no_later", lang))
            sibling = target.sibling_ids[position]
            view = self.conversations.switch(owner, sibling)
        except StoreError as e:
            raise notices.error(e) from None
        messages = tab_messages(view)
        bar, focus = versions_bar(view, sibling, lang)
        return chatbot_messages(messages), messages, bar, focus

    def older(self, conversation, focus, browser_id, request: gr.Request = None):
        return self.switch(-1, conversation, focus, browser_id, request)

    def newer(self, conversation, focus, browser_id, request: gr.Request = None):
        return self.switch(1, conversation, focus, browser_id, request)

    # ---- saving while chatting -----------------------------------------------------------------------------
    # Explicit parameters: Gradio passes `request` only to a named parameter, never after *args.
    def accept(self, message, messages, system, max_length, max_new_tokens, temperature, top_p, top_k,
               repetition_penalty, seed, adapter, conversation, browser_id, request: gr.Request = None):
        """ChatHandlers.accept, then the user message is stored (the conversation is created on the first one).
        -> (chatbot, messages, textbox, conversation, list)."""
        settings = [system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed]
        chatbot, new_messages, box = self.chat.accept(message, messages, *settings, adapter, request=request)
        try:
            owner = owner_of(browser_id, request)
        except gr.Error as e:  # sent before the page had its id: the chat goes on, unsaved, and says so
            notices.warning(t("conv.not_saved", lang_of(request), why=e.message))
            return chatbot, new_messages, box, None, gr.skip()
        try:
            conversation = self._record_settings(owner, conversation, settings, adapter)
            before = list(messages or [])
            parent = before[-1].get("id") if before else None
            # After the last shown message; a chat without stored ids continues the stored branch.
            kwargs = {} if before and parent is None else {"parent_id": parent}
            view = self.conversations.append(owner, conversation, "user", new_messages[-1]["content"], **kwargs)
        except StoreError as e:
            self.chat.closed(request)  # frees the reply slot accept claimed: nothing will be generated
            raise notices.error(f"{e} Press New chat to start another conversation.") from None
        new_messages[-1]["id"] = view.id
        return chatbot, new_messages, box, conversation, self.listing(owner, current=conversation,
                                                                      lang=lang_of(request))

    def _record_settings(self, owner: str, conversation, settings, adapter) -> str:
        values = dict(zip(SETTINGS, settings))
        system = values.pop("system") or ""
        adapter = adapter or None
        if not conversation:
            return self.conversations.create(owner, system_prompt=system, model=self._model(), adapter=adapter,
                                             settings=values)
        self.conversations.update(owner, conversation, system_prompt=system, adapter=adapter or "", settings=values)
        return conversation

    def _model(self) -> dict:
        try:
            info = self.backend.info()
        except GlmappError:  # reloading: the conversation is saved without the model's name
            return {}
        return {"name": info.name, "family": info.family, "dtype": info.dtype, "quant": info.quant}

    def reply(self, messages, system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
              seed, adapter, conversation, browser_id, request: gr.Request = None):
        """ChatHandlers.reply; the reply is stored when it ends. Yields (chatbot, messages, textbox, stats, bar,
        focus, list)."""
        settings = [system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed]
        user_id = messages[-1].get("id") if messages else None
        stream = self.chat.reply(messages, *settings, adapter, request=request)
        yield from self._saving(stream, browser_id, conversation, request, lambda _: user_id)

    def regenerate(self, messages, system, max_length, max_new_tokens, temperature, top_p, top_k,
                   repetition_penalty, seed, adapter, conversation, browser_id, request: gr.Request = None):
        """A new version of the last reply (the old one stays a version). Yields as `reply`."""
        settings = [system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed]
        users = [m for m in messages or [] if m["role"] == "user"]
        user_id = users[-1].get("id") if users else None
        stream = self.chat.regenerate(messages, *settings, adapter, request=request)
        yield from self._saving(stream, browser_id, conversation, request, lambda _: user_id)

    def edit(self, messages, system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
             seed, adapter, conversation, browser_id, edit: gr.EditData = None, request: gr.Request = None):
        """A past message edited: its new text is stored as a new version once the reply starts. Yields as `reply`."""
        settings = [system, max_length, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed]
        messages = list(messages or [])
        index = edit.index if isinstance(edit.index, int) else edit.index[0]
        original = messages[index] if 0 <= index < len(messages) else None
        stream = self.chat.edit(messages, *settings, adapter, edit=edit, request=request)
        stored: dict = {}

        def user_id(shown: list[dict]):
            new = shown[index] if len(shown) > index else None
            if "id" not in stored and new is not None and new is not original and original and original.get("id"):
                owner = owner_of(browser_id, request)
                stored["id"] = self.conversations.edit(owner, original["id"], new["content"]).id
            return stored.get("id")

        yield from self._saving(stream, browser_id, conversation, request, user_id, started=user_id)

    def _saving(self, stream, browser_id, conversation, request, user_id, started=None):
        skip = (gr.skip(),) * 3
        for chatbot, shown, box, stats in stream:
            extra = skip
            try:
                streaming = isinstance(shown, list) and len(shown) >= 2 and shown[-1]["role"] == "assistant"
                if conversation and streaming and started is not None:
                    started(shown)
                if conversation and streaming and "meta" in shown[-1] and "id" not in shown[-1]:
                    extra = self._save_reply(owner_of(browser_id, request), conversation, shown, user_id(shown),
                                             lang_of(request))
            except (StoreError, gr.Error) as e:
                notices.warning(t("conv.save_failed", lang_of(request), why=getattr(e, "message", e)))
            yield chatbot, shown, box, stats, *extra

    def _save_reply(self, owner: str, conversation: str, shown: list[dict], parent_id, lang: str = ENGLISH) -> tuple:
        reply = shown[-1]
        view = self.conversations.append(owner, conversation, "assistant", reply["content"], meta=reply["meta"],
                                         **({"parent_id": parent_id} if parent_id else {}))
        reply["id"] = view.id
        if parent_id:
            shown[-2]["id"] = parent_id
        bar, focus = versions_bar(self.conversations.get(owner, conversation), lang=lang)
        return bar, focus, self.listing(owner, current=conversation, lang=lang)


def clean_title(title) -> str:
    return " ".join(str(title or "").split())


def read_export(path) -> object:
    """The parsed JSON of an uploaded file; gr.Error naming the file (not its server folder) and what is wrong."""
    name = Path(path).name
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise gr.Error(f"{name} is not UTF-8 text (byte {e.start}): import a .json file exported from "
                       "glmapp.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise gr.Error(f"{name} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
