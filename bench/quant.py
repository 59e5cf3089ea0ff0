"""Quantization modes on the mid-size generated checkpoint: linear-weight memory against bf16, and
batch-1 decode tokens/s of `model.chat` per mode; plus the CPU forward choice inside QuantizedLinear
(scale the output rows vs dequantize the weight first) on one 5632×1024 linear.

    python bench/quant.py [--size mid] [--new-tokens 64] [--device auto] [--dtype auto]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import glmapp
from glmapp.cpu_threads import single_threaded
from glmapp.demo import make_demo
from glmapp.quant import (
    MODES,
    available_modes,
    dequantize,
    linear_weight_bytes,
    quantize_weight,
)


def best_ms(fn, repeats=30):
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1000


def forward_choice(rows=(1, 8, 64)):
    """ms per call of the two pure-torch forwards, fp32, for a [rows, 1024] input."""
    w = torch.randn(5632, 1024) * 0.02
    for bits in (8, 4):
        q, scale = quantize_weight(w, bits)
        for m in rows:
            x = torch.randn(m, 1024)
            if bits == 8:
                def rowscale(x=x, q=q, scale=scale):
                    return F.linear(x, q.float()) * scale
            else:
                def rowscale(x=x, q=q, scale=scale):
                    return (F.linear(x[:, 0::2], (q >> 4).float()) + F.linear(x[:, 1::2], ((q << 4) >> 4).float())) * scale

            def first(x=x, q=q, scale=scale, bits=bits):
                return F.linear(x, dequantize(q, scale, bits))

            def dense(x=x):
                return F.linear(x, w)

            print(f"int{bits} rows {m:3d}: scale output rows {best_ms(rowscale):6.2f} ms | dequantize first "
                  f"{best_ms(first):6.2f} ms | fp32 dense {best_ms(dense):6.2f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mid")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        with single_threaded():  # keep this thread free of an OpenMP team (see glmapp.cpu_threads)
            path = make_demo(Path(tmp) / args.size, size=args.size, fmt="safetensors")
        base_model, _ = glmapp.load(str(path), device=args.device, dtype="bfloat16")
        base = linear_weight_bytes(base_model)
        del base_model
        print(f"{args.size}: bf16 linear weights {base / 2**20:.1f} MiB")
        unavailable = available_modes(args.device if args.device != "auto" else "cpu")
        for mode in MODES:
            if unavailable[mode]:
                print(f"{mode:8s} unavailable: {unavailable[mode]}")
                continue
            t0 = time.perf_counter()
            model, tok = glmapp.load(str(path), device=args.device, dtype=args.dtype, quant=mode)
            load_s = time.perf_counter() - t0
            ratio = linear_weight_bytes(model) / base
            model.chat(tok, "warm up", [], do_sample=False, max_new_tokens=4)
            model.chat(tok, "请详细介绍一下长城的历史。", [], do_sample=False, max_new_tokens=args.new_tokens)
            s = model.last_stats
            print(f"{mode:8s} dtype {model.dtype} load {load_s:5.2f}s | linear weights {ratio:5.3f}x bf16 | "
                  f"decode {s.new_tokens} tok at {s.decode_tokens_per_second:6.1f} tok/s ({s.finish_reason})")
            model.backend(tok).close()  # one engine thread at a time (see glmapp.cpu_threads)
            del model
    forward_choice()


if __name__ == "__main__":
    main()
