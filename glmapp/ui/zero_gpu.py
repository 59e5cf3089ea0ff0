"""ZeroGPU: how long a generation asks the GPU for, from its request and the measured decode rate.

On ZeroGPU the app's backend is wrapped (`zero_gpu_backend`, glmapp.backends.gpu_call): each chat reply or
Compare run is one `spaces.GPU` call around the model work alone, so the handlers stay in the main process.

Notable choices:
- `spaces.GPU(duration=...)` takes a function of the call's own arguments (ZeroGPU calls it before the call):
  ours reads the call's largest max new tokens and the decode rate the inline engine measured on earlier calls
  (`stats()["decode_tokens_per_s"]`, shared with ZeroGPU's worker processes). A shorter duration gets a visitor the GPU sooner; one too short aborts the reply, hence the margin.
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


def zero_gpu_backend(backend):
    """On ZeroGPU, `backend` with each generation in a `spaces.GPU` call (duration from its max new tokens and
    the measured decode rate); elsewhere `backend` as it is."""
    if not on_zero_gpu():
        return backend
    from glmapp.backends.gpu_call import on_gpu_calls

    def duration_of(max_new_tokens) -> int:
        try:
            rate = backend.stats().get("decode_tokens_per_s")
        except Exception:  # noqa: BLE001 - still loading or reloading: size the call without a measurement
            rate = None
        return gpu_duration(max_new_tokens, rate)

    return on_gpu_calls(backend, duration_of)
