"""A/B of two checkouts (or two engine settings) on the mid-size checkpoint, one process per run:

    python bench/decode_ab.py REPO_DIR ["{'static_decode': True}"] [bfloat16]

Prints batch-1 decode tok/s (best of 3, 64 new tokens) and 8-stream aggregate tok/s (best of 2) of the
glmapp package found in REPO_DIR. Run it alternately for the two sides: this VM's speed drifts.
"""

import ast
import sys
from pathlib import Path

repo = sys.argv[1]
sys.path.insert(0, repo)
sys.path.insert(0, str(Path(repo) / "bench"))

import glmapp  # noqa: E402
from engine import ours_run, prompt_ids  # noqa: E402

from glmapp.cpu_threads import single_threaded  # noqa: E402
from glmapp.demo import make_demo  # noqa: E402
from glmapp.engine.engine import Engine, EngineConfig  # noqa: E402

cfg = ast.literal_eval(sys.argv[2]) if len(sys.argv) > 2 else {}
path = Path("/tmp/glmapp-ab-mid")
with single_threaded():
    if not (path / "config.json").exists():
        make_demo(path, size="mid", fmt="safetensors")
    model, tok = glmapp.load(str(path), dtype=sys.argv[3] if len(sys.argv) > 3 else "auto")
engine = Engine(model, tok, EngineConfig(max_batch_tokens=2048, max_seqs=64, **cfg))
ours_run(engine, tok, [prompt_ids(tok, 16)], 4)
runs = (ours_run(engine, tok, [prompt_ids(tok, 32, 100 + r)], 64) for r in range(3))
batch1 = max(63 / (full - first) for full, _, first in runs)
agg = max(t / w for w, t, _ in (ours_run(engine, tok, [prompt_ids(tok, 32, 1000 * r + i) for i in range(8)], 64)
                                for r in range(2)))
print(f"{repo} {cfg} {model.dtype}: batch-1 decode {batch1:.1f} tok/s, 8 streams {agg:.1f} tok/s")
engine.shutdown()
