"""RemoteBackend against a second glmapp process serving the OpenAI API (real servers on 127.0.0.1): the same
replies as the model served locally, adapters from /v1/models, stop, a killed server, two replicas, and the
whole web app (chat, Compare with two adapters and a vote) in the browser on a remote model."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from chat_page import run_compare, send, set_number, wait_finished
from conftest import AppServer

from glmapp.backends import LocalBackend
from glmapp.backends.remote import RemoteBackend
from glmapp.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
WAIT_S = 60.0


def wait_for(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling a condition, bounded by the deadline


def last(updates):
    update = None
    for update in updates:
        pass
    return update


def running(server: AppServer) -> float:
    """The upstream engine's running sequences, from its /metrics."""
    with urllib.request.urlopen(server.url + "metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("glmapp_engine_running_sequences "):
                return float(line.split()[1])
    raise AssertionError("no running gauge on /metrics")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, browser_adapters_dir):
    server = AppServer(tmp_path_factory.mktemp("upstream"), "--adapters-dir", str(browser_adapters_dir))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local(browser_adapters_dir):
    """The same demo checkpoint in this process: what the remote must answer."""
    backend = LocalBackend.load(demo=True, adapters_dir=str(browser_adapters_dir))
    yield backend
    backend.close()


def test_remote_replies_equal_the_local_model_with_and_without_an_adapter(upstream, local):
    remote = RemoteBackend(upstream.url)
    try:
        assert remote.name == local.name.rsplit("/", 1)[-1] and remote.family == "chatglm2"
        assert remote.context_length == local.context_length
        assert {"qkv", "all", "mlp", "corrupt"} <= set(remote.loaded_adapters())
        broken = last(remote.chat_stream("hi", [], max_new_tokens=4, adapter="corrupt"))  # listed, fails to load
        assert broken.finish_reason == "error" and broken.error.startswith("The model server refused the request:")
        assert "corrupt" in broken.error and not broken.response
        for adapter in (None, "qkv"):
            if adapter:
                local.load_adapter(adapter)
            history = [("hi", "hello there")]
            want = last(local.chat_stream("how are you", history, max_new_tokens=12, params=GREEDY, adapter=adapter))
            got = last(remote.chat_stream("how are you", history, max_new_tokens=12, params=GREEDY, adapter=adapter))
            assert got.finish_reason == want.finish_reason and got.error is None
            assert got.response == want.response and got.history == want.history
            assert got.usage.completion_tokens == want.usage.completion_tokens
            assert got.usage.prompt_tokens == want.usage.prompt_tokens
        with pytest.raises(Exception, match="does not serve an adapter named 'nope'.*qkv"):
            last(remote.chat_stream("hi", [], adapter="nope"))
        caps = remote.capabilities()
        assert caps.quantization and caps.tokenization and caps.adapter_loading
        with pytest.raises(Exception, match="set on the model server"):
            remote.quantize("int8")
    finally:
        remote.close()


def test_stop_closes_the_stream_and_the_server_cancels_the_request(upstream):
    remote, handles = RemoteBackend(upstream.url), []
    try:
        stream = remote.chat_stream("a long story", [], max_new_tokens=9000, params=SamplingParams(seed=1),
                                    on_handle=handles.append)
        first = next(stream)
        assert first.finish_reason is None and first.response
        assert running(upstream) == 1
        handles[0].cancel()
        final = last(stream)
        assert final.finish_reason == "cancelled"
        wait_for(lambda: running(upstream) == 0, "the upstream to cancel the request")
    finally:
        remote.close()


def test_a_server_killed_mid_reply_gives_a_clear_error_and_the_next_message_works_when_it_is_back(
        tmp_path_factory):
    tmp = tmp_path_factory.mktemp("killed")
    server = AppServer(tmp, port=None)
    remote = RemoteBackend(server.url, retry_s=0.2)
    try:
        stream = remote.chat_stream("a long story", [], max_new_tokens=9000, params=SamplingParams(seed=1))
        first = next(stream)
        assert first.response
        server.proc.kill()
        final = last(stream)
        assert final.finish_reason == "error" and "Lost the connection to the model server mid-reply" in final.error
        assert final.response.startswith(first.response)  # the text so far is kept
        assert "127.0.0.1" not in final.error  # the server's address is the operator's, not the user's
        down = last(remote.chat_stream("hello", [], max_new_tokens=4, params=GREEDY))
        assert down.finish_reason == "error" and "not reachable" in down.error
        server = AppServer(tmp, port=server.port)  # back on the same address
        wait_for(lambda: last(remote.chat_stream("hello", [], max_new_tokens=4, params=GREEDY)).finish_reason
                 in ("stop", "length"), "a reply once the server is back")
    finally:
        remote.close()
        server.stop()


