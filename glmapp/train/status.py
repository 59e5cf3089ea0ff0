"""The state of a training output folder, read from its training.json and trainer_log.jsonl (no torch).

The adapter picker (`glmapp.adapters.list_adapters`) uses it to show a run that has not finished as
unavailable, with how to resume it, instead of offering a half-written adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE_FILE = "training.json"
LOG_FILE = "trainer_log.jsonl"


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_step(folder: Path) -> tuple[int, int] | None:
    """(step, total steps) of the newest line of trainer_log.jsonl, or None."""
    try:
        lines = (folder / LOG_FILE).read_text(encoding="utf-8").strip().splitlines()
        entry = json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError):
        return None
    return (entry["step"], entry["total_steps"]) if entry else None


def unfinished(folder: Path, shown_as: str) -> str | None:
    """Why `folder` holds no usable adapter yet when it is a training run that has not completed, else None.

    `shown_as`: the folder as the user should type it (never a server path)."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(state, dict) or state.get("status") == "complete":
        return None
    step = last_step(folder)
    where = f" at step {step[0]} of {step[1]}" if step else ""
    if state.get("status") == "running" and _alive(state.get("pid")):
        return f"training in progress{where}"
    return (f"training stopped{where} before the adapter was written; resume with "
            f"`glmapp train --config {shown_as}/train_config.yaml --resume`")
