"""Conversations in the browser: kept across a reload and a server restart, per browser; arena vote -> leaderboard.

These tests start servers of their own, each on its own data dir (the session's app_server is shared)."""

from __future__ import annotations

import pytest
from chat_page import bot_messages, open_tab, send, set_number, user_messages, wait_finished
from conftest import AppServer

LIST = "#conv-list"


@pytest.fixture()
def server(tmp_path, browser_adapters_dir):
    holder = {"server": AppServer(tmp_path, "--adapters-dir", str(browser_adapters_dir))}
    yield holder
    holder["server"].stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory, browser_adapters_dir):
    server = AppServer(tmp_path_factory.mktemp("conversations-app"), "--adapters-dir", str(browser_adapters_dir))
    yield server
    server.stop()


def new_page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(120_000)  # CI shares 2 busy cores; a wait that passes returns at once
    page.goto(server.url)
    page.locator("#chat-input textarea").wait_for()
    return page


def wait_listed(page, text: str) -> None:
    page.wait_for_function("t => (document.querySelector('#conv-list')?.innerText || '').includes(t)", arg=text)


def wait_reply_line(page, text: str) -> None:
    page.wait_for_function("t => [...document.querySelectorAll('#chatbot .reply-meta')].some("
                           "e => e.innerText.includes(t) && e.innerText.endsWith('tokens/s'))", arg=text)


def listed(page) -> str:
    return page.locator(LIST).inner_text()


def test_a_conversation_survives_reload_and_restart_and_continues_with_versions(browser, server, tmp_path,
                                                                               browser_adapters_dir, artifacts):
    page = new_page(browser, server["server"])
    set_number(page, "max-new-tokens", 4)
    send(page, "remember the llamas")
    stats = wait_finished(page)
    wait_listed(page, "remember the llamas")
    reply = bot_messages(page)
    wait_reply_line(page, "base model · 4 tokens · ")  # under the reply, outside its text
    assert "tokens" not in reply[0]

    page.reload()
    wait_listed(page, "remember the llamas")  # the list comes back from the server
    assert user_messages(page) == []  # a reloaded page starts with no conversation open

    port = server["server"].port
    server["server"].stop()
    server["server"] = AppServer(tmp_path, "--adapters-dir", str(browser_adapters_dir), port=port)
    page.reload()
    page.locator(f"{LIST} label", has_text="remember the llamas").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"user\"]').length === 1")
    assert user_messages(page) == ["remember the llamas"] and bot_messages(page) == reply
    wait_reply_line(page, "base model · 4 tokens · ")  # the stored meta, after a restart
    page.wait_for_function("() => document.querySelector('#max-new-tokens input[type=number]')?.value === '4'")

    page.locator("#regenerate-btn").click()  # the old reply stays a version
    stats = wait_finished(page)  # request ids start again after a restart: the stats line was emptied by opening
    page.wait_for_function("() => document.querySelector('#versions-bar')?.innerText.includes('2/2')")
    page.locator("#version-older").click()
    page.wait_for_function("() => document.querySelector('#versions-bar')?.innerText.includes('1/2')")
    page.screenshot(path=str(artifacts / "conversations.png"))
    assert bot_messages(page) == reply
    send(page, "and the alpacas")  # continues from the version shown
    wait_finished(page, stats)
    assert user_messages(page) == ["remember the llamas", "and the alpacas"] and bot_messages(page)[0] == reply[0]
    page.context.close()


def test_two_browsers_never_see_each_others_conversations_and_one_imports_the_others_export(browser,
                                                                                          shared, tmp_path):
    alice, bob = new_page(browser, shared), new_page(browser, shared)
    for page, text in ((alice, "alpha secret\n```\nprint(1)\n```"), (bob, "beta note")):
        set_number(page, "max-new-tokens", 2)
        send(page, text)
        wait_finished(page)
        wait_listed(page, text.split("\n")[0])
    alice.locator("#chatbot button.copy_code_button").first.wait_for()  # Gradio's own, on every code block
    bob.reload()
    wait_listed(bob, "beta note")
    assert "alpha" not in listed(bob)
    alice.locator("#conv-search input, #conv-search textarea").first.fill("beta note")  # search finds no other
    alice.wait_for_function("() => !(document.querySelector('#conv-list')?.innerText || '').includes('alpha')")
    assert "beta" not in listed(alice)
    # Export all from alice, import into bob: alice's conversation is bob's too, as a copy.
    alice.locator("#conv-export-all").click()
    link = alice.locator("#conv-export-file a[href]").first
    link.wait_for()
    exported = tmp_path / "alice.json"
    exported.write_bytes(alice.request.get(link.get_attribute("href")).body())
    with bob.expect_file_chooser() as chooser:
        bob.locator("#conv-import").click()
    chooser.value.set_files(str(exported))
    wait_listed(bob, "alpha secret")
    assert "beta note" in listed(bob)
    for page in (alice, bob):
        page.context.close()


def test_an_arena_vote_hides_the_names_until_voted_and_the_leaderboard_shows_them(browser, shared, artifacts):
    # Arena columns sample unseeded, so one may end at once; a vote on an empty answer is (rightly) not counted.
    # Then draw again on a fresh page (its status starts empty, so the wait below proves a new run); bounded.
    for _ in range(3):
        page = new_page(browser, shared)
        open_tab(page, "Compare")
        set_number(page, "compare-max-new-tokens", 8)
        page.locator("#compare-prompt textarea").fill("name a colour")
        page.locator("#arena-run").click()
        page.wait_for_function("() => (document.querySelector('#arena-status')?.innerText || '').includes('Which')")
        if all(page.locator(f"#arena-out-{c}").inner_text().strip() for c in "AB"):
            break
        page.context.close()
    assert "adapter" not in page.locator("#arena-stats-A").inner_text()
    page.locator("#arena-vote-A").click()
    page.wait_for_function("() => (document.querySelector('#arena-status')?.innerText || '').includes('counted')")
    status = page.locator("#arena-status").inner_text()
    assert "not counted" not in status
    names = [part.split("=")[1].strip() for part in status.split("·") if "=" in part]
    assert len(names) == 2 and names[0] != names[1]
    open_tab(page, "Leaderboard")
    page.wait_for_function("n => n.every(x => (document.querySelector('#board-table')?.innerText || '').includes(x))",
                           arg=names)
    assert "95% interval" in page.locator("#board-table").inner_text()
    assert page.locator("#win-rate-matrix").is_visible()
    page.screenshot(path=str(artifacts / "leaderboard.png"))
    page.context.close()
