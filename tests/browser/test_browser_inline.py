"""The whole app on the inline engine (--engine inline: each handler runs its own steps, as on ZeroGPU): a chat
reply streams to the browser and finishes."""

from __future__ import annotations

import pytest
from chat_page import bot_messages, new_tokens, send, set_number, user_messages, wait_finished
from conftest import AppServer


@pytest.fixture(scope="module")
def inline_server(tmp_path_factory):
    server = AppServer(tmp_path_factory.mktemp("inline-app"), "--engine", "inline")
    yield server
    server.stop()


def test_a_chat_reply_reaches_the_browser_on_the_inline_engine(browser, inline_server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(120_000)  # generous: CI shares 2 cores; a wait that passes returns at once
    try:
        page.goto(inline_server.url)
        page.locator("#chat-input textarea").wait_for()
        set_number(page, "temperature", 0)
        set_number(page, "max-new-tokens", 24)
        send(page, "hello")
        stats = wait_finished(page)
        assert user_messages(page) == ["hello"]
        assert bot_messages(page)[0].strip()
        assert 0 < new_tokens(stats) <= 24
    finally:
        context.close()
    assert "Traceback" not in inline_server.log.read_text()
