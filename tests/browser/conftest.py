"""Real app in a subprocess (demo checkpoint, free port) + Debian's chromium driven by Playwright (sync API)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from chat_page import MAX_NEW_TOKENS

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
START_TIMEOUT_S = 120
MAX_INPUT_TOKENS = 200

if not Path(CHROMIUM).exists():
    pytest.skip("Debian chromium is not installed (bash scripts/test.sh installs it)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py` on a free port: the demo checkpoint with the suite's limits and `extra` flags; `model`
    instead of the demo (then `extra` are all the flags besides --model and --port); `env` added to the
    environment; `wait_model`: return once the model is served (else once the page answers)."""

    def __init__(self, tmp: Path, *extra: str, port: int | None = None, model: str | None = None,
                 env: dict | None = None, wait_model: bool = True):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.comparisons = tmp / "comparisons.jsonl"
        self.log = tmp / "app.log"
        if model is None:
            flags = ["--demo", "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-input-tokens", str(MAX_INPUT_TOKENS),
                     "--comparisons-file", str(self.comparisons), "--data-dir", str(tmp / "data"), *extra]
        else:
            flags = ["--model", model, *extra]
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), *flags], cwd=REPO_ROOT,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self._wait_ready(wait_model)

    def _wait_ready(self, model: bool = True) -> None:
        """Until the page answers and (with `model`) the model is served: the page comes up first and the model
        loads in the background; /health says 503 until it is served (404: a front end without the API)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        url = self.url + "health" if model else self.url
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except urllib.error.HTTPError as e:
                if e.code != 503:
                    return  # the server answers (e.g. 401 behind --auth, 404 without the API): it is up
                time.sleep(0.2)  # the model is still loading; bounded by the deadline
            except OSError:
                time.sleep(0.2)  # polling the port of a starting process; bounded by the deadline
        self.stop()
        raise TimeoutError(f"app did not start within {START_TIMEOUT_S}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log_file.close()


@pytest.fixture(scope="session")
def browser_adapters_dir(adapters_copy) -> Path:
    """The peft-made adapters (qkv, all, mlp) plus "corrupt", whose weight file is truncated."""
    return adapters_copy("browser-adapters", corrupt=["corrupt"])


@pytest.fixture(scope="session")
def app_server(tmp_path_factory, browser_adapters_dir):
    server = AppServer(tmp_path_factory.mktemp("app"), "--adapters-dir", str(browser_adapters_dir))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory):
    server = AppServer(tmp_path_factory.mktemp("auth-app"), "--auth", "alice:s3cret")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def dialogs() -> list[str]:
    return []


@pytest.fixture()
def page(browser, app_server, dialogs):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(120_000)  # generous: CI shares 2 cores; a wait that passes returns at once
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(app_server.url)
    page.locator("#chat-input textarea").wait_for()
    yield page
    context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
