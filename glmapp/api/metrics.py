"""`GET /metrics`: the server's load in Prometheus' text format (prometheus_client).

Notable choices:
- Each app has its own `CollectorRegistry`, not the library's global one: two apps in one process (the tests
  do that) never mix their counts, and nothing else that imports prometheus_client shows up here.
- The engine's state (running and waiting sequences, KV cache blocks, requests its failures ended) is read
  from `engine.stats()` at scrape time by a collector, so nothing is counted twice and the engine knows
  nothing about Prometheus. While the model reloads there is no engine: those series are left out.
- Generated tokens are counted as the API's streams report them (cumulative `usage` per choice), so
  `rate(glmapp_api_generated_tokens_total[1m])` is the API's tokens per second.
- Time to first token is measured from the request's arrival at the route to its first text (or its end),
  so it includes parsing, tokenizing, queueing and prefill. Answers from the response cache count neither
  there nor in generated tokens; they count as cache hits (lookups by result, and the hit ratio of this
  process: with a cache in Redis, each front end counts its own lookups).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from glmapp.errors import ModelReloading

# From a few ms (a warm short prompt) to a minute (a long queue on a busy CPU).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """The engine's own numbers, read when scraped."""

    def __init__(self, backend):
        self.backend = backend

    def collect(self):
        try:
            stats = self.backend.stats()
        except ModelReloading:
            return
        gauges = {"glmapp_engine_running_sequences": ("Sequences being generated now.", stats["running"]),
                  "glmapp_engine_waiting_sequences": ("Sequences waiting for room in the batch.", stats["waiting"]),
                  "glmapp_kv_cache_free_blocks": ("KV cache blocks free.", stats["free_blocks"]),
                  "glmapp_kv_cache_blocks": ("KV cache blocks in all.", stats["num_blocks"]),
                  "glmapp_kv_cache_usage_ratio": ("Share of the KV cache's blocks in use (0 to 1).",
                                                  1 - stats["free_blocks"] / max(stats["num_blocks"], 1))}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        # The engine's own count: it starts again at 0 when a reload makes a new engine (a counter reset).
        yield CounterMetricFamily("glmapp_engine_errors", "Requests ended by a failure of the engine (not by bad "
                                  "input), since this engine started.", value=stats["errors"])


class APIMetrics:
    """The counters the API's routes update, and the page that shows them with the engine's state."""

    def __init__(self, backend):
        self.registry = CollectorRegistry()
        self.requests = Counter("glmapp_api_requests", "API requests answered, by route and HTTP status.",
                                ["route", "status"], registry=self.registry)
        self.generated_tokens = Counter("glmapp_api_generated_tokens", "Tokens generated for API requests.",
                                        registry=self.registry)
        self.time_to_first_token = Histogram(
            "glmapp_api_time_to_first_token_seconds", "From an API generation request's arrival to its first "
            "text.", buckets=TTFT_BUCKETS, registry=self.registry)
        self.cache_lookups = Counter("glmapp_api_response_cache_lookups", "Deterministic API requests looked up in "
                                     "the response cache, by result (hit or miss).", ["result"], registry=self.registry)
        self.cache_hit_ratio = Gauge("glmapp_api_response_cache_hit_ratio", "Share of response cache lookups that "
                                     "hit, since this process started (0 to 1).", registry=self.registry)
        self._lookups = {"hit": 0, "miss": 0}
        self.registry.register(_EngineCollector(backend))

    def cache_lookup(self, hit: bool) -> None:
        result = "hit" if hit else "miss"
        self._lookups[result] += 1
        self.cache_lookups.labels(result=result).inc()
        self.cache_hit_ratio.set(self._lookups["hit"] / (self._lookups["hit"] + self._lookups["miss"]))

    def answered(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def page(self) -> tuple[bytes, str]:
        """The text to serve and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
