"""Every shell command glmapp tells a user to run exists after the README's install (#14 items 2, 4).

Commands are collected from where users read them: the hint constants in glmapp/commands.py, the real
checkpoint errors and the demo banner (backticked spans), and the README (bash blocks and inline commands).
Each program must be on PATH and its subcommand must answer `--help`; `glmapp` and `hf` are run from a
folder outside the repository.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from glmapp import commands
from glmapp.checkpoint import resolve
from glmapp.errors import CheckpointError

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
# First words of the commands the README names inline (an inline span like `import glmapp.chat` is code).
SHELL_PROGRAMS = ("python", "python3", "pip", "bash", "hf", "huggingface-cli", "glmapp")


def backticked_commands(message: str) -> list[str]:
    """`...` spans of a message that are commands: a word, then arguments (not a lone `--flag`)."""
    return [span for span in re.findall(r"`([^`]+)`", message) if re.match(r"[a-z][\w.-]* \S", span)]


def message_commands() -> list[str]:
    from glmapp.ui.model_handlers import demo_banner

    found = [commands.MAKE_DEMO, commands.RUN_APP, commands.RUN_APP_WITH_MODEL, commands.download()]
    for model in ("/no/such/folder", "THUDM/no-such-model"):  # tests run offline: both raise
        with pytest.raises(CheckpointError) as error:
            resolve(model)
        found += backticked_commands(str(error.value))
    found += backticked_commands(demo_banner(SimpleNamespace(demo=True, notice=None)))
    return found


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a line ending in a backslash goes on
            line = line.split(" # ")[0].strip()
            # Commands of programs the README's install provides; others (curl in the API examples) are the
            # user's own tools.
            parts = [part.strip() for part in line.split("&&")]
            found += [part for part in parts if part and part.split()[0] in SHELL_PROGRAMS]
    found += [span for span in re.findall(r"`([^`\n]+)`", text) if span.split()[0] in SHELL_PROGRAMS]
    return found


def help_call(command: str) -> tuple[list[str], bool]:
    """The `--help` call that proves `command` exists (empty: only a file to check), and whether it must run
    in the repository folder (`python app.py`, `python -m glmapp`) rather than anywhere."""
    words = shlex.split(command)
    program, args = words[0], words[1:]
    assert shutil.which(program), f"{program!r} (from `{command}`) is not on PATH"
    if program in ("python", "python3"):
        if args[0] == "-m":
            sub = [w for w in args[2:3] if re.fullmatch(r"[a-z][a-z-]*", w)]
            return [sys.executable, "-m", args[1], *sub, "--help"], True
        return [sys.executable, args[0], "--help"], True
    if program == "bash":  # running the script would run the test suite: check that it is there
        assert (REPO_ROOT / args[0]).is_file(), command
        return [], True
    sub = [w for w in args[:1] if re.fullmatch(r"[a-z][a-z-]*", w)]
    return [program, *sub, "--help"], False


def test_collects_the_commands_messages_name():
    named = " | ".join(message_commands())
    assert "hf download THUDM/chatglm2-6b" in named and "glmapp make-demo --out DIR" in named
    assert "hf download THUDM/no-such-model" in named  # the error names the model the user asked for
    readme = " | ".join(readme_commands())
    assert "hf download THUDM/chatglm2-6b" in readme and "glmapp chat --model" in readme


def test_every_command_users_are_told_to_run_exists_after_the_readme_install(tmp_path):
    calls = {}
    for command in message_commands() + readme_commands():
        argv, in_repo = help_call(command)
        if argv:
            calls[tuple(argv)] = (REPO_ROOT if in_repo else tmp_path, command)
    assert any(argv[:2] == ("hf", "download") for argv in calls)
    for argv, (cwd, command) in calls.items():
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "120"})
        assert proc.returncode == 0, f"`{command}`: {' '.join(argv)} failed in {cwd}:\n{proc.stderr[-2000:]}"


def test_the_glmapp_command_works_outside_the_repository(tmp_path):
    for argv in (["glmapp", "--help"], ["glmapp", "make-demo", "--help"]):
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "usage: glmapp" in proc.stdout
    out = tmp_path / "demo"
    proc = subprocess.run(["glmapp", "make-demo", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file()
