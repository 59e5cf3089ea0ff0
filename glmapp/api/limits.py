"""Per-client rate limits of the API (--rate-limit-rpm, --rate-limit-tpm): token buckets in this process.

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
- The clock is injectable (tests advance it instead of sleeping).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from glmapp.api.generation import APIError

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
    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None,
                 clock: Callable[[], float] = time.monotonic, window_s: float = 60.0):
        self.rpm, self.tpm, self.clock, self.window_s = requests_per_minute, tokens_per_minute, clock, window_s
        self._buckets: dict[str, dict[str, TokenBucket]] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, config) -> RateLimiter | None:
        if config.rate_limit_rpm is None and config.rate_limit_tpm is None:
            return None
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
        with self._lock:
            now = self.clock()
            buckets = self._client(client, now)
            need = {"requests": 1, "tokens": tokens}
            waits = {kind: bucket.wait(need[kind]) for kind, bucket in buckets.items()}
            if any(waits.values()):
                kind = max(waits, key=waits.get)
                retry_after = max(1, math.ceil(waits[kind] - EPSILON))
                limit = self.rpm if kind == "requests" else self.tpm
                raise RateLimited(f"Rate limit of {limit} {kind} per minute reached for this "
                                  f"{'API key' if client.startswith('key:') else 'client'}: try again in "
                                  f"{retry_after} s.", kind, retry_after)
            for kind, bucket in buckets.items():
                bucket.level -= need[kind]

    def refund(self, client: str, tokens: int) -> None:
        """Give back tokens an admitted request did not use."""
        if tokens <= 0 or self.tpm is None:
            return
        with self._lock:
            buckets = self._client(client, self.clock())
            bucket = buckets["tokens"]
            bucket.level = min(bucket.capacity, bucket.level + tokens)


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
