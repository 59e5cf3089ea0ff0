"""ZeroGPU call durations: from the request's max new tokens and the measured decode rate, within the limits."""

import sys

import pytest

from glmapp.ui.zero_gpu import FIRST_RATE, MAX_S, MIN_S, gpu_duration


def test_the_duration_grows_with_max_new_tokens_and_shrinks_with_the_rate():
    assert gpu_duration(600, 30.0) == 8 + 26  # START_S + 1.3 * 600 / 30
    assert gpu_duration(600, 60.0) < gpu_duration(600, 30.0) < gpu_duration(1200, 30.0)


def test_before_a_measurement_a_cautious_rate_is_assumed():
    assert gpu_duration(100, None) == gpu_duration(100, 0.0) == gpu_duration(100, FIRST_RATE) == 8 + 13


def test_durations_stay_within_zero_gpus_limits():
    assert gpu_duration(1, 1000.0) == MIN_S
    assert gpu_duration(100_000, 30.0) == MAX_S


@pytest.mark.parametrize("bad", [None, "lots", float("nan"), -5])
def test_a_bad_value_still_gets_a_duration(bad):
    assert MIN_S <= gpu_duration(bad, 30.0) <= MAX_S


class Backend:
    def __init__(self, rate):
        self.rate = rate

    def stats(self):
        return {"decode_tokens_per_s": self.rate}


@pytest.fixture
def stand_in_spaces(tmp_path, monkeypatch):
    """A `spaces` module whose GPU(duration=f) records the duration f gives for each call, then runs the call."""
    (tmp_path / "spaces.py").write_text(
        "asked = []\n"
        "def GPU(duration=60):\n"
        "    def wrap(fn):\n"
        "        def call(*args, **kwargs):\n"
        "            asked.append(duration(*args, **kwargs) if callable(duration) else duration)\n"
        "            return fn(*args, **kwargs)\n"
        "        return call\n"
        "    return wrap\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    sys.modules.pop("spaces", None)
    yield
    sys.modules.pop("spaces", None)


def greedy(n: int) -> dict:
    from glmapp.engine.sampling import SamplingParams

    return dict(max_new_tokens=n, params=SamplingParams(temperature=0.0))


def test_elsewhere_the_backend_is_left_as_it_is(monkeypatch):
    from glmapp.ui.zero_gpu import zero_gpu_backend

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    backend = Backend(30.0)
    assert zero_gpu_backend(backend) is backend


def test_on_zero_gpu_a_compare_run_is_one_gpu_call_sized_by_its_longest_column(stand_in_spaces, loaded_v2):
    """The model work alone goes into the call (the handlers stay outside): both columns in one call, whose
    duration is that of the longest column, with the same greedy text as the backend gives unwrapped."""
    import spaces

    from glmapp.backends import LocalBackend
    from glmapp.backends.gpu_call import GpuCallBackend
    from glmapp.ui.zero_gpu import zero_gpu_backend

    backend = LocalBackend.for_model(*loaded_v2)
    wrapped = zero_gpu_backend(backend)
    assert isinstance(wrapped, GpuCallBackend) and wrapped.family == backend.family  # the rest passes through
    reasons = wrapped.quant_choices()
    assert "ZeroGPU" in reasons["bnb-nf4"] and "ZeroGPU" in reasons["bnb-int8"]
    assert reasons["int4"] == backend.quant_choices()["int4"]
    rate = backend.stats().get("decode_tokens_per_s")
    handles = []
    streams = wrapped.chat_streams("hello there", [], [greedy(5), greedy(40)], on_handle=handles.append)
    texts = [list(s)[-1].response for s in streams]
    assert spaces.asked == [gpu_duration(40, rate)] and gpu_duration(40, rate) != gpu_duration(5, rate)
    expected = [list(backend.chat_stream("hello there", [], **greedy(n)))[-1].response for n in (5, 40)]
    assert texts == expected and len({h.id for h in handles}) == 2 and all(h.done for h in handles)


def test_on_zero_gpu_a_bad_prompt_is_refused_before_any_gpu_call_and_stop_reaches_the_call(stand_in_spaces,
                                                                                         loaded_v2):
    import spaces

    from glmapp.backends import LocalBackend
    from glmapp.errors import InputError
    from glmapp.ui.zero_gpu import zero_gpu_backend

    wrapped = zero_gpu_backend(LocalBackend.for_model(*loaded_v2))
    with pytest.raises(InputError):
        wrapped.chat_stream("   ", [])
    assert spaces.asked == []
    handles = []
    stream = wrapped.chat_stream("hello", [], on_handle=handles.append, **greedy(5000))
    first = next(stream)
    handles[0].cancel()  # what Stop does
    last = first
    for last in stream:
        pass
    assert last.finish_reason == "cancelled" and last.usage.completion_tokens < 5000
