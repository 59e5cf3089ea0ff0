"""`F.linear` vs oneDNN-prepacked linear (`glmapp/cpu_linear.py`) on CPU, side by side in one run.

    python bench/cpu_linear.py [--shapes 5632x1024,1024x2816] [--rows 1,2,8,32,128,512] [--threads N]

ms per call (best of --repeats), for fp32 and bf16 (where oneDNN has bf16) weights of the mid demo model's
two big linears. Each call uses the next of --copies weights (more bytes than the L3 holds, for big shapes),
so every call streams its weight from memory as a decode step does. The two kinds of call alternate, so a
busy machine slows both alike; `ratio` > 1 means packing pays (how `cpu_linear.PACK_MIN_ELEMENTS` was set).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from glmapp import cpu_linear


def best_ms(fns, repeats: int) -> list[float]:
    """Best time of each of `fns` in ms, calling them in turn `repeats` times."""
    for fn in fns:
        for _ in range(3):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return [b * 1e3 for b in best]


def rotating(call, weights):
    state = [0]

    def run():
        state[0] = (state[0] + 1) % len(weights)
        call(weights[state[0]])

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="5632x1024,1024x2816", help="out x in features")
    ap.add_argument("--rows", default="1,2,8,32,128,512")
    ap.add_argument("--copies", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'dtype':9s} {'weight':>10s} {'rows':>5s} {'F.linear':>9s} {'packed':>8s} {'ratio':>6s}")
    for dtype in (torch.float32, torch.bfloat16):
        why_not = cpu_linear.supported(dtype)
        if why_not:
            print(f"{dtype}: skipped ({why_not})")
            continue
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            plain = [torch.randn(n, k).to(dtype) for _ in range(args.copies)]
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, cpu_linear.ROWS_HINT) for w in plain]
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, k).to(dtype)
                a, b = best_ms([rotating(lambda w: F.linear(x, w), plain),
                                rotating(lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                                         packed)], args.repeats)
                print(f"{str(dtype).removeprefix('torch.'):9s} {shape:>10s} {rows:5d} {a:9.3f} {b:8.3f} {a / b:5.2f}x")


if __name__ == "__main__":
    main()
