"""The OpenAI-compatible HTTP API, served by the web app's own server on the same engine.

`build_router(backend, keys, limiter)` makes the routes (`routes.py`); `schemas.py` holds the request and
response bodies, `generation.py` turns a request into engine requests, `keys.py` checks bearer keys,
`limits.py` rate-limits each key, `cache.py` keeps deterministic answers, `tools.py` maps ChatGLM3 tool calls,
`shared.py` connects to the Redis that front ends share, `metrics.py` serves /metrics.
"""

from glmapp.api.cache import response_cache
from glmapp.api.keys import KeyCheck
from glmapp.api.limits import RateLimiter
from glmapp.api.routes import build_router

__all__ = ["KeyCheck", "RateLimiter", "build_router", "response_cache"]
