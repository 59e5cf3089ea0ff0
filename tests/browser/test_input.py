"""What the user puts in is kept or explained: text typed while a reply streams, a message sent during a
reply, bad setting values over the HTTP API, and the download box that appears only with a download."""

from __future__ import annotations

import json
import urllib.request

from chat_page import (MAX_NEW_TOKENS, bot_messages, open_tab, run_compare, send, set_number, stats_text,
                       user_messages, wait_finished)
from playwright.sync_api import expect

BOT_TEXT_LONGER = """n => (document.querySelector('#chatbot [data-testid="bot"]')?.innerText || '').length > n"""


def bot_text_length(page) -> int:
    return len(bot_messages(page)[0]) if bot_messages(page) else 0


def wait_for_more_reply(page, updates: int = 3) -> None:
    """Wait until the streaming reply has grown `updates` times (each wait needs a new streamed update)."""
    for _ in range(updates):
        page.wait_for_function(BOT_TEXT_LONGER, arg=bot_text_length(page))


def test_text_typed_while_a_reply_streams_stays_and_enter_then_is_refused_with_a_notice(page):
    box = page.locator("#chat-input textarea")
    set_number(page, "seed", 1)  # with this seed the demo model writes MAX_NEW_TOKENS tokens without a stop token
    send(page, "Tell me a long story")
    page.wait_for_function("""() => (document.querySelector('#chat-stats')||{}).innerText?.includes('generating')
        && document.querySelector('#chatbot [data-testid="bot"]')?.innerText.trim().length > 0""")
    box.press_sequentially("and then what happened?")
    wait_for_more_reply(page)
    assert box.input_value() == "and then what happened?"  # streamed updates no longer write the box

    box.press("Enter")  # while the reply streams: refused with a notice, the text stays
    page.get_by_text("still being written").first.wait_for()
    wait_for_more_reply(page)
    assert "generating" in stats_text(page)
    assert box.input_value() == "and then what happened?"
    assert user_messages(page) == ["Tell me a long story"]

    page.locator("#stop-btn").click()
    stopped = wait_finished(page)
    assert "stopped" in stopped and box.input_value() == "and then what happened?"
    set_number(page, "max-new-tokens", 8)
    box.press("Enter")  # the reply ended: now it is sent, and the box is cleared once
    answered = wait_finished(page, stopped)
    assert user_messages(page) == ["Tell me a long story", "and then what happened?"]
    assert " · stopped · " not in answered  # ran to its end (not cancelled)
    assert box.input_value() == ""


def test_download_boxes_appear_only_once_something_was_exported(page):
    expect(page.locator("#export-json-btn")).to_be_visible()
    expect(page.locator("#export-file")).to_be_hidden()
    set_number(page, "max-new-tokens", 4)
    send(page, "hello")
    wait_finished(page)
    page.locator("#export-json-btn").click()
    expect(page.locator("#export-file a[href*='.json']")).to_be_visible()

    open_tab(page, "Compare")
    expect(page.locator("#compare-export-btn")).to_be_visible()
    expect(page.locator("#compare-export-file")).to_be_hidden()
    run_compare(page, "hello", 4)
    page.locator("#compare-export-btn").click()
    expect(page.locator("#compare-export-file a[href*='.json']")).to_be_visible()


def api_call(server, api_name: str, data: list) -> tuple[str, str]:
    """POST /gradio_api/call/<api_name>, then read its event stream -> (last event, its data)."""
    request = urllib.request.Request(f"{server.url}gradio_api/call/{api_name}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    event = payload = ""
    with urllib.request.urlopen(f"{server.url}gradio_api/call/{api_name}/{event_id}", timeout=120) as stream:
        for line in stream:
            line = line.decode().strip()
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                payload = line.split(":", 1)[1].strip()
                if event in ("complete", "error"):
                    break
    return event, payload


CHAT = ["hello", "", 100, 4, 0.5, 0.8, 0, 1.0, -1]  # message, system, max length, max new tokens, t, top p, top k,
COLUMN = [None, 0.5, 0.8, 1]                         # repetition penalty, seed / adapter, temperature, top p, seed


def test_api_names_the_bad_field_and_its_range(app_server):
    for data, message in [
        (CHAT[:6] + ["abc"] + CHAT[7:], "Top k must be a whole number from 0 to 200"),
        (CHAT[:3] + [float("nan")] + CHAT[4:], f"Max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}"),
        (CHAT[:8] + ["soon"], "Seed must be a whole number from -1 to"),
        (CHAT[:4] + ["warm"] + CHAT[5:], "Temperature must be a number from 0 to 1.5"),
    ]:
        event, payload = api_call(app_server, "chat", data)
        assert event == "error" and json.loads(payload)["error"].startswith(message), (data, payload)
    event, payload = api_call(app_server, "compare", ["hello", 2, 4, *COLUMN, None, "hot", 0.8, 1, *COLUMN * 2])
    assert event == "error" and json.loads(payload)["error"].startswith(
        "Column B: Temperature must be a number from 0 to 1.5"), payload
    event, payload = api_call(app_server, "chat", CHAT)  # and good values still get a reply
    reply = json.loads(payload)[0]
    assert event == "complete" and reply["messages"][0]["content"] == "hello" and "(4 new)" in reply["stats"]
