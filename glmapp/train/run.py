"""One training run: data -> our native model + peft LoRA -> transformers' Trainer -> an adapter folder.

Notable choices:
- Everything that can fail on the user's input (settings, data, model path) is checked before the output
  folder is touched: a bad file writes nothing.
- OUT/training.json says the run's state; while it says "running" or "incomplete" OUT holds no
  adapter_config.json, so the picker never offers a half-written adapter. At the end the adapter is saved
  into OUT/.adapter-tmp and moved in, weights first and adapter_config.json last, each an atomic rename.
- Checkpoints are Trainer's own (OUT/checkpoints/checkpoint-N, last two kept); `resume` continues the
  newest complete one (it has trainer_state.json, written last) with its optimizer, scheduler and RNG states.
- The loss is ours (`compute_loss_func`): summed token cross-entropy over the number of label tokens of the
  whole accumulated batch (Trainer's count), so micro-batching changes nothing; `lora_l2` adds
  l2 * sum(LoRA weights²) once per optimizer step.
- `layer_lr` splits the LoRA parameters into AdamW groups by layer index.
- Rows are padded on the right without an attention mask: causal attention never lets a real token see
  the padding after it, and the padding's labels are -100.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from glmapp.train import report as card
from glmapp.train.config import ConfigError, TrainConfig, write_yaml
from glmapp.train.examples import Row, build_rows
from glmapp.train.status import LOG_FILE, STATE_FILE

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def newest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step under OUT/checkpoints, or None."""
    found = [(int(p.name.rsplit("-", 1)[1]), p) for p in (out / "checkpoints").glob("checkpoint-*")
             if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def write_state(out: Path, status: str, **extra) -> None:
    """OUT/training.json, replaced atomically."""
    tmp = out / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({"status": status, **extra}, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, out / STATE_FILE)


class Collator:
    """Pads rows on the right (ids with pad, labels with -100); `tokens` is the batch's real token count."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = [r["input_ids"] + [self.pad_id] * (width - len(r["input_ids"])) for r in rows]
        labels = [r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows))}


def lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class CausalLoss:
    """Trainer's `compute_loss_func`: token-summed cross-entropy / label tokens of the step (+ L2 on LoRA)."""

    def __init__(self, model, l2: float):
        self.params = [p for _, p in lora_parameters(model)]
        self.l2 = l2

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        targets = labels[:, 1:].to(logits.device)
        total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        here = (targets != -100).sum()
        count = num_items_in_batch if num_items_in_batch is not None else here.clamp(min=1)
        loss = total / count
        if self.l2:
            # Each micro-batch adds its share, so the whole step adds the penalty exactly once.
            loss = loss + self.l2 * sum(p.float().pow(2).sum() for p in self.params) * (here / count)
        return loss


def parameter_groups(model, config: TrainConfig) -> list[dict]:
    """AdamW groups: LoRA parameters by learning rate (`layer_lr`), each with the weight decay."""
    rates = config.layer_lrs()
    groups: dict[float, list] = {}
    for name, p in lora_parameters(model):
        m = _LAYER.search(name)
        lr = rates.get(int(m[1]), config.lr) if m else config.lr
        groups.setdefault(lr, []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": config.weight_decay} for lr, ps in groups.items()]


def load_model(config: TrainConfig):
    """(model, tokenizer) loaded for training: quantized base as asked, frozen, on the chosen device."""
    import glmapp
    from glmapp.checkpoint import resolve_device

    device = resolve_device(None if config.device == "auto" else config.device)
    # bitsandbytes >= 0.48 runs nf4 / int8 (forward and backward) on the CPU too: QLoRA over bnb works there.
    dtype = model_dtype(config, device)
    quant = None if config.quant == "none" else config.quant
    model, tokenizer = glmapp.load(config.model, device=str(device), dtype=dtype, quant=quant)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def add_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    from glmapp.train import qlora

    lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=config.target_modules())
    if config.quant in ("int8", "int4"):
        qlora.register(lora_config)
    torch.manual_seed(config.seed)
    return get_peft_model(model, lora_config)


def training_arguments(config: TrainConfig, out: Path, device: torch.device, has_eval: bool):
    from transformers import TrainingArguments

    on_gpu = device.type == "cuda"
    half = {"bfloat16": "bf16", "float16": "fp16"}.get(model_dtype(config, device))
    if config.early_stopping_patience is not None and config.save_steps % config.eval_steps:
        raise ConfigError(f"Early stopping keeps the best checkpoint, so --save-steps ({config.save_steps}) must "
                          f"be a multiple of --eval-steps ({config.eval_steps}).")
    return TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs, max_steps=config.max_steps, learning_rate=config.lr,
        lr_scheduler_type=config.scheduler, warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay,
        seed=config.seed, data_seed=config.seed, logging_steps=config.logging_steps, save_strategy="steps",
        save_steps=config.save_steps, save_total_limit=2, eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps if has_eval else None, bf16=half == "bf16" and on_gpu,
        fp16=half == "fp16" and on_gpu, use_cpu=not on_gpu, report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True,
        load_best_model_at_end=config.early_stopping_patience is not None,
        metric_for_best_model="eval_loss" if config.early_stopping_patience is not None else None,
        gradient_checkpointing=False,
    )


def model_dtype(config: TrainConfig, device: torch.device) -> str:
    """--dtype, with auto resolved: fp32 on CPU, bf16 on GPUs that have it, else fp16."""
    if config.dtype != "auto":
        return config.dtype
    if device.type == "cpu":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def _as_dataset(rows: list[Row]) -> list[dict]:
    return [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]


