"""Response cache of the API (--response-cache-size N, 0 = off): repeated deterministic requests are answered
from it without running the model. An LRU in this process, or in Redis with --redis-url (shared by every front
end using it).

Notable choices:
- Only deterministic requests are cached: greedy (temperature 0) or seeded. The key is a SHA-256 over all that
  decides the answer: the route, the served model (name, dtype, quantization), the adapter, the prompt ids
  (messages and tools go through the chat template first, so equal prompts share an entry), the sampling
  settings, n, max_tokens and stop strings.
- An entry is the finished choices (text, finish reason, tool calls, token counts); a hit is replayed as a
  whole body or as a stream, with a new id. Only requests whose every choice ended normally are stored.
- In Redis, entries are strings under `glmapp:cache:<key>` with a sorted set of last uses that keeps the newest
  N (the oldest are deleted as new ones come), so N means the same in both stores. A Redis outage makes the
  cache miss, never fail a request.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading

log = logging.getLogger(__name__)


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def deterministic(body) -> bool:
    return body.temperature == 0 or body.seed is not None


class MemoryCache:
    blocking = False  # in this process: the API calls it on the event loop

    def __init__(self, size: int):
        self.size = size
        self._entries: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: dict) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


# KEYS[1]: the entry, KEYS[2]: the sorted set of last uses (scores: Redis' clock).
_GET_LUA = """
local value = redis.call('GET', KEYS[1])
if value then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], 'XX', tonumber(t[1]) + tonumber(t[2]) / 1000000, KEYS[1])
end
return value
"""
# ARGV: value, size.
_PUT_LUA = """
local t = redis.call('TIME')
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000, KEYS[1])
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[2])
if extra > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, extra - 1)
  redis.call('ZREM', KEYS[2], unpack(old))
  redis.call('DEL', unpack(old))
end
return extra
"""


class RedisCache:
    blocking = True  # its calls wait on the network: the API makes them off the event loop

    def __init__(self, redis, size: int, prefix: str = "glmapp:cache:"):
        self.redis, self.size, self.prefix = redis, size, prefix
        self._uses = prefix + "lru"
        self._get, self._put = redis.register_script(_GET_LUA), redis.register_script(_PUT_LUA)

    def get(self, key: str) -> dict | None:
        from glmapp.api.shared import unavailable

        try:
            value = self._get(keys=[self.prefix + key, self._uses])
        except unavailable() as e:
            log.warning("Response cache skipped: Redis cannot be reached (%s).", e)
            return None
        return json.loads(value) if value is not None else None

    def put(self, key: str, entry: dict) -> None:
        from glmapp.api.shared import unavailable

        try:
            self._put(keys=[self.prefix + key, self._uses], args=[json.dumps(entry, ensure_ascii=False), self.size])
        except unavailable() as e:
            log.warning("Response not cached: Redis cannot be reached (%s).", e)


def response_cache(config):
    """The cache the config asks for: None with --response-cache-size 0."""
    size = config.response_cache_size
    if not size:
        return None
    if config.redis_url:
        from glmapp.api.shared import connect

        return RedisCache(connect(config.redis_url), size)
    return MemoryCache(size)
