"""Batch-1 CPU decode speed of bf16, int8 and int4 side by side in one run (issue 17), each also as a share
of the memory-bandwidth bound.

    python bench/cpu_decode.py [--size mid] [--new-tokens 64] [--rounds 3] [--threads N]

All three models are loaded once; each round runs one greedy `model.chat` per mode, in a rotated order, and
each mode's figure is its best round (the machine is shared: a load change hits all modes of a round alike).
The engine of one model is closed before the next model chats (one engine thread at a time), so each chat
starts an engine: its linears are packed (int4 into ATen's int4 kernel layout, `glmapp.quant_kernels`) then.

Bound: every decode step reads every linear's weight once (the 48 encoder linears with their scales, the
output layer), so tok/s cannot exceed copy bandwidth / those bytes. Copy bandwidth = (bytes read + bytes
written) / time of the best of 10 copies of a 256 MiB tensor (torch's default threads). KV and activations
are left out (a few MiB at these lengths), so the shares are upper estimates of what is reachable.

`--threads` sets the engine's intra-op threads (and the copy's); on a machine busy with other work, one
thread can be several times faster than two (OpenMP teams wait on each other), so record which was used.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import glmapp
from glmapp.cpu_threads import single_threaded
from glmapp.demo import make_demo
from glmapp.engine.engine import EngineConfig
from glmapp.quant import linear_weight_bytes

MODES = ("none", "int8", "int4")
PROMPT = "请详细介绍一下长城的历史。"


def copy_bandwidth(mib: int = 256, repeats: int = 10) -> float:
    """Bytes per second moved by the best of `repeats` copies of a `mib` MiB tensor (read + write)."""
    src = torch.ones(mib * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() / best


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: the quantizable linears (scales and kernel-layout extras
    included) and the output layer."""
    out = model.transformer.output_layer.weight
    return linear_weight_bytes(model) + out.numel() * out.element_size()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mid")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="engine threads (default: the process's)")
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, threads {threads}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        with single_threaded():  # keep this thread free of an OpenMP team (see glmapp.cpu_threads)
            path = make_demo(Path(tmp) / args.size, size=args.size, fmt="safetensors")
        models = {mode: glmapp.load(str(path), device="cpu", dtype="bfloat16", quant=mode) for mode in MODES}
    for model, _ in models.values():
        model.engine_config = EngineConfig(num_threads=threads)
    speeds = {mode: [] for mode in MODES}
    read = {}
    for r in range(args.rounds):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        for mode in order:
            model, tok = models[mode]
            model.chat(tok, "warm up", [], do_sample=False, max_new_tokens=4)
            model.chat(tok, PROMPT, [], do_sample=False, max_new_tokens=args.new_tokens)
            speeds[mode].append(model.last_stats.decode_tokens_per_second)
            read[mode] = weight_bytes_per_token(model)  # measured while packed (engine running)
            model.backend(tok).close()
        print(f"round {r + 1}: " + ", ".join(f"{m} {speeds[m][-1]:.1f}" for m in MODES) + f" tok/s, load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
    torch.set_num_threads(threads)  # after the engines are closed: one OpenMP team at a time
    bandwidth = copy_bandwidth()
    print(f"\ncopy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); best of {args.rounds} greedy chats of "
          f"{args.new_tokens} new tokens, batch 1")
    print("| mode (bf16 activations) | weights read per token | bound tok/s | decode tok/s | share of bound "
          "| vs bf16 |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        bound = bandwidth / read[mode]
        best = max(speeds[mode])
        print(f"| {'bf16' if mode == 'none' else mode} | {read[mode] / 2**20:.1f} MiB | {bound:.0f} | {best:.1f} | "
              f"{best / bound:.0%} | {best / max(speeds['none']):.2f}× |")
    print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    main()
