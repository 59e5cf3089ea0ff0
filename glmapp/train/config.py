"""`TrainConfig`: every training setting, once; the `glmapp train` flags and the YAML files map onto it.

Notable choices:
- Each field's `help` metadata is its documentation: `--help` prints it with the default.
- A `--config FILE.yaml` gives values for any field (keys as the field names, `-` or `_`); flags given on
  the command line win over the file. Unknown keys stop with the list of known ones.
- Importable without torch (the command line's `--help` must be instant).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from glmapp.choices import QUANT_MODES
from glmapp.errors import GlmappError

TARGET_MODULES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
_LAYER_LR = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*:\s*([0-9.eE+-]+)\s*$")


class ConfigError(GlmappError):
    """A training setting that cannot be used: which one, and what to write instead."""


def _f(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """LoRA / QLoRA fine-tuning of a ChatGLM model with transformers' Trainer and peft."""

    model: str = _f(None, "base model folder or hub id")
    data: list[str] = field(default_factory=list,
                            metadata={"help": "training data files (.jsonl or .json list)", "nargs": "+"})
    out: str = _f(None, "output folder of the adapter, e.g. adapters/NAME")
    eval: str | None = _f(None, "evaluation data file (enables eval loss and early stopping)")
    rank: int = _f(8, "LoRA rank r")
    alpha: float = _f(32, "LoRA alpha (scale = alpha / rank)")
    dropout: float = _f(0.1, "dropout on the LoRA input")
    targets: str = _f("query_key_value", f"modules to adapt, comma-separated: {', '.join(TARGET_MODULES)}, or all")
    epochs: float = _f(3, "passes over the data")
    max_steps: int = _f(-1, "optimizer steps (-1: from --epochs)")
    lr: float = _f(2e-4, "peak learning rate")
    batch_size: int = _f(4, "rows per device per micro-batch")
    grad_accum: int = _f(8, "micro-batches per optimizer step")
    max_length: int = _f(1024, "prompt + response tokens per row")
    overlength: str = _f("truncate", "rows over --max-length: truncate (cut the reply) or drop",
                         choices=("truncate", "drop"))
    warmup_ratio: float = _f(0.03, "share of the steps spent warming up the learning rate")
    scheduler: str = _f("cosine", "learning-rate schedule", choices=SCHEDULERS)
    weight_decay: float = _f(0.0, "AdamW weight decay")
    seed: int = _f(42, "seed for initialisation, dropout and data order")
    dtype: str = _f("auto", "auto (bf16/fp16 mixed precision on GPU, fp32 on CPU), bfloat16, float16, float32",
                    choices=DTYPES)
    device: str = _f("auto", "auto, cpu, cuda, cuda:N")
    gradient_checkpointing: bool | None = _f(None, "recompute activations in backward (default: on on GPU)")
    quant: str = _f("none", "base weights: none, int8/int4 (ChatGLM's scheme), bnb-int8/bnb-nf4 (bitsandbytes, "
                            "GPU or CPU); a quantized base stays frozen, only the adapter trains (QLoRA)",
                    choices=QUANT_MODES)
    save_steps: int = _f(100, "checkpoint every N steps (the last two are kept)")
    eval_steps: int = _f(100, "evaluate every N steps (with --eval)")
    logging_steps: int = _f(1, "log every N steps")
    early_stopping_patience: int | None = _f(None, "stop after N evaluations without a better eval loss "
                                                   "(needs --eval; 3 is a good value)")
    layer_lr: str = _f("", "per-layer learning rates, e.g. \"0-11:1e-5,12-27:1e-4\" (other layers: --lr)")
    lora_l2: float = _f(0.0, "L2 penalty on the LoRA matrices, added to the loss (e.g. 0.01)")
    resume: bool = _f(False, "continue from the newest checkpoint in --out")

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"--rank must be at least 1, got {self.rank}.")
        for name in ("batch_size", "grad_accum", "save_steps", "eval_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}.")
        self.target_modules()
        self.layer_lrs()
        if self.early_stopping_patience is not None and not self.eval:
            raise ConfigError("--early-stopping-patience needs an evaluation set: give --eval FILE.")

    def target_modules(self) -> list[str]:
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        if names == ["all"]:
            return list(TARGET_MODULES)
        bad = [n for n in names if n not in TARGET_MODULES]
        if bad or not names:
            raise ConfigError(f"Unknown --targets {', '.join(bad) or '(none)'}: use any of {', '.join(TARGET_MODULES)}"
                            f" (comma-separated) or all.")
        return names

    def layer_lrs(self) -> dict[int, float]:
        """--layer-lr as layer index -> learning rate."""
        out: dict[int, float] = {}
        for part in filter(str.strip, self.layer_lr.split(",")):
            m = _LAYER_LR.match(part)
            if not m or int(m[1]) > int(m[2]):
                raise ConfigError(f"Cannot read --layer-lr part {part.strip()!r}: write FIRST-LAST:LR, e.g. "
                                f"\"0-11:1e-5,12-27:1e-4\".")
            out.update({i: float(m[3]) for i in range(int(m[1]), int(m[2]) + 1)})
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, plus --config. Flags default to None, meaning "not given": the
    file's value or the field's default applies (`from_args`); --help shows the field's default."""
    parser.add_argument("--config", default=None, help="YAML file with any of these settings (flags win)")
    for f in fields(TrainConfig):
        meta = f.metadata
        default = f.default if f.default is not MISSING else None
        kwargs = dict(dest=f.name, default=None, help=f"{meta['help']} (default: {default})")
        if f.type in ("bool", "bool | None"):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"int": int, "float": float, "int | None": int}.get(f.type, str)
        for key in ("choices", "nargs"):
            if key in meta:
                kwargs[key] = meta[key]
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def read_yaml(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"Config file {path!r} not found.")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{file.name}: not valid YAML ({e}).") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{file.name}: expected a mapping of setting: value.")
    known = {f.name for f in fields(TrainConfig)}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{file.name}: unknown settings {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    return values


def write_yaml(config: TrainConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


def from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the flags given, over the --config file's values, over the defaults."""
    values = read_yaml(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None})
    missing = [f"--{n}" for n in ("model", "data", "out") if not values.get(n)]
    if missing:
        raise ConfigError(f"Missing {', '.join(missing)} (on the command line or in the --config file).")
    return TrainConfig(**values)
