"""The app in Chinese and English: the page follows the browser's language, the switch changes it in place and
is remembered; text made on the server (banner, stats line, errors) comes in the same language."""

from __future__ import annotations

import pytest
from chat_page import STATS, open_tab, send, set_number, user_messages, wait_finished

REPO_DOCS = __import__("conftest").REPO_ROOT / "docs"
LONG_MESSAGE = "word " * 400  # over the app's --max-input-tokens (200)


def open_page(browser, app_server, locale: str):
    context = browser.new_context(locale=locale, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(120_000)  # CI shares 2 cores; a wait that passes returns at once
    page.goto(app_server.url)
    page.locator("#chat-input textarea:not([disabled])").wait_for()
    return context, page


def wait_text(page, selector: str, text: str) -> None:
    page.wait_for_function("([s, t]) => (document.querySelector(s)?.innerText || '').includes(t)",
                           arg=[selector, text])


def tab_names(page) -> list[str]:
    return [name.strip() for name in page.locator("button[role=tab]").all_inner_texts()]


def chosen_language(page) -> str:
    return page.locator("#language-switch input:checked").get_attribute("value")


def wait_toast(page, text: str) -> None:
    page.wait_for_function("t => [...document.querySelectorAll('.toast-body')].some(e => e.innerText.includes(t))",
                           arg=text)


CASES = {
    # locale: (tab names, send button, banner words, example prompt, stats words, over-long error words)
    "zh-CN": (["对话", "对比", "排行榜", "模型", "训练"], "发送", "演示检查点", "用两句话介绍一下你自己。",
              ["基础模型", "上下文", "内存"], "消息太长"),
    "en-US": (["Chat", "Compare", "Leaderboard", "Model", "Train"], "Send", "Demo checkpoint",
              "Introduce yourself in two sentences.", ["base model", "tokens of context", "memory"], "Message too long"),
}


@pytest.mark.parametrize("locale", list(CASES))
def test_page_reads_in_the_browser_language_with_server_text_too(browser, app_server, artifacts, locale):
    tabs, send_label, banner, example, stats_words, too_long = CASES[locale]
    context, page = open_page(browser, app_server, locale)
    try:
        page.wait_for_function("names => { const shown = [...document.querySelectorAll('button[role=tab]')]"
                               ".map(b => b.innerText.trim()); return names.every(n => shown.includes(n)); }",
                               arg=tabs)
        assert tab_names(page)[:5] == tabs
        assert page.locator("#send-btn").inner_text().strip() == send_label
        wait_text(page, "#demo-banner", banner)
        assert chosen_language(page) == ("zh-CN" if locale == "zh-CN" else "en")
        page.wait_for_function("t => document.title === t",
                               arg="glmapp · ChatGLM 对话" if locale == "zh-CN" else "glmapp · ChatGLM chat")

        set_number(page, "max-new-tokens", 8)
        page.locator("#chatbot").get_by_text(example).click()  # a starter in the page's language fills the box
        page.wait_for_function("t => document.querySelector('#chat-input textarea').value === t", arg=example)
        page.locator("#chat-input textarea").press("Enter")
        stats = wait_finished(page)
        assert all(word in stats for word in stats_words), stats
        assert user_messages(page) == [example]
        name = "screenshot-zh.png" if locale == "zh-CN" else "screenshot-en.png"
        page.screenshot(path=str(artifacts / name))

        send(page, LONG_MESSAGE)
        wait_toast(page, too_long)
    finally:
        context.close()


def test_switching_language_keeps_the_conversation_and_is_remembered(browser, app_server):
    context, page = open_page(browser, app_server, "en-US")
    try:
        wait_text(page, "#demo-banner", "Demo checkpoint")
        set_number(page, "max-new-tokens", 8)
        send(page, "hello")
        wait_finished(page)
        page.locator("#language-switch label:has-text('中文')").click()
        wait_text(page, "#send-btn", "发送")
        wait_text(page, "#demo-banner", "演示检查点")
        page.wait_for_function("() => document.querySelector('#chat-adapter input').value === '无（基础模型）'")
        page.wait_for_function("() => [...document.querySelectorAll('button[role=tab]')].map(b => b.innerText.trim())"
                               ".join() === '对话,对比,排行榜,模型,训练'")  # hidden tabs' names too
        open_tab(page, "模型")  # the Model tab's server-made text follows too
        wait_text(page, "#adapter-status", "本页正在使用")
        wait_text(page, "#model-info", "内存占用")
        open_tab(page, "对话")
        assert user_messages(page) == ["hello"]  # the same conversation, now in Chinese
        assert "tokens" in page.locator(STATS).inner_text()

        send(page, LONG_MESSAGE)  # errors now come in the chosen language
        wait_toast(page, "消息太长")

        page.reload()  # the choice is remembered by this browser
        page.locator("#chat-input textarea:not([disabled])").wait_for()
        wait_text(page, "#send-btn", "发送")
        assert chosen_language(page) == "zh-CN"

        page.locator("#language-switch label:has-text('English')").click()
        wait_text(page, "#send-btn", "Send")
        wait_text(page, "#demo-banner", "Demo checkpoint")
        page.wait_for_function("() => document.querySelector('#chat-adapter input').value === 'none (base model)'")
    finally:
        context.close()


@pytest.mark.parametrize("locale, tab, banner", [("zh-Hans", "对话", "演示检查点"), ("zh-TW", "Chat", "Demo checkpoint")])
def test_simplified_chinese_tags_read_chinese_and_others_english(browser, app_server, locale, tab, banner):
    context, page = open_page(browser, app_server, locale)
    try:
        wait_text(page, "#demo-banner", banner)
        wait_text(page, "button[role=tab]", tab)
        assert tab_names(page)[0] == tab
    finally:
        context.close()
