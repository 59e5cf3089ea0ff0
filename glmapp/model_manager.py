"""BackendManager: the model the app serves now, and swapping it for a reloaded one.

Notable choices:
- A reload builds the new model while the old one keeps serving; the swap happens only when the
  load succeeded, so a failed reload leaves the previous model in place. The cost is that both
  models are in memory for the duration of the load.
- Requests already running on the old backend finish there; the old engine shuts down after them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

import glmapp
from glmapp.backends import LocalBackend
from glmapp.checkpoint import DEFAULT_MODEL
from glmapp.errors import CheckpointError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelInfo:
    name: str
    family: str
    parameters: int
    dtype: str
    device: str
    weight_bytes: int
    context_length: int
    demo: bool

    def as_markdown(self) -> str:
        rows = [("Model", f"`{self.name}`"), ("Family", self.family),
                ("Parameters", f"{self.parameters / 1e6:,.1f} M"), ("Dtype", self.dtype), ("Device", self.device),
                ("Weights in memory", format_bytes(self.weight_bytes)), ("Context", f"{self.context_length:,} tokens"),
                ("Demo checkpoint", "yes (random weights)" if self.demo else "no")]
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def device_memory(device: torch.device) -> str:
    """A short 'memory in use' text for the device the model runs on."""
    if device.type == "cuda":
        used = torch.cuda.memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        return f"{format_bytes(used)} / {format_bytes(total)} GPU"
    import psutil

    return f"{format_bytes(psutil.Process().memory_info().rss)} RAM (process)"


class BackendManager:
    def __init__(self, backend: LocalBackend, name: str, *, demo: bool = False, notice: str = "",
                 device: str = "auto", max_input_tokens: int | None = None):
        self._backend = backend
        self.name = name
        self.demo = demo
        self.notice = notice  # why the demo checkpoint is used, shown in the banner
        self.device = device
        self.max_input_tokens = max_input_tokens
        self.dtype_choice = "auto"
        self._reload_lock = threading.Lock()

    @classmethod
    def load(cls, model: str | None = None, *, demo: bool = False, dtype: str = "auto", device: str = "auto",
             max_input_tokens: int | None = None) -> BackendManager:
        """--model, else the default model from the cache, else the demo checkpoint (with the reason kept)."""
        from glmapp.demo import ensure_demo

        notice = ""
        if not demo:
            try:
                name = model or DEFAULT_MODEL
                net, tok = glmapp.load(name, device=device, dtype=dtype)
            except CheckpointError as e:
                if model is not None:
                    raise
                notice = str(e)
                demo = True
        if demo:
            name = str(ensure_demo("chatglm2"))
            net, tok = glmapp.load(name, device=device, dtype=dtype)
        manager = cls(LocalBackend(net, tok, max_input_tokens=max_input_tokens), name, demo=demo, notice=notice,
                      device=device, max_input_tokens=max_input_tokens)
        manager.dtype_choice = dtype
        return manager

    @property
    def backend(self) -> LocalBackend:
        return self._backend

    def info(self) -> ModelInfo:
        model = self._backend.model
        params = list(model.parameters())
        return ModelInfo(
            name=self.name, family=self._backend.family, parameters=sum(p.numel() for p in params),
            dtype=str(model.dtype).removeprefix("torch."), device=str(model.device),
            weight_bytes=sum(p.numel() * p.element_size() for p in params),
            context_length=self._backend.context_length,
            demo=self.demo or bool(getattr(model.config, "glmapp_demo", False)),
        )

    def memory(self) -> str:
        return device_memory(self._backend.model.device)

    def reload(self, dtype: str, progress=None) -> ModelInfo:
        """Load the same checkpoint in `dtype` and swap it in; on failure the old model keeps serving."""
        if dtype not in DTYPES:
            raise CheckpointError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
        report = progress or (lambda fraction, desc: None)
        if not self._reload_lock.acquire(blocking=False):
            raise CheckpointError("Another reload is already running; wait for it to finish.")
        try:
            report(0.1, f"Loading {self.name} as {dtype}")
            net, tok = glmapp.load(self.name, device=self.device, dtype=dtype)
            report(0.8, "Starting the engine")
            new = LocalBackend(net, tok, max_input_tokens=self.max_input_tokens)
            old, self._backend = self._backend, new
            self.dtype_choice = dtype
            report(0.9, "Freeing the previous model")
            threading.Thread(target=old.close, name="glmapp-old-backend", daemon=True).start()
            report(1.0, "Done")
            return self.info()
        finally:
            self._reload_lock.release()

    def close(self) -> None:
        self._backend.close()
