"""The web app serving ChatGLM-6B (v1): a chat on the v1 demo checkpoint, then the Compare tab runs the base model
against a P-tuning v2 prefix adapter in one batch (greedy columns: the prefix changes the reply)."""

from __future__ import annotations

import pytest
from chat_page import choose, open_tab, run_compare, send, set_number, wait_finished, wait_model_info
from conftest import MAX_INPUT_TOKENS, AppServer

from glmapp.demo import make_demo
from tests.test_v1_ptuning import make_ptuning


@pytest.fixture(scope="module")
def v1_app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v1-app")
    base = make_demo(tmp / "chatglm1-demo", family="chatglm1")
    make_ptuning(base, tmp / "adapters" / "prefix", projection=True, seed=3)
    server = AppServer(tmp, "--max-new-tokens", "64", "--max-input-tokens", str(MAX_INPUT_TOKENS),
                       "--comparisons-file", str(tmp / "comparisons.jsonl"), "--data-dir", str(tmp / "data"),
                       "--adapters-dir", str(tmp / "adapters"), model=str(base))
    yield server
    server.stop()


def test_v1_demo_chats_and_compares_a_ptuning_adapter_with_the_base(browser, v1_app, artifacts):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(120_000)
    try:
        page.goto(v1_app.url)
        page.locator("#chat-input textarea").wait_for()
        open_tab(page, "Model")
        wait_model_info(page, "Family", "chatglm1")
        open_tab(page, "Chat")
        set_number(page, "max-new-tokens", 8)
        send(page, "你好")
        assert "(8 new)" in wait_finished(page)
        assert page.locator('#chatbot [data-testid="bot"]').count() == 1
        page.locator("#tab-compare-button, button[role=tab]:has-text('Compare')").first.click()
        choose(page, "compare-adapter-B", "prefix")
        for label in "AB":
            page.locator(f"button:has-text('{label} settings')").first.click()
            set_number(page, f"compare-temperature-{label}", 0)
        run_compare(page, "你好", 12)
        assert page.locator("#compare-stats-A").inner_text().startswith("base model")
        assert page.locator("#compare-stats-B").inner_text().startswith("adapter prefix")
        base, prefixed = [page.locator(f"#compare-out-{label}").inner_text().strip() for label in "AB"]
        assert base and prefixed and base != prefixed
        page.screenshot(path=str(artifacts / "v1-compare-ptuning.png"))
    finally:
        context.close()
