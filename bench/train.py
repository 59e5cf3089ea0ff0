"""Training throughput and peak memory: `glmapp train` vs plain transformers + peft on the same model and data.

    PYTHONPATH=. python bench/train.py [--size mid] [--repeats 2] [--batch-size 2] [--max-length 128]

The baseline is transformers' own `GlmForCausalLM` holding our converted weights (saved once with
`save_pretrained`), peft LoRA on the matching modules and a stock `Trainer` (its own loss). Both sides train on the
same rows (our chat template's ids and labels, every row cut to --max-length) with the same LoRA rank/alpha/
dropout, optimizer settings, batch, accumulation, steps and seed, fp32 on CPU. Targets are the modules that exist
on both sides one to one (dense <-> o_proj, dense_h_to_4h <-> gate_up_proj, dense_4h_to_h <-> down_proj): our fused
query_key_value has no single counterpart. Each run is its own process, ours and theirs alternating; a run reports
real tokens / Trainer's train_runtime and the growth of its peak RSS (VmHWM) from after the imports. Printed: per-run
figures, medians, and the ratios ours/theirs (tokens/s: higher is better; memory: lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

OURS_TARGETS = "dense,dense_h_to_4h,dense_4h_to_h"
THEIR_TARGETS = ["o_proj", "gate_up_proj", "down_proj"]

WORKER = r'''
import json, sys
import peft, torch, transformers
from transformers import Trainer, TrainingArguments
side, spec = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(spec["threads"])
def status(key):  # VmHWM: this memory map's peak (ru_maxrss would carry the parent's across exec)
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak starts at the current RSS
before = status("VmRSS")
if side == "ours":
    from glmapp.train.config import TrainConfig
    from glmapp.train.run import train
    out = train(TrainConfig(**spec["ours"]))
    summary = json.loads((out / "training.json").read_text())["summary"]
    tokens_per_s = summary["tokens_per_s"]
else:
    from peft import LoraConfig, get_peft_model
    from transformers import GlmForCausalLM
    h = spec["hyper"]
    rows = json.loads(open(spec["rows"]).read())
    model = GlmForCausalLM.from_pretrained(spec["converted"], dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(h["seed"])
    model = get_peft_model(model, LoraConfig(r=h["rank"], lora_alpha=h["alpha"], lora_dropout=h["dropout"],
                                             target_modules=spec["their_targets"]))

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        return {"input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in batch]),
                "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])}

    args = TrainingArguments(output_dir=spec["their_out"], per_device_train_batch_size=h["batch_size"],
                             gradient_accumulation_steps=h["grad_accum"], max_steps=h["max_steps"],
                             learning_rate=h["lr"], lr_scheduler_type=h["scheduler"], warmup_steps=h["warmup_ratio"],
                             weight_decay=h["weight_decay"], seed=h["seed"], data_seed=h["seed"], logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    metrics = trainer.train().metrics
    used = h["max_steps"] * h["batch_size"] * h["grad_accum"]
    tokens = sum(len(rows[i % len(rows)]["input_ids"]) for i in range(used))
    tokens_per_s = tokens / metrics["train_runtime"]
peak = status("VmHWM") - before
print("RESULT", json.dumps({"tokens_per_s": tokens_per_s, "peak_bytes": peak}))
'''


def prepare(work: Path, args) -> dict:
    """The checkpoint, its converted copy for transformers, the data file and the rows both sides train on."""
    import glmapp
    from glmapp.demo import make_demo
    from glmapp.models.glm_convert import to_transformers_glm
    from glmapp.train.examples import build_rows

    model_dir = Path(args.model) if args.model else make_demo(work / "model", family="chatglm2", size=args.size)
    model, tokenizer = glmapp.load(str(model_dir), device="cpu", dtype="float32")
    to_transformers_glm(model).save_pretrained(work / "converted")
    data = work / "data.jsonl"
    words = "the model learns a fixed answer to each question in this set ".split()
    data.write_text("\n".join(json.dumps({"prompt": f"question {i}: " + " ".join(words[: 4 + i % 8]),
                                          "response": " ".join(words * 20)}) for i in range(64)), encoding="utf-8")
    rows, _ = build_rows(tokenizer, [str(data)], args.max_length, "truncate")
    (work / "rows.json").write_text(json.dumps([{"input_ids": r.input_ids, "labels": r.labels} for r in rows]))
    hyper = dict(rank=8, alpha=32, dropout=0.1, lr=2e-4, scheduler="cosine", warmup_ratio=0.03, weight_decay=0.0,
                 seed=42, batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.steps)
    return {"model": str(model_dir), "converted": str(work / "converted"), "data": str(data),
            "rows": str(work / "rows.json"), "hyper": hyper, "threads": args.threads}


def run_once(side: str, spec: dict, work: Path, i: int) -> dict:
    spec = dict(spec)
    spec["ours"] = dict(model=spec["model"], data=[spec["data"]], out=str(work / f"ours-{i}"),
                        targets=OURS_TARGETS, max_length=ARGS.max_length, gradient_checkpointing=False,
                        save_steps=100000, **spec["hyper"])
    spec["their_targets"], spec["their_out"] = THEIR_TARGETS, str(work / f"theirs-{i}")
    done = subprocess.run([sys.executable, "-c", WORKER, side, json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if done.returncode:
        raise SystemExit(f"{side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.rsplit("RESULT", 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: a demo checkpoint of --size)")
    p.add_argument("--size", default="mid")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    global ARGS
    ARGS = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}, "
          f"{os.cpu_count()} CPUs, {ARGS.threads} threads per run")
    results: dict[str, list[dict]] = {"ours": [], "theirs": []}
    with tempfile.TemporaryDirectory(prefix="glmapp-bench-train-") as tmp:
        work = Path(tmp)
        spec = prepare(work, ARGS)
        for i in range(ARGS.repeats):
            for side in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
                r = run_once(side, spec, work, i)
                results[side].append(r)
                print(f"round {i + 1} {side:6s} {r['tokens_per_s']:8.1f} tokens/s  "
                      f"peak +{r['peak_bytes'] / 2**20:7.0f} MB", flush=True)
    med = {s: (statistics.median(r["tokens_per_s"] for r in rs), statistics.median(r["peak_bytes"] for r in rs))
           for s, rs in results.items()}
    print(f"median ours   {med['ours'][0]:.1f} tokens/s, peak +{med['ours'][1] / 2**20:.0f} MB")
    print(f"median theirs {med['theirs'][0]:.1f} tokens/s, peak +{med['theirs'][1] / 2**20:.0f} MB")
    print(f"ratio ours/theirs: tokens/s {med['ours'][0] / med['theirs'][0]:.2f}x, "
          f"peak memory {med['ours'][1] / med['theirs'][1]:.2f}x")
    print(f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
