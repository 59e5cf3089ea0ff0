"""BackendManager: the model the app serves now, the LoRA adapters resident on it, and reloading it.

Notable choices:
- A reload FREES the old model before the new one loads (engine shut down, references dropped,
  `gc.collect`, CUDA cache emptied), so a 6B model never needs room for two copies. Generations
  running at that moment end as "cancelled"; new ones get `ModelReloading` until the swap. If the
  new load fails, the previous settings are loaded again and the error is reported.
- Adapters are loaded once and stay resident (switching between them is instant); the validated CPU
  copy of each is kept, so a reload re-applies them to the new model without reading them again.
- Which adapter a reply uses is the caller's choice per request (`chat_stream(adapter=...)`): the
  manager holds no per-user state.
"""

from __future__ import annotations

import gc
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import glmapp
from glmapp.adapters import AdapterInfo, AdapterManager, LoraWeights, list_adapters, resolve_adapter
from glmapp.backends import LocalBackend
from glmapp.checkpoint import DEFAULT_MODEL
from glmapp.errors import AdapterError, CheckpointError, GlmappError

DTYPES = ("auto", "float32", "bfloat16", "float16")
FREE_WAIT_ROUNDS, FREE_WAIT_S = 25, 0.2  # up to 5 s for running streams to let go of the old model


class ModelReloading(GlmappError):
    """A request arrived while the model is being reloaded (the old one is already freed)."""


