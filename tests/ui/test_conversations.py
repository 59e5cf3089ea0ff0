"""Conversation handlers as plain functions: the real demo backend and a real store (SQLite in tmp_path)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest

from glmapp.backends import LocalBackend
from glmapp.store import open_store, sqlite_url
from glmapp.ui.adapter_handlers import BASE
from glmapp.ui.chat_handlers import ChatHandlers
from glmapp.ui.conversations import SETTINGS, ConversationHandlers, new_browser_id, owner_of

GREEDY = dict(system="", max_length=8192, max_new_tokens=6, temperature=0, top_p=0.8, top_k=0,
              repetition_penalty=1.0, seed=None)


@pytest.fixture(scope="module")
def backend(demo_v2):
    b = LocalBackend.load(str(demo_v2), max_input_tokens=64)
    yield b
    b.close()


@pytest.fixture()
def store(tmp_path):
    s = open_store(sqlite_url(tmp_path))
    yield s
    s.close()


@pytest.fixture()
def conv(backend, store):
    return ConversationHandlers(store, ChatHandlers(backend), backend)


class Tab:
    """One browser tab: its browser id, its state (messages, conversation), its request."""

    def __init__(self, conv, browser_id=None, username=None, **settings):
        self.conv = conv
        self.request = SimpleNamespace(session_hash=uuid_hex(), username=username)
        self.browser_id, *_ = conv.page_load(browser_id, request=self.request)
        self.messages, self.conversation, self.adapter = [], None, None
        self.settings = {**GREEDY, **settings}

    def values(self):
        return (*(self.settings[k] for k in SETTINGS), self.adapter, self.conversation, self.browser_id)

    def send(self, text):
        _, self.messages, _, self.conversation, _ = self.conv.accept(text, self.messages, *self.values(),
                                                                     request=self.request)
        return self._run(self.conv.reply(self.messages, *self.values(), request=self.request))

    def regenerate(self):
        return self._run(self.conv.regenerate(self.messages, *self.values(), request=self.request))

    def edit(self, index, text):
        data = gr.EditData(None, {"index": index, "value": text, "previous_value": self.messages[index]["content"]})
        return self._run(self.conv.edit(self.messages, *self.values(), edit=data, request=self.request))

    def _run(self, stream):
        *_, last = stream
        self.messages = last[1]
        return last

    def owner(self):
        return owner_of(self.browser_id, self.request)


def uuid_hex():
    return new_browser_id()


def test_a_message_and_its_reply_are_stored_with_title_and_meta(conv, store):
    tab = Tab(conv)
    _, _, _, stats, bar, _, listing = tab.send("hello there\nsecond line")
    view = store.conversations.get(tab.owner(), tab.conversation)
    assert view.title == "hello there"
    assert [(m.role, m.content) for m in view.messages] == [(m["role"], m["content"]) for m in tab.messages]
    meta = view.messages[1].meta
    assert meta["tokens"] == 6 and meta["tokens_per_second"] > 0 and meta["finish_reason"] == "length"
    assert meta["adapter"] is None and "6 tokens" in bar and "base model" in bar
    assert [m["id"] for m in tab.messages] == [m.id for m in view.messages]
    assert listing["choices"][0][1] == tab.conversation and listing["choices"][0][0].startswith("hello there")
    assert view.model["name"] and view.settings["max_new_tokens"] == 6


def test_opening_restores_everything_and_the_next_message_continues_it(conv, store):
    first = Tab(conv, max_new_tokens=5, temperature=0.5, top_p=0.7, seed=7)
    first.send("one")
    first.send("two")
    # A new tab of the same browser opens it: the messages, settings and conversation come back exactly.
    tab = Tab(conv, first.browser_id)
    out = conv.open(first.conversation, tab.browser_id, request=tab.request)
    chatbot, messages, conversation, title, info, bar, focus, stats, adapter, chat_picker, model_picker, *values = out
    assert messages == first.messages and conversation == first.conversation and title == "one"
    restored = dict(zip(SETTINGS, [v["value"] for v in values]))
    assert restored == {**first.settings, "system": ""}
    assert "temperature 0.5" in info and adapter is None and chat_picker == model_picker == BASE
    # The adapter it used comes back in the tab's state and in both pickers (Chat tab and Model tab).
    store.conversations.update(first.owner(), first.conversation, adapter="style")
    _, _, _, _, info, *_, adapter, chat_picker, model_picker = conv.open(first.conversation, tab.browser_id,
                                                                         request=tab.request)[:11]
    assert adapter == chat_picker == model_picker == "style" and "adapter style" in info
    tab.messages, tab.conversation = messages, conversation
    tab.send("three")
    view = store.conversations.get(tab.owner(), conversation)
    assert [m.content for m in view.messages[::2]] == ["one", "two", "three"]
    assert view.messages[4].parent_id == messages[-1]["id"]


def test_regenerate_and_edit_keep_versions_and_switching_continues_from_the_shown_one(conv, store):
    tab = Tab(conv, temperature=0.9, seed=None)
    tab.send("question")
    old_reply = tab.messages[1]
    *_, bar, focus, _ = tab.regenerate()
    assert "‹ 2/2 ›" in bar and focus == tab.messages[1]["id"] != old_reply["id"]
    chatbot, messages, bar, focus = conv.switch(-1, tab.conversation, focus, tab.browser_id, request=tab.request)
    assert "‹ 1/2 ›" in bar and messages[1]["content"] == old_reply["content"] and focus == old_reply["id"]
    with pytest.raises(gr.Error, match="no earlier version"):
        conv.switch(-1, tab.conversation, focus, tab.browser_id, request=tab.request)
    tab.messages = messages
    tab.send("follow-up")  # continues from the version shown
    view = store.conversations.get(tab.owner(), tab.conversation)
    assert view.messages[2].parent_id == old_reply["id"]

    *_, bar, _, _ = tab.edit(0, "question, edited")
    view = store.conversations.get(tab.owner(), tab.conversation)
    assert [m.content for m in view.messages][0] == "question, edited" and len(view.messages) == 2
    assert view.messages[0].versions == 2 and "Message 1 (yours) · version ‹ 2/2 ›" in bar
    assert [m["id"] for m in tab.messages] == [m.id for m in view.messages]


def test_two_browsers_never_see_each_others_conversations(conv):
    alice, bob = Tab(conv), Tab(conv)
    alice.send("alice's secret")
    assert alice.browser_id != bob.browser_id
    assert conv.search("", None, bob.browser_id, request=bob.request)["choices"] == []
    assert conv.search("secret", None, bob.browser_id, request=bob.request)["choices"] == []
    with pytest.raises(gr.Error, match="not yours"):
        conv.open(alice.conversation, bob.browser_id, request=bob.request)
    with pytest.raises(gr.Error, match="not yours"):
        conv.delete(alice.conversation, "", bob.browser_id, request=bob.request)
    assert len(conv.search("", None, alice.browser_id, request=alice.request)["choices"]) == 1


def test_logged_in_users_own_by_name_whatever_the_browser_id(conv):
    carol = Tab(conv, username="carol")
    carol.send("hi")
    other_browser = Tab(conv, username="carol")
    assert len(conv.search("", None, other_browser.browser_id, request=other_browser.request)["choices"]) == 1
    dave = Tab(conv, carol.browser_id, username="dave")  # the same browser, another login
    assert conv.search("", None, dave.browser_id, request=dave.request)["choices"] == []


def test_search_rename_delete_and_undo(conv):
    tab = Tab(conv)
    tab.send("about llamas")
    llamas = tab.conversation
    conv.new_chat(tab.request)
    tab.messages, tab.conversation = [], None
    tab.send("about kiwis")

    def titles(query):
        return [c[0].split(" · ")[0] for c in conv.search(query, None, tab.browser_id, request=tab.request)["choices"]]

    assert titles("") == ["about kiwis", "about llamas"]  # newest first
    assert titles("LLAMA") == ["about llamas"]
    reply_word = tab.messages[1]["content"].split()[0]
    assert "about kiwis" in titles(reply_word)  # message text is searched too
    conv.rename(llamas, "  Camelids   of Peru ", "", tab.browser_id, request=tab.request)
    assert titles("peru") == ["Camelids of Peru"]
    with pytest.raises(gr.Error, match="cannot be empty"):
        conv.rename(llamas, "   ", "", tab.browser_id, request=tab.request)

    out = conv.delete(llamas, "", tab.browser_id, request=tab.request)
    assert out[4] is None and out[-2] == llamas and out[-1]["visible"] is True
    assert titles("") == ["about kiwis"]
    listing, deleted, undo = conv.undo_delete(llamas, "", tab.browser_id, request=tab.request)
    assert deleted is None and undo["visible"] is False
    assert titles("") == ["about kiwis", "Camelids of Peru"]


def test_a_page_without_browser_id_or_login_is_told_to_reload(conv):
    with pytest.raises(gr.Error, match="reload the page"):
        conv.search("", None, None, request=SimpleNamespace(session_hash="x", username=None))
    assert new_browser_id("not-an-id") != "not-an-id"
    kept = new_browser_id()
    assert new_browser_id(kept) == kept


def test_data_dir_and_db_name_the_database_and_a_bad_one_stops_launch_before_the_model_loads(tmp_path):
    from glmapp.ui import ConfigError, launch, load_config

    store = load_config(["--data-dir", str(tmp_path / "d")], environ={}).open_store()
    store.close()
    assert (tmp_path / "d" / "glmapp.sqlite3").exists()
    url = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    store = load_config([], environ={"GLMAPP_DB": url, "GLMAPP_DATA_DIR": str(tmp_path / "unused")}).open_store()
    store.close()
    assert (tmp_path / "other.sqlite3").exists() and not (tmp_path / "unused").exists()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="Cannot use --data-dir"):
        load_config(["--data-dir", str(tmp_path / "a-file")], environ={}).open_store()
    with pytest.raises(ConfigError, match="--db .*nosuch://x"):
        launch(load_config(["--db", "nosuch://x", "--model", str(tmp_path / "no-model")], environ={}), block=False)


def test_names_in_the_info_and_versions_lines_cannot_make_links_or_tags():
    from glmapp.ui.conversations import describe, versions_bar

    evil = "[y](javascript:alert(1)) <img src=x onerror=alert(1)>"
    view = SimpleNamespace(model={"name": "m"}, adapter=evil, settings={"temperature": 0.5})
    message = SimpleNamespace(id=1, role="assistant", version=1, versions=1, meta={"adapter": evil, "tokens": 1})
    for text in (describe(view), versions_bar(SimpleNamespace(messages=[message]))[0]):
        assert "](javascript:" not in text and "<img" not in text


@pytest.mark.parametrize("name", ["accept", "reply", "regenerate", "edit", "page_load", "search", "open", "rename",
                                  "delete", "undo_delete", "older", "newer", "new_chat", "export_one",
                                  "export_every", "import_file"])
def test_gradio_gives_every_page_handler_the_request(conv, name):
    """Gradio passes gr.Request (the login, the tab's session) only to a named parameter: without it every tab
    would share one session (Stop, the busy check) and a logged-in user would have no owner."""
    import inspect

    from gradio.helpers import special_args

    handler = getattr(conv, name)
    request = gr.Request(username="alice", session_hash="tab-1")
    inputs = [None] * sum(p.kind is p.POSITIONAL_OR_KEYWORD and p.annotation not in ("gr.Request", "gr.EditData")
                          for p in inspect.signature(handler).parameters.values())
    args, *_ = special_args(handler, inputs, request=request)
    assert request in args


def test_a_message_sent_before_the_page_has_its_id_is_answered_unsaved_with_a_notice(conv, store):
    tab = Tab(conv)
    tab.browser_id = None  # the page's load event has not answered yet
    with pytest.warns(UserWarning, match="not saved"):
        _, messages, _, conversation, _ = conv.accept("early", [], *tab.values(), request=tab.request)
    assert conversation is None and messages[-1]["content"] == "early"
    *_, last = conv.reply(messages, *tab.values(), request=tab.request)
    assert last[1][-1]["role"] == "assistant" and last[1][-1]["content"]
    tab.browser_id = new_browser_id()
    assert conv.search("", None, tab.browser_id, request=tab.request)["choices"] == []


def test_the_chat_box_opens_only_once_the_page_load_gave_the_browser_its_id(backend, store, monkeypatch):
    """The box starts disabled and the load event that sets the owner id is the one that enables it: a message
    typed into a page still loading (a busy server) could otherwise be sent with no owner and go unsaved."""
    from glmapp.ui.layout import build_ui

    demo = build_ui(backend, store=store)
    config = demo.get_config_file()
    box = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "chat-input")
    assert box["props"]["interactive"] is False
    owners = [d for d in config["dependencies"] if d["targets"] and d["targets"][0][1] == "load"
              and box["id"] in d["outputs"]]
    assert len(owners) == 1
    conv = ConversationHandlers(store, ChatHandlers(backend), backend)
    request = SimpleNamespace(session_hash="tab", username=None)
    browser_id, listing, ready, _timer = conv.page_load(None, request=request)
    assert new_browser_id(browser_id) == browser_id and listing["choices"] == [] and ready["interactive"] is True

    def broken(*_, **__):
        from glmapp.store import StoreError
        raise StoreError("the database is unreachable")

    monkeypatch.setattr(store.conversations, "list", broken)  # a listing failure must not keep the chat closed
    with pytest.warns(UserWarning, match="could not be listed: the database is unreachable"):
        _, listing, ready, _timer = conv.page_load(browser_id, request=request)
    assert ready["interactive"] is True and listing is not None


def test_export_one_or_all_and_import_them_as_another_owners_new_conversations(conv, store, tmp_path):
    import json

    from glmapp.ui.export import conversation_record

    alice, bob = Tab(conv), Tab(conv)
    alice.send("first chat")
    first = alice.conversation
    alice.messages, alice.conversation = [], None
    alice.send("second chat")
    one = json.loads(open(conv.export_one(first, alice.browser_id, request=alice.request)["value"]).read())
    assert one["format"] == "glmapp.conversation/1" and one["title"] == "first chat"
    assert [m["content"] for m in one["messages"]] == [m.content for m in store.conversations.get(
        alice.owner(), first).messages]
    everything = conv.export_every(alice.browser_id, request=alice.request)["value"]
    assert [c["title"] for c in json.loads(open(everything).read())["conversations"]] == ["second chat", "first chat"]

    listing = conv.import_file(everything, "", bob.browser_id, request=bob.request)
    assert [c[0].split(" · ")[0] for c in listing["choices"]] == ["second chat", "first chat"]
    copied = store.conversations.get(bob.owner(), listing["choices"][1][1])
    assert [m["content"] for m in one["messages"]] == [m.content for m in copied.messages]
    assert copied.settings["max_new_tokens"] == 6
    # What the Chat tab's Export JSON button writes imports too, with its adapter.
    chat_tab = tmp_path / "chat-tab.json"
    chat_tab.write_text(json.dumps(conversation_record([{"role": "user", "content": "hi"}], "be brief", {},
                                                      {"temperature": 0.5, "seed": None, "adapter": "style"})))
    listing = conv.import_file(str(chat_tab), "", bob.browser_id, request=bob.request)
    view = store.conversations.get(bob.owner(), listing["choices"][0][1])
    assert (view.system_prompt, view.adapter, view.settings) == ("be brief", "style", {"temperature": 0.5,
                                                                                     "seed": None})
    assert len(store.conversations.list(alice.owner())) == 2  # alice's own are untouched
    with pytest.raises(gr.Error, match="Open a conversation first"):
        conv.export_one(None, bob.browser_id, request=bob.request)
    with pytest.raises(gr.Error, match="no conversation to export"):
        conv.export_every(Tab(conv).browser_id, request=bob.request)


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", r"bad\.json is not UTF-8 text \(byte 0\)"),
    (b'{"format": "glmapp.conversation/1",\n "messages": [}', r"bad\.json is not valid JSON: .* line 2, column 15"),
    (b'{"format": "something else"}', r"Conversation 1: expected an object with \"format\""),
    (b'[{"format": "glmapp.conversation/1", "messages": [{"role": "user", "content": "ok"}]},'
     b' {"format": "glmapp.conversation/1", "messages": [{"role": "robot", "content": "x"}]}]',
     r"Conversation 2, message 1: role 'robot'"),
    (b'{"format": "glmapp.conversation/1", "messages": [], "settings": {"temperature": "hot"}}',
     r"settings\.temperature must be a number or null \(got 'hot'\)"),
])
def test_a_bad_import_file_is_named_with_what_is_wrong_and_nothing_is_written(conv, store, tmp_path, content,
                                                                               message):
    tab = Tab(conv)
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    with pytest.raises(gr.Error, match=message) as raised:
        conv.import_file(str(bad), "", tab.browser_id, request=tab.request)
    assert str(tmp_path) not in raised.value.message  # the server's folders stay private
    assert store.conversations.list(tab.owner()) == []


def test_each_reply_gets_its_own_line_and_a_streaming_one_none_yet():
    from glmapp.ui.conversations import reply_lines

    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "meta": {"adapter": "style", "tokens": 3,
                                                                 "tokens_per_second": 12.345}},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert reply_lines(messages) == ["style · 3 tokens · 12.3 tokens/s", ""]
    assert reply_lines(None) == []
