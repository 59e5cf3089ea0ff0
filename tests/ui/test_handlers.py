"""UI handlers as plain functions on the real LocalBackend with the demo checkpoint (no browser)."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import gradio as gr
import pytest

from glmapp.backends import LocalBackend
from glmapp.ui.chat_handlers import BUSY, ChatHandlers, to_family_history
from glmapp.ui.compare_handlers import CompareHandlers
from glmapp.ui.config import AppConfig, ConfigError, load_config
from glmapp.ui.export import conversation_record, render_html_page
from glmapp.ui.render import safe_markdown

GREEDY = dict(system="", max_length=8192, max_new_tokens=12, temperature=0, top_p=0.8, top_k=0,
              repetition_penalty=1.0, seed=None)
EVIL = "<script>alert(1)</script> <img src=x onerror=alert(1)> [x](javascript:alert(1))"


@pytest.fixture(scope="module")
def manager(demo_v2):
    m = LocalBackend.load(str(demo_v2), max_input_tokens=64)
    yield m
    m.close()


@pytest.fixture()
def chat(manager):
    return ChatHandlers(manager)


def run(gen):
    *_, last = gen
    return last


def test_send_streams_and_returns_history_textbox_and_stats(chat):
    updates = list(chat.send("hello", [], **GREEDY))
    chatbot, messages, textbox, stats = updates[-1]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"]
    assert chatbot[1]["content"] == safe_markdown(messages[1]["content"])
    assert "tokens/s" in stats and "(12 new)" in stats and "req-" in stats
    # The box is cleared once, when the message is accepted; the reply never writes it (what the user types
    # meanwhile stays).
    assert updates[0][2] == "" and updates[0][1] == [{"role": "user", "content": "hello"}]
    assert len(updates) > 2 and all(u[2] == gr.skip() for u in updates[1:])


def test_a_message_sent_while_the_reply_streams_is_refused_with_a_notice(chat):
    tab = SimpleNamespace(session_hash="busy-tab")
    long = {**GREEDY, "max_new_tokens": 2000}
    gen = chat.send("story", [], **long, request=tab)
    next(gen), next(gen)  # accepted, and the reply streams
    with pytest.warns(UserWarning, match="still being written"), pytest.raises(gr.Error) as refused:
        chat.accept("next question", [], **long, request=tab)
    assert refused.value.message == BUSY and not refused.value.visible  # the notice is the warning above
    _, other, _ = chat.accept("other tab", [], **GREEDY, request=SimpleNamespace(session_hash="other"))
    assert other[-1]["content"] == "other tab"  # only that tab waits
    with pytest.warns(UserWarning, match="still being written"):
        assert run(chat.regenerate([{"role": "user", "content": "x"}], **long, request=tab))[3] == gr.skip()
    chat.stop(tab)
    for *_, stats in gen:
        if not stats.startswith("generating"):
            break  # the page now shows the reply ended (the generator has not returned yet)
    assert "stopped" in stats
    _, messages, textbox = chat.accept("next question", [], **GREEDY, request=tab)  # so it is accepted
    assert messages[-1]["content"] == "next question" and textbox == ""


def test_greedy_regenerate_gives_the_same_reply_and_max_new_tokens_caps(chat):
    _, messages, _, _ = run(chat.send("hello", [], **GREEDY))
    _, again, _, _ = run(chat.regenerate(messages, **GREEDY))
    assert [m["content"] for m in again] == [m["content"] for m in messages]  # meta holds this run's tokens/s
    _, short, _, stats = run(chat.regenerate(messages, **{**GREEDY, "max_new_tokens": 3}))
    assert "(3 new)" in stats and len(short[1]["content"]) <= len(messages[1]["content"])


def test_undo_removes_the_last_round_and_returns_its_text(chat):
    _, messages, _, _ = run(chat.send("one", [], **GREEDY))
    _, messages, _, _ = run(chat.send("two", messages, **GREEDY))
    chatbot, kept, text = chat.undo(messages)
    assert text == "two" and [m["content"] for m in kept if m["role"] == "user"] == ["one"] and len(chatbot) == 2
    assert chat.clear() == ([], [], "", "")


def test_editing_a_past_message_continues_from_there(chat):
    _, messages, _, _ = run(chat.send("one", [], **GREEDY))
    _, messages, _, _ = run(chat.send("two", messages, **GREEDY))
    edit = SimpleNamespace(index=0, value="uno &lt;b>")
    _, edited, _, _ = run(chat.edit(messages, **GREEDY, edit=edit))
    assert [m["content"] for m in edited if m["role"] == "user"] == ["uno <b>"]


def test_stop_cancels_only_that_session(chat):
    session_a, session_b = SimpleNamespace(session_hash="a"), SimpleNamespace(session_hash="b")
    long = {**GREEDY, "max_new_tokens": 2000}
    gen_a, gen_b = chat.send("story", [], **long, request=session_a), chat.send("story", [], **long, request=session_b)
    next(gen_a), next(gen_b), next(gen_a), next(gen_b)  # accepted, then streaming
    chat.stop(session_a)
    *_, stats_a = run(gen_a)
    *_, stats_b = run(gen_b)
    assert "stopped" in stats_a and "(2000 new)" in stats_b


def test_closing_the_stream_cancels_the_generation(chat):
    gen = chat.send("story", [], **{**GREEDY, "max_new_tokens": 2000}, request=SimpleNamespace(session_hash="tab"))
    next(gen), next(gen)  # accepted, then streaming
    assert chat.active.running("tab") == 1
    gen.close()  # what Gradio does when the tab goes away
    assert chat.active.running("tab") == 0


@pytest.mark.parametrize("text", ["", "   ", "\x00\x01\x7f\u200b"])
def test_empty_or_control_only_message_is_refused(chat, text):
    with pytest.raises(gr.Error, match="Empty message"):
        run(chat.send(text, [], **GREEDY))


def test_control_characters_are_removed_from_pasted_text(chat):
    _, messages, _, _ = run(chat.send("he\x00l\x1blo\ufeff", [], **GREEDY))
    assert messages[0]["content"] == "hello"


def test_too_long_message_names_the_limit(chat):
    with pytest.raises(gr.Error, match="limit of 64 tokens"):
        run(chat.send("word " * 200, [], **GREEDY))


def test_engine_error_in_one_request_is_reported_and_the_next_works(chat, monkeypatch):
    engine = chat.backend.engine
    norm = chat.backend.model.transformer.encoder.final_layernorm
    errors = engine.error_count

    def fail(*args, **kwargs):  # runs in the engine thread, inside the real step
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(norm, "forward", fail)
    with pytest.warns(UserWarning, match="Generation failed: RuntimeError: CUDA error"):
        _, messages, textbox, stats = run(chat.send("hello", [], **GREEDY))
    assert messages == [] and textbox == "hello" and "failed" in stats  # the message goes back to the box
    assert engine.error_count == errors + 1
    monkeypatch.undo()
    _, messages, _, stats = run(chat.send("hello", [], **GREEDY))
    assert len(messages) == 2 and "(12 new)" in stats


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value, message", [
    ("top_k", NAN, "Top k must be a whole number from 0 to 200"),
    ("top_k", 2.5, "Top k must be a whole number from 0 to 200"),
    ("max_new_tokens", INF, "Max new tokens must be a whole number from 1 to 32768"),
    ("max_length", NAN, "Max length must be a whole number from 16 to 32768"),
    ("max_length", 99999, "Max length must be a whole number from 16 to 32768"),
    ("temperature", "hot", "Temperature must be a number from 0 to 1.5"),
    ("top_p", 0, "Top p must be a number from 0.01 to 1"),
    ("repetition_penalty", None, "Repetition penalty must be a number from 0.5 to 2"),
    ("seed", "abc", "Seed must be a whole number from -1 to 9223372036854775807"),
    ("seed", NAN, "Seed must be a whole number from -1"),
    ("seed", True, "Seed must be a whole number from -1"),
])
def test_every_bad_setting_gets_a_message_naming_the_field_and_its_range(chat, field, value, message):
    with pytest.raises(gr.Error) as bad:
        run(chat.send("hello", [], **{**GREEDY, field: value}))
    assert bad.value.message.startswith(message) and bad.value.visible
    with pytest.raises(gr.Error) as api:  # the HTTP API's handler gets the raw value the same way
        run(chat.api_chat("hello", **{**GREEDY, field: value}))
    assert api.value.message == bad.value.message


def test_settings_given_as_numeric_text_are_accepted(chat):
    _, messages, _, stats = run(chat.send("hello", [], **{**GREEDY, "top_k": "5", "seed": "7",
                                                          "max_new_tokens": "3"}))
    assert len(messages) == 2 and "(3 new)" in stats


def test_max_new_tokens_above_the_servers_cap_is_refused(manager):
    capped = ChatHandlers(manager, max_new_tokens=100)
    with pytest.raises(gr.Error, match="Max new tokens must be a whole number from 1 to 100 \\(got 101\\)"):
        run(capped.send("hello", [], **{**GREEDY, "max_new_tokens": 101}))


def test_family_history_formats():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "x"}]
    assert to_family_history("chatglm2", messages) == [("q", "a")]
    assert to_family_history("chatglm3", messages)[1] == {"role": "assistant", "metadata": "", "content": "a"}


def test_system_prompt_is_used_for_chatglm3(demo_v3):
    manager = LocalBackend.load(str(demo_v3))
    try:
        _, messages, _, _ = run(ChatHandlers(manager).send("hi", [], **{**GREEDY, "system": "Be brief."}))
        assert len(messages) == 2
    finally:
        manager.close()


def test_rendering_makes_markup_and_script_links_inert():
    out = safe_markdown(EVIL + "\n```html\n<b>code</b>\n```\n$a<b$")
    assert "<script" not in out and "<img" not in out and "](javascript:" not in out
    assert "```html\n<b>code</b>\n```" in out  # code blocks are escaped by the Markdown renderer itself
    assert safe_markdown("bell\x07") == "bell"


def test_exported_html_is_standalone_inert_and_renders_formulas():
    record = conversation_record([{"role": "user", "content": EVIL},
                                  {"role": "assistant", "content": "$$\\frac{1}{2}$$"}], model={"name": "demo"})
    page = render_html_page(record)
    assert "<script" not in page and "<img" not in page and 'href="javascript' not in page
    assert "<math" in page and "Content-Security-Policy" in page and "<link" not in page


COLUMNS = [None, 0, 0.8, 1, "none", 0.95, 0.8, 7, None, 0.8, 0.8, 1, None, 0.8, 0.8, 1]  # adapter, t, top_p, seed


def test_compare_columns_are_decoded_together_in_the_same_engine_steps(manager, tmp_path):
    """The engine is held between steps until both columns are submitted: if the handler ran the columns one
    after another, the second would never arrive; if the engine ran them one after another, the steps would add up."""
    engine, tab = manager.engine, SimpleNamespace(session_hash="compare-tab")
    compare = CompareHandlers(manager, tmp_path / "votes.jsonl")
    release, held = threading.Event(), threading.Event()
    holder = threading.Thread(target=engine.call, args=(lambda: (held.set(), release.wait(60)),))
    holder.start()
    assert held.wait(30)
    steps = engine.stats()["steps"]
    results = []
    runner = threading.Thread(target=lambda: results.append(list(compare.run("hello", 2, 24, *COLUMNS,
                                                                             request=tab))))
    runner.start()
    deadline = time.monotonic() + 30
    while compare.active.running("compare-tab") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # polling a condition the handler sets from its column threads
    both_submitted = compare.active.running("compare-tab") == 2
    release.set()
    runner.join(60)
    holder.join(10)
    assert both_submitted and results
    record = results[0][-1][-1]
    tokens = [c["completion_tokens"] for c in record["columns"]]
    assert min(tokens) > 8  # long enough that one-after-another would need many more steps
    assert engine.stats()["steps"] - steps <= max(tokens) + 1 < sum(tokens)


def test_compare_votes_append_jsonl_and_export(manager, tmp_path):
    compare = CompareHandlers(manager, tmp_path / "votes.jsonl")
    updates = list(compare.run("hello", 2, 10, *COLUMNS))
    *outputs, record = updates[-1]
    assert record and [c["label"] for c in record["columns"]] == ["A", "B"]
    assert all(c["output"] and c["completion_tokens"] == 10 for c in record["columns"])
    assert "tokens/s" in outputs[4] and "tokens/s" in outputs[5] and outputs[2] == outputs[3] == ""
    saved = compare.vote("B", "b wins", record)
    assert saved.startswith("Saved") and "votes.jsonl" in saved and str(tmp_path) not in saved  # no server path
    assert "Saved" in compare.vote("tie", "", record)
    lines = [json.loads(x) for x in (tmp_path / "votes.jsonl").read_text().splitlines()]
    assert [x["vote"] for x in lines] == ["B", "tie"] and lines[0]["note"] == "b wins"
    with pytest.raises(gr.Error):
        compare.vote("C", "", record)
    assert json.loads(open(compare.export(record)).read())["prompt"] == "hello"


@pytest.mark.parametrize("args, message", [
    (("hello", NAN, 10, *COLUMNS), "Columns must be a whole number from 2 to 4"),
    (("hello", 2, "ten", *COLUMNS), "Max new tokens must be a whole number from 1 to 32768"),
    (("hello", 2, 10, *COLUMNS[:5], "hot", *COLUMNS[6:]), "Column B: Temperature must be a number from 0 to 1.5"),
    (("hello", 2, 10, *COLUMNS[:3], INF, *COLUMNS[4:]), "Column A: Seed must be a whole number from -1"),
])
def test_compare_names_a_bad_setting_and_its_range(manager, tmp_path, args, message):
    with pytest.raises(gr.Error) as bad:
        run(CompareHandlers(manager, tmp_path / "votes.jsonl").run(*args))
    assert bad.value.message.startswith(message)


def test_a_column_error_quoting_an_adapter_name_shows_it_as_text(manager, tmp_path):
    columns = ["<img src=x onerror=alert(1)>", *COLUMNS[1:]]
    with pytest.raises(gr.Error) as bad:
        run(CompareHandlers(manager, tmp_path / "votes.jsonl").run("hello", 2, 10, *columns))
    assert bad.value.message.startswith("Column A:") and "&lt;img src=x" in bad.value.message
    assert "<img" not in bad.value.message


def test_reload_failure_loads_the_previous_model_again(manager, monkeypatch):
    from glmapp.ui.model_handlers import reload_model

    real = __import__("glmapp").load
    monkeypatch.setattr("glmapp.load", lambda *a, **k: (_ for _ in ()).throw(MemoryError("no room"))
                        if k.get("dtype") == "float16" else real(*a, **k))
    with pytest.raises(gr.Error, match="no room.*previous model was loaded again \\(float32\\)"):
        reload_model(manager, "float16")
    assert manager.info().dtype == "float32" and manager.dtype_choice == "auto"
    assert len(run(ChatHandlers(manager).send("hello", [], **GREEDY))[1]) == 2


def test_config_from_flags_env_and_auth_file(tmp_path):
    auth_file = tmp_path / "users"
    auth_file.write_text("# team\nbob:pw2\n")
    cfg = load_config(["--auth", "al:pw", "--auth-file", str(auth_file), "--port", "9000"],
                      {"GLMAPP_PORT": "1234", "GLMAPP_MAX_CONCURRENCY": "8", "GLMAPP_SHARE": "true"})
    assert cfg.port == 9000 and cfg.max_concurrency == 8 and cfg.share and cfg.host == "127.0.0.1"
    assert cfg.credentials() == [("al", "pw"), ("bob", "pw2")] and cfg.adapters_dir == "adapters"
    assert load_config(["--adapters-dir", "x"], {"GLMAPP_ADAPTERS_DIR": "y"}).adapters_dir == "x"
    assert load_config([], {"GLMAPP_ADAPTERS_DIR": "y"}).adapters_dir == "y"
    assert load_config([], {"GRADIO_SERVER_NAME": "0.0.0.0"}).host == "0.0.0.0"
    with pytest.raises(ConfigError, match="USER:PASS"):
        AppConfig(auth=["nopassword"]).credentials()
    with pytest.raises(ConfigError):
        load_config(["--dtype", "int3"], {})


def test_engine_settings_reach_the_engine_and_survive_a_reload():
    from glmapp.engine.kv_cache import PagedKVCache

    cfg = load_config(["--kv-cache-mb", "64"], {"GLMAPP_COMPILE": "1"})
    assert cfg.engine_config().kv_cache_mb == 64 and cfg.engine_config().compile
    assert load_config([], {}).engine_config().kv_cache_mb is None
    with pytest.raises(ConfigError, match="--kv-cache-mb must be at least 1"):
        load_config(["--kv-cache-mb", "0"], {})
    assert load_config([], {"GLMAPP_OUTPUT_QUANT": "int4"}).engine_config().output_quant == "int4"
    with pytest.raises(ConfigError, match=r"--output-quant must be one of none, int8, int4 \(got 'q4'\)"):
        load_config(["--output-quant", "q4"], {})
    manager = LocalBackend.load(demo=True, engine_config=load_config(["--kv-cache-mb", "3"], {}).engine_config())
    try:
        model = manager.model
        per_block = PagedKVCache.bytes_per_block(model.config, 16, model.dtype)
        expected = (3 * 2**20 // per_block) * 16  # 3 MB of KV, not the 512 MB default
        assert manager.engine.capacity_tokens == expected
        manager.reload("float32")
        assert manager.engine.capacity_tokens == expected
    finally:
        manager.close()