@dataclass
class ReloadResult:
    info: ModelInfo
    reapplied: list[str] = field(default_factory=list)  # adapters active on the new model
    dropped: dict[str, str] = field(default_factory=dict)  # adapter -> why it could not be re-applied


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
    quant: str = "none"

    def as_markdown(self) -> str:
        rows = [("Model", f"`{self.name}`"), ("Family", self.family),
                ("Parameters", f"{self.parameters / 1e6:,.1f} M"), ("Dtype", self.dtype),
                ("Quantization", self.quant), ("Device", self.device),
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
                 device: str = "auto", max_input_tokens: int | None = None, adapters_dir: str = "adapters",
                 engine_config=None):
        self._backend: LocalBackend | None = backend
        self.engine_config = engine_config  # kept for the engines of reloaded models
        self.name = name
        self.demo = demo
        self.notice = notice  # why the demo checkpoint is used, shown in the banner
        self.device = device
        self.max_input_tokens = max_input_tokens
        self.adapters_dir = adapters_dir
        self.dtype_choice = "auto"
        self.quant_choice: str | None = None  # None = as stored in the checkpoint
        self._reload_lock = threading.Lock()
        self._adapter_lock = threading.Lock()  # one adapter load at a time (two tabs picking the same one)

    @classmethod
    def load(cls, model: str | None = None, *, demo: bool = False, dtype: str = "auto", device: str = "auto",
             max_input_tokens: int | None = None, adapters_dir: str = "adapters",
             quant: str | None = None, engine_config=None) -> BackendManager:
        """--model, else the default model from the cache, else the demo checkpoint (with the reason kept)."""
        from glmapp.demo import ensure_demo

        notice = ""
        if not demo:
            try:
                name = model or DEFAULT_MODEL
                net, tok = glmapp.load(name, device=device, dtype=dtype, quant=quant)
            except CheckpointError as e:
                if model is not None:
                    raise
                notice = str(e)
                demo = True
        if demo:
            name = str(ensure_demo("chatglm2"))
            net, tok = glmapp.load(name, device=device, dtype=dtype, quant=quant)
        manager = cls(LocalBackend(net, tok, max_input_tokens=max_input_tokens, engine_config=engine_config), name,
                      demo=demo, notice=notice, device=device, max_input_tokens=max_input_tokens,
                      adapters_dir=adapters_dir, engine_config=engine_config)
        manager.dtype_choice, manager.quant_choice = dtype, quant
        return manager

    @property
    def backend(self) -> LocalBackend:
        backend = self._backend
        if backend is None:
            raise ModelReloading("The model is being reloaded (see the Model tab); try again in a moment.")
        return backend

    def info(self) -> ModelInfo:
        from glmapp.quant import model_mode

        model = self.backend.model
        params = list(model.parameters())
        return ModelInfo(
            name=self.name, family=self.backend.family, parameters=sum(p.numel() for p in params),
            dtype=str(model.dtype).removeprefix("torch."), device=str(model.device),
            weight_bytes=sum(p.numel() * p.element_size() for p in params),
            context_length=self.backend.context_length,
            demo=self.demo or bool(getattr(model.config, "glmapp_demo", False)), quant=model_mode(model),
        )

    def memory(self) -> str:
        backend = self._backend
        return device_memory(backend.model.device) if backend is not None else "(model reloading)"

    # ---- adapters ---------------------------------------------------------------------------------
    def list_adapters(self) -> list[AdapterInfo]:
        """Adapters in the adapters folder, with metadata (an `error` says why one cannot be loaded)."""
        return list_adapters(self.adapters_dir)

    def loaded_adapters(self) -> list[str]:
        backend = self._backend
        return AdapterManager.of(backend.model).names() if backend is not None else []

    def load_adapter(self, spec: str, *, reload: bool = False,
                     download: Callable[[str], Path] | None = None) -> AdapterInfo:
        """Make `spec` (folder name in the adapters folder, or hub id) resident; instant if it already is.

        Names are confined to the adapters folder (they come from the web UI and the HTTP API). A hub id not
        in the cache is fetched with `download` (None: refused). The download runs without the adapter lock,
        so other tabs pick and load adapters meanwhile; the lock is taken only to install.
        Raises AdapterError (nothing changes on the model) when it cannot be loaded."""
        spec = (spec or "").strip()
        with self._adapter_lock:
            resident = AdapterManager.of(self.backend.model).adapters
            if not reload and spec in resident:
                return resident[spec].info
        name, folder = resolve_adapter(spec, self.adapters_dir, confine=True, download=download)
        with self._adapter_lock:
            adapters = AdapterManager.of(self.backend.model)  # the model may have been reloaded meanwhile
            if not reload and name in adapters.adapters:
                return adapters.adapters[name].info  # another tab loaded it meanwhile
            return adapters.load_folder(name, folder).info

    # ---- reload -----------------------------------------------------------------------------------
    def reload(self, dtype: str, progress=None) -> ReloadResult:
        """Free the current model, load the same checkpoint in `dtype`, re-apply the resident adapters.

        On failure the previous dtype is loaded again (adapters re-applied) and the error is raised."""
        if dtype not in DTYPES:
            raise CheckpointError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
        return self.switch(lambda: glmapp.load(self.name, device=self.device, dtype=dtype, quant=self.quant_choice),
                           lambda: glmapp.load(self.name, device=self.device, dtype=self.dtype_choice,
                                               quant=self.quant_choice),
                           f"{self.name} as {dtype}", progress, on_success=lambda: setattr(self, "dtype_choice", dtype))

    def quantize(self, mode: str, progress=None) -> ReloadResult:
        """Switch quantization with `glmapp.quant.switch_quantization` (it frees the old weights before
        loading and reloads the previous mode on failure); resident adapters are re-applied."""
        from glmapp.checkpoint import resolve
        from glmapp.quant import (
            QuantizationSwitchFailed,
            resolve_mode,
            switch_quantization,
        )

        report = progress or (lambda fraction, desc: None)
        resolve_mode(mode, 0, self.backend.model.transformer.output_layer.weight.device)  # fail before freeing
        path = resolve(self.name).path
        if not self._reload_lock.acquire(blocking=False):
            raise CheckpointError("Another reload is already running; wait for it to finish.")
        try:
            backend, self._backend = self.backend, None
            adapters = list(AdapterManager.of(backend.model).adapters.values())
            model, tok = backend.model, backend.tokenizer
            report(0.02, "Stopping generations")
            backend.close()  # the engine must not run a step while the weights are released
            del backend
            try:
                new = switch_quantization(path, model, mode, report)
            except QuantizationSwitchFailed as e:
                del model
                raise ReloadFailed(e, self._install(e.model, tok, adapters, report)) from e
            del model
            result = self._install(new, tok, adapters, report)
            self.quant_choice = mode
            report(1.0, "Done")
            return result
        finally:
            self._reload_lock.release()

    def switch(self, load_new, load_previous, what: str, progress=None, on_success=None) -> ReloadResult:
        """The free-old-first swap of dtype reloads (quantization has its own in glmapp.quant).

        `load_new` / `load_previous` return (model, tokenizer)."""
        report = progress or (lambda fraction, desc: None)
        if not self._reload_lock.acquire(blocking=False):
            raise CheckpointError("Another reload is already running; wait for it to finish.")
        try:
            adapters = list(AdapterManager.of(self.backend.model).adapters.values())
            report(0.05, "Stopping generations and freeing the current model")
            self._free_backend()
            try:
                report(0.2, f"Loading {what}")
                net, tok = load_new()
            except (GlmappError, RuntimeError, MemoryError) as e:  # e.g. CUDA out of memory while loading
                self._free_partial()
                report(0.5, "Loading failed; loading the previous model again")
                net, tok = load_previous()  # if this fails too, the error says so and no model is served
                result = self._install(net, tok, adapters, report)
                raise ReloadFailed(e, result) from e
            result = self._install(net, tok, adapters, report)
            if on_success is not None:
                on_success()
            report(1.0, "Done")
            return result
        finally:
            self._reload_lock.release()

    def _install(self, net, tok, adapters: list[LoraWeights], report) -> ReloadResult:
        report(0.8, "Re-applying adapters and starting the engine")
        manager, dropped = AdapterManager.of(net), {}
        for weights in adapters:
            try:
                manager.install(weights)
            except (AdapterError, RuntimeError, KeyError, AttributeError) as e:  # e.g. no such module now
                dropped[weights.name] = f"{type(e).__name__}: {e}"
        self._backend = LocalBackend(net, tok, max_input_tokens=self.max_input_tokens, engine_config=self.engine_config)
        return ReloadResult(self.info(), manager.names(), dropped)

    def _free_backend(self) -> None:
        """Shut the engine down (running requests end as cancelled) and release every reference."""
        old, self._backend = self._backend, None
        if old is None:
            return
        freed = threading.Event()
        weakref.finalize(old.model, freed.set)
        old.close()
        del old
        # Streams that were running still hold the backend until their handler sees "cancelled" and
        # returns; the model is then cyclic garbage (model <-> adapter manager), so collect until it goes.
        for _ in range(FREE_WAIT_ROUNDS):
            self._free_partial()
            if freed.wait(FREE_WAIT_S):
                return

    @staticmethod
    def _free_partial() -> None:
        gc.collect()  # the model, its adapter manager and LoRA wrappers reference each other
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()


class ReloadFailed(GlmappError):
    """The new model could not be loaded; the previous one was loaded again (`result`)."""

    def __init__(self, cause: BaseException, result: ReloadResult):
        super().__init__(f"{type(cause).__name__}: {cause}" if not isinstance(cause, GlmappError) else str(cause))
        self.cause = cause
        self.result = result
