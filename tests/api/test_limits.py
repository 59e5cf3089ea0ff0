"""Per-key rate limits (--rate-limit-rpm, --rate-limit-tpm): the official openai client against the real app
server with a limiter whose clock the tests move (no sleeps), and the token buckets as plain objects."""

from __future__ import annotations

import math

import openai
import pytest
from test_keys import _free_port
from test_openai_api import engine_text, error_of

from glmapp.api.limits import RateLimited, RateLimiter
from glmapp.ui.config import AppConfig, ConfigError, load_config

KEYS = ["sk-a", "sk-b", "sk-c"]
RPM, TPM = 2, 200
HI = [{"role": "user", "content": "hi"}]


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def limited(serve_api):
    clock = Clock()
    server = serve_api(limiter=RateLimiter(RPM, TPM, clock=clock), api_key=KEYS)
    return server, clock


def test_a_burst_over_the_rpm_gets_429_with_retry_after_and_passes_once_refilled(limited):
    server, clock = limited
    a = server.client(key="sk-a")
    for _ in range(RPM):
        a.chat.completions.create(model=server.model, messages=HI, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        a.chat.completions.create(model=server.model, messages=HI, max_tokens=2)
    assert error_of(e)["code"] == "rate_limit_exceeded" and error_of(e)["type"] == "requests"
    assert "2 requests per minute" in error_of(e)["message"] and "sk-a" not in error_of(e)["message"]
    assert e.value.response.headers["retry-after"] == str(60 // RPM)  # one request refills in 30 s
    # Another key has its own buckets.
    server.client(key="sk-b").completions.create(model=server.model, prompt="hi", max_tokens=2)
    clock.now += 60 / RPM - 1
    with pytest.raises(openai.RateLimitError) as e:
        a.chat.completions.create(model=server.model, messages=HI, max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    clock.now += 1
    assert a.chat.completions.create(model=server.model, messages=HI, max_tokens=2).choices[0].finish_reason


def test_tokens_per_minute_count_prompt_and_max_tokens_and_give_back_what_was_unused(limited):
    server, clock = limited
    c = server.client(key="sk-c")
    # A stop string the greedy reply reaches after a few tokens, so most of max_tokens goes unused.
    text, _ = engine_text(server.manager, "once upon a time", max_new_tokens=20)
    stop = text[len(text) // 3:][:2]
    first = c.completions.create(model=server.model, prompt="once upon a time", max_tokens=150, temperature=0,
                                 stop=stop)
    assert first.choices[0].finish_reason == "stop" and first.usage.completion_tokens < 150
    charged = first.usage.prompt_tokens + 150
    left = TPM - first.usage.prompt_tokens - first.usage.completion_tokens  # the unused part came back
    need = first.usage.prompt_tokens + (left - first.usage.prompt_tokens + 1)  # one token more than is left
    assert charged <= TPM and need <= TPM
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model=server.model, prompt="once upon a time", max_tokens=need - first.usage.prompt_tokens)
    assert error_of(e)["type"] == "tokens"
    assert e.value.response.headers["retry-after"] == str(math.ceil((need - left) * 60 / TPM))
    # A request that fits what is left passes.
    c.completions.create(model=server.model, prompt="once upon a time", max_tokens=left - first.usage.prompt_tokens)


def test_a_request_over_a_whole_minutes_tokens_is_a_400_not_a_429(limited):
    server, _ = limited
    with pytest.raises(openai.BadRequestError) as e:
        server.client(key="sk-b").chat.completions.create(model=server.model, messages=HI, max_tokens=TPM)
    assert error_of(e)["param"] == "max_tokens" and f"{TPM} tokens per minute" in error_of(e)["message"]


def test_the_429s_show_on_metrics(limited):
    from test_metrics import requests_of, scrape

    server, _ = limited
    assert requests_of(scrape(server, key="sk-a"), "/v1/chat/completions", 429) >= 2


# ---- the buckets as plain objects ---------------------------------------------------------------------------
def test_each_client_has_its_own_buckets_and_a_refused_request_takes_nothing():
    clock = Clock()
    limiter = RateLimiter(3, 100, clock=clock)
    limiter.admit("address:10.0.0.1", 60)
    with pytest.raises(RateLimited) as e:
        limiter.admit("address:10.0.0.1", 60)  # 40 tokens left; the refused request takes no request either
    assert e.value.kind == "tokens" and e.value.retry_after == math.ceil(20 * 60 / 100)
    limiter.admit("address:10.0.0.2", 100)  # another address: a full bucket
    limiter.admit("address:10.0.0.1", 40)
    with pytest.raises(RateLimited) as e:
        limiter.admit("address:10.0.0.1", 1)  # 2 requests taken so far, but no tokens left
    assert e.value.kind == "tokens"
    limiter.refund("address:10.0.0.1", 30)
    limiter.admit("address:10.0.0.1", 30)
    with pytest.raises(RateLimited) as e:
        limiter.admit("address:10.0.0.1", 0)
    assert e.value.kind == "requests" and e.value.retry_after == 20  # 3 per minute: one every 20 s
    clock.now += 20
    limiter.admit("address:10.0.0.1", 0)


def test_refunds_never_fill_a_bucket_past_a_minutes_budget():
    clock = Clock()
    limiter = RateLimiter(None, 100, clock=clock)
    limiter.admit("key:0", 10)
    limiter.refund("key:0", 500)
    limiter.admit("key:0", 100)
    with pytest.raises(RateLimited):
        limiter.admit("key:0", 1)


def test_rate_limit_flags_and_environment_variables():
    assert RateLimiter.of(AppConfig()) is None
    config = load_config(["--rate-limit-rpm", "30"], environ={"GLMAPP_RATE_LIMIT_TPM": "5000"})
    assert (config.rate_limit_rpm, config.rate_limit_tpm) == (30, 5000)
    limiter = RateLimiter.of(config)
    assert (limiter.rpm, limiter.tpm) == (30, 5000)
    with pytest.raises(ConfigError, match="--rate-limit-tpm must be at least 1"):
        AppConfig(rate_limit_tpm=0)


def test_the_launched_app_limits_each_client_address_when_the_api_is_open(tmp_path):
    """`launch` (what `python app.py --rate-limit-rpm 1` runs) applies the limit; with no key, per address."""
    import httpx

    from glmapp.ui import launch

    config = AppConfig(demo=True, port=_free_port(), rate_limit_rpm=1, adapters_dir=str(tmp_path),
                       comparisons_file=str(tmp_path / "votes.jsonl"), data_dir=str(tmp_path / "data"))
    demo = launch(config, block=False, wait_for_model=True)
    try:
        url = f"http://127.0.0.1:{config.port}"
        body = {"model": "x", "prompt": "hi", "max_tokens": 2}
        body["model"] = httpx.get(url + "/v1/models").json()["data"][0]["id"]  # listing is not limited
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
        response = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 429 and response.headers["retry-after"] == "60"
        assert "for this client" in response.json()["error"]["message"]
        assert 'status="429"' in httpx.get(url + "/metrics").text  # open API: open metrics
    finally:
        demo.close()
