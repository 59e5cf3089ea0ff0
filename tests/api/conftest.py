"""The real web app served in this process (Gradio + the API routes, on 127.0.0.1), on the demo ChatGLM2
checkpoint with the peft-made adapters, so tests can also look at the engine the API submits to."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest

from glmapp.api import KeyCheck, build_router
from glmapp.api.routes import base_model_id
from glmapp.backends import LocalBackend
from glmapp.ui import serve
from glmapp.ui.config import AppConfig
from glmapp.ui.server import ServerLimits

MAX_INPUT_TOKENS = 64
API_KEY = "sk-test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str  # the web app's root
    manager: LocalBackend
    model: str  # the base model's id in /v1/models
    key: str | None = None  # the API key it accepts (None: open)

    @property
    def api(self) -> str:
        return self.url.rstrip("/") + "/v1"

    def client(self, key: str = "unused", **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.api, api_key=key, max_retries=0, timeout=60, **kwargs)


def _serve(manager, tmp, limiter=None, cache=None, **settings):
    from glmapp.ui.layout import build_ui

    config = AppConfig(port=_free_port(), adapters_dir=manager.adapters_dir,
                       comparisons_file=str(tmp / "comparisons.jsonl"), **settings)
    limits = ServerLimits()
    demo = build_ui(manager, config, limits)
    router = build_router(manager, KeyCheck.of(config), limiter, cache)
    url, _ = serve(demo, config, config.credentials(), limits, router.routes)
    return demo, Served(url, manager, base_model_id(manager.name), (config.api_key or [None])[0])


@pytest.fixture(scope="session")
def api_manager(demo_v2, adapters_copy):
    manager = LocalBackend.load(str(demo_v2), max_input_tokens=MAX_INPUT_TOKENS,
                                  adapters_dir=str(adapters_copy("api-adapters", corrupt=["corrupt"])))
    yield manager
    manager.close()


@pytest.fixture(scope="session")
def served(api_manager, tmp_path_factory):
    """The app with no login and no API key: the API is open, like the page."""
    demo, server = _serve(api_manager, tmp_path_factory.mktemp("api-open"))
    yield server
    demo.close()


@pytest.fixture(scope="session")
def served_with_login(api_manager, tmp_path_factory):
    """The same model behind --auth alice:s3cret with --api-key API_KEY."""
    demo, server = _serve(api_manager, tmp_path_factory.mktemp("api-auth"), auth=["alice:s3cret"], api_key=[API_KEY])
    yield server
    demo.close()


@pytest.fixture(scope="module")
def serve_api(api_manager, tmp_path_factory):
    """Serve the same model with other settings: serve_api(limiter=..., cache=..., api_key=[...]) -> Served
    (closed after the test module)."""
    demos = []

    def serve_with(limiter=None, cache=None, **settings) -> Served:
        demo, server = _serve(api_manager, tmp_path_factory.mktemp("api-more"), limiter, cache, **settings)
        demos.append(demo)
        return server

    yield serve_with
    for demo in demos:
        demo.close()


@pytest.fixture(scope="session")
def served_v3(demo_v3, tmp_path_factory):
    """The app on the demo ChatGLM3 checkpoint (tool calls, observation turns), open API."""
    manager = LocalBackend.load(str(demo_v3), adapters_dir=str(tmp_path_factory.mktemp("v3-adapters")))
    demo, server = _serve(manager, tmp_path_factory.mktemp("api-v3"))
    yield server
    demo.close()
    manager.close()
