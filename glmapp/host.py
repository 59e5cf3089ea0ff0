"""ModelHost: the one owner of the served model's life — load, reload in another dtype or quantization
(with rollback), adapters, the one engine on its weights, and freeing it all.

Notable choices:
- One engine per model, ever: every user of a model (the web app, the API, `model.chat()` in a script)
  reaches it through the host registered for that model (`ModelHost.of`), so two engines never run on the
  same weights. The registry is keyed by the model object's id and cleared when the host frees it.
- A reload FREES the old model before the new one loads (engine shut down, references dropped,
  `gc.collect`, CUDA cache emptied), so a 6B model never needs room for two copies. Generations running at
  that moment end as "cancelled"; new ones get `ModelReloading` until the swap. If the new load fails, the
  previous settings are loaded again and the error is reported (`ReloadFailed` carries the result).
- Dtype and quantization reloads are one path (`_swap`): only how the new weights are made differs (a fresh
  load from the checkpoint, or `switch_quantization`, which streams the weights in the new mode).
- Adapters are loaded once and stay resident (switching between them is instant); the validated CPU copy of
  each is kept, so a reload re-applies them to the new model without reading them again.
- Which adapter a reply uses is the caller's choice per request: the host holds no per-user state.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from glmapp.adapters import AdapterInfo, AdapterManager, LoraWeights, list_adapters, resolve_adapter
from glmapp.backends.base import ModelInfo, ReloadResult, format_bytes
from glmapp.choices import DTYPES
from glmapp.backends.handle import RequestHandle
from glmapp.checkpoint import DEFAULT_MODEL
from glmapp.errors import (
    AdapterError,
    CheckpointError,
    GlmappError,
    ModelLoadFailed,
    ModelLoading,
    ModelReloading,
    QuantizationError,
)

log = logging.getLogger("glmapp.host")
FREE_WAIT_ROUNDS, FREE_WAIT_S = 25, 0.2  # up to 5 s for running streams to let go of the old model
UNKNOWN_SHAPE = ("chatglm2", 32768)  # (family, context length) shown until a checkpoint without config.json fails
_HOSTS: dict[int, "ModelHost"] = {}  # id(model) -> its host, while the host serves it
_HOSTS_LOCK = threading.Lock()


class QuantizationSwitchFailed(QuantizationError):
    """Loading the new mode failed; `model` is the previous mode, loaded again. The cause is chained."""

    def __init__(self, message: str, model):
        super().__init__(message)
        self.model = model


def switch_quantization(path, model, mode: str, progress=None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Reload the checkpoint at `path` in quantization `mode`, freeing `model`'s weights first.

    Contract: `model` is consumed — its weights are released before the new ones load, so at most one
    copy of the weights is held. Use only the returned model. If the new mode fails to load, the previous
    mode is loaded again and `QuantizationSwitchFailed` is raised with it as `.model` (cause chained); if
    that reload fails too, its error propagates. Adapters are not carried over: re-apply them on the
    returned model (`AdapterManager.install`). `progress(fraction, message)` reports along the way.
    """
    from glmapp.checkpoint import load_model
    from glmapp.quant import model_mode, release_weights, resolve_mode

    path = Path(path)

    report = progress or (lambda fraction, message: None)
    weight = model.transformer.output_layer.weight
    device = device or weight.device
    dtype = dtype or weight.dtype
    previous, family, model_cls = model_mode(model), model.config.family, type(model)
    resolve_mode(mode, 0, torch.device(device))  # an unknown or unavailable mode fails before anything is freed

    def load(m: str, start: float, end: float):
        def step(fraction, message):
            report(start + (end - start) * fraction, message)
        return load_model(path, device=device, dtype=dtype, model_cls=model_cls, family=family, quant=m,
                          progress=step)

    report(0.0, f"Freeing the {previous} weights")
    release_weights(model)
    report(0.05, f"Loading {mode}")
    try:
        new = load(mode, 0.05, 1.0)
    except Exception as e:
        gc.collect()
        report(0.5, f"Loading {mode} failed ({type(e).__name__}); loading {previous} again")
        restored = load(previous, 0.5, 1.0)
        raise QuantizationSwitchFailed(f"Switching to {mode!r} failed ({type(e).__name__}: {e}); "
                                       f"the model was reloaded as {previous!r}.", restored) from e
    report(1.0, f"Loaded {mode}")
    return new