def _read_log(out: Path) -> list[dict]:
    file = out / LOG_FILE
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def train(config: TrainConfig) -> Path:
    """Run the training `config` describes; returns the adapter folder."""
    from glmapp import allocator
    from glmapp.checkpoint import read_config, resolve
    from glmapp.tokenizer import ChatGLMTokenizer
    from glmapp.train.log import LogCallback

    out = Path(config.out)
    if (out / "adapter_config.json").is_file() and not config.resume:
        raise ConfigError(f"{out} already holds a trained adapter; choose another --out or delete it.")
    resume_from = newest_checkpoint(out) if config.resume else None
    if config.resume and resume_from is None:
        raise ConfigError(f"--resume: no complete checkpoint under {out / 'checkpoints'}; start without --resume.")
    path = resolve(config.model).path
    tokenizer = ChatGLMTokenizer.from_pretrained(path, family=read_config(path).family)
    rows, data_report = build_rows(tokenizer, config.data, config.max_length, config.overlength)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in data_report.lines():
            _log(line)
        _log(allocator.describe())
    eval_rows = build_rows(tokenizer, [config.eval], config.max_length, config.overlength)[0] if config.eval else []
    model, tokenizer = load_model(config)
    device = model.device
    peft_model = add_lora(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = config.model
    gpu = device.type == "cuda"
    if config.gradient_checkpointing if config.gradient_checkpointing is not None else gpu:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    collator = Collator(tokenizer.pad_token_id)
    trainer = _trainer(peft_model, config, out, device, rows, eval_rows, collator)
    main = trainer.is_world_process_zero()  # with several processes (DDP) only the first one writes
    started = time.time()
    if main:
        _start_output(out, config, data_report, resume_from, started)
        # Rows are split evenly between the processes: this one's count times their number.
        trainer.add_callback(LogCallback(out / LOG_FILE, lambda: trainer.tokens_seen * trainer.args.world_size))
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException:
        if main:
            write_state(out, "incomplete", pid=None, started=started, config=config.to_dict())
        raise
    if main:
        _finish(out, config, trainer, peft_model, data_report, result.metrics, started, tokenizer.family)
    return out


def _start_output(out: Path, config: TrainConfig, data_report, resume_from: Path | None, started: float) -> None:
    """The run's folder before the first step: settings, state "running", the log kept up to the checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(config, out / "train_config.yaml")
    write_state(out, "running", pid=os.getpid(), started=started, config=config.to_dict(),
                data=json.loads(data_report.to_json()))
    log = [e for e in _read_log(out) if resume_from is None or e["step"] <= int(resume_from.name.split("-")[1])]
    (out / LOG_FILE).write_text("".join(json.dumps(e) + "\n" for e in log), encoding="utf-8")


def _finish(out: Path, config: TrainConfig, trainer, peft_model, data_report, metrics: dict, started: float,
            family: str) -> None:
    """Adapter, plot, model card, then state "complete"."""
    wall = time.time() - started
    _save_adapter(peft_model, out)
    log = _read_log(out)
    (out / "loss.svg").write_text(card.loss_svg(log), encoding="utf-8")
    evals = [e["eval_loss"] for e in log if e.get("eval_loss") is not None]
    losses = [e["loss"] for e in log if e.get("loss") is not None]
    tokens = trainer.tokens_seen * trainer.args.world_size
    summary = {"steps": trainer.state.global_step, "final_train_loss": losses[-1] if losses else None,
               "final_eval_loss": evals[-1] if evals else None, "wall_time_s": round(wall, 1),
               "tokens_per_s": round(tokens / max(metrics.get("train_runtime", wall), 1e-9), 1),
               "train_rows": data_report.rows}
    files = [{"name": Path(f).name, "sha256": card.sha256(f), "format": data_report.files[Path(f).name]["format"],
              "examples": data_report.files[Path(f).name]["examples"]} for f in config.data]
    (out / "README.md").write_text(card.model_card(config.to_dict(), config.model, family, files,
                                                   data_report.lines(), summary), encoding="utf-8")
    write_state(out, "complete", started=started, config=config.to_dict(), summary=summary)
    _log(f"Adapter written to {out} ({summary['steps']} steps, final loss {summary['final_train_loss']}).")


def _trainer(model, config: TrainConfig, out: Path, device, rows, eval_rows, collator):
    from transformers import EarlyStoppingCallback, Trainer

    args = training_arguments(config, out, device, bool(eval_rows))

    class LoraTrainer(Trainer):
        tokens_seen = 0  # real (unpadded) tokens trained on by this process

        def compute_loss(self, model, inputs, *args, **kwargs):
            tokens = int(inputs.pop("tokens"))
            self.tokens_seen += tokens if model.training else 0
            return super().compute_loss(model, inputs, *args, **kwargs)

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = torch.optim.AdamW(parameter_groups(self.model, config), lr=config.lr)
            return self.optimizer

    callbacks = []
    if config.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    return LoraTrainer(model=model, args=args, train_dataset=_as_dataset(rows),
                       eval_dataset=_as_dataset(eval_rows) if eval_rows else None, data_collator=collator,
                       compute_loss_func=CausalLoss(model, config.lora_l2), callbacks=callbacks)


def _save_adapter(peft_model, out: Path) -> None:
    """The PEFT adapter moved into `out` with adapter_config.json last (what the picker looks for)."""
    tmp = out / ".adapter-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != "adapter_config.json"] + ["adapter_config.json"]:
        os.replace(tmp / name, out / name)
    tmp.rmdir()

