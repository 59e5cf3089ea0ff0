"""Two front-end processes (real `python app.py` subprocesses on 127.0.0.1) sharing their API rate limits and
response cache through a real `redis-server` (Debian's package) started in a temp dir; and the response cache
in one process, in memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis
from test_keys import _free_port
from test_openai_api import error_of

from glmapp.api.cache import MemoryCache
from glmapp.ui.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
START_S = 240
KEY = "sk-shared"
RPM = 5


def wait_until(condition, what: str, timeout: float, proc=None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended\n" + (log.read_text()[-3000:] if log else ""))
        try:
            if condition():
                return
        except (httpx.HTTPError, redis.RedisError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)  # polling a server that is starting; bounded by the deadline


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server")
    folder, port = tmp_path_factory.mktemp("redis"), _free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: redis.Redis.from_url(url).ping(), "redis-server", 30, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def start_app(checkpoint: Path, tmp: Path, *flags: str):
    port, log = _free_port(), tmp / "app.log"
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "app.py", "--model", str(checkpoint), "--port", str(port), "--device", "cpu",
           "--adapters-dir", str(tmp / "adapters"), "--comparisons-file", str(tmp / "votes.jsonl"),
           "--data-dir", str(tmp / "data"), *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}", log


@pytest.fixture(scope="module")
def front_ends(demo_v2, redis_url, tmp_path_factory):
    """Two app processes on one model checkpoint, one Redis: --rate-limit-rpm RPM, a key, a response cache."""
    tmp = tmp_path_factory.mktemp("front-ends")
    flags = ("--redis-url", redis_url, "--rate-limit-rpm", str(RPM), "--api-key", KEY, "--response-cache-size", "8")
    apps = [start_app(demo_v2, tmp / name, *flags) for name in ("a", "b")]
    try:
        for proc, url, log in apps:
            wait_until(lambda: httpx.get(url + "/health", timeout=5).status_code == 200, "the app to serve",
                       START_S, proc, log)
        yield [url for _, url, _ in apps]
    finally:
        for proc, _, _ in apps:
            proc.terminate()
        for proc, _, _ in apps:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def model_of(url: str) -> str:
    return client(url).models.list().data[0].id


def cache_counts(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    counts = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        for result in counts:
            if line.startswith(f'glmapp_api_response_cache_lookups_total{{result="{result}"}}'):
                counts[result] = float(line.split()[-1])
    return counts


def test_two_front_ends_share_one_rate_limit_and_one_response_cache(front_ends, redis_url):
    a, b = front_ends
    model = model_of(a)
    ask = dict(model=model, temperature=0, max_tokens=6, messages=[{"role": "user", "content": "shared question"}])
    first = client(a).chat.completions.create(**ask)  # a miss on a: generated, stored in Redis
    second = client(b).chat.completions.create(**ask)  # a hit on b: the answer a stored
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage.completion_tokens == first.usage.completion_tokens and second.id != first.id
    assert cache_counts(a) == {"hit": 0, "miss": 1} and cache_counts(b) == {"hit": 1, "miss": 0}
    assert "glmapp_api_response_cache_hit_ratio 1.0" in httpx.get(
        b + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    # A stream of the same request replays the cached answer in pieces, ending as a live one does.
    chunks = list(client(a).chat.completions.create(stream=True, **ask))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == first.choices[0].finish_reason
    # Sampling without a seed is not cached.
    client(b).chat.completions.create(**(ask | {"temperature": 0.9}))
    assert cache_counts(b) == {"hit": 1, "miss": 0}
    # So far RPM - 1 requests of the key (a, b, a, b): one more passes on either front end, then both refuse.
    client(a).completions.create(model=model, prompt="x", max_tokens=1)
    for url in (a, b):
        with pytest.raises(openai.RateLimitError) as e:
            client(url).completions.create(model=model, prompt="x", max_tokens=1)
        assert error_of(e)["code"] == "rate_limit_exceeded" and int(e.value.response.headers["retry-after"]) >= 1
    assert redis.Redis.from_url(redis_url).exists("glmapp:limits:key:0")


def test_the_memory_cache_keeps_the_newest_entries():
    cache = MemoryCache(2)
    cache.put("a", {"n": 1})
    cache.put("b", {"n": 2})
    assert cache.get("a") == {"n": 1}  # used: now the newest
    cache.put("c", {"n": 3})
    assert cache.get("b") is None and cache.get("a") == {"n": 1} and cache.get("c") == {"n": 3}


def test_bad_cache_and_redis_flags_say_what_to_use():
    with pytest.raises(ConfigError, match="--response-cache-size"):
        load_config(["--response-cache-size", "-1"], environ={})
    with pytest.raises(ConfigError, match="redis://"):
        load_config(["--redis-url", "localhost:6379"], environ={})


def test_an_unreachable_redis_stops_the_app_with_the_url_but_not_its_password():
    from glmapp.api.shared import connect

    with pytest.raises(ConfigError) as e:
        connect(f"redis://:hunter2@127.0.0.1:{_free_port()}/0")
    assert "127.0.0.1" in str(e.value) and "hunter2" not in str(e.value)


def test_a_repeated_deterministic_request_is_answered_from_memory_without_the_engine(serve_api):
    from test_openai_api import engine_idle, wait_for

    server = serve_api(cache=MemoryCache(8))
    engine = server.manager.engine
    ask = dict(model=server.model, max_tokens=5, n=2, seed=11, temperature=0.8,
               messages=[{"role": "user", "content": "cache me"}])
    first = server.client().chat.completions.create(**ask)
    wait_for(lambda: engine_idle(server.manager), "the engine to be idle")
    steps = engine.stats()["steps"]
    again = server.client().chat.completions.create(**ask)
    assert engine.stats()["steps"] == steps  # the engine did not run
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    assert again.usage == first.usage
    server.client().chat.completions.create(**(ask | {"seed": 12}))  # other settings: another entry
    assert engine.stats()["steps"] > steps
