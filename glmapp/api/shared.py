"""The Redis that front-end processes share with --redis-url (rate limits, response cache).

Notable choices:
- One client per process and URL from `redis.Redis.from_url` (its own connection pool, thread-safe), checked
  with a PING at start: a wrong URL stops the app with a message that names the host but never the password
  in the URL.
- While Redis is down, calls raise `unavailable()` errors: the rate limiter answers 503, the cache is skipped.
"""

from __future__ import annotations

import functools
from urllib.parse import urlsplit

from glmapp.ui.config import ConfigError

TIMEOUT_S = 5.0


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


@functools.lru_cache(maxsize=8)
def connect(url: str):
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        client.ping()
    except ValueError as e:
        raise ConfigError(f"--redis-url {safe_url(url)!r} is not a Redis URL ({e}); use redis://HOST:PORT/DB.") \
            from None
    except redis.RedisError as e:
        raise ConfigError(f"Cannot reach Redis at --redis-url {safe_url(url)!r}: {e}. Start it or fix the URL.") \
            from None
    return client


def unavailable() -> tuple[type[Exception], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError)
