"""GET /metrics on the real app server: scraped with HTTP, read with prometheus_client's own text parser, and
compared with what the API answered and the engine's own stats."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_openai_api import WAIT_S, engine_idle, wait_for

REQUESTS = "glmapp_api_requests_total"
TOKENS = "glmapp_api_generated_tokens_total"
TTFT_COUNT = "glmapp_api_time_to_first_token_seconds_count"
TTFT_SUM = "glmapp_api_time_to_first_token_seconds_sum"


def scrape(server, key: str | None = None) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one scrape."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(server.url + "metrics", headers=headers, timeout=WAIT_S)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def requests_of(metrics, route: str, status: int) -> float:
    return metrics.get((REQUESTS, (("route", route), ("status", str(status)))), 0.0)


def test_metrics_count_requests_by_status_generated_tokens_and_first_tokens(served):
    wait_for(lambda: engine_idle(served.manager), "an idle engine")
    client = served.client()
    before = scrape(served)
    chat = client.chat.completions.create(model=served.model, temperature=0, max_tokens=7,
                                          messages=[{"role": "user", "content": "count me"}])
    stream = client.completions.create(model=served.model, prompt="count me too", temperature=0, max_tokens=5,
                                       n=2, stream=True, stream_options={"include_usage": True})
    streamed = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    client.models.list()
    after = scrape(served)

    def moved(route, status):
        return requests_of(after, route, status) - requests_of(before, route, status)

    assert moved("/v1/chat/completions", 200) == 1
    assert moved("/v1/chat/completions", 404) == 1
    assert moved("/v1/completions", 200) == 1
    assert moved("/v1/models", 200) == 1
    assert moved("/metrics", 200) == 1  # the first scrape (counted once answered)
    generated = chat.usage.completion_tokens + streamed.completion_tokens
    assert generated > 0
    assert after[(TOKENS, ())] - before.get((TOKENS, ()), 0.0) == generated
    # One observation per generation request that ran (the 404 never did), not one per choice.
    assert after[(TTFT_COUNT, ())] - before.get((TTFT_COUNT, ()), 0.0) == 2
    assert after[(TTFT_SUM, ())] > before.get((TTFT_SUM, ()), 0.0)


def test_metrics_show_the_engines_state(served):
    manager = served.manager
    wait_for(lambda: engine_idle(manager), "an idle engine")
    idle = scrape(served)
    stats = manager.engine.stats()
    assert idle[("glmapp_engine_running_sequences", ())] == 0
    assert idle[("glmapp_engine_waiting_sequences", ())] == 0
    assert idle[("glmapp_kv_cache_blocks", ())] == stats["num_blocks"] > 0
    assert idle[("glmapp_kv_cache_free_blocks", ())] == stats["free_blocks"]
    assert idle[("glmapp_engine_errors_total", ())] == stats["errors"]
    with httpx.stream("POST", served.api + "/chat/completions", timeout=WAIT_S, json={
            "model": served.model, "max_tokens": 20000, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "a long reply to watch"}]}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
        busy = scrape(served)  # the request runs until this client leaves
        assert busy[("glmapp_engine_running_sequences", ())] == 1
        assert busy[("glmapp_kv_cache_free_blocks", ())] < busy[("glmapp_kv_cache_blocks", ())]
        assert 0 < busy[("glmapp_kv_cache_usage_ratio", ())] <= 1
    wait_for(lambda: engine_idle(manager), "the engine to drop the request of the client that left")


def test_metrics_need_the_api_key_under_login(served_with_login):
    server = served_with_login
    response = httpx.get(server.url + "metrics", timeout=WAIT_S)
    assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
    response = httpx.get(server.url + "metrics", headers={"Authorization": "Bearer wrong"}, timeout=WAIT_S)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert (REQUESTS, (("route", "/metrics"), ("status", "401"))) in scrape(server, key=server.key)