def same_tokenizer(a, b) -> bool:
    """The same object, or one loaded from the same SentencePiece model for the same family."""
    if a is b:
        return True
    try:
        return (type(a) is type(b) and a.family == b.family
                and a.sp.serialized_model_proto() == b.sp.serialized_model_proto())
    except AttributeError:
        return False


def choose_checkpoint(model: str | None, demo: bool) -> tuple[str, bool, str]:
    """--model, else the default model when it is in the Hugging Face cache, else the demo checkpoint (with
    why) -> (name, demo, notice). Without --model nothing is downloaded: 12 GB are fetched only when asked for."""
    from glmapp.checkpoint import resolve
    from glmapp.demo import ensure_demo

    notice = ""
    if not demo and model is None:
        try:
            resolve(DEFAULT_MODEL, download=False)
            return DEFAULT_MODEL, False, ""
        except CheckpointError as e:
            notice, demo = str(e), True
    if demo:
        return str(ensure_demo("chatglm2")), True, notice
    return model, False, ""


def expected_shape(name: str) -> tuple[str, int] | None:
    """(family, context length) from the checkpoint's config.json, read before its weights: a local folder or
    the cache, else that one small file from the hub. None when it cannot be read (the load will say why)."""
    from glmapp.checkpoint import read_config, resolve_config

    try:
        config = read_config(resolve_config(name))
    except Exception:  # noqa: BLE001 - the background load reports the real error
        return None
    return config.family, int(config.seq_length)


def load_failure(name: str, error: BaseException, demo: bool) -> str:
    """What the page shows when the background load failed: the error and how to fix it."""
    from glmapp import commands

    cause = str(error) if isinstance(error, GlmappError) else f"{type(error).__name__}: {error}"
    fix = ("" if demo else f" To try the app meanwhile, start it on the demo checkpoint: `{commands.RUN_APP} --demo`.")
    return f"Loading the model {name} failed: {cause}{fix}"


class ReloadFailed(GlmappError):
    """The new model could not be loaded; the previous one was loaded again (`result`)."""

    def __init__(self, cause: BaseException, result: ReloadResult):
        super().__init__(f"{type(cause).__name__}: {cause}" if not isinstance(cause, GlmappError) else str(cause))
        self.cause = cause
        self.result = result


def device_memory(device: torch.device) -> str:
    """A short 'memory in use' text for the device the model runs on."""
    if device.type == "cuda":
        used = torch.cuda.memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        return f"{format_bytes(used)} / {format_bytes(total)} GPU"
    import psutil

    return f"{format_bytes(psutil.Process().memory_info().rss)} RAM (process)"


@dataclass
class LoadState:
    """Where a background load (`ModelHost.start`) is: `fraction` and `message` while it runs (`detail`: bytes,
    speed and time left during a download), `error` once it failed, `done` once the model is served."""

    fraction: float = 0.0
    message: str = "Starting"
    detail: str = ""
    error: str = ""
    done: bool = False
    started: float = field(default_factory=time.monotonic)

    def report(self, fraction: float, message: str, detail: str = "") -> None:
        self.fraction, self.message, self.detail = max(0.0, min(1.0, float(fraction))), message, detail

    def describe(self) -> str:
        if self.error:
            return self.error
        detail = f" · {self.detail}" if self.detail else ""
        return f"The model is still loading ({self.fraction:.0%}: {self.message}{detail}); try again when it is ready."


