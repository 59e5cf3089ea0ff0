"""32 concurrent API streams and two people chatting in the browser, on one app (issue #13): every output is
the one the same request gets alone (greedy), and the engine is back to its starting state afterwards."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest
from chat_page import bot_messages, send, set_number, wait_finished
from conftest import AppServer
from openai import AsyncOpenAI, OpenAI

STREAMS, TOKENS, API_TOKENS = 32, 12, 512  # the API streams outlast the browsers' sends
# The engine runs 32 sequences at most (EngineConfig.max_seqs): the browsers' replies wait for free slots, so
# their wait covers the storm on a busy machine.
WAIT_MS = 300_000


@pytest.fixture(scope="module")
def uncached(tmp_path_factory):
    """The app without the API's response cache: a repeated request is generated again, not replayed."""
    server = AppServer(tmp_path_factory.mktemp("uncached-app"), "--response-cache-size", "0")
    yield server
    server.stop()


def greedy_page(browser, server):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(120_000)  # CI shares 2 busy cores; a wait that passes returns at once
    page.goto(server.url)
    set_number(page, "temperature", 0)
    set_number(page, "max-new-tokens", TOKENS)
    return page


def ask_anew(page, text: str) -> None:
    """A new chat with one message."""
    page.locator("#conv-new").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"user\"]').length === 0")
    send(page, text)


def reply_of(page, previous: str = "") -> tuple[str, str]:
    """-> (the reply, the stats line), once the request after `previous` finished."""
    stats = wait_finished(page, previous, timeout=WAIT_MS)
    return bot_messages(page)[-1], stats


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(glmapp_\w+) ([0-9.e+-]+)$", text, re.M)}


def test_32_api_streams_and_two_browser_users_each_get_what_they_get_alone(browser, uncached):
    app_server = uncached
    api = app_server.url + "v1"
    model = OpenAI(base_url=api, api_key="unused", max_retries=0, timeout=120).models.list().data[0].id
    queries = [f"api question number {i % 2}" for i in range(STREAMS)]
    client = OpenAI(base_url=api, api_key="unused", max_retries=0, timeout=120)
    alone = {q: client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                               max_tokens=API_TOKENS, temperature=0).choices[0].message.content
             for q in sorted(set(queries))}
    pages = [greedy_page(browser, app_server) for _ in range(2)]
    asks = ["what does alice ask", "and what does bob ask"]
    firsts = []
    for page, ask in zip(pages, asks):
        ask_anew(page, ask)
        firsts.append(reply_of(page))
    start = metrics(app_server.url)

    async def storm() -> list[str]:
        async_client = AsyncOpenAI(base_url=api, api_key="unused", max_retries=0, timeout=300,
                                   http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=STREAMS + 4)))

        async def one(q: str) -> str:
            stream = await async_client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=API_TOKENS, temperature=0,
                stream=True)
            async with stream:
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async with async_client:
            return await asyncio.gather(*(one(q) for q in queries))

    results: dict = {}

    def run_storm():
        try:
            results["texts"] = asyncio.run(storm())
        except BaseException as e:  # noqa: BLE001 - reported by the assertions below
            results["error"] = e

    api_thread = threading.Thread(target=run_storm, daemon=True)
    api_thread.start()
    deadline = time.monotonic() + 120
    while metrics(app_server.url)["glmapp_engine_running_sequences"] < STREAMS // 4:  # the storm is on
        assert time.monotonic() < deadline and api_thread.is_alive(), results
        time.sleep(0.05)
    for page, ask in zip(pages, asks):  # both people chat during the storm
        ask_anew(page, ask)
    assert api_thread.is_alive(), "the storm ended before the browsers sent: make the API replies longer"
    again = [reply_of(page, first[1]) for page, first in zip(pages, firsts)]
    api_thread.join(300)
    assert not api_thread.is_alive(), "the API streams did not finish"
    assert results["texts"] == [alone[q] for q in queries]
    assert [a[0] for a in again] == [f[0] for f in firsts]
    deadline = time.monotonic() + 60
    while (now := metrics(app_server.url))["glmapp_engine_running_sequences"] > 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # the last stream's blocks are freed as it ends; bounded by the deadline
    for name in ("glmapp_engine_running_sequences", "glmapp_engine_waiting_sequences", "glmapp_kv_cache_free_blocks"):
        assert now[name] == start[name], name
    for page in pages:
        page.context.close()
