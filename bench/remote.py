"""Tokens/s and time to first token through `RemoteBackend` (what a `--backend-url` front end does) vs the same
OpenAI-compatible server called directly, in one run.

    PYTHONPATH=. python bench/remote.py [--size mid] [--dtype float32] [--streams 1,32] [--new-tokens 64]

The server is a real glmapp app (`python app.py --model <demo checkpoint>`, a subprocess, as in bench/api.py).
"direct" streams chat completions with plain httpx from one thread per stream, as a minimal client would;
"remote" runs `RemoteBackend.chat_stream` from one thread per stream, as the web app's handlers do (its
per-update post-processing and history included). Same greedy requests, fresh questions every run (no
prefix-cache hits), alternating sides with the order flipped every repeat; best of --repeats per figure.
Tokens are counted from the server's `usage`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
from api import question, start_app  # bench/api.py

from glmapp.backends.remote import RemoteBackend
from glmapp.demo import make_demo
from glmapp.engine.sampling import SamplingParams


def direct_stream(client: httpx.Client, url: str, model: str, text: str, new_tokens: int, out: list, i: int):
    t0, first, tokens = time.perf_counter(), None, 0
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": True, "temperature": 0,
            "max_tokens": new_tokens, "stream_options": {"include_usage": True}}
    with client.stream("POST", url + "/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            event = json.loads(line[5:])
            if first is None and event.get("choices"):
                first = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    out[i] = (first, tokens)


def remote_stream(backend: RemoteBackend, text: str, new_tokens: int, out: list, i: int):
    t0, first, update = time.perf_counter(), None, None
    for update in backend.chat_stream(text, [], max_new_tokens=new_tokens, params=SamplingParams(temperature=0.0)):
        if first is None:
            first = time.perf_counter() - t0
    assert update.error is None, update.error
    out[i] = (first, update.usage.completion_tokens)


def run_threads(target, texts, *args) -> tuple[float, int, float]:
    """All streams at once -> (wall seconds, tokens, seconds to the first update of stream 0)."""
    out = [None] * len(texts)
    threads = [threading.Thread(target=target, args=(*args[:-1], t, args[-1], out, i)) for i, t in enumerate(texts)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(o[1] for o in out), out[0][0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mid")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--streams", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ttft-repeats", type=int, default=15)
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = make_demo(tmp / "ckpt", family="chatglm2", size=args.size)
        app, url = start_app(checkpoint, args.dtype, None, tmp / "app")
        try:
            backend = RemoteBackend(url)
            client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=max(streams) + 4))
            model, salt = backend.name, iter(range(1, 10**6))

            def texts(n):
                return [question(next(salt)) for _ in range(n)]

            sides = {"direct": lambda n, k=args.new_tokens: run_threads(direct_stream, texts(n), client, url, model, k),
                     "remote": lambda n, k=args.new_tokens: run_threads(remote_stream, texts(n), backend, k)}
            for measure in sides.values():  # warm-up: every batch shape, the first requests
                measure(max(streams))
            print(f"model {args.size} ({args.dtype}), {os.cpu_count()} CPUs, load average "
                  f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at start")
            runs, order = {}, list(sides)
            for r in range(args.repeats):
                for n in streams:
                    for side in (order if r % 2 == 0 else order[::-1]):
                        wall, tokens, _ = sides[side](n)
                        print(f"  repeat {r + 1}, {n:2d} streams, {side:6s}: {tokens / wall:7.1f} tok/s "
                              f"({tokens} tokens in {wall:.2f} s)", flush=True)
                        runs.setdefault((side, n), []).append(tokens / wall)
            ttft = {side: [] for side in sides}
            for r in range(args.ttft_repeats):
                for side in (order if r % 2 == 0 else order[::-1]):
                    ttft[side].append(sides[side](1, 1)[2] * 1000)
            print(f"\n{'best of ' + str(args.repeats):36s} {'remote':>9s} {'direct':>9s} {'remote/direct':>14s}")
            for n in streams:
                rem, dire = max(runs[("remote", n)]), max(runs[("direct", n)])
                print(f"{f'aggregate tok/s, {n} streams x {args.new_tokens}':36s} {rem:9.1f} {dire:9.1f} "
                      f"{rem / dire:13.2f}x")
            rem, dire = min(ttft["remote"]), min(ttft["direct"])
            print(f"{f'time to first token, ms (best of {args.ttft_repeats})':36s} {rem:9.1f} {dire:9.1f}  "
                  f"RemoteBackend adds {rem - dire:.1f} ms")
            backend.close()
            client.close()
        finally:
            app.terminate()
            app.wait(30)


if __name__ == "__main__":
    main()
