"""glmapp vs llama.cpp (llama-cpp-python) on the same weights, batch-1 CPU decode, side by side (issue 17).

    python bench/llama_cpp.py [--size mid] [--vocab 65024] [--types f32,bf16,q8_0,q4_0] [--rounds 3]
                              [--threads 2] [--prompt-tokens 32] [--new-tokens 64] [--check-tokens 20]
                              [--prefill-tokens 1024] [--output same|full]

Needs `llama_cpp` (not a glmapp dependency; build it with
`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36`, about 10 minutes on 2 cores).

The checkpoint: the demo network of `--size` (mid = 12 layers, hidden 1024, 16 heads, kv_channels 64, 2 groups,
ffn 2816) stored in bf16, with its embedding and output layer widened to `--vocab` rows (65024 = the real ChatGLM
vocabulary, so the output layer weighs what it does in the real models: 265M parameters in all). It is exported
with `glmapp.gguf_export` at each type and paired with our model in the same weights:
f32 <-> ours fp32, bf16 <-> ours bf16, q8_0 <-> ours int8, q4_0 <-> ours int4 (bf16 activations; ChatGLM's
per-row int8/int4 schemes, so "same weights" is same source weights, not the same quantized values).

Correctness first: llama.cpp's greedy tokens after the prompt must equal ours (f32: all `--check-tokens` of them,
else the script stops; the other types print how many of the first ones agree, since the two quantizers differ).
Speed: for each type, `--rounds` rounds alternating ours and llama.cpp (order flipped every round), each run
`--new-tokens` greedy tokens after the same `--prompt-tokens` prompt ids; tok/s = tokens after the first / time
after the first (prefill excluded), the same formula for both; the best round is reported, with the ratio.
`--prefill-tokens N` also times a prompt of N tokens up to its first new token (ours: the engine's
submit-to-first-token; llama.cpp: eval of the prompt and the first argmax).
`--output same` (default): the output layer is quantized like the other weights on both sides (llama.cpp's
file as `--type`, ours through the engine's `output_quant`); `--output full`: both keep it in bf16.
llama.cpp runs in a process of its own (its OpenMP threads stay out of our engine's way)
with `--threads` threads, default flash attention (off) and f16 KV cache; ours with its engine on the same
number of threads (glmapp's CPU kernels when they build, see glmapp/cpu_kernels.py; GLMAPP_CPU_KERNELS=torch
for ATen's).

Bound: a decode step reads every weight it multiplies once (all linears and the output layer; the embedding
only one row), so tok/s <= read bandwidth / those bytes. Read bandwidth: the best of 5 sums of a 512 MiB tensor
in 2 MiB pages with `--threads` threads, in a process of its own, measured before the first type and after each
one; the highest is used (this host's bandwidth drifts by 20-40% within minutes, and the speeds are best-of
rounds too). Each side's share of its own bound is printed (ours: the
linears' tensors as the engine holds them, the output layer as it reads it; llama.cpp: the GGUF's tensors but
token_embd). KV reads and activations are left out (under 1 MiB per token at these lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# This file's name is the package's: drop bench/ from the path so `import llama_cpp` finds llama-cpp-python.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import glmapp  # noqa: E402
from glmapp.checkpoint import iter_tensors, write_checkpoint  # noqa: E402
from glmapp.cpu_threads import single_threaded  # noqa: E402
from glmapp.demo import make_demo  # noqa: E402
from glmapp.engine.engine import EngineConfig  # noqa: E402
from glmapp.engine.request import GenerationRequest  # noqa: E402
from glmapp.engine.sampling import SamplingParams  # noqa: E402
from glmapp.gguf_export import export_gguf  # noqa: E402

OURS = {"f32": ("float32", "none"), "bf16": ("bfloat16", "none"), "q8_0": ("bfloat16", "int8"),
        "q4_0": ("bfloat16", "int4")}
PROMPT = "请详细介绍一下长城的历史，以及它在今天的意义。The Great Wall of China is a series of fortifications."
WIDENED = ("transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight")


def make_checkpoint(out: Path, size: str, vocab: int, seed: int = 0) -> Path:
    """The `size` demo in bf16 with embedding and output layer widened to `vocab` rows (seeded random rows)."""
    base = make_demo(out / "base", size=size, fmt="safetensors", dtype=torch.bfloat16, seed=seed)
    raw = json.loads((base / "config.json").read_text(encoding="utf-8"))
    gen = torch.Generator().manual_seed(seed + 1)
    state = {}
    for name, t in iter_tensors(base):
        if name in WIDENED and t.shape[0] < vocab:
            extra = torch.randn(vocab - t.shape[0], t.shape[1], generator=gen) * 0.02
            t = torch.cat([t, extra.to(t.dtype)])
        state[name] = t.contiguous()
    raw.update(padded_vocab_size=vocab, _name_or_path=f"glmapp/chatglm2-bench-{size}-v{vocab}")
    return write_checkpoint(out / f"{size}-v{vocab}", state, raw, tokenizer_from=base, fmt="safetensors")


LONG_PROMPT = "Summarise the following notes. 长城的修建持续了两千多年，跨越多个朝代。"  # shares no prefix with PROMPT


def prompt_ids(tokenizer, n: int, text: str = PROMPT) -> list[int]:
    ids = tokenizer.encode(text)
    while len(ids) < n:
        ids += tokenizer.sp_encode(text)
    return ids[:n]


class Ours:
    def __init__(self, path: Path, dtype: str, quant: str, threads: int, output_quant: str = "none"):
        self.model, self.tok = glmapp.load(str(path), device="cpu", dtype=dtype, quant=quant)
        self.model.engine_config = EngineConfig(num_threads=threads, output_quant=output_quant)
        self.backend = None

    def start(self):
        self.backend = self.model.backend(self.tok)

    def stop(self):
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def generate(self, ids: list[int], n: int) -> tuple[list[int], float]:
        request = GenerationRequest(list(ids), SamplingParams(temperature=0.0), max_new_tokens=n, stop_ids=[-1])
        handle = self.backend.submit(request)
        out = [t for delta in handle for t in delta.token_ids]
        self.prefill_seconds = handle.usage.first_token_seconds  # submit -> first token: the prompt's prefill
        self.cached_tokens = handle.usage.cached_tokens
        return out, handle.usage.decode_tokens_per_second


class LlamaCpp:
    def __init__(self, gguf_path: Path, threads: int, n_ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _next(self) -> int:
        return int(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).argmax())

    def generate(self, ids: list[int], n: int) -> tuple[list[int], float]:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(list(ids))
        out = [self._next()]
        t_first = time.perf_counter()
        self.prefill_seconds = t_first - t0
        for _ in range(n - 1):
            self.llm.eval([out[-1]])
            out.append(self._next())
        span = time.perf_counter() - t_first
        return out, (n - 1) / span


def _serve_llama_cpp(conn, gguf_path: str, threads: int, n_ctx: int) -> None:
    llm = LlamaCpp(Path(gguf_path), threads, n_ctx)
    conn.send("ready")
    while (call := conn.recv()) is not None:
        out, tps = llm.generate(*call)
        conn.send((out, tps, llm.prefill_seconds))


class LlamaCppProcess:
    """`LlamaCpp` in a process of its own: ggml computes on the calling thread with its own OpenMP runtime, and
    our engine's OpenMP team must be the only one busy in our process (`glmapp.cpu_threads`)."""

    def __init__(self, gguf_path: Path, threads: int, n_ctx: int):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve_llama_cpp, args=(child, str(gguf_path), threads, n_ctx), daemon=True)
        self.process.start()
        if not self.conn.poll(600) or self.conn.recv() != "ready":
            raise RuntimeError("llama.cpp's process did not start")

    def generate(self, ids: list[int], n: int) -> tuple[list[int], float]:
        self.conn.send((list(ids), n))
        out, tps, self.prefill_seconds = self.conn.recv()
        return out, tps

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(timeout=30)


