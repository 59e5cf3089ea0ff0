"""P-tuning v2 prefix checkpoints (the official fine-tuning output of all three generations, spec §8).

Notable choices:
- A prefix checkpoint is a folder with the base `config.json` plus `pre_seq_len` (and `prefix_projection`) and a
  weight file holding only `transformer.prefix_encoder.*`. It is read and validated into CPU tensors against the
  served model's config before anything is used: a wrong family, a wrong shape or a corrupt file is an
  `AdapterError` naming what was expected.
- The prefix encoder is evaluated once, in fp32 (the official code keeps it fp32), into per-layer keys/values
  [P, groups, head_dim]: the output [P, 2·L, groups, d] is read as (layer 0 key, layer 0 value, layer 1 key, ...).
  Prefix keys get no rotary embedding; positions of the prompt are not shifted by P; every query sees the
  prefix (spec §8). Dropout is an identity at inference.
- Applying it is seeding a KV cache: the prefix fills the first P slots, then the prompt runs as usual
  (`seed_cache` for a `DenseKVCache`). Loaded for serving it is a `PrefixAdapter`, resident in the
  `AdapterManager` beside LoRA adapters; the engine's scheduler gives its KV cache blocks of its own (`PrefixBlocks`),
  filled once from `PrefixAdapter.kv` and shared by every row that uses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from glmapp.errors import AdapterError

PREFIX = "transformer.prefix_encoder."
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "adapter_model.bin", "adapter_model.safetensors")


@dataclass
class PrefixWeights:
    """One P-tuning v2 checkpoint: its prefix-encoder tensors (names without `transformer.prefix_encoder.`)."""

    name: str
    pre_seq_len: int
    projection: bool
    family: str  # "chatglm1" or "chatglm2/3" (v2 and v3 share the network)
    tensors: dict[str, torch.Tensor]


def read_prefix_config(folder: Path) -> dict | None:
    """config.json of `folder` when it describes a P-tuning checkpoint (`pre_seq_len` > 0), else None."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"config.json of {Path(folder).name!r} is not valid JSON ({e}).") from None
    return cfg if isinstance(cfg, dict) and cfg.get("pre_seq_len") else None


def _family(cfg: dict) -> str:
    return "chatglm1" if cfg.get("position_encoding_2d") or "inner_hidden_size" in cfg else "chatglm2/3"


def _layout(config) -> tuple[int, int, int, int]:
    """(layers, groups, head_dim, hidden) of a served model's config (v1 and v2/v3 expose the same names)."""
    return config.num_layers, config.num_kv_groups, config.kv_channels, config.hidden_size


def expected_shapes(config, pre_seq_len: int, projection: bool) -> dict[str, tuple[int, ...]]:
    """Prefix-encoder tensor shapes for a base `config` (spec §8)."""
    layers, groups, d, hidden = _layout(config)
    kv = 2 * layers * groups * d
    v1 = getattr(config, "family", None) == "chatglm1"
    if not projection:
        return {"embedding.weight": (pre_seq_len, kv)}
    width = hidden if v1 else kv  # v1 embeds into the hidden size; v2/v3 embed the full KV width
    return {"embedding.weight": (pre_seq_len, width), "trans.0.weight": (hidden, width), "trans.0.bias": (hidden,),
            "trans.2.weight": (kv, hidden), "trans.2.bias": (kv,)}


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    for fname in WEIGHT_FILES:
        file = folder / fname
        if not file.is_file():
            continue
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(file))
            else:
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - every reader error means the same thing to the user
            raise AdapterError(f"P-tuning weight file {fname!r} of {folder.name!r} cannot be read (truncated or "
                               f"corrupt: {type(e).__name__}).") from None
        return {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}
    raise AdapterError(f"P-tuning checkpoint {folder.name!r} has no weights: expected one of {', '.join(WEIGHT_FILES)}"
                       f" holding {PREFIX}* tensors.")


def read_prefix(name: str, folder: Path, config) -> PrefixWeights:
    """Validate the P-tuning checkpoint in `folder` against the served model's `config`."""
    folder = Path(folder)
    cfg = read_prefix_config(folder)
    if cfg is None:
        raise AdapterError(f"{name!r} is not a P-tuning checkpoint: its config.json has no pre_seq_len.")
    family = _family(cfg)
    served = "chatglm1" if getattr(config, "family", None) == "chatglm1" else "chatglm2/3"
    if family != served:
        raise AdapterError(f"P-tuning checkpoint {name!r} was trained on a {family} model; the served model is "
                           f"{served}. Load it on its own base model.")
    pre_seq_len, projection = int(cfg["pre_seq_len"]), bool(cfg.get("prefix_projection", False))
    tensors = _read_tensors(folder)
    expected = expected_shapes(config, pre_seq_len, projection)
    for key, shape in expected.items():
        if key not in tensors:
            raise AdapterError(f"P-tuning checkpoint {name!r} lacks {PREFIX}{key} (expected {list(shape)}; "
                               f"prefix_projection={projection}).")
        if tuple(tensors[key].shape) != shape:
            raise AdapterError(f"P-tuning checkpoint {name!r}: {PREFIX}{key} has shape {list(tensors[key].shape)},"
                               f" but this model needs {list(shape)} (pre_seq_len {pre_seq_len}); it was trained "
                               f"on another model size.")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterError(f"P-tuning checkpoint {name!r} has unexpected tensor {PREFIX}{extra[0]} "
                           f"(prefix_projection={projection} in its config.json).")
    return PrefixWeights(name, pre_seq_len, projection, family, {k: v.float() for k, v in tensors.items()})


@torch.no_grad()
def prefix_kv(weights: PrefixWeights, config, dtype: torch.dtype, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key, value), each [P, groups, head_dim] in `dtype` on `device`; computed in fp32 (spec §8)."""
    t = weights.tensors
    x = t["embedding.weight"]
    if weights.projection:
        x = F.linear(torch.tanh(F.linear(x, t["trans.0.weight"], t["trans.0.bias"])), t["trans.2.weight"],
                     t["trans.2.bias"])
    layers, groups, d, _ = _layout(config)
    kv = x.view(weights.pre_seq_len, 2 * layers, groups, d).to(device=device, dtype=dtype)
    return [(kv[:, 2 * i], kv[:, 2 * i + 1]) for i in range(layers)]


def seed_cache(cache, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Write the prefix into the first slots of an empty `DenseKVCache` (every row) and commit them; returns P."""
    if cache.length:
        raise ValueError("a prefix goes into an empty cache")
    p = kv[0][0].shape[0]
    for layer, (k, v) in enumerate(kv):
        cache.k[layer, :, :p] = k
        cache.v[layer, :, :p] = v
    cache.commit(p)
    return p


@dataclass(eq=False)
class PrefixAdapter:
    """A P-tuning checkpoint loaded for serving: what `AdapterManager` holds under its name (beside `LoraWeights`)."""

    name: str
    uid: str  # changes when a checkpoint of the same name is loaded again
    weights: PrefixWeights
    info: object  # glmapp.adapters.AdapterInfo
    _kv: dict = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return self.weights.pre_seq_len

    def kv(self, config, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [layers, P, groups, head_dim] in `dtype` on `device`, computed once (per dtype/device)."""
        key = (dtype, str(device))
        if key not in self._kv:
            layers = prefix_kv(self.weights, config, dtype, device)
            self._kv = {key: (torch.stack([k for k, _ in layers]), torch.stack([v for _, v in layers]))}
        return self._kv[key]
