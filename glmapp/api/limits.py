"""Per-client rate limits of the API (--rate-limit-rpm, --rate-limit-tpm): token buckets in this process, or in
Redis with --redis-url so that several front-end processes share them.

Notable choices:
- A client is its API key, or its address when the API is open (no key). Each has two buckets that refill
  evenly over a minute: requests and tokens. A full bucket allows a burst of a whole minute's budget.
- Only generation requests (/v1/chat/completions, /v1/completions) are limited; a request that breaks a
  limit takes nothing from either bucket and gets a 429 whose `Retry-After` is the seconds until both
  buckets hold enough again (rounded up).
- Tokens are counted when a request is admitted as its prompt tokens plus the most it may generate
  (`max_tokens` times `n`; without `max_tokens`, all the room the context leaves), so running requests never
  exceed the limit; what a request did not generate is given back when it ends. A request that needs more
  than a whole minute's tokens can never pass: a 400 that says to lower `max_tokens`, not a 429 that a
  client would retry forever.
- The clock is injectable (tests advance it instead of sleeping). In Redis, one Lua script per admission or
  refund reads and updates a client's buckets atomically on Redis' own clock (`TIME`), so front ends on other
  machines agree; a client's buckets expire after a window idle (they would be full again anyway).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from glmapp.api.generation import APIError

log = logging.getLogger(__name__)

EPSILON = 1e-6  # refills are float sums: 30 s at 2/min may come to 0.9999999 of a request
MAX_CLIENTS = 10_000  # past this many buckets, the full ones (clients idle for a minute) are forgotten


@dataclass
class TokenBucket:
    capacity: float
    per_second: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = now

    def wait(self, amount: float) -> float:
        """Seconds until `amount` is in the bucket (0: it is now); call refill first."""
        missing = amount - self.level
        return 0.0 if missing <= EPSILON else missing / self.per_second


class RateLimiter:
    blocking = False  # in this process: the API calls it on the event loop

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None,
                 clock: Callable[[], float] = time.monotonic, window_s: float = 60.0):
        self.rpm, self.tpm, self.clock, self.window_s = requests_per_minute, tokens_per_minute, clock, window_s
        self._buckets: dict[str, dict[str, TokenBucket]] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, config) -> RateLimiter | None:
        """The limits of the config: None without limits; shared through Redis with --redis-url."""
        if config.rate_limit_rpm is None and config.rate_limit_tpm is None:
            return None
        if getattr(config, "redis_url", None):
            from glmapp.api.shared import connect

            return RedisRateLimiter(connect(config.redis_url), config.rate_limit_rpm, config.rate_limit_tpm)
        return cls(config.rate_limit_rpm, config.rate_limit_tpm)

    def _client(self, client: str, now: float) -> dict[str, TokenBucket]:
        buckets = self._buckets.get(client)
        if buckets is None:
            if len(self._buckets) >= MAX_CLIENTS:
                self._forget_idle(now)
            limits = {"requests": self.rpm, "tokens": self.tpm}
            buckets = self._buckets[client] = {kind: TokenBucket(limit, limit / self.window_s, limit, now)
                                               for kind, limit in limits.items() if limit is not None}
        for bucket in buckets.values():
            bucket.refill(now)
        return buckets

    def _forget_idle(self, now: float) -> None:
        for client, buckets in list(self._buckets.items()):
            for bucket in buckets.values():
                bucket.refill(now)
            if all(b.level >= b.capacity for b in buckets.values()):
                del self._buckets[client]

    def admit(self, client: str, tokens: int) -> None:
        """Take one request and `tokens` from `client`'s buckets, or raise APIError (429, or 400 if never)."""
        if self.tpm is not None and tokens > self.tpm:
            raise APIError(400, f"This request may use {tokens} tokens (its prompt plus max_tokens for each "
                                f"choice), over this server's limit of {self.tpm} tokens per minute: set a lower "
                                "max_tokens (or n).", "max_tokens", "rate_limit_exceeded")
        refused = self._take(client, tokens)
        if refused is not None:
            kind, wait = refused
            retry_after = max(1, math.ceil(wait - EPSILON))
            limit = self.rpm if kind == "requests" else self.tpm
            raise RateLimited(f"Rate limit of {limit} {kind} per minute reached for this "
                              f"{'API key' if client.startswith('key:') else 'client'}: try again in "
                              f"{retry_after} s.", kind, retry_after)

    def _take(self, client: str, tokens: int) -> tuple[str, float] | None:
        """Take from the buckets if both hold enough; else (the limit that was reached, seconds to wait)."""
        with self._lock:
            now = self.clock()
            buckets = self._client(client, now)
            need = {"requests": 1, "tokens": tokens}
            waits = {kind: bucket.wait(need[kind]) for kind, bucket in buckets.items()}
            if any(waits.values()):
                kind = max(waits, key=waits.get)
                return kind, waits[kind]
            for kind, bucket in buckets.items():
                bucket.level -= need[kind]
            return None

    def refund(self, client: str, tokens: int) -> None:
        """Give back tokens an admitted request did not use."""
        if tokens <= 0 or self.tpm is None:
            return
        self._give(client, tokens)

    def _give(self, client: str, tokens: int) -> None:
        with self._lock:
            buckets = self._client(client, self.clock())
            bucket = buckets["tokens"]
            bucket.level = min(bucket.capacity, bucket.level + tokens)


