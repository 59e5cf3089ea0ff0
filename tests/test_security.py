"""What a visitor can make a running app do or keep, against the real server (in this process, on 127.0.0.1,
demo checkpoint): the login on every route, the number of browser sessions kept, the upload size and the
upload cache."""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from glmapp.backends import LocalBackend
from glmapp.ui import AppConfig, ServerLimits, serve
from glmapp.ui.layout import build_ui
from glmapp.ui.server import is_public, routes

USER, PASSWORD = "alice", "s3cret"
LIMITS = ServerLimits(max_sessions=100, max_upload="1mb", cache_sweep=(1, 1))  # a quick sweep to see it happen
SESSIONS = 2000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(demo_v2, tmp_path_factory):
    config = AppConfig(port=_free_port(), auth=[f"{USER}:{PASSWORD}"],
                       adapters_dir=str(tmp_path_factory.mktemp("no-adapters")))
    manager = LocalBackend.load(str(demo_v2), adapters_dir=config.adapters_dir)
    demo = build_ui(manager, config, LIMITS)
    url, _ = serve(demo, config, config.credentials(), LIMITS)
    yield demo, url.rstrip("/")
    demo.close()
    manager.close()


@pytest.fixture()
def anonymous(app):
    with httpx.Client(base_url=app[1], timeout=30) as client:
        yield client


@pytest.fixture()
def alice(app):
    with httpx.Client(base_url=app[1], timeout=60) as client:
        assert client.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        yield client


def concrete(path: str) -> str:
    """A route pattern with every {parameter} filled in."""
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_but_the_login_page_and_its_assets_needs_the_login(app, anonymous):
    demo, _ = app
    served = {(method, r.path) for r in routes(demo.app) for method in (r.methods or ())}
    # the routes Gradio itself left open to anonymous callers must be among those checked
    assert {("GET", "/gradio_api/heartbeat/{session_hash}"), ("POST", "/gradio_api/cancel"),
            ("POST", "/gradio_api/reset"), ("POST", "/gradio_api/upload"), ("POST", "/gradio_api/queue/join")} <= served
    open_routes = []
    for method, path in sorted(served):
        body = {"json": {"session_hash": "someone-else", "event_id": "x", "data": [], "fn_index": 0}} \
            if method == "POST" else {}
        response = anonymous.request(method, concrete(path), **body)
        if is_public(method, concrete(path)):
            open_routes.append(path)
            assert response.status_code != 401, (method, path)  # answered by Gradio (a form without fields: 422)
        else:
            assert response.status_code == 401, (method, path, response.status_code, response.text[:200])
            assert method == "HEAD" or response.json()["detail"]["error"] == "Not authenticated"
    assert "/" in open_routes and "/assets/{path:path}" in open_routes
    login_page = anonymous.get("/")
    assert '"auth_required":true' in login_page.text.replace(" ", "")  # the login form, not the app


def test_a_logged_in_user_chats_and_calls_the_routes_the_page_uses(app, alice):
    from gradio_client import Client

    assert alice.get("/config").status_code == 200 and alice.get("/gradio_api/info").status_code == 200
    assert alice.post("/gradio_api/reset", json={"session_hash": "s", "event_id": "e"}).status_code == 200
    client = Client(app[1], auth=(USER, PASSWORD), verbose=False)
    reply = client.predict("hello", api_name="/chat")
    assert reply["messages"][0]["content"] == "hello" and reply["messages"][1]["content"]


def _stop_fn_index(demo) -> int:
    """The Chat tab's Stop button: an event with no inputs and no outputs, the cheapest way to open a session."""
    return next(i for i, dep in demo.fns.items() if getattr(dep.fn, "__name__", "") == "stop")


def _open_session(client: httpx.Client, fn_index: int, session: str) -> None:
    joined = client.post("/gradio_api/queue/join", json={"data": [], "fn_index": fn_index, "session_hash": session,
                                                          "event_data": None, "trigger_id": None})
    assert joined.status_code == 200, joined.text
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as events:
        for line in events.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                return
    raise AssertionError(f"session {session}: the event never completed")


def test_thousands_of_sessions_keep_a_bounded_number_of_states(app, alice):
    """Each browser tab costs the server a copy of the page's state; beyond `max_sessions` the least recently
    used one goes (Gradio's default keeps 10,000)."""
    demo, _ = app
    fn_index = _stop_fn_index(demo)
    _open_session(alice, fn_index, "warm-up")
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: _open_session(alice, fn_index, f"tab-{i}"), range(SESSIONS)))
    gc.collect()
    kept = len(demo.state_holder.session_data)
    grown_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20
    assert kept <= LIMITS.max_sessions, kept
    assert f"tab-{SESSIONS - 1}" in demo.state_holder.session_data  # the newest tab keeps its state
    assert grown_mb < 150, f"{grown_mb:.0f} MB more after {SESSIONS} sessions"  # unbounded: ~0.2 MB per session


def test_a_too_large_upload_is_refused(alice):
    big = alice.post("/gradio_api/upload", files={"files": ("big.bin", b"\0" * (2 * 2**20))})
    assert big.status_code == 413, (big.status_code, big.text)


def test_uploads_are_deleted_by_the_cache_sweep(app, alice):
    demo, _ = app
    assert demo.delete_cache == LIMITS.cache_sweep  # what launch passes to Gradio
    small = alice.post("/gradio_api/upload", files={"files": ("note.txt", b"hello")})
    assert small.status_code == 200, small.text
    path = small.json()[0]
    assert open(path, "rb").read() == b"hello"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(path):
        time.sleep(0.2)  # polling the file system for Gradio's sweep, bounded by the deadline
    assert not os.path.exists(path), "the upload is still in the cache after 30 s (sweep: every 1 s, older than 1 s)"
