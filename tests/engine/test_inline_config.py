"""--engine threaded|inline|auto (env GLMAPP_ENGINE): auto is inline only on ZeroGPU."""

import sys

import pytest

from glmapp.ui.config import ConfigError, engine_mode, load_config


@pytest.fixture
def spaces_importable(tmp_path, monkeypatch):
    (tmp_path / "spaces.py").write_text("def GPU(fn=None, duration=60):\n    return fn\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("spaces", None)


def test_auto_is_threaded_off_zero_gpu():
    assert engine_mode("auto", {}) == "threaded"
    assert engine_mode("auto", {"SPACES_ZERO_GPU": "true"}) == "threaded"  # no spaces package here
    assert load_config([], {}).engine_config().inline is False


def test_auto_is_inline_with_the_spaces_package_and_spaces_zero_gpu(spaces_importable):
    assert engine_mode("auto", {"SPACES_ZERO_GPU": "true"}) == "inline"
    assert engine_mode("auto", {}) == "threaded"
    assert load_config([], {"SPACES_ZERO_GPU": "1"}).engine_config().inline is False  # os.environ has none
    assert engine_mode("threaded", {"SPACES_ZERO_GPU": "true"}) == "threaded"


def test_the_flag_beats_the_environment_and_forces_a_mode():
    assert load_config(["--engine", "inline"], {}).engine_config().inline is True
    assert load_config([], {"GLMAPP_ENGINE": "inline"}).engine_config().inline is True
    assert load_config(["--engine", "threaded"], {"GLMAPP_ENGINE": "inline"}).engine_config().inline is False


def test_an_unknown_engine_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"--engine must be one of auto, threaded, inline \(got 'fast'\)"):
        load_config(["--engine", "fast"], {})
