"""One-row CPU matmul kernels on cold weights: bf16 (oneDNN packed), int8 weight-only (ATen's
`_weight_int8pack_mm`, our int8 path) and int8 weights with int8 activations (`torch._int_mm` + dynamic per-row
activation quantization), int4 in ATen's CPU kernel layout (our int4 path) (issue 17: why int8 decodes no
faster than bf16).

    python bench/cold_gemv.py [--threads 1] [--out 5632] [--in 1024] [--copies 24]

A decode step streams every weight from memory once, so a kernel timed on one weight that stays in the
cache says little: each timing walks `--copies` different weights in turn (24 × 5632×1024 bf16 = 276 MB, well
past the L3). GB/s = weight bytes (bf16 2, int8 1, int4 0.5 per value; int4's scales left out) / time; best of 5 walks.
"""

import argparse
import os
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=int, default=5632)
    ap.add_argument("--in", dest="in_features", type=int, default=1024)
    ap.add_argument("--copies", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, k, copies = args.out, args.in_features, args.copies
    print(f"threads {args.threads}, weight {n}x{k}, {copies} copies, load average {os.getloadavg()}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, k, generator=gen).bfloat16()
    packed, q8, scales = [], [], []
    for _ in range(copies):
        w = torch.randn(n, k, generator=gen) * 0.02
        packed.append(torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 64))
        s = w.abs().amax(1) / 127
        q8.append(torch.round(w / s[:, None]).to(torch.int8))
        scales.append(s)
    scales_bf16 = [s.bfloat16() for s in scales]
    # int4 in ATen's CPU kernel layout (what our int4 path serves from), one group of 256 per scale
    group = 256
    int4, int4_scales = [], []
    for q, s in zip(q8, scales):
        q4 = torch.clamp(torch.round(q.float() / 127 * 7), -8, 7).to(torch.int32) + 8
        int4.append(torch._convert_weight_to_int4pack_for_cpu(q4, 8))
        s4 = (s * 127 / 7).bfloat16().expand(k // group, n)
        int4_scales.append(torch.stack((s4, torch.zeros_like(s4)), dim=-1).contiguous())

    def walk(fn) -> float:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for i in range(copies):
                fn(i)
            best = min(best, (time.perf_counter() - t) / copies)
        return best

    def int_mm_dynamic(i):
        xf = x.float()
        s = xf.abs().amax(dim=1, keepdim=True) / 127
        xq = torch.round(xf / s).to(torch.int8)
        return (torch._int_mm(xq, q8[i].t()).float() * (s * scales[i])).bfloat16()

    kernels = {
        "bf16 oneDNN packed": (2, lambda i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")),
        "int8 _weight_int8pack_mm": (1, lambda i: torch._weight_int8pack_mm(x, q8[i], scales_bf16[i])),
        "int8 x int8 _int_mm (dynamic)": (1, int_mm_dynamic),
        "int4 _weight_int4pack_mm_for_cpu": (0.5, lambda i: torch._weight_int4pack_mm_for_cpu(
            x, int4[i], group, int4_scales[i])),
    }
    for name, (size, fn) in kernels.items():
        seconds = walk(fn)
        print(f"{name:32s} {seconds * 1e6:7.0f} µs  {n * k * size / seconds / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
