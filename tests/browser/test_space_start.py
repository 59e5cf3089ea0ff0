"""A Space-like start (issue #16): SPACE_ID, GRADIO_SERVER_NAME=0.0.0.0 and SPACES_ZERO_GPU set, with a stand-in
`spaces` package (tests/spaces_standin) whose GPU calls run in worker processes forked from the app, as on
ZeroGPU. The app starts, its generations run inside those workers, and replies reach the browser."""

from __future__ import annotations

import os
import subprocess
import sys

from chat_page import open_tab, send, set_number, wait_finished
from conftest import REPO_ROOT, AppServer, _free_port

STANDIN = REPO_ROOT / "tests" / "spaces_standin"


class SpaceApp(AppServer):
    def __init__(self, tmp):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log, self.calls = tmp / "app.log", tmp / "gpu-calls.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPACE_ID": "someone/glmapp", "SPACES_ZERO_GPU": "true",
               "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(self.port), "GLMAPP_DEMO": "1",
               "GLMAPP_DATA_DIR": str(tmp / "data"), "GLMAPP_ADAPTERS_DIR": str(tmp / "adapters"),
               "SPACES_STANDIN_LOG": str(self.calls),
               "PYTHONPATH": os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")])}
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO_ROOT, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def gpu_calls(self) -> list[dict]:
        if not self.calls.exists():
            return []
        return [dict(kv.split("=") for kv in line.split()) for line in self.calls.read_text().splitlines()]


def test_a_zero_gpu_space_starts_and_generates_inside_gpu_calls(browser, tmp_path):
    server = SpaceApp(tmp_path)
    try:
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.set_default_timeout(120_000)  # CI shares 2 busy cores; a wait that passes returns at once
        page.goto(server.url)
        set_number(page, "max-new-tokens", 6)
        send(page, "hello from a Space")
        stats = wait_finished(page)
        assert "(6 new)" in stats and page.locator('#chatbot [data-testid="bot"]').inner_text().strip()
        calls = server.gpu_calls()
        assert len(calls) == 1 and calls[0]["worker"] != calls[0]["app"] == str(server.proc.pid)
        assert 10 <= int(calls[0]["duration"]) <= 120
        assert page.request.get(server.url + "v1/models").status == 404  # no API outside GPU calls
        send(page, "and a second message")  # the main process's session state was released: not "busy"
        wait_finished(page, stats)
        open_tab(page, "Compare")
        page.locator("#compare-prompt textarea").fill("two columns, one call")
        page.locator("#compare-run").click()
        page.wait_for_function("() => [...document.querySelectorAll('[id^=compare-stats-]')]"
                               ".filter(e => /tokens\\/s/.test(e.innerText)).length >= 2")
        calls = server.gpu_calls()
        assert len(calls) == 3 and len({c["worker"] for c in calls}) == 3  # one worker process per call
        page.context.close()
    finally:
        server.stop()
