"""The Train tab in a real browser on the demo checkpoint: upload data, preview and report, start, progress bar and
loss plot, reload and find the running job, stop; a short run to the end, its adapter in the picker, and "Compare
with base" streaming two columns. Training runs as its own process started by the app."""

from __future__ import annotations

import json

import pytest
from chat_page import dropdown_value, open_tab, run_compare, set_number
from conftest import AppServer

PROMPT = "请介绍一下你自己"


@pytest.fixture(scope="module")
def train_server(tmp_path_factory):
    """An app with its own adapters folder: the runs made here must not show up in other tests' pickers."""
    tmp = tmp_path_factory.mktemp("train-app")
    server = AppServer(tmp, "--adapters-dir", str(tmp / "adapters"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("train-data") / "fixed.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{PROMPT} {i}" if i else PROMPT, "response": "我是一个助手。"},
                                         ensure_ascii=False) for i in range(8)), encoding="utf-8")
    return path


@pytest.fixture()
def train_page(browser, train_server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(120_000)  # a training process starts in 10-30 s on 2 busy cores
    page.goto(train_server.url)
    open_tab(page, "Train")
    page.locator("#train-start").wait_for()
    yield page
    context.close()


def text_of(selector: str) -> str:
    return f"(document.querySelector('{selector}')?.innerText || '')"


def fill_job(page, data_file, name: str, max_steps: int) -> None:
    """Upload the data and set a short, small job (the widgets start at their defaults after a reload)."""
    page.locator("#train-upload input[type=file]").set_input_files(str(data_file))
    page.wait_for_function(f"() => {text_of('#train-upload')}.includes('.jsonl')")  # the uploaded file's name
    page.locator("#train-hyperparameters button, #train-hyperparameters .label-wrap").first.click()
    # The accordion mounts its widgets when it opens: a value typed while they mount can be reset to the default
    # (seen once in a full run: max_steps stayed -1). Type once they are there, then check each value held.
    page.locator("#train-save-steps input[type=number]").wait_for(state="visible")
    values = (("train-max-steps", max_steps), ("train-batch-size", 2), ("train-grad-accum", 1),
              ("train-max-length", 64), ("train-save-steps", 100000))
    for elem_id, value in values:
        set_number(page, elem_id, value)
    for elem_id, value in values:
        box = page.locator(f"#{elem_id} input[type=number]")
        for _ in range(3):  # bounded: a value lost to a re-render is typed again
            if box.input_value() == str(value):
                break
            set_number(page, elem_id, value)
        assert box.input_value() == str(value), elem_id
    page.locator("#train-name textarea").fill(name)


def bar_value(page) -> int:
    return int(page.locator("#train-bar progress").get_attribute("value"))


def test_upload_preview_start_progress_reload_and_stop(train_page, data_file):
    page = train_page
    fill_job(page, data_file, "running-job", max_steps=100000)
    page.locator("#train-preview").click()
    page.wait_for_function(f"() => {text_of('#train-report')}.includes('Detected format: fixed.jsonl: prompt')")
    page.wait_for_function(f"() => {text_of('#train-table')}.includes('{PROMPT}')")
    assert "我是一个助手" in page.locator("#train-table").inner_text()

    page.locator("#train-start").click()
    page.wait_for_function(f"() => {text_of('#train-status')}.startsWith(\"Started training 'running-job'\")")
    page.wait_for_function("() => +(document.querySelector('#train-bar progress')?.getAttribute('value') || 0) >= 2")
    page.wait_for_function("() => document.querySelector('#train-plot svg')")
    plot = page.locator("#train-plot svg").inner_html()
    step = bar_value(page)
    # The bar and the plot move on with the steps.
    page.wait_for_function("""([step, plot]) => {
        const bar = document.querySelector('#train-bar progress'), svg = document.querySelector('#train-plot svg');
        return bar && +bar.getAttribute('value') > step && svg && svg.innerHTML !== plot; }""", arg=[step, plot])
    assert "running — step" in page.locator("#train-progress").inner_text()

    page.reload()
    open_tab(page, "Train")  # a reopened page shows the job that goes on, with its plot
    page.wait_for_function(f"() => {text_of('#train-progress')}.includes('running-job**: running') || "
                           f"{text_of('#train-progress')}.includes('running-job: running')")
    page.wait_for_function("() => document.querySelector('#train-plot svg')")
    assert bar_value(page) > step

    page.locator("#train-stop").click()
    page.wait_for_function(f"() => {text_of('#train-status')}.startsWith('Stopped')")
    page.wait_for_function(f"() => {text_of('#train-progress')}.includes('stopped (incomplete')")


def test_a_finished_run_is_in_the_picker_and_compares_with_base(train_page, data_file, artifacts):
    page = train_page
    fill_job(page, data_file, "fixed-reply", max_steps=3)
    page.locator("#train-start").click()
    page.wait_for_function(f"() => {text_of('#train-progress')}.includes('finished — step 3/3')")
    page.locator("#train-compare").wait_for(state="visible")
    page.screenshot(path=str(artifacts / "train-tab.png"), full_page=True)

    open_tab(page, "Model")  # the picker offers the new adapter without a reload
    page.locator("#adapter-choice input").click()
    listbox = page.locator(f"#{page.locator('#adapter-choice input').get_attribute('aria-controls')}")
    listbox.get_by_role("option", name="fixed-reply", exact=True).wait_for()
    page.keyboard.press("Escape")

    open_tab(page, "Train")
    page.locator("#train-compare").click()
    page.locator("#compare-adapter-B").wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#compare-prompt textarea')?.value !== ''")
    assert page.locator("#compare-prompt textarea").input_value() == PROMPT
    assert dropdown_value(page, "compare-adapter-A") == "none (base model)"
    assert dropdown_value(page, "compare-adapter-B") == "fixed-reply"
    run_compare(page, PROMPT, 12)
    assert page.locator("#compare-stats-A").inner_text().startswith("base model")
    assert page.locator("#compare-stats-B").inner_text().startswith("adapter fixed-reply")
    assert all(page.locator(f"#compare-out-{label}").inner_text().strip() for label in "AB")
