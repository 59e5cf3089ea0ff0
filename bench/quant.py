"""Quantization modes on the mid-size generated checkpoint: every kernel of `glmapp.quant_kernels` timed
against the dense matmul on the checkpoint's two largest linears (rows × dtype), then per mode and dtype
the linear-weight memory against bf16 (kernel-layout copies included) and batch-1 decode tokens/s of
`model.chat`.

    python bench/quant.py [--size mid] [--new-tokens 64] [--device auto] [--dtypes float32,bfloat16]
                          [--rows 1,8,16,32,64] [--skip-chat]

Timings are the best of up to --repeats runs per kernel, the kernels of one cell interleaved run by run
(in a shuffled order) so that a load change on the machine hits all of them alike, with caches flushed
before every timed call.
"""

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import torch

import glmapp
from glmapp import quant_kernels
from glmapp.checkpoint import resolve_device
from glmapp.cpu_threads import single_threaded
from glmapp.demo import SIZES, make_demo
from glmapp.quant import MODES, QuantizedLinear, available_modes, linear_weight_bytes

KERNELS = {8: ("rowscale", "int8pack", "int8pack_bf16", "rowscale_bf16", "dequantize"),
           4: ("split", "nibbles_int8pack", "nibbles_int8pack_bf16", "split_bf16", "tinygemm", "dequantize")}