class ModelHost:
    def __init__(self, model, tokenizer, name: str, *, demo: bool = False, notice: str = "", device: str = "auto",
                 max_input_tokens: int | None = None, adapters_dir: str = "adapters", engine_config=None,
                 dtype: str = "auto", quant: str | None = None):
        """A host serving `model`; with model None, a host whose model `start` loads in the background."""
        self.name = name
        self.demo = demo
        self.notice = notice  # why the demo checkpoint is used, shown in the banner
        self.device = device
        self.max_input_tokens_setting = max_input_tokens
        self.adapters_dir = adapters_dir
        self.engine_config = engine_config  # kept for the engines of reloaded models
        self.dtype_choice = dtype
        self.quant_choice = quant  # None = as stored in the checkpoint
        self._model = self._tokenizer = self._engine = None
        self._reload_lock = threading.Lock()
        self._adapter_lock = threading.Lock()  # one adapter load at a time (two tabs picking the same one)
        self.loading: LoadState | None = None  # set by `start` (a background load); None: loaded before serving
        self._expected: tuple[str, int] | None = None  # (family, context length) read from config.json meanwhile
        if model is not None:
            self._start(model, tokenizer)

    # ---- finding and making hosts ----------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | None = None, *, demo: bool = False, dtype: str = "auto", device: str = "auto",
             max_input_tokens: int | None = None, adapters_dir: str = "adapters",
             quant: str | None = None, engine_config=None) -> ModelHost:
        """--model, else the default model from the cache, else the demo checkpoint (with the reason kept)."""
        import glmapp

        name, demo, notice = choose_checkpoint(model, demo)
        net, tok = glmapp.load(name, device=device, dtype=dtype, quant=quant)
        return cls(net, tok, name, demo=demo, notice=notice, device=device, max_input_tokens=max_input_tokens,
                   adapters_dir=adapters_dir, engine_config=engine_config, dtype=dtype, quant=quant)

    @classmethod
    def start(cls, model: str | None = None, *, demo: bool = False, dtype: str = "auto", device: str = "auto",
              max_input_tokens: int | None = None, adapters_dir: str = "adapters", quant: str | None = None,
              engine_config=None) -> ModelHost:
        """As `load`, but the load (a download from the hub included) runs in a background thread: the host is
        returned at once, `loading` tells how far it is, and requests get `ModelLoading` (then `ModelLoadFailed`
        with the reason, if it fails) until the model is served. Which checkpoint to load, and its family and
        context length (from config.json), are found before returning, so a UI can be built meanwhile."""
        name, demo, notice = choose_checkpoint(model, demo)
        host = cls(None, None, name, demo=demo, notice=notice, device=device, max_input_tokens=max_input_tokens,
                   adapters_dir=adapters_dir, engine_config=engine_config, dtype=dtype, quant=quant)
        host.loading = LoadState()
        host._expected = expected_shape(name) or UNKNOWN_SHAPE  # the UI is built before the load ends or fails
        threading.Thread(target=host._load_in_background, name="glmapp-model-load", daemon=True).start()
        return host

    def _load_in_background(self) -> None:
        import glmapp

        state = self.loading
        try:
            net, tok = glmapp.load(self.name, device=self.device, dtype=self.dtype_choice, quant=self.quant_choice,
                                   progress=state.report)
            state.report(1.0, "Starting the engine")
            self._start(net, tok)
            self._expected = None
            state.done = True
        except BaseException as e:  # noqa: BLE001 - any failure is shown in the page (and logged in full)
            log.exception("Loading %s failed", self.name)
            state.error = load_failure(self.name, e, self.demo)

    @classmethod
    def of(cls, model, tokenizer, engine_config=None) -> ModelHost:
        """The host serving `model` (e.g. the web app's), or a new one for it: one engine per model."""
        with _HOSTS_LOCK:
            host = _HOSTS.get(id(model))
        if host is not None and host._model is model and same_tokenizer(host._tokenizer, tokenizer):
            return host
        if host is not None:  # closing the serving host would end its users' streams (the web app's, say)
            raise CheckpointError(
                "This model is already served with a different tokenizer (one engine per model, and its requests "
                "are tokenized the way it was loaded): use that tokenizer, or close() the host serving it first.")
        return cls(model, tokenizer, str(getattr(model.config, "name_or_path", "") or "model"),
                   engine_config=engine_config)

    # ---- what is served now ----------------------------------------------------------------------------
    def _served(self):
        model, tokenizer, engine = self._model, self._tokenizer, self._engine
        if model is None or engine is None:
            state = self.loading
            if state is not None and not state.done:
                raise (ModelLoadFailed if state.error else ModelLoading)(state.describe())
            raise ModelReloading("The model is being reloaded (see the Model tab); try again in a moment.")
        return model, tokenizer, engine

    @property
    def model(self):
        return self._served()[0]

    @property
    def tokenizer(self):
        return self._served()[1]

    @property
    def engine(self):
        return self._served()[2]

    @property
    def serving(self) -> bool:
        return self._engine is not None

    @property
    def ready(self) -> bool:
        """The first load has finished (or there was none to wait for); False while loading or after it failed."""
        return self.loading is None or self.loading.done

    @property
    def family(self) -> str:
        if self._expected is not None and self._engine is None:  # still loading: what config.json says
            return self._expected[0]
        return self.tokenizer.family

    @property
    def context_length(self) -> int:
        if self._expected is not None and self._engine is None:
            return self._expected[1]
        return int(self.model.config.seq_length)

    @property
    def max_input_tokens(self) -> int:
        return self.max_input_tokens_setting or self.context_length

    def submit(self, request_id: str, request, canceller) -> RequestHandle:
        return self.submit_together([(request_id, request)], canceller)[0]

    def submit_together(self, requests, canceller) -> list[RequestHandle]:
        """(request id, request) pairs submitted at once: one batch (one call with the inline engine)."""
        engine = self.engine
        handles = [RequestHandle(request_id, canceller, engine.is_running) for request_id, _ in requests]
        engine.submit_together([(h, request) for h, (_, request) in zip(handles, requests)])
        return handles

    def cancel(self, request_id: str) -> None:
        engine = self._engine
        if engine is not None:
            engine.cancel(request_id)

    def info(self) -> ModelInfo:
        from glmapp.quant import model_mode

        model, tokenizer, _ = self._served()
        params = list(model.parameters())
        return ModelInfo(
            name=self.name, family=tokenizer.family, parameters=sum(p.numel() for p in params),
            dtype=str(model.dtype).removeprefix("torch."), device=str(model.device),
            weight_bytes=sum(p.numel() * p.element_size() for p in params),
            context_length=int(model.config.seq_length),
            demo=self.demo or bool(getattr(model.config, "glmapp_demo", False)), quant=model_mode(model),
        )

    def memory(self) -> str:
        model = self._model
        return device_memory(model.device) if model is not None else "(model reloading)"

    def quant_choices(self) -> dict[str, str | None]:
        """Quantization mode -> None when it can run on this model's device, else why not."""
        from glmapp.quant import available_modes

        return available_modes(self.model.transformer.output_layer.weight.device)

    # ---- adapters -------------------------------------------------------------------------------------
    def list_adapters(self) -> list[AdapterInfo]:
        """Adapters in the adapters folder, with metadata (an `error` says why one cannot be loaded)."""
        return list_adapters(self.adapters_dir)

    def loaded_adapters(self) -> list[str]:
        model = self._model
        return AdapterManager.of(model).names() if model is not None else []

    def load_adapter(self, spec: str, *, reload: bool = False, download: Callable[[str], Path] | None = None,
                     confine: bool = True) -> AdapterInfo:
        """Make `spec` (folder name in the adapters folder, or hub id) resident; instant if it already is.

        Names are confined to the adapters folder (they come from the web UI and the HTTP API); the command
        line, whose user owns the file system, passes `confine=False` (any path). A hub id not in the cache is
        fetched with `download` (None: refused). The download runs without the adapter lock, so other tabs pick
        and load adapters meanwhile; the lock is taken only to install.
        Raises AdapterError (nothing changes on the model) when it cannot be loaded."""
        spec = (spec or "").strip()
        with self._adapter_lock:
            resident = AdapterManager.of(self.model).adapters
            if not reload and spec in resident:
                return resident[spec].info
        name, folder = resolve_adapter(spec, self.adapters_dir, confine=confine, download=download)
        with self._adapter_lock:
            adapters = AdapterManager.of(self.model)  # the model may have been reloaded meanwhile
            if not reload and name in adapters.adapters:
                return adapters.adapters[name].info  # another tab loaded it meanwhile
            return adapters.load_folder(name, folder).info

    # ---- reload ---------------------------------------------------------------------------------------
    def reload(self, dtype: str, progress=None) -> ReloadResult:
        """Free the current model, load the same checkpoint in `dtype`, re-apply the resident adapters.

        On failure the previous dtype is loaded again (adapters re-applied) and `ReloadFailed` is raised."""
        import glmapp

        if dtype not in DTYPES:
            raise CheckpointError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")

        def load(choice):
            return lambda: glmapp.load(self.name, device=self.device, dtype=choice, quant=self.quant_choice)

        result = self._swap(load(dtype), load(self.dtype_choice), f"{self.name} as {dtype}", progress)
        self.dtype_choice = dtype
        return result

    def quantize(self, mode: str, progress=None) -> ReloadResult:
        """Switch quantization with `switch_quantization` (it streams the weights in the new mode
        and reloads the previous mode when that fails); resident adapters are re-applied."""
        from glmapp.checkpoint import resolve
        from glmapp.quant import resolve_mode

        resolve_mode(mode, 0, self.model.transformer.output_layer.weight.device)  # fail before freeing
        path = resolve(self.name).path

        def load(model, report):
            try:
                return switch_quantization(path, model, mode, report), None
            except QuantizationSwitchFailed as e:
                return e.model, e

        result = self._swap(None, None, mode, progress, quantize=load)
        self.quant_choice = mode
        return result

    def _swap(self, load_new, load_previous, what: str, progress=None, quantize=None) -> ReloadResult:
        """Stop the engine, free or hand over the old weights, install the new model (or the previous one
        again when making the new one fails, raising `ReloadFailed`).

        `load_new()` / `load_previous()` return (model, tokenizer) after the old model is freed; `quantize`
        instead takes the old model (and a progress callback) and returns (new model, failure or None)."""
        report = progress or (lambda fraction, desc: None)
        if not self._reload_lock.acquire(blocking=False):
            raise CheckpointError("Another reload is already running; wait for it to finish.")
        try:
            model, tokenizer, _engine = self._served()
            del _engine  # this frame must not keep the old engine (and so the old model) alive
            adapters = list(AdapterManager.of(model).adapters.values())
            report(0.05, "Stopping generations and freeing the current model")
            if quantize is not None:  # switch_quantization releases the old weights itself, layer by layer
                self._stop(free=False)
                new, failure = quantize(model, report)
                del model
                if failure is not None:
                    raise ReloadFailed(failure, self._install(new, tokenizer, adapters, report))
                result = self._install(new, tokenizer, adapters, report)
            else:
                del model
                self._stop(free=True)
                try:
                    report(0.2, f"Loading {what}")
                    net, tok = load_new()
                except (GlmappError, RuntimeError, MemoryError) as e:  # e.g. CUDA out of memory while loading
                    self._collect()
                    report(0.5, "Loading failed; loading the previous model again")
                    net, tok = load_previous()  # if this fails too, the error says so and no model is served
                    raise ReloadFailed(e, self._install(net, tok, adapters, report)) from e
                result = self._install(net, tok, adapters, report)
            report(1.0, "Done")
            return result
        finally:
            self._reload_lock.release()

    def _install(self, model, tokenizer, adapters: list[LoraWeights], report) -> ReloadResult:
        report(0.8, "Re-applying adapters and starting the engine")
        manager, dropped = AdapterManager.of(model), {}
        for weights in adapters:
            try:
                manager.install(weights)
            except (AdapterError, RuntimeError, KeyError, AttributeError) as e:  # e.g. no such module now
                dropped[weights.name] = f"{type(e).__name__}: {e}"
        self._start(model, tokenizer)
        return ReloadResult(self.info(), manager.names(), dropped)

    def _start(self, model, tokenizer) -> None:
        from glmapp.engine.engine import Engine
        from glmapp.engine.inline import InlineEngine

        inline = self.engine_config is not None and self.engine_config.inline
        engine = (InlineEngine if inline else Engine)(model, tokenizer, self.engine_config)
        self._model, self._tokenizer, self._engine = model, tokenizer, engine
        with _HOSTS_LOCK:
            _HOSTS[id(model)] = self

    def _stop(self, free: bool) -> None:
        """Shut the engine down (running requests end as cancelled) and drop this host's references; with
        `free`, wait (bounded) until the old model is garbage, so the next load has its memory."""
        model, engine = self._model, self._engine
        self._model = self._engine = None
        if model is None:
            return
        with _HOSTS_LOCK:
            if _HOSTS.get(id(model)) is self:
                del _HOSTS[id(model)]
        freed = threading.Event()
        if free:
            weakref.finalize(model, freed.set)
        engine.shutdown()
        del model, engine
        if not free:
            return
        # Streams that were running still hold the model until their handler sees "cancelled" and returns;
        # the model is then cyclic garbage (model <-> adapter manager), so collect until it goes.
        for _ in range(FREE_WAIT_ROUNDS):
            self._collect()
            if freed.wait(FREE_WAIT_S):
                return

    @staticmethod
    def _collect() -> None:
        gc.collect()  # the model, its adapter manager and LoRA wrappers reference each other
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Stop the engine (restoring the weights' plain layout) and let go of the model."""
        self._stop(free=False)
