"""Tokens/s and time to first token through the OpenAI-compatible API vs the engine directly, in one run.

    PYTHONPATH=. python bench/api.py [--size mid] [--dtype float32] [--streams 1,32] [--new-tokens 64]
                                     [--baseline-app DIR]

The API side is the real app (`python app.py --model <demo checkpoint> --port P`, a subprocess) with the
official `openai` client streaming chat completions (greedy, `max_tokens` fixed, tokens counted from
`usage` via `stream_options.include_usage`). The engine side is an `Engine` in this process on the same
checkpoint with the app's engine settings, fed the same prompt ids as the chat template makes (the
engine side never stops at the end-of-text token; the API side could, so tokens/s counts what each
generated). Each side runs while the other is idle, alternating within every repeat (the order flips every
repeat), so a slow phase of the machine hits both; best of --repeats for each figure. Prints aggregate
tokens/s at each stream count as API / engine, CPU seconds per 1000 tokens of the generating process (the
app's for the API: its HTTP work included; the client's apart), and the time to first token the HTTP path
adds (one-token streamed requests). With `--baseline-app DIR` (another checkout of glmapp, e.g. `git archive`
of an earlier commit), a second app from that tree is measured the same way in the same run ("before").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch
from openai import AsyncOpenAI

import glmapp
from engine import ours_run  # bench/engine.py
from glmapp.cpu_threads import PROCESS_THREADS, single_threaded
from glmapp.demo import make_demo
from glmapp.engine.engine import Engine, EngineConfig
from glmapp.prompts import build_prompt_ids

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(checkpoint: Path, dtype: str, threads: int | None, tmp: Path, root: Path = ROOT,
              timeout: float = 300.0):
    """`python app.py` of the tree `root` on the checkpoint; -> (process, API base url) once /health answers ok."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    log = open(tmp / "app.log", "wb")
    cmd = [sys.executable, "app.py", "--model", str(checkpoint), "--port", str(port), "--dtype", dtype,
           "--device", "cpu", "--adapters-dir", str(tmp / "adapters"),
           "--comparisons-file", str(tmp / "comparisons.jsonl")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(root)}
    if threads:  # the app's engine thread takes the process's thread count
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # polling the condition (the server answers), not a synchronising sleep
    proc.kill()
    raise RuntimeError(f"the app did not serve /health within {timeout:.0f} s:\n"
                       + (tmp / "app.log").read_text(errors="replace")[-3000:])


def question(salt: int) -> str:
    return f"第{salt}个问题：请详细介绍一下中国的历史、文化和科学。Tell me everything."


async def api_stream(client, model: str, text: str, new_tokens: int):
    """One streamed chat completion -> (seconds to its first chunk, completion tokens, prompt tokens).
    The server sends a choice's first chunk with its first visible text, or with its end."""
    t0 = time.perf_counter()
    first, usage = None, None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], stream=True, temperature=0,
        max_tokens=new_tokens, stream_options={"include_usage": True})
    async with stream:
        async for chunk in stream:
            if first is None and chunk.choices:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                usage = chunk.usage
    return first, usage.completion_tokens, usage.prompt_tokens


