"""ZeroGPU call durations: from the request's max new tokens and the measured decode rate, within the limits."""

import sys

import pytest

from glmapp.ui.zero_gpu import FIRST_RATE, MAX_S, MIN_S, gpu_duration, gpu_for


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


def test_on_zero_gpu_the_handler_asks_for_the_duration_of_its_request(stand_in_spaces):
    import spaces

    def handler(prompt, n_columns, max_new_tokens, *rest):
        return f"ran {max_new_tokens}"

    backend = Backend(30.0)
    wrapped = gpu_for(backend, 2)(handler)
    assert wrapped("hi", 2, 600) == "ran 600"
    backend.rate = 60.0
    wrapped("hi", 2, 600)
    assert wrapped(prompt="hi", n_columns=2, max_new_tokens=60) == "ran 60"
    assert spaces.asked == [gpu_duration(600, 30.0), gpu_duration(600, 60.0), gpu_duration(60, 60.0)]


def test_elsewhere_the_handler_is_left_as_it_is(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def handler():
        return 1

    assert gpu_for(Backend(30.0), 0)(handler) is handler


def test_on_zero_gpu_every_generation_handler_of_the_app_asks_for_its_requests_duration(stand_in_spaces, loaded_v2):
    """The app's chat, regenerate, edit, API chat, Compare and arena handlers are wrapped by `spaces.GPU` with a
    duration read from their own max-new-tokens argument (a wrong position would size every call alike)."""
    import spaces

    from glmapp.backends import LocalBackend
    from glmapp.ui.layout import build_ui

    wrapped = []
    real_gpu = spaces.GPU

    def recording_gpu(duration=60):
        def wrap(fn):
            wrapped.append((getattr(fn, "__name__", ""), duration))
            return real_gpu(duration=duration)(fn)
        return wrap

    spaces.GPU = recording_gpu
    backend = LocalBackend.for_model(*loaded_v2)
    build_ui(backend)
    names = {name for name, _ in wrapped}
    assert names == {"reply", "regenerate", "edit", "api_chat", "run"} and len(wrapped) == 6  # run: Compare, arena
    rate = backend.stats().get("decode_tokens_per_s")
    for name, duration in wrapped:
        at = {"reply": 3, "regenerate": 3, "edit": 3, "api_chat": 3}.get(name)
        if name == "run":  # Compare (prompt, n_columns, max_new_tokens, ...) or arena (prompt, max_new_tokens, ...)
            at = 2 if duration("p", 2, 900, "x") == gpu_duration(900, rate) else 1
            assert duration("p", 900, ["base"]) == gpu_duration(900, rate) or at == 2
        args = ["x"] * at + [900] + ["y"] * 3
        assert duration(*args) == gpu_duration(900, rate) != gpu_duration(5, rate), name
