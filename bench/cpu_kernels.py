"""glmapp's few-row CPU kernels (`glmapp/cpu_kernels.py`) against ATen's, per weight kind, shape and row count.

    python bench/cpu_kernels.py [--threads 1,2] [--rows 1,2,4,8,16] [--repeats 5]

Shapes: the mid model's four linears and the 65024-row output layer. Weights come from memory as in decoding,
not from cache: each timed call goes through enough copies of the weight (>= 160 MiB in all) that none is
still cached when its turn comes back. ATen's side is what glmapp ran before: oneDNN's packed bf16 linear,
`_weight_int8pack_mm` (int8), tinygemm on ATen's int4 layout (int4), all with bf16 activations.
Prints ms per call (best of --repeats passes over the copies), GB/s of weight read, and ours/ATen speed.
"""

import argparse
import time

import torch

from glmapp import cpu_kernels, quant_kernels
from glmapp.quant import QuantizedLinear

SHAPES = ((65024, 1024), (1280, 1024), (1024, 1024), (5632, 1024), (1024, 2816))
KINDS = {"bf16": cpu_kernels.W_BF16, "int8": cpu_kernels.W_INT8, "int4": cpu_kernels.W_INT4}


def timed(calls, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - t) / len(calls))
    return best


def copies(nbytes: int) -> int:
    return max(2, -(-(160 << 20) // nbytes))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    assert cpu_kernels.available(), "glmapp's CPU kernels are unavailable here (see the log)"
    gen = torch.Generator().manual_seed(0)
    print("| threads | weight | kind | rows | ATen ms | ours ms | ours GB/s | ours/ATen speed |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for n, k in SHAPES:
            base = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
            for name, kind in KINDS.items():
                lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
                lin.weight.data.copy_(base)
                if kind == cpu_kernels.W_BF16:
                    nbytes = base.numel() * 2
                    weights = [base.clone() for _ in range(copies(nbytes))]
                    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in weights]
                    def aten(x, p):  # noqa: E306
                        return torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                    ours_args = [(w, None) for w in weights]
                else:
                    bits = 8 if kind == cpu_kernels.W_INT8 else 4
                    q = QuantizedLinear.from_float(lin, bits)
                    nbytes = q.weight.numel() + q.weight_scale.numel() * 2
                    mods = [QuantizedLinear.from_float(lin, bits) for _ in range(copies(nbytes))]
                    ours_args = [(m.weight.clone(), m.weight_scale) for m in mods]
                    for m in mods:
                        quant_kernels.to_kernel_layout(m)
                    packed = mods
                    aten_kernel = quant_kernels.KERNELS["int8pack" if bits == 8 else "tinygemm"]
                    def aten(x, m, aten_kernel=aten_kernel):  # noqa: E306  (not m(x): that would dispatch to ours)
                        return aten_kernel(m, x)
                for rows in map(int, args.rows.split(",")):
                    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
                    with torch.inference_mode():
                        t_aten = timed([lambda p=p: aten(x, p) for p in packed], args.repeats)
                        t_ours = timed([lambda w=w, s=s: cpu_kernels.linear(kind, x, w, s) for w, s in ours_args],
                                       args.repeats)
                    print(f"| {threads} | {n}x{k} | {name} | {rows} | {t_aten * 1e3:.3f} | {t_ours * 1e3:.3f} | "
                          f"{nbytes / t_ours / 1e9:.1f} | {t_aten / t_ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
