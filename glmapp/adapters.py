"""LoRA adapters at runtime: discover, validate, load side by side, mix in one batch, merge.

Notable choices:
- PEFT's on-disk format (`adapter_config.json` + `adapter_model.safetensors|.bin`) is read directly.
  Everything is validated into CPU tensors before anything touches the model, so a failing load
  never leaves a half-applied adapter.
- Target modules are wrapped once in `LoraLinear`, which keeps the base module (full precision or
  quantized) and adds `scale * B(A(x))` per adapter. One batch may mix adapters: the engine tells
  the manager which token rows use which adapter for the current step (`AdapterManager.rows`); with
  several adapters in a step each module runs them stacked (one [sum r, in] A, one [out, sum r] B, each
  token masked to its own adapter's columns), which costs the same ops however many adapters compare.
- Two ways to name an adapter (`resolve_adapter(confine=...)`): the web UI and HTTP API are confined to
  the adapters folder; the command line and the Python API accept any path. Hub ids resolve through the
  Hugging Face cache, and are downloaded (adapter files only, size-capped) by `glmapp.adapter_hub`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from glmapp import adapter_hub, cpu_linear, ptuning
from glmapp.errors import AdapterError
from glmapp.train.status import unfinished

TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class AdapterInfo:
    name: str
    path: str
    base_model: str = ""
    r: int = 0
    alpha: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    size_bytes: int = 0
    error: str | None = None  # why it cannot be loaded, if known from its metadata
    kind: str = "lora"  # or "ptuning": a P-tuning v2 prefix checkpoint (glmapp.ptuning)
    pre_seq_len: int = 0  # prefix length of a P-tuning checkpoint


@dataclass
class LoraWeights:
    """One adapter: per module path, (A [r, in], B [out, r]) with the scale folded into B."""

    name: str
    uid: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    info: AdapterInfo


class LoraLinear(nn.Module):
    """A base linear (any module with in/out features) plus any number of LoRA deltas."""

    MAX_STACKS = 8  # cached adapter combinations per module (a comparison reuses one for all its steps)

    def __init__(self, base: nn.Module, manager: "AdapterManager", path: str):
        super().__init__()
        self.base = base
        self.path = path
        self.in_features = getattr(base, "in_features", None)
        self.out_features = getattr(base, "out_features", None)
        self.deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._manager = [manager]  # a list keeps it out of the module tree
        self._stacks: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = {}

    @property
    def weight(self):
        return self.base.weight

    def set_delta(self, name: str, delta: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        if delta is None:
            self.deltas.pop(name, None)
        else:
            self.deltas[name] = delta
        self._stacks.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        manager = self._manager[0]
        groups = manager.groups
        if not groups or not self.deltas:
            return y
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if len(groups) == 1:
            name, index = groups[0]
            if name in self.deltas:
                a, b = self.deltas[name]
                rows = flat_x if index is None else flat_x[index]
                d = ((rows.to(a.dtype) @ a.T) @ b.T).to(y.dtype)
                if index is None:
                    flat_y.add_(d)
                else:
                    flat_y.index_add_(0, index, d)
            return y
        # Several adapters in one step (a comparison): every adapter's A stacked into one matrix, each token
        # keeps only its own adapter's columns, one matmul with the stacked Bs: 5 ops however many adapters.
        stack = self._stack(tuple(name for name, _ in groups))
        if stack is not None:
            a, b, owner = stack
            xa = (flat_x.to(a.dtype) @ a.T) * (owner == manager.token_slots(flat_x.shape[0], flat_x.device)[:, None])
            flat_y.add_((xa @ b.T).to(y.dtype))
        return y

    def _stack(self, names: tuple[str, ...]):
        """(A of every named adapter this module has [C, in], their Bs [out, C], group slot of each column [C])."""
        if names not in self._stacks:
            if len(self._stacks) >= self.MAX_STACKS:
                self._stacks.clear()
            parts = [(slot, self.deltas[n]) for slot, n in enumerate(names) if n in self.deltas]
            self._stacks[names] = None if not parts else (
                torch.cat([a for _, (a, _) in parts]), torch.cat([b for _, (_, b) in parts], dim=1),
                torch.cat([torch.full((a.shape[0],), slot, dtype=torch.long, device=a.device)
                           for slot, (a, _) in parts]))
        return self._stacks[names]


def _read_config(folder: Path) -> dict:
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"Adapter {folder.name!r} has no adapter_config.json: expected a PEFT LoRA folder "
                           f"(adapter_config.json + adapter_model.safetensors).")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter_config.json of {folder.name!r} is not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter_config.json of {folder.name!r} must hold a JSON object.")
    return cfg


def _check_config(name: str, cfg: dict) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"Adapter {name!r} is {peft_type}; glmapp supports LoRA adapters (peft_type LORA) "
                           f"on {', '.join(TARGETS)}.")
    if cfg.get("use_dora"):
        raise AdapterError(f"Adapter {name!r} uses DoRA, which is not supported; use a plain LoRA adapter.")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"Adapter {name!r} also trains full modules ({cfg['modules_to_save']}); only LoRA "
                           f"deltas are supported.")


def _weight_file(folder: Path) -> Path:
    for fname in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / fname).is_file():
            return folder / fname
    raise AdapterError(f"Adapter {folder.name!r} has no adapter_model.safetensors or adapter_model.bin.")


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reader error means the same thing to the user
        raise AdapterError(f"Adapter weight file {file.name!r} of {file.parent.name!r} cannot be read "
                           f"(truncated or corrupt: {type(e).__name__}).") from None


def describe(folder: Path, name: str | None = None) -> AdapterInfo:
    """Metadata of an adapter folder, without loading its weights."""
    name = name or folder.name
    info = AdapterInfo(name=name, path=str(folder))
    try:
        prefix_cfg = ptuning.read_prefix_config(folder)
    except AdapterError as e:
        return AdapterInfo(name=name, path=str(folder), kind="ptuning", error=str(e))
    if prefix_cfg is not None:
        info.kind, info.pre_seq_len = "ptuning", int(prefix_cfg["pre_seq_len"])
        info.base_model = str(prefix_cfg.get("_name_or_path") or "")
        return info
    try:
        cfg = _read_config(folder)
        _check_config(name, cfg)
        targets = cfg.get("target_modules") or ["query_key_value"]
        info.base_model = str(cfg.get("base_model_name_or_path") or "")
        info.r = int(cfg.get("r", 8))
        info.alpha = float(cfg.get("lora_alpha", info.r))
        info.target_modules = [targets] if isinstance(targets, str) else list(targets)
        info.size_bytes = _weight_file(folder).stat().st_size
    except AdapterError as e:
        info.error = str(e)
    return info


def list_adapters(adapters_dir: str | Path) -> list[AdapterInfo]:
    """Every adapter folder directly inside `adapters_dir` (sorted by name), with metadata; unfinished
    training runs there are listed with the reason they cannot be used yet (`glmapp.train.status`)."""
    root = Path(adapters_dir)
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and _is_adapter_folder(child) and _inside(root, child):
            found.append(describe(child))
        elif child.is_dir() and _inside(root, child) and (why := unfinished(child, f"{root.name}/{child.name}")):
            found.append(AdapterInfo(name=child.name, path=str(child), error=why))  # a training run, not done
    return found


def _is_adapter_folder(folder: Path) -> bool:
    """A PEFT LoRA folder, or a P-tuning checkpoint (config.json with pre_seq_len; listed with its error if bad)."""
    if (folder / "adapter_config.json").is_file():
        return True
    try:
        return ptuning.read_prefix_config(folder) is not None
    except AdapterError:
        return True


def _inside(root: Path, path: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def resolve_adapter(spec: str, adapters_dir: str | Path, *, confine: bool,
                    download: Callable[[str], Path] | None = None) -> tuple[str, Path]:
    """An adapter spec -> (display name, folder).

    `confine=True` is for names from the web UI and the HTTP API: only folders inside `adapters_dir` (no
    absolute paths, `~`, `..` or symlinks out of it), or hub ids. `confine=False` is for the command line and
    the Python API, whose user owns the file system: any existing path (absolute, `~`, `..`, symlinks) is
    used as given, else a folder name in `adapters_dir`, else a hub id.
    A hub id not in the Hugging Face cache is fetched with `download(repo_id) -> folder`; None: cache only."""
    root = Path(adapters_dir)
    spec = (spec or "").strip()
    if not spec:
        raise AdapterError("No adapter given.")
    p = Path(spec)
    if not confine and p.expanduser().exists():
        folder = p.expanduser()
        if not folder.is_dir():
            raise AdapterError(f"Adapter path {spec!r} is not a folder.")
        return folder.resolve().name, folder
    if confine and (p.is_absolute() or spec.startswith("~") or ".." in p.parts):
        raise AdapterError(f"Adapter path {spec!r} is outside the adapters folder; put the adapter inside "
                           f"{root.name!r}/ and use its folder name.")
    candidate = root / p
    if candidate.exists() or candidate.is_symlink():
        if confine and not _inside(root, candidate):
            raise AdapterError(f"Adapter {spec!r} points outside the adapters folder (symlink); copy it in.")
        if not candidate.is_dir():
            raise AdapterError(f"Adapter {spec!r} is not a folder.")
        return spec, candidate
    if adapter_hub.is_hub_id(spec):
        folder = adapter_hub.cached(spec)
        if folder is not None:
            return spec, folder
        if download is None:
            raise AdapterError(f"Adapter {spec!r} is not in the adapters folder nor in the Hugging Face cache; "
                               f"load it by hub id in the Model tab first.")
        return spec, download(spec)
    where = f"the adapters folder {root.name!r}/" + ("" if confine else " nor a path that exists")
    raise AdapterError(f"No adapter named {spec!r} in {where}.")


class AdapterManager:
    """Adapters resident on one model. Attach with `AdapterManager.of(model)`."""

    _uids = itertools.count(1)

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, LoraWeights] = {}
        self.groups: list[tuple[str, torch.Tensor | None]] = []  # (adapter name, token rows) this step
        self._slots: torch.Tensor | None = None  # this step's group of every token (-1: base), built once
        self.lock = threading.RLock()  # held by the engine while a step runs

    @classmethod
    def of(cls, model: nn.Module) -> "AdapterManager":
        manager = model.__dict__.get("_glmapp_adapters")
        if manager is None:
            manager = cls(model)
            model.__dict__["_glmapp_adapters"] = manager
        return manager

    def names(self) -> list[str]:
        return sorted(self.adapters)

    def uid(self, name: str) -> str | None:
        w = self.adapters.get(name)
        return w.uid if w else None

    def _targets(self) -> dict[str, nn.Module]:
        out = {}
        for path, module in self.model.named_modules():
            leaf = path.rsplit(".", 1)[-1]
            # v2/v3 layers live under transformer.encoder.layers, v1's under transformer.layers
            if leaf in TARGETS and (".encoder.layers." in f".{path}" or path.startswith("transformer.layers.")):
                out[path] = module
        return out

    def validate(self, name: str, folder: Path) -> LoraWeights | ptuning.PrefixAdapter:
        """Read and check everything on CPU; raises AdapterError naming what is wrong."""
        if ptuning.read_prefix_config(folder) is not None:  # P-tuning v2: the engine prepends its prefix KV
            weights = ptuning.read_prefix(name, folder, self.model.config)
            return ptuning.PrefixAdapter(name, f"{name}#{next(self._uids)}", weights, describe(folder, name))
        cfg = _read_config(folder)
        _check_config(name, cfg)
        state = _read_weights(_weight_file(folder))
        targets = self._targets()
        r_default = int(cfg.get("r", 8))
        alpha_default = float(cfg.get("lora_alpha", r_default))
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            m = _KEY.match(key)
            if m is None:
                raise AdapterError(f"Adapter {name!r} has a tensor {key!r} that is not a LoRA A/B weight.")
            pairs.setdefault(m["module"], {})[m["ab"]] = tensor
        if not pairs:
            raise AdapterError(f"Adapter {name!r} holds no LoRA weights.")
        modules = {}
        for path, ab in sorted(pairs.items()):
            base_path = path.removeprefix("model.") if path not in targets else path
            module = targets.get(base_path)
            if module is None:
                leaf = path.rsplit(".", 1)[-1]
                raise AdapterError(f"Adapter {name!r} targets module {path!r}, which this model does not have "
                                   f"({'not a supported target: use ' + ', '.join(TARGETS) if leaf not in TARGETS else 'wrong layer count or base model'}).")
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"Adapter {name!r} has an incomplete LoRA pair for {path!r}.")
            a, b = ab["A"], ab["B"]
            base = module.base if isinstance(module, LoraLinear) else module
            in_f, out_f = base.in_features, base.out_features
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
                raise AdapterError(
                    f"Adapter {name!r} does not fit this model at {base_path!r}: lora_A {tuple(a.shape)} and "
                    f"lora_B {tuple(b.shape)}, but the module needs A [r, {in_f}] and B [{out_f}, r]. "
                    f"It was probably trained for another base model.")
            r = a.shape[0]
            short = base_path.split(".")[-1]
            alpha = float(cfg.get("alpha_pattern", {}).get(short, alpha_default))
            scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise AdapterError(f"Adapter {name!r} has NaN/Inf values at {base_path!r}.")
            modules[base_path] = (a.float(), b.float() * scale)
        return LoraWeights(name, f"{name}#{next(self._uids)}", modules, describe(folder, name))

    def load(self, spec: str, adapters_dir: str | Path, name: str | None = None, *, confine: bool = False,
             download: Callable[[str], Path] | None = adapter_hub.download) -> LoraWeights:
        """Load (or replace) an adapter by path, folder name in `adapters_dir` or hub id.

        The default suits the Python API and the command line (any path the caller gives, hub downloads);
        the web app passes `confine=True` (see `resolve_adapter`)."""
        display, folder = resolve_adapter(spec, adapters_dir, confine=confine, download=download)
        return self.load_folder(name or display, folder)

    def load_folder(self, name: str, folder: Path) -> LoraWeights:
        """Validate the adapter in `folder` and install it under `name`."""
        weights = self.validate(name, folder)
        self.install(weights)
        return weights

    def prefix(self, name: str) -> ptuning.PrefixAdapter | None:
        """The loaded P-tuning adapter called `name` (None: a LoRA adapter or not loaded)."""
        w = self.adapters.get(name)
        return w if isinstance(w, ptuning.PrefixAdapter) else None

    def install(self, weights: LoraWeights | ptuning.PrefixAdapter) -> None:
        if isinstance(weights, ptuning.PrefixAdapter):  # no module changes: the engine applies it per row
            with self.lock:
                if weights.name in self.adapters:
                    self._remove(weights.name)
                self.adapters[weights.name] = weights
            return
        device = self.model.transformer.output_layer.weight.device
        dtype = self.model.transformer.output_layer.weight.dtype
        # On CPU the deltas stay fp32: their small matmuls cost 2x more in bf16 (17.6 vs 39.4 us for
        # [1, 1024] through rank 8 to 5632 columns) and they are small next to the base weights.
        dtype = dtype if dtype.is_floating_point and device.type != "cpu" else torch.float32
        placed = {p: (a.to(device, dtype), b.to(device, dtype)) for p, (a, b) in weights.modules.items()}
        with self.lock:
            if weights.name in self.adapters:
                self._remove(weights.name)
            targets = self._targets()
            for path, delta in placed.items():
                module = targets[path]
                if not isinstance(module, LoraLinear):
                    module = self._wrap(path, module)
                module.set_delta(weights.name, delta)
            self.adapters[weights.name] = weights

    def _wrap(self, path: str, module: nn.Module) -> LoraLinear:
        parent_path, leaf = path.rsplit(".", 1)
        wrapper = LoraLinear(module, self, path)
        setattr(self.model.get_submodule(parent_path), leaf, wrapper)
        return wrapper

    def _remove(self, name: str) -> None:
        for module in self.model.modules():
            if isinstance(module, LoraLinear):
                module.set_delta(name, None)
        del self.adapters[name]

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise AdapterError(f"Adapter {name!r} is not loaded.")
            self._remove(name)

    @contextlib.contextmanager
    def rows(self, groups: list[tuple[str, torch.Tensor | None]]):
        """Within the block, flattened token rows in each group get that adapter (None = every row)."""
        with self.lock:
            for name, _ in groups:
                if name not in self.adapters:
                    raise AdapterError(f"Adapter {name!r} is not loaded (it was unloaded meanwhile?).")
            self.groups, self._slots = list(groups), None
            try:
                yield
            finally:
                self.groups, self._slots = [], None

    def token_slots(self, n: int, device) -> torch.Tensor:
        """[n] index into this step's groups of each flattened token (-1: no adapter); built once per step."""
        slots = self._slots
        if slots is None or slots.shape[0] != n or slots.device != device:
            slots = torch.full((n,), -1, dtype=torch.long, device=device)
            for j, (_, index) in enumerate(self.groups):
                if index is None:
                    slots.fill_(j)
                else:
                    slots[index] = j
            self._slots = slots
        return slots

    @contextlib.contextmanager
    def active(self, name: str | None):
        """Apply one adapter to every row (training-style forward, reference checks)."""
        with self.rows([] if name is None else [(name, None)]):
            yield

    def merge(self, name: str) -> None:
        """Fold an adapter into the base weights (W += scale·B·A) and drop every LoRA wrapper."""
        with self.lock:
            if name not in self.adapters:
                raise AdapterError(f"Adapter {name!r} is not loaded.")
            if self.prefix(name) is not None:
                raise AdapterError(f"Adapter {name!r} is a P-tuning v2 prefix: it adds keys/values to attention and "
                                   f"has no weights to merge; serve it as an adapter instead.")
            cpu_linear.unpack(self.model)
            wrappers = [m for m in self.model.modules() if isinstance(m, LoraLinear)]
            # Check everything first: a refused merge must not leave some layers merged.
            if any(type(m.base) is not nn.Linear for m in wrappers):  # quantized / bitsandbytes layers
                raise AdapterError("Merging needs a full-precision base model; reload with --quant none.")
            for module in wrappers:
                if name in module.deltas:
                    a, b = module.deltas[name]
                    module.base.weight.data += (b.float() @ a.float()).to(module.base.weight.dtype)
            for path, module in list(self.model.named_modules()):
                if isinstance(module, LoraLinear):
                    parent_path, leaf = path.rsplit(".", 1)
                    setattr(self.model.get_submodule(parent_path), leaf, module.base)
            self.adapters.clear()


def export_merged(base: str, adapter: str, out: str | Path, adapters_dir: str | Path = "adapters",
                  dtype: str | None = None, num_shards: int = 2) -> Path:
    """`glmapp merge`: base checkpoint + adapter -> a merged checkpoint in the official layout."""
    from glmapp.checkpoint import load_model, read_config, resolve, write_checkpoint

    out = Path(out)
    src = resolve(base).path
    raw_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    model = load_model(src, device="cpu", dtype="float32")  # merge in fp32, store in the base's dtype
    manager = AdapterManager.of(model)
    weights = manager.load(adapter, adapters_dir)
    manager.merge(weights.name)
    store = dtype or raw_config.get("torch_dtype") or "float16"
    store_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(store)
    if store_dtype is None:
        raise AdapterError(f"Unknown dtype {store!r} for the merged checkpoint: use float16, bfloat16 or float32.")
    state = {k: v.to(store_dtype).contiguous() for k, v in model.state_dict().items()}
    raw_config["torch_dtype"] = store
    write_checkpoint(out, state, raw_config, tokenizer_from=src, num_shards=num_shards)
    read_config(out)  # the result must load
    return out
