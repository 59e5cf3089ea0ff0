"""Paged decode attention: the torch reference and the Triton kernel (run by Triton's interpreter on CPU,
compiled on CUDA) both equal plain SDPA over each row's contiguous keys/values."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmapp.engine.paged_attention import (
    paged_decode,
    paged_decode_reference,
    paged_decode_rows,
    paged_decode_triton,
    rows_cheaper,
)
from glmapp.models.chatglm import attention

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_batch(lengths, heads, groups, head_dim, block_size, width, dtype=torch.float32, device="cpu", seed=0):
    """Rows of random k/v scattered over shuffled blocks. Every slot no row owns (block 0, which the padded
    table entries point at, and the tails of last blocks) holds NaN, so any read of it shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = len(lengths) * width + 1
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).to(torch.int32)
    shape = (num_blocks * block_size, groups, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    tables = torch.zeros((len(lengths), width), dtype=torch.int32)
    keys, values = [], []
    for row, n in enumerate(lengths):
        used = -(-n // block_size)
        tables[row, :used] = order[row * width: row * width + used]
        pos = torch.arange(n)
        slots = (tables[row, pos // block_size].long() * block_size + pos % block_size).to(device)
        k, v = (torch.randn(n, groups, head_dim, generator=gen).to(device, dtype) for _ in range(2))
        k_cache[slots], v_cache[slots] = k, v
        keys.append(k)
        values.append(v)
    q = torch.randn(len(lengths), heads, head_dim, generator=gen).to(device, dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, tables.to(device), lens, keys, values


def sdpa_rows(q, keys, values):
    """What the model's own attention computes for each decode row over its contiguous keys/values."""
    rows = [attention(q[i][None, None], k[None], v[None], None, is_causal=False)[0, 0] for i, (k, v) in
            enumerate(zip(keys, values))]
    return torch.stack(rows)


# (heads, groups, head_dim, block_size, width): ChatGLM2-style GQA, and v1-style one head per group
# (padded from 1 to 16 rows inside the kernel) with a small block size.
CASES = [(8, 2, 32, 16, 8), (4, 4, 16, 4, 24)]


def lengths_for(block_size, width):
    full = width * block_size
    return [1, block_size - 1, block_size, full * 2 // 3 + 1, full]  # the 4th spans > 2 partitions of 32


@pytest.mark.parametrize("heads,groups,head_dim,block_size,width", CASES)
def test_reference_matches_sdpa_and_ignores_padding(heads, groups, head_dim, block_size, width):
    q, kc, vc, tables, lens, keys, values = make_batch(lengths_for(block_size, width), heads, groups, head_dim,
                                                       block_size, width)
    out = paged_decode_reference(q, kc, vc, tables, lens, block_size)
    torch.testing.assert_close(out, sdpa_rows(q, keys, values), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,groups,head_dim,block_size,width", CASES)
def test_row_by_row_path_matches_sdpa_and_reads_only_its_slots(heads, groups, head_dim, block_size, width, dtype):
    lengths = lengths_for(block_size, width)
    q, kc, vc, tables, lens, keys, values = make_batch(lengths, heads, groups, head_dim, block_size, width, dtype)
    row_slots = []
    for row, n in enumerate(lengths):
        pos = torch.arange(n)
        row_slots.append(tables[row, pos // block_size].long() * block_size + pos % block_size)
    out = paged_decode_rows(q, kc, vc, row_slots)  # every slot it does not own is NaN
    assert out.dtype == dtype
    want = sdpa_rows(q.float(), [k.float() for k in keys], [v.float() for v in values])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(paged_decode_rows(q, kc, vc, row_slots, scale=0.3).float(),
                               paged_decode_reference(q, kc, vc, tables, lens, block_size, scale=0.3).float(),
                               atol=tol, rtol=tol)


def test_row_by_row_is_chosen_for_few_or_long_rows_only():
    assert rows_cheaper([1], 16) and rows_cheaper([3000], 16)  # one row: nothing to pad
    assert rows_cheaper([2000] * 8, 16) and rows_cheaper([1500, 20, 30, 40], 16)  # long or uneven rows
    assert not rows_cheaper([20] * 32, 16) and not rows_cheaper([50] * 4, 16)  # many short, even rows


# Triton fixes interpreter mode when it is first imported, and this process may use the compiled kernels (on
# a GPU machine), so the interpreted runs happen in one child process with TRITON_INTERPRET=1. The child loads
# the kernel module by path: it needs only torch, and importing glmapp would pull in transformers (~7 s).
INTERPRET_SCRIPT = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("paged_attention", "glmapp/engine/paged_attention.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
results = {}
for name, (partition_size, args, kwargs) in torch.load(sys.argv[1]).items():
    module.PARTITION_SIZE = partition_size
    out = module.paged_decode_triton(*args, **kwargs)
    assert "out" not in kwargs or out is kwargs["out"], "paged_decode_triton must return the given out"
    results[name] = out
torch.save(results, sys.argv[2])
"""


def interpreted_cases():
    """name -> (partition size, args, kwargs, contiguous keys, values) for every interpreted kernel run."""
    cases = {}
    for heads, groups, head_dim, block_size, width in CASES:
        q, kc, vc, tables, lens, keys, values = make_batch(lengths_for(block_size, width), heads, groups, head_dim,
                                                           block_size, width)
        for partition_size in (32, 512):  # split-K with a reduce; one partition written directly
            name = f"{heads}-{groups}-{head_dim}-{block_size}-{partition_size}"
            cases[name] = (partition_size, (q, kc, vc, tables, lens, block_size), {}, keys, values)
    q, kc, vc, tables, lens, keys, values = make_batch([5, 40], 8, 2, 32, 8, 6)
    cases["scale-out"] = (16, (q, kc, vc, tables, lens, 8), {"scale": 0.3, "out": torch.empty_like(q)}, keys, values)
    # ChatGLM2-6B head shapes in fp16 with the default partition size (the interpreter's bf16 dot is broken).
    q, kc, vc, tables, lens, keys, values = make_batch([1, 100, 700], 32, 2, 128, 16, 48, dtype=torch.float16)
    cases["fp16"] = (512, (q, kc, vc, tables, lens, 16), {}, keys, values)
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """(cases, outputs of paged_decode_triton run by Triton's interpreter in a child process)."""
    pytest.importorskip("triton")
    cases = interpreted_cases()
    folder = tmp_path_factory.mktemp("paged_attention")
    torch.save({name: case[:3] for name, case in cases.items()}, folder / "cases.pt")
    subprocess.run([sys.executable, "-c", INTERPRET_SCRIPT, str(folder / "cases.pt"), str(folder / "out.pt")],
                   cwd=REPO_ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, check=True, timeout=120)
    return cases, torch.load(folder / "out.pt")


@pytest.mark.parametrize("heads,groups,head_dim,block_size,width", CASES)
@pytest.mark.parametrize("partition_size", [32, 512], ids=["split-k", "one-partition"])
def test_triton_kernel_matches_reference_and_sdpa(interpreted, partition_size, heads, groups, head_dim,
                                                  block_size, width):
    cases, outputs = interpreted
    name = f"{heads}-{groups}-{head_dim}-{block_size}-{partition_size}"
    _, args, _, keys, values = cases[name]
    torch.testing.assert_close(outputs[name], paged_decode_reference(*args), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[name], sdpa_rows(args[0], keys, values), atol=1e-5, rtol=1e-5)


def test_triton_kernel_takes_scale_and_writes_into_out(interpreted):
    cases, outputs = interpreted
    _, args, kwargs, _, _ = cases["scale-out"]
    torch.testing.assert_close(outputs["scale-out"], paged_decode_reference(*args, scale=kwargs["scale"]),
                               atol=1e-5, rtol=1e-5)


def test_triton_kernel_in_fp16_at_chatglm2_6b_head_shapes(interpreted):
    cases, outputs = interpreted
    _, args, _, _, _ = cases["fp16"]
    assert outputs["fp16"].dtype == torch.float16
    torch.testing.assert_close(outputs["fp16"], paged_decode_reference(*args), atol=5e-3, rtol=5e-3)


def test_dispatch_uses_the_reference_on_cpu():
    q, kc, vc, tables, lens, _, _ = make_batch([3, 20], 8, 2, 32, 16, 2)
    assert torch.equal(paged_decode(q, kc, vc, tables, lens, 16), paged_decode_reference(q, kc, vc, tables, lens, 16))


def test_a_kernel_failing_at_its_first_call_falls_back_to_the_reference_once(monkeypatch, caplog):
    """The CUDA dispatch logic, with the device check forced (the kernel itself cannot run here)."""
    from glmapp.engine import paged_attention as pa

    monkeypatch.setattr(pa, "_TRITON", {"state": "untried"})
    monkeypatch.setattr(pa, "_wants_triton", lambda q: pa._TRITON["state"] != "broken")
    calls = []

    def failing(*args):
        calls.append(1)
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(pa, "paged_decode_triton", failing)
    q, kc, vc, tables, lens, _, _ = make_batch([3, 20], 8, 2, 32, 16, 2)
    expected = paged_decode_reference(q, kc, vc, tables, lens, 16)
    with caplog.at_level("WARNING", logger=pa.__name__):
        assert torch.equal(pa.paged_decode(q, kc, vc, tables, lens, 16), expected)
        assert torch.equal(pa.paged_decode(q, kc, vc, tables, lens, 16), expected)
    assert len(calls) == 1 and pa._TRITON["state"] == "broken"  # tried once, then never again
    assert sum("paged decode kernel failed" in r.getMessage() for r in caplog.records) == 1

    monkeypatch.setattr(pa, "_TRITON", {"state": "proven"})  # after a first success, errors propagate
    with pytest.raises(RuntimeError, match="no kernel image"):
        pa.paged_decode(q, kc, vc, tables, lens, 16)


def test_triton_kernel_rejects_a_head_dim_that_is_not_a_power_of_two():
    q, kc, vc, tables, lens, _, _ = make_batch([3], 4, 2, 24, 16, 1)
    with pytest.raises(ValueError, match="power-of-two head dim >= 16, got 24"):
        paged_decode_triton(q, kc, vc, tables, lens, 16)


def gpu_batch(seed=0):
    """ChatGLM2-6B decode shapes in bf16: 32 rows of up to 8k tokens, block size 16."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 15, 16, 512, 513, 8192] + torch.randint(1, 8193, (26,), generator=gen).tolist()
    return make_batch(lengths, 32, 2, 128, 16, 512, dtype=torch.bfloat16, device="cuda", seed=seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_reference_in_bf16():
    q, kc, vc, tables, lens, _, _ = gpu_batch()
    out = paged_decode_triton(q, kc, vc, tables, lens, 16)
    expected = paged_decode_reference(q, kc, vc, tables, lens, 16)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_follows_new_context_lengths():
    q, kc, vc, tables, lens, _, _ = gpu_batch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        paged_decode_triton(q, kc, vc, tables, lens, 16)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_triton(q, kc, vc, tables, lens, 16)
    lens.copy_(torch.clamp(lens // 3, min=1))  # shorter rows: their tails now count as padding
    graph.replay()
    expected = paged_decode_reference(q, kc, vc, tables, lens, 16)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
