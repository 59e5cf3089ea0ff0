"""The memory allocator of training processes: tcmalloc when the system has it, glibc's malloc otherwise.

Notable choices:
- Measured on CPU (bench/RESULTS.md, "Training memory and the allocator"): glibc's malloc keeps most of the
  memory a training step frees between the tensors it keeps (with gradient checkpointing a job's peak
  resident memory was 1.6x, over an int4 base 2.8x, that under tcmalloc), at the same tokens/s. tcmalloc (Debian/Ubuntu:
  libtcmalloc-minimal4) gives it back to the step's next tensors.
- A process cannot change its allocator once it runs, so the training CLI re-executes itself once with
  LD_PRELOAD set (same pid, argv and environment; `_MARK` stops a second time), and the Train tab's job
  runner starts its process with it. Library callers of `glmapp.train.run.train` keep their process's.
- `GLMAPP_ALLOCATOR=system` keeps glibc's malloc everywhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
_MARK = "GLMAPP_ALLOCATOR_SET"


def tcmalloc_path() -> str | None:
    """The path of the system's tcmalloc, or None (also when GLMAPP_ALLOCATOR=system or not on Linux)."""
    if os.environ.get("GLMAPP_ALLOCATOR", "").lower() == "system" or not sys.platform.startswith("linux"):
        return None
    for folder in _DIRS:
        for name in _NAMES:
            if (Path(folder) / name).is_file():
                return str(Path(folder) / name)
    return None


def in_use(pid: int | str = "self") -> str:
    """"tcmalloc" when the process `pid` has tcmalloc mapped, else "glibc malloc"."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "glibc malloc"
    return "tcmalloc" if "libtcmalloc" in maps else "glibc malloc"


def with_tcmalloc(env: dict[str, str]) -> dict[str, str]:
    """A copy of `env` whose processes start with tcmalloc, when the system has it."""
    path = tcmalloc_path()
    if path is None or path in env.get("LD_PRELOAD", ""):
        return dict(env)
    preload = " ".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
    return {**env, "LD_PRELOAD": preload, _MARK: "1"}


def reexec_with_tcmalloc(argv: list[str]) -> None:
    """Replace this process by `python -m glmapp *argv` with tcmalloc preloaded; return when it cannot or
    need not (tcmalloc absent or already in use, or this process was started that way already)."""
    if os.environ.get(_MARK) or in_use() == "tcmalloc" or tcmalloc_path() is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "glmapp", *argv], with_tcmalloc(dict(os.environ)))


def describe() -> str:
    """One line for a training log: the allocator in use, and how to get tcmalloc when it is not."""
    if in_use() == "tcmalloc":
        return "Memory allocator: tcmalloc"
    return ("Memory allocator: glibc malloc (it can hold up to three times the memory a CPU job needs; install "
            "libtcmalloc-minimal4 to use less)")
