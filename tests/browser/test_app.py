"""The web app in a real browser: chat, stop, regenerate, undo, clear, sliders, adapter picker, compare with
adapters + vote, export, reload, two users at once, safe rendering, login. Handler logic is unit-tested in tests/ui; these cover the wiring."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from chat_page import (MAX_NEW_TOKENS, bot_messages, choose, dropdown_value, new_tokens, open_tab, run_compare, send,
                       set_number, user_messages, wait_finished, wait_model_info)

ADAPTER_STATUS = "(document.querySelector('#adapter-status')||{}).textContent||''"


def test_reply_streams_and_stop_ends_it_mid_stream(page, artifacts):
    assert "Demo checkpoint" in page.locator("#demo-banner").inner_text()
    set_number(page, "seed", 1)  # with this seed the demo model writes MAX_NEW_TOKENS tokens without a stop token
    send(page, "Tell me a long story")
    # While generating, the reply grows in place and the stats line says so.
    page.wait_for_function("""() => (document.querySelector('#chat-stats')||{}).innerText?.includes('generating')
        && document.querySelector('#chatbot [data-testid="bot"]')?.innerText.trim().length > 0""")
    assert user_messages(page) == ["Tell me a long story"]
    page.locator("#stop-btn").click()
    stats = wait_finished(page)
    assert "stopped" in stats
    assert 0 < new_tokens(stats) < MAX_NEW_TOKENS
    assert bot_messages(page)[0].strip()
    page.screenshot(path=str(artifacts / "chat-tab.png"))


def test_greedy_is_repeatable_and_max_new_tokens_caps_the_reply(page):
    set_number(page, "temperature", 0)
    set_number(page, "max-new-tokens", 24)
    send(page, "hello")
    first_stats = wait_finished(page)
    first = bot_messages(page)
    assert new_tokens(first_stats) <= 24 and first[0].strip()

    page.locator("#regenerate-btn").click()  # same settings, greedy: the same reply again
    second_stats = wait_finished(page, first_stats)
    assert bot_messages(page) == first and user_messages(page) == ["hello"]

    set_number(page, "max-new-tokens", 4)
    page.locator("#regenerate-btn").click()
    third_stats = wait_finished(page, second_stats)
    assert new_tokens(third_stats) <= 4
    assert len(bot_messages(page)[0]) < len(first[0])


def test_undo_puts_the_message_back_and_clear_empties_the_chat(page):
    set_number(page, "max-new-tokens", 8)
    send(page, "first message")
    stats = wait_finished(page)
    send(page, "second message")
    wait_finished(page, stats)
    assert user_messages(page) == ["first message", "second message"]

    page.locator("#undo-btn").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"user\"]').length === 1")
    # The textbox is another output of the same event: wait for it too rather than read it at once.
    page.wait_for_function("() => document.querySelector('#chat-input textarea')?.value === 'second message'")

    page.locator("#clear-btn").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"user\"]').length === 0")
    assert bot_messages(page) == []


def test_bad_input_gets_a_message_and_the_app_keeps_serving(page):
    send(page, "   \x00\x07  ")
    page.get_by_text("Empty message").first.wait_for()
    send(page, "word " * 400)
    page.get_by_text("limit of 200 tokens").first.wait_for()
    set_number(page, "max-new-tokens", 4)
    send(page, "still there?")
    wait_finished(page)
    assert user_messages(page) == ["still there?"]


def test_markup_in_messages_is_shown_as_text_and_runs_nothing(page, dialogs):
    # The user's message goes through the same renderer as the model's replies (render.chatbot_messages).
    evil = "<script>alert(1)</script> <img src=x onerror=alert(1)> [x](javascript:alert(1))"
    set_number(page, "max-new-tokens", 4)
    send(page, evil)
    wait_finished(page)
    shown = user_messages(page)[0]
    assert "<script>alert(1)</script>" in shown and "<img src=x onerror=alert(1)>" in shown
    found = page.evaluate("""() => document.querySelectorAll(
        '#chatbot script, #chatbot img, #chatbot [onerror], #chatbot a[href*="javascript" i]').length""")
    assert found == 0
    assert dialogs == []


def test_export_downloads_valid_json_and_html(page):
    set_number(page, "max-new-tokens", 8)
    send(page, "Euler: $e^{i\\pi}+1=0$")
    wait_finished(page)
    downloads = {}
    for kind in ("json", "html"):
        page.locator(f"#export-{kind}-btn").click()
        link = page.locator(f"#export-file a[href*='.{kind}']")
        link.wait_for()
        with page.expect_download() as info:
            link.click()
        downloads[kind] = open(info.value.path(), encoding="utf-8").read()
    record = json.loads(downloads["json"])
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert record["messages"][0]["content"] == "Euler: $e^{i\\pi}+1=0$"
    assert downloads["html"].startswith("<!DOCTYPE html>") and "<math" in downloads["html"]
    assert "<script" not in downloads["html"]


def test_two_users_chat_at_once_and_keep_their_own_histories(browser, app_server):
    pages = []
    for _ in range(2):
        context = browser.new_context()
        p = context.new_page()
        p.goto(app_server.url)
        p.locator("#chat-input textarea").wait_for()
        set_number(p, "max-new-tokens", 200)
        pages.append(p)
    send(pages[0], "I am user one")
    send(pages[1], "I am user two")
    for p in pages:
        wait_finished(p)
    assert user_messages(pages[0]) == ["I am user one"]
    assert user_messages(pages[1]) == ["I am user two"]
    for p in pages:
        assert len(bot_messages(p)) == 1
        p.context.close()


def test_picking_an_adapter_changes_the_reply_and_none_restores_it(page, artifacts):
    set_number(page, "temperature", 0)
    set_number(page, "max-new-tokens", 16)
    send(page, "hello")
    base_stats = wait_finished(page)
    base = bot_messages(page)
    assert base_stats.startswith("base model")

    open_tab(page, "Model")
    choose(page, "adapter-choice", "all")
    page.wait_for_function(f"() => ({ADAPTER_STATUS}).includes('Active in this tab: all')")
    choose(page, "adapter-choice", "corrupt")  # its metadata looks fine, its weights are truncated: all stays
    page.get_by_text("Could not load adapter 'corrupt'").first.wait_for()
    page.wait_for_function("() => document.querySelector('#adapter-choice input')?.value === 'all'")
    assert "Active in this tab: all" in page.locator("#adapter-status").inner_text()
    assert "active in this tab" in page.locator("#adapter-table").inner_text()
    page.screenshot(path=str(artifacts / "model-tab.png"))

    open_tab(page, "Chat")
    assert dropdown_value(page, "chat-adapter") == "all"
    page.locator("#regenerate-btn").click()
    tuned_stats = wait_finished(page, base_stats)
    assert tuned_stats.startswith("adapter all") and bot_messages(page) != base

    choose(page, "chat-adapter", "none (base model)")  # the compact picker in the Chat tab
    page.wait_for_function("() => document.querySelector('#chat-stats')?.innerText.includes('base model selected')")
    page.locator("#regenerate-btn").click()
    restored_stats = wait_finished(page, tuned_stats)
    assert restored_stats.startswith("base model") and bot_messages(page) == base


def test_compare_with_two_adapters_streams_both_columns_and_records_a_vote(page, app_server, artifacts):
    page.locator("#tab-compare-button, button[role=tab]:has-text('Compare')").first.click()
    choose(page, "compare-adapter-A", "qkv")
    choose(page, "compare-adapter-B", "all")
    run_compare(page, "Write a poem", 40)
    assert page.locator("#compare-stats-A").inner_text().startswith("adapter qkv")
    assert page.locator("#compare-stats-B").inner_text().startswith("adapter all")
    outputs = [page.locator(f"#compare-out-{label}").inner_text().strip() for label in "AB"]
    assert all(outputs)
    page.locator("#compare-note").locator("textarea, input").first.fill("A reads better")
    page.locator("#vote-A").click()
    # Only the vote's own status line: a plain text match would also find the label "Note (saved with the vote)".
    page.wait_for_function("() => (document.querySelector('#vote-status')?.innerText || '').startsWith('Saved')")
    entry = json.loads(app_server.comparisons.read_text(encoding="utf-8").splitlines()[-1])
    assert entry["vote"] == "A" and entry["note"] == "A reads better" and entry["prompt"] == "Write a poem"
    assert [c["label"] for c in entry["columns"]] == ["A", "B"]
    assert [c["adapter"] for c in entry["columns"]] == ["qkv", "all"]
    assert all(c["output"] and c["settings"]["max_new_tokens"] == 40 for c in entry["columns"])
    page.screenshot(path=str(artifacts / "compare-tab.png"))


def test_model_panel_reloads_in_another_dtype_and_keeps_the_chat_and_adapter(page, artifacts):
    set_number(page, "max-new-tokens", 6)
    choose(page, "chat-adapter", "mlp")
    page.wait_for_function("() => document.querySelector('#chat-stats')?.innerText.includes('adapter mlp selected')")
    send(page, "before reload")
    stats = wait_finished(page)
    assert stats.startswith("adapter mlp")
    page.locator("button[role=tab]:has-text('Model')").first.click()
    assert "float32" in page.locator("#model-info").inner_text()
    page.locator("#dtype-choice").get_by_text("bfloat16").click()
    page.locator("#reload-btn").click()
    wait_model_info(page, "Dtype", "bfloat16")
    page.screenshot(path=str(artifacts / "model-tab-after-reload.png"))
    page.locator("button[role=tab]:has-text('Chat')").first.click()
    send(page, "after reload")
    assert wait_finished(page, stats).startswith("adapter mlp")  # re-applied to the reloaded model
    assert user_messages(page) == ["before reload", "after reload"]
    page.locator("button[role=tab]:has-text('Model')").first.click()
    page.locator("#dtype-choice").get_by_text("float32").click()  # leave the shared server as it was
    page.locator("#reload-btn").click()
    wait_model_info(page, "Dtype", "float32")


def test_switching_quantization_keeps_the_chat_and_the_adapter(page):
    set_number(page, "max-new-tokens", 6)
    choose(page, "chat-adapter", "qkv")
    page.wait_for_function("() => document.querySelector('#chat-stats')?.innerText.includes('adapter qkv selected')")
    send(page, "before int8")
    stats = wait_finished(page)
    for mode in ("int8", "none"):  # the second switch leaves the shared server as it was
        open_tab(page, "Model")
        choose(page, "quant-choice", mode)
        page.locator("#quant-reload-btn").click()
        wait_model_info(page, "Quantization", mode)
        open_tab(page, "Chat")
        send(page, f"after {mode}")
        stats = wait_finished(page, stats)
        assert stats.startswith("adapter qkv")  # re-applied to the re-quantized model
    assert user_messages(page) == ["before int8", "after int8", "after none"]


def test_with_auth_an_anonymous_visitor_cannot_chat(browser, auth_server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(auth_server.url)
    page.get_by_text("Login").first.wait_for()
    assert page.locator("#chat-input").count() == 0
    for path, data in (("gradio_api/info", None), ("config", None),
                       ("gradio_api/call/chat", json.dumps({"data": ["hi"]}).encode())):
        request = urllib.request.Request(auth_server.url + path, data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status = response.status
        except urllib.error.HTTPError as e:
            status = e.code
        assert status in (401, 403), (path, status)
    page.locator("input[type=text], input[name=username]").first.fill("alice")
    page.locator("input[type=password]").first.fill("s3cret")
    page.locator("button:has-text('Login')").first.click()
    page.locator("#chat-input textarea").wait_for()
    context.close()


def _anonymous_status(url: str, data: dict | None = None) -> int:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_with_auth_an_anonymous_client_cannot_stop_a_logged_in_users_reply(browser, auth_server):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(120_000)
    joined = []  # (session_hash, event_id) of the user's events, as the page sends them
    page.on("requestfinished", lambda r: joined.append((json.loads(r.post_data or "{}").get("session_hash"),
                                                        (r.response().json() or {}).get("event_id")))
            if "/gradio_api/queue/join" in r.url else None)
    page.goto(auth_server.url)
    page.locator("input[type=text], input[name=username]").first.fill("alice")
    page.locator("input[type=password]").first.fill("s3cret")
    page.locator("button:has-text('Login')").first.click()
    page.locator("#chat-input textarea").wait_for()
    set_number(page, "seed", 1)
    send(page, "Tell me a long story")
    page.wait_for_function("() => (document.querySelector('#chat-stats')||{}).innerText?.includes('generating')")
    session, _ = joined[-1]
    assert session
    base = auth_server.url + "gradio_api/"
    # What an attacker who learned the session id tries: each is refused before Gradio sees it.
    for event_id in {e for _, e in joined if e}:
        assert _anonymous_status(base + "cancel", {"session_hash": session, "event_id": event_id, "fn_index": 0}) == 401
    assert _anonymous_status(base + "reset", {"session_hash": session, "event_id": "x"}) == 401
    assert _anonymous_status(base + f"heartbeat/{session}") == 401
    shown = len(bot_messages(page)[0])
    page.wait_for_function("""n => (document.querySelector('#chatbot [data-testid="bot"]')?.innerText || '').length > n
        && document.querySelector('#chat-stats')?.innerText.includes('generating')""", arg=shown)  # still streaming
    page.locator("#stop-btn").click()  # the user, logged in, can
    assert "stopped" in wait_finished(page)
    context.close()
