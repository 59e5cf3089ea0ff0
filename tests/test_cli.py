"""`glmapp` command line, run as a real subprocess (no stdin tty, as in CI)."""

import os
import subprocess
import sys

import pytest


def run(*args, stdin="", timeout=180):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "glmapp", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_make_demo_writes_the_official_layout_deterministically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        proc = run("make-demo", "--family", "chatglm3", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in a.iterdir())
    assert names == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_chat_streams_replies_and_keeps_history(demo_v2):
    proc = run("chat", "--model", str(demo_v2), "--max-new-tokens", "8", "--temperature", "0",
               stdin="你好\nclear\nHello there\nexit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ChatGLM: ") == 2
    assert "(history cleared)" in proc.stdout
    assert "tok/s" in proc.stderr


def test_chat_reports_bad_input_and_keeps_going(demo_v2):
    proc = run("chat", "--model", str(demo_v2), "--max-new-tokens", "4", stdin="   \nhi\nexit\n")
    assert proc.returncode == 0
    assert "[error] Empty message" in proc.stdout
    assert proc.stdout.count("ChatGLM: ") == 2  # the empty one errored, the next one answered


@pytest.mark.parametrize("model,expect", [("/no/such/folder", "Model folder not found"),
                                          ("THUDM/chatglm2-6b", "Hugging Face cache")])
def test_missing_weights_say_what_was_looked_for_and_offer_the_demo(model, expect):
    proc = run("chat", "--model", model, stdin="")
    assert proc.returncode == 2
    assert expect in proc.stderr and "--demo" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags", [["--demo"], []])
def test_demo_flag_or_missing_default_model_uses_the_demo_checkpoint(tmp_path, flags):
    env_cache = {"GLMAPP_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "glmapp", "chat", *flags, "--max-new-tokens", "4"],
                          input="hi\n", capture_output=True, text=True, timeout=180, env={**os.environ, **env_cache})
    assert proc.returncode == 0, proc.stderr
    assert "[demo]" in proc.stderr and "random weights" in proc.stderr
    assert (tmp_path / "chatglm2-demo-tiny" / "config.json").is_file()
