"""A training job run from the web app: `python -m glmapp train --config FILE` in its own process.

Notable choices:
- One job at a time per runner; a second start raises `TrainBusy` naming the running one.
- The chat server never imports the training code path that loads a model: a crash or out-of-memory in
  training ends that process only. The job goes on when the browser tab closes; the runner (held by the
  server) still knows it when the page is opened again.
- Progress is read from the files the run writes (trainer_log.jsonl, training.json) and from its stderr,
  captured into ADAPTERS/.jobs/NAME.log; the settings are written to ADAPTERS/.jobs/NAME.yaml first.
- Stop sends SIGINT (the run marks itself incomplete and keeps its checkpoints), then SIGKILL after a grace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmapp.allocator import with_tcmalloc
from glmapp.errors import GlmappError
from glmapp.train.config import TrainConfig, write_yaml
from glmapp.train.status import LOG_FILE, STATE_FILE


class TrainBusy(GlmappError):
    """A training job is already running."""


@dataclass
class TrainJob:
    name: str
    out: Path
    config_file: Path
    stderr_file: Path
    process: subprocess.Popen
    started: float = field(default_factory=time.time)

    def running(self) -> bool:
        return self.process.poll() is None


def read_log(out: Path) -> list[dict]:
    try:
        lines = (out / LOG_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the line being written
    return entries


class JobRunner:
    """Starts, follows and stops the one training process of this server."""

    def __init__(self, adapters_dir: str | Path):
        self.adapters_dir = Path(adapters_dir)
        self.job: TrainJob | None = None
        self._lock = threading.Lock()

    def ensure_idle(self) -> None:
        """Raise TrainBusy when a job is running."""
        if self.job is not None and self.job.running():
            raise TrainBusy(f"A training job is running ({self.job.name}); stop it or wait until it ends.")

    def start(self, config: TrainConfig, name: str) -> TrainJob:
        with self._lock:
            self.ensure_idle()
            jobs = self.adapters_dir / ".jobs"
            jobs.mkdir(parents=True, exist_ok=True)
            config_file, stderr_file = jobs / f"{name}.yaml", jobs / f"{name}.log"
            write_yaml(config, config_file)
            with open(stderr_file, "w") as err:
                process = subprocess.Popen([sys.executable, "-m", "glmapp", "train", "--config", str(config_file)],
                                           stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                           env=with_tcmalloc({**os.environ, "PYTHONUNBUFFERED": "1"}))
            self.job = TrainJob(name, Path(config.out), config_file, stderr_file, process)
            return self.job

    def stop(self, grace_s: float = 30.0) -> bool:
        """Stop the running job (SIGINT, SIGKILL after `grace_s`); False when none was running."""
        job = self.job
        if job is None or not job.running():
            return False
        job.process.send_signal(signal.SIGINT)
        try:
            job.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait(timeout=grace_s)
        return True

    def progress(self) -> dict | None:
        """What the page shows about the current (or last) job: state, step/total, losses, ETA, log tail."""
        job = self.job
        if job is None:
            return None
        log = read_log(job.out)
        steps = [e for e in log if e.get("loss") is not None]
        last = steps[-1] if steps else {}
        try:
            state = json.loads((job.out / STATE_FILE).read_text(encoding="utf-8")).get("status")
        except (OSError, json.JSONDecodeError):
            state = None
        code = job.process.poll()
        if code is None:
            status = "running"
        elif code == 0 and state == "complete":
            status = "finished"
        else:
            status = f"stopped ({state or 'no output'}, exit {code})"
        try:
            tail = job.stderr_file.read_text(encoding="utf-8", errors="replace").splitlines()[-12:]
        except OSError:
            tail = []
        return {"name": job.name, "status": status, "step": last.get("step", 0), "total": last.get("total_steps"),
                "loss": last.get("loss"), "tokens_per_s": last.get("tokens_per_s"), "elapsed": last.get("elapsed"),
                "eta": last.get("eta"), "log": log, "tail": tail}