# KEYS[1]: the client's hash; ARGV: rpm, tpm (-1: no limit), tokens, window seconds, "admit" | "refund".
_BUCKETS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window, admit = tonumber(ARGV[4]), ARGV[5] == 'admit'
local kinds = {{'requests', tonumber(ARGV[1]), 1}, {'tokens', tonumber(ARGV[2]), tonumber(ARGV[3])}}
local levels, worst, worst_kind = {}, 0, ''
for i, k in ipairs(kinds) do
  local cap = k[2]
  if cap >= 0 then
    local level = tonumber(redis.call('HGET', KEYS[1], k[1]))
    local updated = tonumber(redis.call('HGET', KEYS[1], k[1] .. ':t'))
    if level == nil or updated == nil then level, updated = cap, now end
    level = math.min(cap, level + math.max(0, now - updated) * cap / window)
    levels[i] = level
    local missing = k[3] - level
    if admit and missing > 1e-6 and missing / (cap / window) > worst then
      worst, worst_kind = missing / (cap / window), k[1]
    end
  end
end
if worst > 0 then return {worst_kind, tostring(worst)} end
for i, k in ipairs(kinds) do
  if levels[i] ~= nil then
    local level = levels[i]
    if admit then level = level - k[3] elseif k[1] == 'tokens' then level = math.min(k[2], level + k[3]) end
    redis.call('HSET', KEYS[1], k[1], tostring(level), k[1] .. ':t', tostring(now))
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return {'', '0'}
"""


class RedisRateLimiter(RateLimiter):
    """The same token buckets in Redis, shared by every front end that uses the same Redis."""
    blocking = True  # its calls wait on the network: the API makes them off the event loop

    def __init__(self, redis, requests_per_minute: int | None, tokens_per_minute: int | None,
                 window_s: float = 60.0, prefix: str = "glmapp:limits:"):
        super().__init__(requests_per_minute, tokens_per_minute, window_s=window_s)
        self.redis, self.prefix = redis, prefix
        self._script = redis.register_script(_BUCKETS_LUA)

    def _run(self, client: str, tokens: int, mode: str) -> list:
        from glmapp.api.shared import unavailable

        args = [-1 if self.rpm is None else self.rpm, -1 if self.tpm is None else self.tpm, tokens, self.window_s, mode]
        try:
            return self._script(keys=[self.prefix + client], args=args)
        except unavailable() as e:
            raise APIError(503, "The rate limiter's Redis cannot be reached; try again in a moment.",
                           code="rate_limiter_unavailable") from e

    def _take(self, client: str, tokens: int) -> tuple[str, float] | None:
        kind, wait = self._run(client, tokens, "admit")
        return (kind.decode(), float(wait)) if kind else None

    def _give(self, client: str, tokens: int) -> None:
        try:
            self._run(client, tokens, "refund")
        except APIError:  # the request is over; its client gets the tokens back as the bucket refills
            log.warning("Giving back %d unused tokens failed: Redis cannot be reached.", tokens)


class RateLimited(APIError):
    """429 in OpenAI's format, with the seconds to wait for the `Retry-After` header."""

    def __init__(self, message: str, kind: str, retry_after: int):
        super().__init__(429, message, code="rate_limit_exceeded")
        self.kind, self.retry_after = kind, retry_after

    def body(self) -> dict:
        body = super().body()
        body["error"]["type"] = self.kind  # OpenAI's: "requests" or "tokens", the limit that was reached
        return body

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}