def read_bandwidth(threads: int) -> float:
    """Bytes/s read by a sum over 512 MiB (in 2 MiB pages where the kernel allows, as the engine's weights) with
    `threads` threads (in a child process: no OpenMP team here)."""
    import subprocess

    code = ("import time, torch\n"
            "from glmapp import hugepages\n"
            f"torch.set_num_threads({threads})\n"
            "x = torch.ones(128 << 20)\n"
            "hugepages.back([x])\n"
            "best = min((lambda t: (x.sum(), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))\n"
            "print(x.numel() * 4 / best)\n")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def ours_bytes_per_token(model, output_quant: str) -> int:
    """Weight bytes one decode step of ours reads: the linears as held, the output layer as the engine reads it."""
    from glmapp.quant import linear_weight_bytes

    out = model.transformer.output_layer.weight
    n, k = out.shape
    output = {"none": out.numel() * out.element_size(), "int8": n * k + 2 * n, "int4": n * k // 2 + 2 * n}
    return linear_weight_bytes(model) + output[output_quant]


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of the GGUF's tensors a decode step reads (all but the token embedding)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="mid")
    ap.add_argument("--vocab", type=int, default=65024)
    ap.add_argument("--types", default="f32,bf16,q8_0,q4_0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--check-tokens", type=int, default=20)
    ap.add_argument("--prefill-tokens", type=int, default=0,
                    help="also time the prefill of a prompt this long (tokens/s up to the first new token), 0 = off")
    ap.add_argument("--output", choices=("same", "full"), default="same",
                    help="same: both quantize the output layer like the other weights (llama.cpp's file and our "
                         "engine's --output-quant); full: both keep it in bf16 (f32 for f32)")
    ap.add_argument("--check-only", action="store_true", help="only the greedy-token check, no timing")
    args = ap.parse_args(argv)
    types = args.types.split(",")
    from importlib.metadata import version  # llama_cpp itself is loaded in its own process only

    print(f"torch {torch.__version__}, llama-cpp-python {version('llama-cpp-python')}, threads {args.threads}, "
          f"load average {os.getloadavg()}", flush=True)
    rows, failed = [], False
    bandwidth = read_bandwidth(args.threads)
    print(f"read bandwidth with {args.threads} threads: {bandwidth / 1e9:.1f} GB/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="glmapp-bench-llama-") as tmp:
        tmp = Path(tmp)
        with single_threaded():
            path = make_checkpoint(tmp, args.size, args.vocab)
        for type_ in types:
            dtype, quant = OURS[type_]
            quantized = quant in ("int8", "int4")
            output_type = None if args.output == "same" or not quantized else "bf16"
            with single_threaded():  # parallel torch work here would give this thread an OpenMP team of its
                # own beside the engine thread's, and the engine then decoded 35% slower on 2 threads
                gguf_path = export_gguf(path, tmp / f"{type_}.gguf", type_, output_type=output_type).path
            output_quant = quant if args.output == "same" and quantized else "none"
            ours = Ours(path, dtype, quant, args.threads, output_quant)
            bytes_ours = ours_bytes_per_token(ours.model, output_quant)
            bytes_theirs = gguf_bytes_per_token(gguf_path)
            ids = prompt_ids(ours.tok, args.prompt_tokens)
            longest = max(args.prompt_tokens, args.prefill_tokens)
            theirs = LlamaCppProcess(gguf_path, args.threads, n_ctx=longest + args.new_tokens + 16)
            long_ids = prompt_ids(ours.tok, args.prefill_tokens, LONG_PROMPT) if args.prefill_tokens else None
            ours.start()
            a, _ = ours.generate(ids, args.check_tokens)
            ours.stop()
            b, _ = theirs.generate(ids, args.check_tokens)
            same = agree(a, b)
            print(f"{type_}: greedy tokens equal for the first {same} of {args.check_tokens}"
                  + ("" if same == args.check_tokens else f" (ours {a[:same + 3]}..., llama.cpp {b[:same + 3]}...)"),
                  flush=True)
            if type_ == "f32" and same < args.check_tokens:
                failed = True
            if args.check_only:
                theirs.close()
                continue
            speeds = {"ours": [], "llama.cpp": []}
            prefill = {"ours": [], "llama.cpp": []}
            for r in range(args.rounds):
                order = ("ours", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "ours")
                for who in order:
                    if who == "ours":
                        ours.start()
                        ours.generate(ids, 4)  # warm-up: the engine packs its linears on start
                        speeds[who].append(ours.generate(ids, args.new_tokens)[1])
                        if long_ids:
                            ours.generate(long_ids, 2)
                            # a fresh engine each round: no part of the long prompt may come from its prefix cache
                            assert ours.cached_tokens == 0, ours.cached_tokens
                            prefill[who].append(len(long_ids) / ours.prefill_seconds)
                        ours.stop()
                    else:
                        theirs.generate(ids, 4)
                        speeds[who].append(theirs.generate(ids, args.new_tokens)[1])
                        if long_ids:
                            theirs.generate(long_ids, 2)
                            prefill[who].append(len(long_ids) / theirs.prefill_seconds)
                extra = (f"; prefill of {len(long_ids)}: ours {prefill['ours'][-1]:.0f}, llama.cpp "
                         f"{prefill['llama.cpp'][-1]:.0f} tok/s" if long_ids else "")
                print(f"  {type_} round {r + 1}: ours {speeds['ours'][-1]:.1f}, llama.cpp "
                      f"{speeds['llama.cpp'][-1]:.1f} tok/s{extra}, load average {os.getloadavg()[0]:.2f}", flush=True)
            rows.append((type_, quant, max(speeds["ours"]), max(speeds["llama.cpp"]), same,
                         max(prefill["ours"], default=0.0), max(prefill["llama.cpp"], default=0.0),
                         bytes_ours, bytes_theirs))
            theirs.close()
            del ours
            bandwidth = max(bandwidth, read_bandwidth(args.threads))
    if rows:
        print(f"\nbest of {args.rounds} alternating rounds, {args.new_tokens} new tokens after {args.prompt_tokens} "
              f"prompt tokens, batch 1, {args.threads} threads")
        head = ("| llama.cpp type / ours | glmapp tok/s | llama.cpp tok/s | ratio | greedy tokens equal | "
                "glmapp bound tok/s (share) | llama.cpp bound tok/s (share) |")
        rule = "|---|---|---|---|---|---|---|"
        if args.prefill_tokens:
            head += f" prefill {args.prefill_tokens}: glmapp tok/s | llama.cpp tok/s | ratio |"
            rule += "---|---|---|"
        print(head + "\n" + rule)
        print(f"read bandwidth (the highest measured): {bandwidth / 1e9:.1f} GB/s")
        for type_, quant, o, t, same, po, pt, bytes_o, bytes_t in rows:
            bound_o, bound_t = bandwidth / bytes_o, bandwidth / bytes_t
            ours_name = OURS[type_][0] if quant == "none" else f"{quant} (bf16 act.)"
            line = (f"| {type_} / {ours_name} | {o:.1f} | {t:.1f} | {o / t:.2f}× | {same}/{args.check_tokens} | "
                    f"{bound_o:.0f} ({o / bound_o:.0%}) | {bound_t:.0f} ({t / bound_t:.0%}) |")
            if args.prefill_tokens:
                line += f" {po:.0f} | {pt:.0f} | {po / pt:.2f}× |"
            print(line)
    print(f"\nload average {os.getloadavg()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
