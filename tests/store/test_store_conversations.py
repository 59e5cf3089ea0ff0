"""Conversations in the store, on SQLite and on a real PostgreSQL server (the `store` fixture runs both)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from glmapp.store import ImportFormatError, NotFound, StoreError, open_store
from glmapp.store.schema import utcnow
from glmapp.ui.export import conversation_record


def _chat(cs, owner="alice", turns=(("Hello there", "Hi!"), ("What is LoRA?", "Low-rank adapters.")), **kw):
    cid = cs.create(owner, **kw)
    for question, answer in turns:
        cs.append(owner, cid, "user", question)
        cs.append(owner, cid, "assistant", answer, meta={"adapter": "a1", "completion_tokens": 3})
    return cid


def _texts(view):
    return [(m.role, m.content) for m in view.messages]


def test_conversation_survives_reopening_with_messages_settings_and_meta(db_url):
    s = open_store(db_url)
    cid = _chat(s.conversations, system_prompt="Be brief.", model={"name": "demo"}, adapter="a1",
                settings={"temperature": 0.8, "top_p": 0.7})
    s.close()
    again = open_store(db_url)
    view = again.conversations.get("alice", cid)
    assert _texts(view) == [("user", "Hello there"), ("assistant", "Hi!"), ("user", "What is LoRA?"),
                            ("assistant", "Low-rank adapters.")]
    assert (view.system_prompt, view.model, view.adapter, view.settings) == (
        "Be brief.", {"name": "demo"}, "a1", {"temperature": 0.8, "top_p": 0.7})
    assert view.messages[1].meta == {"adapter": "a1", "completion_tokens": 3}
    assert view.title == "Hello there"
    again.close()


def test_list_is_newest_first_and_title_comes_from_first_user_message(store):
    cs = store.conversations
    first = _chat(cs, turns=(("  \nA long first line " + "x" * 100 + "\nsecond", "ok"),))
    second = _chat(cs, turns=(("Later one", "ok"),))
    assert [c.id for c in cs.list("alice")] == [second, first]
    title = cs.get("alice", first).title
    assert title.startswith("A long first line") and title.endswith("…") and len(title) == 60
    cs.append("alice", first, "user", "more")  # a new message moves it to the top
    assert [c.id for c in cs.list("alice")] == [first, second]


def test_rename_and_bad_titles(store):
    cs = store.conversations
    cid = _chat(cs)
    cs.rename("alice", cid, "  My   notes ")
    assert cs.get("alice", cid).title == "My notes"
    cs.append("alice", cid, "user", "does not rename it")
    assert cs.get("alice", cid).title == "My notes"
    with pytest.raises(StoreError, match="cannot be empty"):
        cs.rename("alice", cid, "   ")
    with pytest.raises(StoreError, match="at most 200"):
        cs.rename("alice", cid, "t" * 201)


def test_search_matches_titles_and_any_message_case_insensitively(store):
    cs = store.conversations
    lora = _chat(cs, turns=(("Tell me about adapters", "LoRA is Low-Rank Adaptation"),))
    pizza = _chat(cs, turns=(("Pizza recipe", "Flour, water, 100% love"),))
    cs.rename("alice", pizza, "Dinner")
    assert [c.id for c in cs.list("alice", "low-rank")] == [lora]
    assert [c.id for c in cs.list("alice", "DINNER")] == [pizza]
    assert [c.id for c in cs.list("alice", "100%")] == [pizza]
    assert [c.id for c in cs.list("alice", "0% l")] == [pizza]
    assert cs.list("alice", "_") == [] and cs.list("alice", "r%e") == []  # LIKE wildcards are matched literally
    old = cs.get("alice", lora).messages[1]
    cs.edit("alice", old.id, "replaced")
    assert [c.id for c in cs.list("alice", "low-rank")] == [lora]  # old versions are searched too


def test_edit_keeps_old_version_and_conversation_continues_from_the_shown_one(store):
    cs = store.conversations
    cid = _chat(cs)
    second_question = cs.get("alice", cid).messages[2]
    edited = cs.edit("alice", second_question.id, "What is QLoRA?")
    assert (edited.version, edited.versions) == (2, 2)
    assert _texts(cs.get("alice", cid))[2:] == [("user", "What is QLoRA?")]
    cs.append("alice", cid, "assistant", "Quantized LoRA.")
    assert _texts(cs.get("alice", cid))[2:] == [("user", "What is QLoRA?"), ("assistant", "Quantized LoRA.")]
    back = cs.switch("alice", second_question.id)  # ‹ 1/2: the old branch with its old reply
    assert _texts(back)[2:] == [("user", "What is LoRA?"), ("assistant", "Low-rank adapters.")]
    assert (back.messages[2].version, back.messages[2].versions) == (1, 2)
    assert cs.get("alice", cid).messages[2].sibling_ids == [second_question.id, edited.id]
    forward = cs.switch("alice", edited.id)
    assert _texts(forward)[-1] == ("assistant", "Quantized LoRA.")


def test_regenerate_is_a_sibling_reply_and_the_first_message_can_be_edited(store):
    cs = store.conversations
    cid = _chat(cs, turns=(("Q", "A1"),))
    question, answer = cs.get("alice", cid).messages
    regenerated = cs.append("alice", cid, "assistant", "A2", parent_id=question.id)
    assert (regenerated.version, regenerated.versions) == (2, 2)
    assert [m.content for m in cs.switch("alice", answer.id).messages] == ["Q", "A1"]
    new_first = cs.edit("alice", question.id, "Q'")
    assert new_first.parent_id is None and [m.content for m in cs.get("alice", cid).messages] == ["Q'"]


def test_delete_hides_and_undo_restores(store):
    cs = store.conversations
    cid = _chat(cs)
    cs.delete("alice", cid)
    assert cs.list("alice") == [] and cs.list("alice", "LoRA") == []
    assert [c.id for c in cs.list("alice", deleted=True)] == [cid]
    with pytest.raises(NotFound):
        cs.get("alice", cid)
    with pytest.raises(NotFound):
        cs.append("alice", cid, "user", "to a deleted one")
    cs.restore("alice", cid)
    assert len(cs.get("alice", cid).messages) == 4


def test_purge_erases_only_old_deleted_conversations(store):
    cs = store.conversations
    kept, gone, alive = _chat(cs), _chat(cs), _chat(cs)
    cs.edit("alice", cs.get("alice", gone).messages[1].id, "a branch in the purged one")
    cs.delete("alice", gone)
    assert cs.purge_deleted("alice", before=utcnow() - timedelta(days=1)) == 0
    cs.delete("alice", kept)
    assert cs.purge_deleted("bob", before=utcnow() + timedelta(seconds=1)) == 0
    assert cs.purge_deleted("alice", before=utcnow() + timedelta(seconds=1)) == 2
    with pytest.raises(NotFound):
        cs.restore("alice", gone)
    assert [c.id for c in cs.list("alice")] == [alive]


def test_owner_is_enforced_for_every_read_and_write(store):
    cs = store.conversations
    cid = _chat(cs, owner="alice")
    message = cs.get("alice", cid).messages[0]
    mine = _chat(cs, owner="bob", turns=(("Hello there", "bob's"),))
    assert [c.id for c in cs.list("bob")] == [mine] and [c.id for c in cs.list("bob", "LoRA")] == []
    attempts = [
        lambda: cs.get("bob", cid), lambda: cs.append("bob", cid, "user", "x"),
        lambda: cs.edit("bob", message.id, "x"), lambda: cs.switch("bob", message.id),
        lambda: cs.rename("bob", cid, "mine now"), lambda: cs.update("bob", cid, system_prompt="x"),
        lambda: cs.delete("bob", cid), lambda: cs.restore("bob", cid), lambda: cs.export("bob", cid),
        lambda: cs.append("bob", mine, "user", "x", parent_id=message.id),  # parent in alice's conversation
    ]
    for attempt in attempts:
        with pytest.raises(NotFound, match="not yours"):
            attempt()
    assert cs.purge_deleted("bob", before=utcnow() + timedelta(days=1)) == 0
    view = cs.get("alice", cid)
    assert view.title == "Hello there" and len(view.messages) == 4 and not view.deleted
    assert len(cs.get("bob", mine).messages) == 2


def test_a_failed_write_changes_nothing(store):
    cs = store.conversations
    a, b = _chat(cs), _chat(cs)
    foreign = cs.get("alice", b).messages[0].id
    before = cs.get("alice", a)
    with pytest.raises(NotFound):
        cs.append("alice", a, "user", "wrong parent", parent_id=foreign)
    with pytest.raises(StoreError, match="Unknown role"):
        cs.append("alice", a, "tool", "x")
    after = cs.get("alice", a)
    assert _texts(after) == _texts(before) and after.updated_at == before.updated_at


def test_update_records_settings_model_and_system_prompt(store):
    cs = store.conversations
    cid = _chat(cs)
    cs.update("alice", cid, system_prompt="New", adapter="a2", settings={"seed": 7}, model={"name": "m"})
    view = cs.get("alice", cid)
    assert (view.system_prompt, view.adapter, view.settings, view.model) == ("New", "a2", {"seed": 7}, {"name": "m"})


def test_export_is_the_apps_export_format_and_imports_back(store):
    cs = store.conversations
    cid = _chat(cs, system_prompt="Be brief.", model={"name": "demo"}, adapter="a1", settings={"temperature": 0.8})
    exported = cs.export("alice", cid)
    view = cs.get("alice", cid)
    apps = conversation_record([{"role": m.role, "content": m.content} for m in view.messages], "Be brief.",
                               {"name": "demo"}, {"temperature": 0.8, "adapter": "a1"})
    assert {k: v for k, v in exported.items() if k in apps and k != "exported_at"} == \
           {k: v for k, v in apps.items() if k != "exported_at"}
    [copy] = cs.import_records("bob", json.loads(json.dumps(exported)))
    imported = cs.get("bob", copy)
    assert (_texts(imported), imported.system_prompt, imported.adapter, imported.settings, imported.title) == (
        _texts(view), "Be brief.", "a1", {"temperature": 0.8}, view.title)
    [from_app] = cs.import_records("carol", apps)  # what today's export button writes
    assert _texts(cs.get("carol", from_app)) == _texts(view) and cs.get("carol", from_app).title == "Hello there"


def test_export_all_and_import_all(store):
    cs = store.conversations
    ids = [_chat(cs), _chat(cs, turns=(("Second", "two"),))]
    everything = cs.export_all("alice")
    assert everything["format"] == "glmapp.conversations/1" and len(everything["conversations"]) == 2
    copies = cs.import_records("dave", everything)
    assert sorted(c.title for c in cs.list("dave")) == sorted(cs.get("alice", i).title for i in ids)
    assert len(copies) == 2


@pytest.mark.parametrize("data, message", [
    ({"format": "other"}, 'Conversation 2: expected an object with "format"'),
    ([], "Expected a glmapp.conversation/1 export"),
    ({"format": "glmapp.conversation/1", "messages": "hi"}, '"messages" must be a list'),
    ({"format": "glmapp.conversation/1", "messages": [{"role": "user", "content": 3}]}, "message 1: expected"),
    ({"format": "glmapp.conversation/1", "messages": [{"role": "user", "content": "a"},
                                                      {"role": "system", "content": "b"}]}, "message 2: role 'system'"),
    ({"format": "glmapp.conversation/1", "messages": [], "title": "t" * 300}, "at most 200"),
])
def test_import_rejects_bad_files_by_name_and_stores_nothing(store, data, message):
    good = {"format": "glmapp.conversation/1", "messages": [{"role": "user", "content": "fine"}]}
    with pytest.raises(ImportFormatError, match=message):
        store.conversations.import_records("erin", [good, data] if isinstance(data, dict) else data)
    assert store.conversations.list("erin") == []


def test_owner_must_be_given(store):
    with pytest.raises(StoreError, match="Owner must be"):
        store.conversations.list("")