def best_ms(fns: dict, repeats: int, budget_s: float = 1.5) -> dict:
    """Best time in ms of each `name: (prepare, call)`, interleaved; `prepare` runs untimed before the
    call, and a call stops being repeated once it has used `budget_s`. Caches are flushed before every
    timed call: in a decode step each linear's weight comes from memory (the mid model's linears are
    63-504 MiB, the L3 here 32 MiB), and a warm cache would favour whichever kernel runs right after
    another one that read the same weight."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    flush = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    best = dict.fromkeys(fns, float("inf"))
    spent = dict.fromkeys(fns, 0.0)
    order = list(fns)
    for i in range(repeats):
        random.Random(i).shuffle(order)  # no call always follows the same one
        for name in order:
            prepare, call = fns[name]
            if i >= 3 and spent[name] > budget_s:
                continue
            prepare()
            flush.add_(1)
            sync()
            t = time.perf_counter()
            call()
            sync()
            elapsed = time.perf_counter() - t
            best[name], spent[name] = min(best[name], elapsed), spent[name] + elapsed
    return {name: t * 1000 for name, t in best.items()}


def use(dispatch: dict, packed_copy: dict):
    def prepare():
        quant_kernels.DISPATCH, quant_kernels.INT4_PACKED_COPY = dispatch, packed_copy
    return prepare


def linear_table(shape, dtype, device, rows_list, repeats):
    """Markdown table: ms per QuantizedLinear call with each kernel forced, and with its own dispatch
    ("forward", the chosen kernel named). Every column is a module call, so all pay the same overhead."""
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(shape, generator=gen) * 0.02)
    dense = dense.to(device=device, dtype=dtype)
    modules = {bits: QuantizedLinear.from_float(dense, bits) for bits in (8, 4)}
    columns = ["dense"] + [f"int{b} {k}" for b in (8, 4) for k in KERNELS[b]] + ["int8 forward", "int4 forward"]
    print(f"\n{out_features}×{in_features}, {str(dtype).removeprefix('torch.')} activations, {device}, ms per call "
          f"(best of ≤{repeats}); \"forward\" = QuantizedLinear's own dispatch, its kernel named")
    print("| rows | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    actual = use(quant_kernels.DISPATCH, quant_kernels.INT4_PACKED_COPY)
    for rows in rows_list:
        x = torch.randn(rows, in_features, generator=gen).to(device=device, dtype=dtype)
        fns = {"dense": (actual, lambda x=x: dense(x))}
        chosen = {}
        with torch.no_grad():
            for bits, m in modules.items():
                for kernel in KERNELS[bits]:
                    forced = use({(device, bits, dtype): ((None, kernel),)}, {device: True})
                    forced()
                    m(x)  # warm-up; builds tinygemm's packed copy
                    if quant_kernels.choose(m, x) == kernel:  # else this device/shape cannot run it
                        fns[f"int{bits} {kernel}"] = (forced, lambda x=x, m=m: m(x))
                actual()
                chosen[bits] = quant_kernels.choose(m, x)
                fns[f"int{bits} forward"] = (actual, lambda x=x, m=m: m(x))
            ms = best_ms(fns, repeats)
        actual()
        cells = []
        for c in columns:
            cell = f"{ms[c]:.3f}" if c in ms else "—"
            if c.endswith("forward"):
                cell += f" ({chosen[int(c[3])]})"
            cells.append(cell)
        print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)
    print(f"(load average {os.getloadavg()[0]:.2f} after this table)")


def chat_speed(path, device, dtypes, new_tokens, chats=2):
    """Per mode and dtype: linear-weight memory after chatting (kernel-layout extras included) and the best of
    `chats` greedy decodes. (The engine holds CPU int4 weights in tinygemm's layout while it serves, so the
    rows that forced the older CPU kernels or a second tinygemm copy are gone: bench/cpu_decode.py compares
    the decode order of bf16, int8 and int4.)"""
    base_model, _ = glmapp.load(str(path), device=device, dtype="bfloat16")
    base = linear_weight_bytes(base_model)
    del base_model
    print(f"\nbf16 linear weights {base / 2**20:.1f} MiB; best of {chats} chats of {new_tokens} new tokens")
    print("| mode | dtype | linear weights vs bf16 | decode tok/s |")
    print("|---|---|---|---|")
    unavailable = available_modes(device)
    for dtype in dtypes:
        for mode in MODES:
            if unavailable[mode]:
                print(f"| {mode} | {dtype} | unavailable: {unavailable[mode]} | |")
                continue
            model, tok = glmapp.load(str(path), device=device, dtype=dtype, quant=mode)
            model.chat(tok, "warm up", [], do_sample=False, max_new_tokens=4)
            speeds = []
            for _ in range(chats):
                model.chat(tok, "请详细介绍一下长城的历史。", [], do_sample=False, max_new_tokens=new_tokens)
                speeds.append(model.last_stats.decode_tokens_per_second)
            print(f"| {mode} | {dtype} | {linear_weight_bytes(model) / base:.3f}× | {max(speeds):.1f} |", flush=True)
            model.backend(tok).close()  # one engine thread at a time (see glmapp.cpu_threads)
            del model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mid")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rows", default="1,8,16,32,64")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--skip-chat", action="store_true")
    ap.add_argument("--skip-tables", action="store_true")
    args = ap.parse_args()
    if args.size == "6b":  # ChatGLM2-6B's shapes, random weights (a GPU run: see bench/gpu_checks.sh)
        from engine import SIZES_6B

        SIZES["6b"] = SIZES_6B
    device = resolve_device(args.device).type
    dtypes = args.dtypes.split(",")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f}")
    hidden, ffn = SIZES[args.size]["hidden_size"], SIZES[args.size]["ffn_hidden_size"]
    rows = [int(r) for r in args.rows.split(",")]
    for dtype in [] if args.skip_tables else dtypes:  # dense_h_to_4h and dense_4h_to_h
        for shape in ((2 * ffn, hidden), (hidden, ffn)):
            linear_table(shape, getattr(torch, dtype), device, rows, args.repeats)
    if args.skip_chat:
        return
    with tempfile.TemporaryDirectory() as tmp:
        with single_threaded():  # keep this thread free of an OpenMP team (see glmapp.cpu_threads)
            path = make_demo(Path(tmp) / args.size, size=args.size, fmt="safetensors")
        chat_speed(path, device, dtypes, args.new_tokens)
    print(f"\nload average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
