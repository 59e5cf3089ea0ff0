"""What LoRA adapters cost in a batch (the Compare tab's workload), side by side in one run.

    PYTHONPATH=. python bench/lora.py [--size mid] [--dtype auto] [--rank 8] [--streams 4]

Random rank-r adapters on all four ChatGLM targets (written as PEFT folders, loaded through
`AdapterManager`), greedy decode of --new-tokens per stream, aggregate tokens/s of --streams concurrent
streams for: every row on the base model; every row on one adapter; every row on its own adapter (a
comparison); and batch-1 base vs batch-1 with an adapter. Best of --repeats runs each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import glmapp
from engine import ours_run  # bench/engine.py
from glmapp.adapters import TARGETS, AdapterManager
from glmapp.cpu_threads import single_threaded
from glmapp.demo import make_demo
from glmapp.engine.engine import Engine, EngineConfig


def write_adapter(model, folder: Path, rank: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS and name.startswith("transformer.encoder.layers."):
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.02
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.02
    folder.mkdir(parents=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}))


def run(engine, prompts, adapters, new_tokens) -> float:
    """Aggregate tokens/s of all prompts at once, row i on adapters[i]."""
    wall, tokens, _ = ours_run(engine, None, prompts, new_tokens, adapters)
    return tokens / wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mid")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = args.streams
    with tempfile.TemporaryDirectory() as tmp, single_threaded():
        path = make_demo(Path(tmp) / args.size, size=args.size, fmt="safetensors")
        model, tok = glmapp.load(str(path), dtype=args.dtype)
        manager = AdapterManager.of(model)
        names = [f"a{i}" for i in range(n)]
        for i, name in enumerate(names):
            write_adapter(model, Path(tmp) / "adapters" / name, args.rank, seed=i)
            manager.load(name, Path(tmp) / "adapters")
    engine = Engine(model, tok, EngineConfig(max_seqs=64))
    print(f"model {args.size}, {model.dtype}, {n} adapters of rank {args.rank} on {', '.join(TARGETS)}, "
          f"{n} streams x {args.new_tokens} new tokens, torch {torch.__version__}")
    salt = iter(range(10**6))

    def prompts(k):  # fresh prompts every run: no prefix-cache hits between runs
        return [tok.encode(f"第{next(salt)}个问题：请比较这些回答。") for _ in range(k)]

    cases = {"base, batch 1": (1, [None]), "one adapter, batch 1": (1, [names[0]]),
             f"base, {n} streams": (n, [None] * n), f"one adapter, {n} streams": (n, [names[0]] * n),
             f"{n} adapters, one per stream": (n, names)}
    run(engine, prompts(n), names, 4)  # warm up
    best = {}
    for _ in range(args.repeats):  # interleaved, so slow phases of the machine hit every case
        for label, (k, adapters) in cases.items():
            best[label] = max(best.get(label, 0.0), run(engine, prompts(k), adapters, args.new_tokens))
    engine.shutdown()
    print(f"\n{'case':34s} {'tok/s':>8s} {'vs base':>8s}")
    for label, rate in best.items():
        base = best["base, batch 1"] if "batch 1" in label else best[f"base, {n} streams"]
        print(f"{label:34s} {rate:8.1f} {rate / base:7.2f}x")


if __name__ == "__main__":
    main()
