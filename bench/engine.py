"""Our engine vs transformers' own `GlmForCausalLM.generate` on the same weights, side by side in one run.

    python bench/engine.py                       # CPU: generated mid-size checkpoint (hidden 1024, 12 layers)
    python bench/engine.py --size 6b --device cuda --dtype bfloat16   # GPU: 6B-shaped random weights

Prints decode tokens/s at batch 1, prefill tokens/s for a 1k-token prompt, aggregate tokens/s with 8
and 32 concurrent streams, each as ours / transformers' (its best of the dynamic and static cache).
On CUDA also: batch-1 decode as a share of the memory-bandwidth bound (weight bytes read per token /
device-to-device copy bandwidth measured in the same run), time to first token for 1k and 8k prompts,
peak memory, and our decode with static shapes + CUDA graphs vs our plain varlen step. On CPU also: our
batch-1 decode without the oneDNN-prepacked linears (`glmapp/cpu_linear.py`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import glmapp
from glmapp.backends import RequestHandle
from glmapp.cpu_threads import PROCESS_THREADS, single_threaded
from glmapp.demo import SIZES, make_demo
from glmapp.engine.engine import Engine, EngineConfig
from glmapp.engine.request import GenerationRequest
from glmapp.engine.sampling import SamplingParams
from glmapp.models.glm_convert import to_transformers_glm

SIZES_6B = dict(num_layers=28, hidden_size=4096, num_attention_heads=32, kv_channels=128, ffn_hidden_size=13696)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float:
    """Bytes per second moved (read + written) by a 1 GiB device-to-device copy, best of 10."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row of it)."""
    emb = model.transformer.embedding.word_embeddings.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - emb.numel() * emb.element_size()


def decode_rate(engine, tok, n_prompt, n_new, rep, salt=1):
    """Batch-1 decode tokens/s: (time for N tokens - time to the first) / (N - 1), best of `rep`."""
    return max((n_new - 1) / (full - first) for full, _, first in
               (ours_run(engine, tok, [prompt_ids(tok, n_prompt, salt * 100 + r)], n_new) for r in range(rep)))


