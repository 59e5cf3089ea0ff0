"""trainer_log.jsonl: one JSON line per logging step and per evaluation, appended as training goes.

Each line: step, total steps, loss or eval_loss, learning_rate, tokens_per_s (since the previous line),
elapsed and eta (seconds). The Train tab and the loss plot read this file; a resumed run continues it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from transformers import TrainerCallback


class LogCallback(TrainerCallback):
    def __init__(self, file: Path, tokens_seen):
        self.file = file
        self.tokens_seen = tokens_seen  # () -> real tokens trained on so far
        self.start = self.last_time = time.time()
        self.start_step = None
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.time()
        self.start_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:
            return
        now = time.time()
        done = state.global_step - (self.start_step or 0)
        left = state.max_steps - state.global_step
        entry = {"step": state.global_step, "total_steps": state.max_steps, "loss": logs.get("loss"),
                 "eval_loss": logs.get("eval_loss"), "learning_rate": logs.get("learning_rate"),
                 "tokens_per_s": round((self.tokens_seen() - self.last_tokens) / max(now - self.last_time, 1e-9), 1),
                 "elapsed": round(now - self.start, 2),
                 "eta": round((now - self.start) / done * left, 1) if done else None}
        if "loss" in logs:
            self.last_tokens, self.last_time = self.tokens_seen(), now
        with open(self.file, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        shown = f"loss {entry['loss']:.4f}" if entry["loss"] is not None else f"eval loss {entry['eval_loss']:.4f}"
        print(f"step {state.global_step}/{state.max_steps} {shown} lr {entry['learning_rate']} "
              f"{entry['tokens_per_s']} tok/s eta {entry['eta']}s", file=sys.stderr, flush=True)