async def api_run(client, model: str, texts: list[str], new_tokens: int):
    """All streams at once -> (wall seconds, completion tokens from usage, seconds to the first chunk of
    stream 0, prompt tokens of stream 0)."""
    t0 = time.perf_counter()
    results = await asyncio.gather(*(api_stream(client, model, t, new_tokens) for t in texts))
    return time.perf_counter() - t0, sum(r[1] for r in results), results[0][0], results[0][2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mid")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--streams", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="best of N alternating runs for every figure")
    ap.add_argument("--ttft-repeats", type=int, default=15, help="alternating one-token requests per side")
    ap.add_argument("--baseline-app", type=Path, default=None,
                    help="another glmapp tree whose app is measured too, as 'before' (e.g. an earlier commit)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads of both engines (default: the process's count; 1 on a machine shared with "
                         "other busy processes, where a team of threads waits for its slowest)")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with single_threaded():  # the engine thread does the computing
            checkpoint = make_demo(tmp / args.size, size=args.size, fmt="safetensors")
            model, tok = glmapp.load(str(checkpoint), device="cpu", dtype=args.dtype)
        apps = {"api": start_app(checkpoint, args.dtype, args.threads, tmp / "api")}
        try:
            if args.baseline_app:
                apps["before"] = start_app(checkpoint, args.dtype, args.threads, tmp / "before",
                                           args.baseline_app.resolve())
            run(args, streams, model, tok, {side: (url, psutil.Process(app.pid)) for side, (app, url) in apps.items()},
                checkpoint.name)
        except Exception:
            for side in apps:  # why a server stopped answering
                print(f"--- {side} app log (end) ---\n" + (tmp / side / "app.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            for app, _ in apps.values():
                app.terminate()
                try:
                    app.wait(30)
                except subprocess.TimeoutExpired:
                    app.kill()


def cpu_seconds(process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run(args, streams, model, tok, apps: dict, model_id: str):
    """`apps`: side name ("api", "before") -> (API base url, its process)."""
    print(f"model {args.size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {model.dtype}, "
          f"torch {torch.__version__}, threads {args.threads or PROCESS_THREADS} per engine, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at start")
    engine = Engine(model, tok, EngineConfig(num_threads=args.threads))  # else the app's settings
    loop = asyncio.new_event_loop()
    clients = {side: AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600,
                                 http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=max(streams) + 4)))
               for side, (url, _) in apps.items()}
    salt = iter(range(1, 10**6))

    def texts(n):  # fresh questions every run: no prefix-cache hits between runs
        return [question(next(salt)) for _ in range(n)]

    def engine_side(n, new_tokens=args.new_tokens):
        return ours_run(engine, tok, [build_prompt_ids(tok, t, []) for t in texts(n)], new_tokens)

    def api_side(client):
        def measure(n, new_tokens=args.new_tokens):
            wall, tokens, first, _ = loop.run_until_complete(api_run(client, model_id, texts(n), new_tokens))
            return wall, tokens, first
        return measure

    # warm up all (first steps of every batch shape, the servers' first requests) and check the prompts agree
    engine_side(max(streams))
    q = question(0)
    for client in clients.values():
        _, _, _, api_prompt = loop.run_until_complete(api_run(client, model_id, [q], 4))
        assert api_prompt == len(build_prompt_ids(tok, q, [])), "the API and the engine got different prompts"
        api_side(client)(max(streams))

    # CPU seconds per 1000 tokens of the process that generates (the app for the API, this one for the
    # engine): less sensitive than tokens/s to other processes taking the cores. The client's CPU is apart.
    me = psutil.Process()
    runs = {}  # (side, streams) -> [(tokens/s, generating process CPU s/1k tokens, client CPU s/1k tokens)]
    sides = {"engine": (engine_side, me)} | {side: (api_side(clients[side]), process)
                                             for side, (_, process) in apps.items()}
    order = list(sides)
    for r in range(args.repeats):
        for n in streams:
            for side in (order if r % 2 == 0 else order[::-1]):
                measure, process = sides[side]
                cpu0, mine0 = cpu_seconds(process), cpu_seconds(me)
                wall, tokens, _ = measure(n)
                cpu, mine = (cpu_seconds(process) - cpu0) * 1000 / tokens, (cpu_seconds(me) - mine0) * 1000 / tokens
                print(f"  repeat {r + 1}, {n:2d} streams, {side:6s}: {tokens / wall:7.1f} tok/s ({tokens} tokens in "
                      f"{wall:.2f} s), {cpu:.2f} CPU s/1k tokens" + (f" (+ client {mine:.2f})" if side != "engine"
                                                                     else ""), flush=True)
                runs.setdefault((side, n), []).append((tokens / wall, cpu, mine))

    # Time to first token: one-token requests (the first chunk then carries the token whatever its text),
    # alternating; the engine's is the time to the request's one delta.
    ttft = {side: [] for side in sides}
    for r in range(args.ttft_repeats):
        for side in (order if r % 2 == 0 else order[::-1]):
            _, tokens, first = sides[side][0](1, 1)
            assert tokens == 1
            ttft[side].append(first * 1000)
    engine.shutdown()
    for client in clients.values():
        loop.run_until_complete(client.close())
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()

    for side in apps:
        name = "API" if side == "api" else f"API {side}"
        print(f"\n{'best of ' + str(args.repeats):40s} {name:>10s} {'engine':>9s} {'API/engine':>11s}")
        for n in streams:
            api, eng = max(runs[(side, n)]), max(runs[("engine", n)])
            per_repeat = " ".join(f"{a[0] / e[0]:.2f}" for a, e in zip(runs[(side, n)], runs[("engine", n)]))
            print(f"{f'aggregate tok/s, {n} streams x {args.new_tokens}':40s} {api[0]:10.1f} {eng[0]:9.1f} "
                  f"{api[0] / eng[0]:10.2f}x  (per repeat: {per_repeat})")
            api, eng = min(c for _, c, _ in runs[(side, n)]), min(c for _, c, _ in runs[("engine", n)])
            print(f"{f'  CPU s per 1k tokens, {n} streams':40s} {api:10.2f} {eng:9.2f} {api / eng:10.2f}x  "
                  f"(+ client {min(m for _, _, m in runs[(side, n)]):.2f})")
        api, eng = min(ttft[side]), min(ttft["engine"])
        print(f"{f'time to first token, ms (best of {args.ttft_repeats})':40s} {api:10.1f} {eng:9.1f}  "
              f"HTTP path adds {api - eng:.1f} ms")
        api, eng = statistics.median(ttft[side]), statistics.median(ttft["engine"])
        print(f"{'time to first token, ms (median)':40s} {api:10.1f} {eng:9.1f}  HTTP path adds {api - eng:.1f} ms")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
