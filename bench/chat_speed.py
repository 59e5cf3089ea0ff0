"""CPU/GPU tokens/s of `model.chat` on generated checkpoints (tiny demo and mid-size), plus load time.

    python bench/chat_speed.py [--sizes tiny,mid] [--new-tokens 128] [--device auto] [--dtype auto]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import glmapp
from glmapp.cpu_threads import single_threaded
from glmapp.demo import make_demo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            with single_threaded():  # keep this thread free of an OpenMP team (see glmapp.cpu_threads)
                path = make_demo(Path(tmp) / size, size=size, fmt="safetensors")
            t0 = time.perf_counter()
            model, tok = glmapp.load(str(path), device=args.device, dtype=args.dtype)
            load_s = time.perf_counter() - t0
            params = sum(p.numel() for p in model.parameters())
            model.chat(tok, "warm up", [], do_sample=False, max_new_tokens=4)
            query = "请详细介绍一下长城的历史。" * 8
            _, history = model.chat(tok, query, [], do_sample=False, max_new_tokens=args.new_tokens)
            s = model.last_stats
            print(f"{size:5s} params {params / 1e6:7.1f}M dtype {model.dtype} load {load_s:5.2f}s | "
                  f"prompt {s.prompt_tokens} tok, first token after {s.first_token_seconds * 1000:6.1f} ms | "
                  f"decode {s.new_tokens} tok at {s.decode_tokens_per_second:7.1f} tok/s ({s.finish_reason})")
            model.backend(tok).close()  # one engine thread at a time (see glmapp.cpu_threads)


if __name__ == "__main__":
    main()