def prompt_ids(tok, n: int, salt: int = 0) -> list[int]:
    base = tok.encode(f"第{salt}个问题：请详细介绍一下中国的历史、文化和科学。Tell me everything. ", add_special_tokens=False)
    ids = (base * (n // len(base) + 1))[: n - 2]
    return tok.prefix_ids + ids


def ours_run(engine, tok, prompts, new_tokens, adapters=None):
    """Submit all prompts at once (row i on adapters[i], if given); -> (wall seconds, tokens generated,
    seconds to first token of request 0)."""
    handles = []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        h = RequestHandle(f"b{time.perf_counter_ns()}-{i}", engine.cancel)
        engine.submit(h, GenerationRequest(p, SamplingParams(temperature=0), new_tokens, stop_ids=[-1],
                                           adapter=adapters[i] if adapters else None))
        handles.append(h)
    first, total = None, 0
    for i, h in enumerate(handles):
        for delta in h:
            if first is None and i == 0:
                first = time.perf_counter() - t0
            total += len(delta.token_ids)
            if delta.error:
                raise RuntimeError(delta.error)
    return time.perf_counter() - t0, total, first


def hf_run(ref, prompts, new_tokens, cache, device):
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    sync(device)
    return time.perf_counter() - t0, (out.shape[1] - ids.shape[1]) * ids.shape[0]


def best_hf(engine, ref, prompts, new_tokens, device, repeats):
    """transformers' best of its dynamic and static cache, best of `repeats` runs, on the engine thread
    (the same CPU thread pool as ours: a fair comparison)."""
    results = {}
    for cache in ("dynamic", "static"):
        try:
            runs = [engine.call(lambda: hf_run(ref, prompts, new_tokens, cache, device)) for _ in range(repeats)]
            results[cache] = min(runs)
        except Exception as e:  # noqa: BLE001 - report, use the other setting
            print(f"  (transformers {cache} cache failed: {type(e).__name__}: {e})")
    cache = min(results, key=lambda c: results[c][0])
    return results[cache], cache


def best_ours(engine, tok, make_prompts, new_tokens, repeats):
    """Fresh prompts for every repeat, so the prefix cache never turns a repeat into a cache hit."""
    return min((ours_run(engine, tok, make_prompts(r), new_tokens) for r in range(repeats)), key=lambda r: r[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mid", choices=[*SIZES, "6b"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--streams", default="8,32")
    ap.add_argument("--repeats", type=int, default=3, help="best of N runs for every figure")
    ap.add_argument("--ttft", default=None, help="prompt lengths for time to first token (CUDA default 1024,8192)")
    ap.add_argument("--kv-cache-mb", type=float, default=None, help="KV budget (CUDA default 8192)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, single_threaded():  # the engine thread does the computing
        if args.size == "6b":
            SIZES["6b"] = SIZES_6B
        path = make_demo(Path(tmp) / args.size, size=args.size, fmt="safetensors")
        model, tok = glmapp.load(str(path), device=args.device, dtype=args.dtype)
    device, dtype = model.device, model.dtype
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.size}: {params / 1e6:.1f}M params, {dtype}, {device}, torch {torch.__version__}, "
          f"threads {PROCESS_THREADS} (engine thread)")
    kv_mb = args.kv_cache_mb or (8192 if device.type == "cuda" else None)
    engine = Engine(model, tok, EngineConfig(max_batch_tokens=2048, max_seqs=64, kv_cache_mb=kv_mb))
    ref = engine.call(lambda: to_transformers_glm(model, attn_implementation="sdpa"))
    n_new, n_prompt = args.new_tokens, args.prompt_tokens
    rows = []

    rep = args.repeats
    # warm up both
    ours_run(engine, tok, [prompt_ids(tok, 16)], 4)
    engine.call(lambda: hf_run(ref, [prompt_ids(tok, 16)], 4, "dynamic", device))

    # batch-1 decode: (time for N tokens - time to the first token) / (N - 1)
    p1 = [prompt_ids(tok, n_prompt, 1)]
    ours_decode = decode_rate(engine, tok, n_prompt, n_new, rep)
    (h_full, _), cache = best_hf(engine, ref, p1, n_new, device, rep)
    h_one = min(engine.call(lambda: hf_run(ref, p1, 1, cache, device))[0] for _ in range(rep))
    hf_decode = (n_new - 1) / (h_full - h_one)
    rows.append(("decode tok/s, batch 1", ours_decode, hf_decode, cache))

    # prefill of a 1k-token prompt (time to first token)
    p1k = [prompt_ids(tok, 1024, 2)]
    ttft = min(ours_run(engine, tok, [p], 1)[2] for p in [prompt_ids(tok, 1024, 2 + i) for i in range(rep)])
    (h_ttft, _), cache = best_hf(engine, ref, p1k, 1, device, rep)
    rows.append(("prefill tok/s, 1k prompt", 1024 / ttft, 1024 / h_ttft, cache))

    for n in [int(s) for s in args.streams.split(",")]:
        prompts = [prompt_ids(tok, n_prompt, 10 + i) for i in range(n)]
        o_wall, o_tokens, _ = best_ours(
            engine, tok, lambda r: [prompt_ids(tok, n_prompt, 1000 * (r + 1) + i) for i in range(n)], n_new, rep)
        (h_wall, h_tokens), cache = best_hf(engine, ref, prompts, n_new, device, rep)
        rows.append((f"aggregate tok/s, {n} streams", o_tokens / o_wall, h_tokens / h_wall, cache))
    ref = None  # free its copy of the weights before the extra CUDA figures
    extra = []
    if device.type == "cuda":
        lengths = [int(x) for x in (args.ttft or "1024,8192").split(",")]
        for n in lengths:
            if n < engine.context_length:
                t = min(ours_run(engine, tok, [prompt_ids(tok, n, 5000 + n + r)], 1)[2] for r in range(rep))
                extra.append(f"time to first token, {n}-token prompt: {t * 1000:.1f} ms")
        bw, wb = copy_bandwidth(device), weight_bytes_per_token(model)
        extra.append(f"batch-1 decode {ours_decode:.1f} tok/s = {ours_decode * wb / bw:.0%} of the bandwidth bound "
                     f"({wb / 1e9:.2f} GB of weights per token, {bw / 1e12:.2f} TB/s copy bandwidth, "
                     f"bound {bw / wb:.0f} tok/s)")
        static = engine.runner.static
        extra.append(f"static decode steps {static.steps if static else 0}, graph replays "
                     f"{static.replays if static else 0}")
        extra.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    engine.shutdown()
    packed = engine.packed_linears
    del engine

    def decode_without(**setting) -> float:
        """Our batch-1 decode again, on a fresh engine with one setting changed."""
        if device.type == "cuda":
            torch.cuda.empty_cache()
        other = Engine(model, tok, EngineConfig(max_batch_tokens=2048, max_seqs=64, kv_cache_mb=kv_mb, **setting))
        ours_run(other, tok, [prompt_ids(tok, 16)], 4)
        rate = decode_rate(other, tok, n_prompt, n_new, rep, salt=7)
        other.shutdown()
        return rate

    if device.type == "cuda":
        varlen = decode_without(static_decode=False)
        extra.append(f"batch-1 decode, varlen step without CUDA graphs: {varlen:.1f} tok/s "
                     f"(static + graphs {ours_decode / varlen:.2f}x)")
    elif packed:
        unpacked = decode_without(prepack=False)
        extra.append(f"batch-1 decode with plain (not prepacked) linears: {unpacked:.1f} tok/s "
                     f"(prepacked {ours_decode / unpacked:.2f}x)")

    print(f"\n{'measure':32s} {'glmapp':>10s} {'transformers':>13s} {'ratio':>7s}  (transformers cache)")
    for name, ours, theirs, cache in rows:
        print(f"{name:32s} {ours:10.1f} {theirs:13.1f} {ours / theirs:7.2f}x  ({cache})")
    batch1 = rows[0][1]
    for name, ours, _, _ in rows[2:]:
        print(f"{name}: {ours / batch1:.2f}x our batch-1 decode rate")
    for line in extra:
        print(line)


if __name__ == "__main__":
    main()