def test_two_replicas_one_killed_traffic_continues_on_the_other(tmp_path_factory, upstream):
    other = AppServer(tmp_path_factory.mktemp("replica"))
    remote = RemoteBackend([other.url, upstream.url], retry_s=30)
    try:
        # Both take traffic: two concurrent streams go to different replicas (least busy first).
        handles = []
        streams = [remote.chat_stream("story", [], max_new_tokens=9000, params=SamplingParams(seed=1),
                                      on_handle=handles.append) for _ in range(2)]
        firsts = [next(s) for s in streams]
        assert all(f.response for f in firsts)
        assert running(other) == 1 and running(upstream) == 1
        for h in handles:
            h.cancel()
        for s in streams:
            last(s)
        other.proc.kill()
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            last(remote.chat_stream("hello", [], max_new_tokens=6, params=GREEDY)))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert len(results) == 3 and all(r.finish_reason in ("stop", "length") for r in results)
        assert remote.memory() == "remote (1/2 replicas up)"
    finally:
        remote.close()
        other.stop()


@pytest.fixture(scope="module")
def front_end(tmp_path_factory, upstream):
    server = AppServer(tmp_path_factory.mktemp("front"), "--backend-url", upstream.url + "v1")
    yield server
    server.stop()


def test_the_web_app_on_a_remote_model_chats_compares_two_adapters_and_records_a_vote(browser, front_end,
                                                                                       artifacts):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(120_000)
    try:
        page.goto(front_end.url)
        page.locator("#chat-input textarea").wait_for()
        set_number(page, "max-new-tokens", 8)
        send(page, "hello remote")
        stats = wait_finished(page)
        assert "8 new tokens" in stats or "tokens" in stats
        assert page.locator('#chatbot [data-testid="bot"]').first.inner_text().strip()
        page.locator("button[role=tab]:has-text('Model')").first.click()
        page.wait_for_function("() => (document.querySelector('#capabilities-note')?.innerText || '')"
                               ".includes('set on the model server')")
        assert page.locator("#quant-reload-btn").is_disabled()
        page.locator("#tab-compare-button, button[role=tab]:has-text('Compare')").first.click()
        from chat_page import choose

        choose(page, "compare-adapter-A", "qkv")
        choose(page, "compare-adapter-B", "all")
        run_compare(page, "Write a poem", 12)
        assert page.locator("#compare-stats-A").inner_text().startswith("adapter qkv")
        assert page.locator("#compare-stats-B").inner_text().startswith("adapter all")
        page.locator("#vote-B").click()
        page.wait_for_function("() => (document.querySelector('#vote-status')?.innerText || '').startsWith('Saved')")
        entry = json.loads(front_end.comparisons.read_text(encoding="utf-8").splitlines()[-1])
        assert entry["vote"] == "B" and [c["adapter"] for c in entry["columns"]] == ["qkv", "all"]
        page.screenshot(path=str(artifacts / "remote-compare.png"))
    finally:
        context.close()


def test_terminal_chat_on_a_remote_model_prints_the_servers_reply(upstream):
    import subprocess
    import sys

    remote = RemoteBackend(upstream.url)
    try:
        want = last(remote.chat_stream("hello there", [], max_new_tokens=10, params=GREEDY)).response
    finally:
        remote.close()
    out = subprocess.run([sys.executable, "-m", "glmapp", "chat", "--backend-url", upstream.url + "v1",
                          "--temperature", "0", "--max-new-tokens", "10", "--adapter", "nope"],
                         input="hello there\nexit\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "does not serve an adapter named 'nope'" in out.stderr  # a clear refusal
    out = subprocess.run([sys.executable, "-m", "glmapp", "chat", "--backend-url", upstream.url + "v1",
                          "--temperature", "0", "--max-new-tokens", "10"],
                         input="hello there\nexit\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"ChatGLM: {want}\n" in out.stdout and "10 tokens" in out.stderr
