#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for a session that is lent one (the device tool's `run`
# has a 10-minute limit per call: run the parts separately if needed).
#   bash bench/gpu_checks.sh tests     # CUDA-only tests (Triton decode kernel, CUDA graphs, quant kernels)
#   bash bench/gpu_checks.sh engine    # bench/engine.py on 6B-shaped random weights, bf16
#   bash bench/gpu_checks.sh quant     # bench/quant.py: int8/int4 kernels at 6B shapes, then decode per mode
#                                      # (the decode part writes and loads a 12 GB checkpoint per mode: long)
# The device image has torch, transformers, peft and triton but no gradio or bitsandbytes: the tests
# below avoid the UI; carry wheels (see the device tool's README) for the bitsandbytes modes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
case "${1:-tests}" in
  tests)
    python3 -m pytest -q -rs -p no:cacheprovider tests/engine/test_paged_attention.py \
      tests/engine/test_static_decode.py tests/test_quant.py 2>&1 | tee "$OUT/tests.txt" ;;
  engine)
    python3 bench/engine.py --size 6b --device cuda --dtype bfloat16 --repeats 2 2>&1 | tee "$OUT/engine.txt" ;;
  quant)
    python3 bench/quant.py --size 6b --device cuda --dtypes bfloat16 --rows 1,8,16,32,64,128 2>&1 \
      | tee "$OUT/quant.txt" ;;
  *) echo "usage: bash bench/gpu_checks.sh tests|engine|quant" >&2; exit 2 ;;
esac
