"""`glmapp` command line, run as a real subprocess (no stdin tty, as in CI)."""

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glmapp.cli import printable

REPO_ROOT = Path(__file__).resolve().parent.parent


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


# ---- --help: instant, with the defaults (#14 item 6) ------------------------------------------------------

HEAVY = ("torch", "transformers", "gradio")
# Runs an entry point the way the shell does (runpy, as `python app.py` / `python -m glmapp`), then reports
# which heavy packages its --help imported.
HELP_PROBE = """
import runpy, sys
entry, *argv = sys.argv[1:]
sys.argv = [entry, *argv]
try:
    if entry.endswith(".py"):
        runpy.run_path(entry, run_name="__main__")
    else:
        runpy.run_module(entry, run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code in (0, None), e.code
print("IMPORTED:", sorted(m for m in %r if m in sys.modules), file=sys.stderr)
""" % (HEAVY,)


def help_of(*entry_and_args):
    env = {**os.environ, "COLUMNS": "250"}  # one help entry per line, whatever the terminal
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, *entry_and_args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED: []" in proc.stderr, proc.stderr  # no torch, transformers or gradio for --help
    return proc.stdout


def help_entry(out: str, flag: str) -> str:
    """The help text of one option, on one line (argparse wraps long option names onto the next line)."""
    entries = re.split(r"\n(?=  -)", out)
    return " ".join(next(e for e in entries if e.strip().startswith(flag + " ") or e.strip() == flag).split())


def test_app_help_shows_the_defaults_without_importing_torch_transformers_or_gradio():
    out = help_of("app.py", "--help")
    for flag, default in [("--host", "127.0.0.1"), ("--port", "7860"), ("--max-concurrency", "4"),
                          ("--max-new-tokens", "2048"), ("--dtype", "auto")]:
        assert f"(default: {default})" in help_entry(out, flag), help_entry(out, flag)
    description = " ".join(out.split())
    assert "temperature 0.95, top_p 0.8" in description and "temperature 0.6" in description  # slider starts


def test_chat_help_shows_the_defaults_and_the_chat_commands_without_importing_torch():
    out = help_of("glmapp", "chat", "--help")
    for flag, default in [("--max-length", "8192"), ("--top-k", "0"), ("--repetition-penalty", "1.0")]:
        assert f"(default: {default})" in help_entry(out, flag), help_entry(out, flag)
    # the app's slider starts (the official demos' values), one set of defaults for both
    assert "chatglm2 0.95, chatglm3 0.6" in " ".join(help_entry(out, "--temperature").split())
    assert "chatglm2 0.8, chatglm3 0.8" in " ".join(help_entry(out, "--top-p").split())
    assert "--max-new-tokens" in out and "what --max-length leaves" in out
    assert "`clear`" in out and "`exit`" in out
    top = help_of("glmapp", "--help")
    assert "`clear`" in top and "`exit`" in top
    help_of("glmapp", "make-demo", "--help")


# ---- control characters in replies (#14 item 7) -----------------------------------------------------------

RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def test_printable_escapes_control_characters_and_keeps_text_newlines_and_tabs():
    assert printable("a\x07b\x0c\x7f\x1b[2J\x85") == "a\\x07b\\x0c\\x7f\\x1b[2J\\x85"
    assert printable("right\u202eto-left\r") == "right\\u202eto-left\\r"
    text = "你好, world\n\tcode 👩\u200d💻 é"  # newline, tab, CJK and an emoji joined by ZWJ stay as they are
    assert printable(text) == text


@pytest.fixture(scope="module")
def bell_model(demo_v2, tmp_path_factory):
    """demo_v2 changed so that greedy decoding produces only BEL or ESC byte tokens: the final norm keeps one
    hidden unit, and its sign picks the BEL row or the ESC row of the output layer."""
    from safetensors.torch import load_file, save_file

    from glmapp.tokenizer import ChatGLMTokenizer

    out = tmp_path_factory.mktemp("bell-model")
    shutil.copytree(demo_v2, out, dirs_exist_ok=True)
    tokenizer = ChatGLMTokenizer.from_pretrained(out, family="chatglm2")
    bel, esc = tokenizer.convert_tokens_to_ids("<0x07>"), tokenizer.convert_tokens_to_ids("<0x1B>")
    shard = next(p for p in out.glob("*.safetensors") if "transformer.output_layer.weight" in load_file(p))
    tensors = load_file(shard)
    norm = torch.zeros_like(tensors["transformer.encoder.final_layernorm.weight"])
    norm[0] = 1.0
    head = torch.zeros_like(tensors["transformer.output_layer.weight"])
    head[bel, 0], head[esc, 0] = 100.0, -100.0
    tensors.update({"transformer.encoder.final_layernorm.weight": norm, "transformer.output_layer.weight": head})
    save_file(tensors, shard, metadata={"format": "pt"})
    return out


def test_piped_chat_prints_a_clean_transcript_with_the_queries_and_escaped_controls(bell_model):
    proc = run("chat", "--model", str(bell_model), "--max-new-tokens", "6", "--temperature", "0",
               stdin="hi\nexit\n")
    assert proc.returncode == 0, proc.stderr
    assert "User: hi\nChatGLM: " in proc.stdout  # piped input is echoed, so the transcript reads
    reply = proc.stdout.split("ChatGLM: ", 1)[1].split("\n", 1)[0]
    assert reply and re.fullmatch(r"(\\x07|\\x1b)+", reply), reply  # what the model produced, escaped
    assert not RAW_CONTROLS.search(proc.stdout), repr(proc.stdout)


def test_terminal_chat_never_sends_control_characters_to_the_terminal(bell_model):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "glmapp", "chat", "--model", str(bell_model), "--max-new-tokens",
                             "6", "--temperature", "0"], stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(slave)
    os.write(master, b"hi\nexit\n")  # the terminal buffers the lines until the chat reads them
    seen = b""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the chat exited and closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    text = seen.decode("utf-8", "replace")
    assert "ChatGLM: " in text, text
    reply = text.split("ChatGLM: ", 1)[1]
    assert "\\x07" in reply or "\\x1b" in reply, repr(reply)
    assert not re.search("[\x07\x0c\x1b\x7f]", text), repr(text)  # \r is the terminal's own (newline -> \r\n)
