"""The page is up before the model: a loading banner with the download's progress, chat closed until the model
is served, and a checkpoint that cannot load shown in the page (issue #16). The model comes from a FakeHub
(tests/fake_hub.py) holding its weights halfway until the test releases them."""

from __future__ import annotations

import pytest
from chat_page import send, set_number, wait_finished
from conftest import AppServer
from fake_hub import FakeHub

REPO = "org/loading-chatglm2"


def model_app(tmp, model: str, env: dict | None = None) -> AppServer:
    """`python app.py --model MODEL` (no --demo), returned once the page answers (the model may still load)."""
    return AppServer(tmp, "--data-dir", str(tmp / "data"), "--adapters-dir", str(tmp / "adapters"),
                     "--max-new-tokens", "64", model=model, env=env, wait_model=False)


def open_page(browser, url):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(120_000)  # CI shares 2 busy cores; a wait that passes returns at once
    page.goto(url)
    return page


def test_the_page_shows_the_download_and_opens_the_chat_when_the_model_is_ready(browser, demo_v2, tmp_path,
                                                                                  artifacts):
    hub = FakeHub(REPO, demo_v2, hold=True)
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    server = model_app(tmp_path, REPO, env)
    try:
        assert hub.half_sent.wait(120)
        page = open_page(browser, server.url)
        banner = page.locator("#loading-banner")
        page.wait_for_function("() => /Downloading .*: \\d+% · .* of .*\\/s/.test("
                               "document.querySelector('#loading-banner')?.innerText || '')")
        assert f"Loading the model {REPO}" in banner.inner_text()
        assert banner.locator("progress").count() == 1
        box = page.locator("#chat-input textarea")
        assert box.is_disabled() and page.locator("#send-btn").is_disabled()
        page.screenshot(path=str(artifacts / "loading.png"))
        hub.release()
        page.wait_for_function("() => !document.querySelector('#chat-input textarea').disabled")
        banner.wait_for(state="hidden")
        assert page.locator("#send-btn").is_enabled()
        set_number(page, "max-new-tokens", 4)
        send(page, "hello after loading")
        assert "(4 new)" in wait_finished(page)
        page.context.close()
    finally:
        server.stop()
        hub.close()


@pytest.mark.parametrize("broken", ["missing", "truncated"])
def test_a_checkpoint_that_cannot_load_is_shown_in_the_page_with_the_fix(browser, demo_v2, tmp_path, broken):
    model = tmp_path / "model"
    if broken == "truncated":
        import shutil

        shutil.copytree(demo_v2, model)
        shard = sorted(model.glob("*.safetensors"))[-1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    server = model_app(tmp_path, str(model))
    try:
        page = open_page(browser, server.url)
        page.wait_for_function("() => (document.querySelector('#loading-banner')?.innerText || '')"
                               ".includes('could not be loaded')")
        text = page.locator("#loading-banner").inner_text()
        assert "--demo" in text and ("not found" in text if broken == "missing" else "model-0000" in text)
        assert page.locator("#chat-input textarea").is_disabled()
        page.context.close()
    finally:
        server.stop()
