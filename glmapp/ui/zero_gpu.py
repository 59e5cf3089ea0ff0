"""ZeroGPU: how long a generation handler asks the GPU for, from its request and the measured decode rate.

Notable choices:
- `spaces.GPU(duration=...)` takes a function of the handler's own arguments (ZeroGPU calls it before the call):
  `gpu_for` builds one that reads the call's max new tokens (by position or keyword) and the decode rate the
  inline engine measured on earlier calls (`stats()["decode_tokens_per_s"]`, shared with ZeroGPU's worker
  processes). A shorter duration gets a visitor the GPU sooner; one too short aborts the reply, hence the margin.
- Before any call finished, the rate is a cautious guess (`FIRST_RATE`); durations stay within ZeroGPU's limits.
- The `spaces` package is imported only where it is installed; elsewhere the decorator changes nothing.
"""

from __future__ import annotations

import importlib.util
import math
import os

MIN_S, MAX_S = 10, 120  # ZeroGPU: calls under 60 s queue with priority; 120 s is the cap for visitors
START_S = 8.0  # weights onto the GPU, the prompt's prefill, first-token latency
MARGIN = 1.3  # slack on the measured rate (another visitor's call may share the machine)
FIRST_RATE = 10.0  # tokens/s assumed before a call has measured one (a 6B model in bf16 decodes faster)
DEFAULT_MAX_NEW = 512  # when the call's value is missing or not a number (the handler then refuses it)


def gpu_duration(max_new_tokens, decode_tokens_per_s: float | None) -> int:
    """Seconds of GPU to ask for a call that may write `max_new_tokens` at the measured rate (MIN_S..MAX_S)."""
    try:
        tokens = max(0.0, float(max_new_tokens))
    except (TypeError, ValueError):
        tokens = DEFAULT_MAX_NEW
    if math.isnan(tokens):
        tokens = DEFAULT_MAX_NEW
    rate = decode_tokens_per_s if decode_tokens_per_s and decode_tokens_per_s > 0 else FIRST_RATE
    return int(min(MAX_S, max(MIN_S, math.ceil(START_S + MARGIN * tokens / rate))))


def on_zero_gpu(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get("SPACES_ZERO_GPU", "") != "" and importlib.util.find_spec("spaces") is not None


def gpu_for(backend, max_new_tokens_at: int, keyword: str = "max_new_tokens"):
    """A decorator for a generation handler: `spaces.GPU` with a duration from the call's max new tokens (the
    positional argument at `max_new_tokens_at`, else the keyword) on ZeroGPU; elsewhere the handler as it is."""
    if not on_zero_gpu():
        return lambda fn: fn
    import spaces  # type: ignore[import-not-found]

    def duration(*args, **kwargs) -> int:
        value = args[max_new_tokens_at] if len(args) > max_new_tokens_at else kwargs.get(keyword)
        try:
            rate = backend.stats().get("decode_tokens_per_s")
        except Exception:  # noqa: BLE001 - the model is reloading: size the call without a measurement
            rate = None
        return gpu_duration(value, rate)

    return spaces.GPU(duration=duration)
