"""Who may call the API: --api-key / --api-keys-file and --auth, as plain functions."""

from __future__ import annotations

import socket

import pytest

from glmapp.api.generation import APIError
from glmapp.api.keys import KeyCheck
from glmapp.ui.config import AppConfig, ConfigError, load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refusal(check: KeyCheck, header: str | None) -> APIError:
    with pytest.raises(APIError) as e:
        check.check(header)
    assert e.value.status == 401
    return e.value


def test_no_key_and_no_login_leaves_the_api_open():
    KeyCheck.of(AppConfig()).check(None)


def test_login_without_a_key_refuses_every_call_and_says_to_set_one():
    check = KeyCheck.of(AppConfig(auth=["alice:s3cret"]))
    for header in (None, "Bearer anything"):
        assert "--api-key" in refusal(check, header).message


def test_keys_from_flags_environment_and_file(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nsk-file-1\n\n  sk-file-2  \n")
    config = load_config(["--api-key", "sk-flag", "--api-keys-file", str(keys_file)])
    check = KeyCheck.of(config)
    for key in ("sk-flag", "sk-file-1", "sk-file-2"):
        check.check(f"Bearer {key}")
    assert refusal(check, "Bearer sk-other").code == "invalid_api_key"
    assert refusal(check, None).code == "missing_api_key"
    assert refusal(check, "sk-flag").code == "missing_api_key"  # not a bearer header
    assert load_config([], {"GLMAPP_API_KEY": "a, b"}).api_key == ["a", "b"]


def test_an_unreadable_keys_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--api-keys-file"):
        KeyCheck.of(AppConfig(api_keys_file=str(tmp_path / "missing.txt")))


def test_the_app_launched_with_login_and_no_key_serves_the_api_refusing_anonymous_calls(tmp_path):
    """`launch` (what `python app.py` runs) puts the API on the web app's port."""
    import httpx

    from glmapp.ui import launch

    config = AppConfig(demo=True, port=_free_port(), auth=["alice:s3cret"], adapters_dir=str(tmp_path),
                       comparisons_file=str(tmp_path / "votes.jsonl"), data_dir=str(tmp_path / "data"))
    demo = launch(config, block=False, wait_for_model=True)
    try:
        url = f"http://127.0.0.1:{config.port}"
        response = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer guess"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "api_key_required"
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        assert httpx.get(url + "/config").status_code == 401  # the page still needs its login
    finally:
        demo.close()
