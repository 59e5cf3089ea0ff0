"""glmapp's own CPU decode kernels (glmapp/cpu_kernels.py, glmapp/kernels/cpu_kernels.c) and the fused decode
step (glmapp/engine/cpu_decode.py): built and cached, the same numbers as the torch code they replace, one
OpenMP runtime, and the engine's fused steps equal to its per-op steps."""

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import glmapp
from glmapp import cpu_kernels, cpu_linear
from glmapp.engine.cpu_decode import FusedDecode
from glmapp.engine.paged_attention import paged_decode_rows_torch
from glmapp.models.chatglm import apply_rotary

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="glmapp's CPU kernels do not build here")
GEN = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN).to(dtype)


def close(got, want, tol):
    """max |got - want| within `tol` of max |want|."""
    return (got.float() - want.float()).abs().max().item() <= tol * want.float().abs().max().item()


# ---- building ---------------------------------------------------------------------------------------------
def test_the_build_is_cached_by_source_compiler_and_cpu(tmp_path):
    first = cpu_kernels.build(tmp_path)
    assert first.is_file() and first.parent == tmp_path
    mtime = first.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left behind


def test_without_a_compiler_the_reason_is_logged_and_atens_kernels_run(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("GLMAPP_CACHE", str(tmp_path))
    cpu_kernels.library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="does not run"):
            cpu_kernels.build(tmp_path)
        with caplog.at_level(logging.WARNING, logger="glmapp.cpu_kernels"):
            assert cpu_kernels.library() is None
        assert "unavailable" in caplog.text and "ATen" in caplog.text
        # the model code falls back to torch: a linear still gives its result
        lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
        model = torch.nn.Sequential(lin)
        cpu_linear.pack(model)
        assert type(model[0]) is not cpu_linear.GemvLinear
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()
    assert cpu_kernels.available()


def test_the_opt_out_keeps_atens_kernels(monkeypatch):
    monkeypatch.setenv("GLMAPP_CPU_KERNELS", "torch")
    cpu_kernels.library.cache_clear()
    try:
        assert not cpu_kernels.available()
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()


def test_one_openmp_runtime_in_the_process():
    """The library joins torch's libgomp (same soname) instead of loading the system's as a second runtime.
    (Other wheels bundle copies under other sonames, e.g. sentencepiece's libgomp-<hash>.so.1: not ours.)"""
    cpu_kernels.library()
    maps = Path("/proc/self/maps").read_text().splitlines()
    gomp = {line.split()[-1] for line in maps if line.endswith("/libgomp.so.1")}
    assert gomp == {str(Path(torch.__file__).parent / "lib" / "libgomp.so.1")}, gomp


# ---- linears ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 9])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_bf16_weights_match_f_linear(dtype, rows):
    w, b = randn(300, 1024, dtype=torch.bfloat16) * 0.05, randn(300, dtype=torch.bfloat16)
    x = randn(rows, 1024, dtype=dtype)
    want = F.linear(x.to(torch.bfloat16).float(), w.float(), b.float())
    got = cpu_kernels.linear(cpu_kernels.W_BF16, x, w, None, b)
    assert got.dtype == dtype and got.shape == (rows, 300)
    assert close(got, want, 1e-2)


def test_gemv_linear_is_a_plain_linear_to_everything_but_its_forward(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(1024, 256), torch.nn.Linear(256, 64, bias=False)).to(torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = randn(1, 3, 1024, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = model(x)
        assert cpu_linear.pack(model) == 2
        assert [type(m) for m in model] == [cpu_linear.GemvLinear] * 2 and cpu_linear.is_packed(model)
        one = model(x[:, :1])  # one row: glmapp's kernel
        many = model(x)  # three rows: F.linear
    assert close(one, want[:, :1], 2e-2) and close(many, want, 1e-2)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the same tensors, unchanged
    assert cpu_linear.unpack(model) == 2 and [type(m) for m in model] == [torch.nn.Linear] * 2
    model[0].weight.requires_grad_(True)
    cpu_linear.pack(model)
    model(x[:, :1]).float().sum().backward()  # autograd takes F.linear
    assert model[0].weight.grad is not None


# ---- the fused parts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_fused_norm_swiglu_rope_attention_and_argmax_match_torch(dtype):
    x, w = randn(3, 1024, dtype=dtype), torch.rand(1024, generator=GEN).to(dtype)
    want = F.rms_norm(x.float(), (1024,), w.float(), 1e-5).to(dtype)
    assert close(cpu_kernels.rms_norm(x, w, 1e-5), want, 1e-2)

    h = randn(2, 3, 2 * 2816, dtype=dtype) * 4
    gate, up = h.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = cpu_kernels.swiglu(h)
    assert got.shape == want.shape and close(got, want, 1e-2)
    if dtype == torch.float32:
        assert close(got, want, 1e-6)  # the exp approximation is within a few ulp

    qkv = randn(1, 3, 20 * 64 + 64, dtype=dtype)
    positions = torch.tensor([[0, 5, 2047]])
    inv = 1.0 / 10000 ** (torch.arange(0, 32, 2).float() / 32)
    angles = positions[..., None].float() * inv
    rotations = torch.stack((angles.cos(), angles.sin()), -1)[:, :, None]
    want = apply_rotary(qkv[..., :20 * 64].unflatten(-1, (20, 64)), rotations)
    got = cpu_kernels.rope(qkv, 20, 64, rotations)
    assert got.shape == want.shape and close(got, want, 1e-2)

    kc, vc = randn(300, 2, 64, dtype=dtype), randn(300, 2, 64, dtype=dtype)
    q = randn(3, 16, 64, dtype=dtype)
    rows = [torch.arange(0, 1), torch.randperm(300, generator=GEN)[:77], torch.arange(100, 300)]
    assert close(cpu_kernels.attend(q, kc, vc, rows), paged_decode_rows_torch(q, kc, vc, rows), 1e-2)

    logits = randn(4, 65024, dtype=dtype)
    logits[1, 10] = logits[1, 60000] = 50.0
    logits[2].fill_(float("-inf"))
    logits[3, 33] = float("nan")
    assert cpu_kernels.argmax(logits).tolist() == logits.float().argmax(-1).tolist() == [
        logits[0].float().argmax().item(), 10, 0, 33]


# ---- the fused decode step ----------------------------------------------------------------------------------
def _generate(engine, tok, text, n=20):
    from glmapp.backends import RequestHandle
    from glmapp.engine.request import GenerationRequest
    from glmapp.engine.sampling import SamplingParams

    handle = RequestHandle(f"k{id(engine)}-{n}", engine.cancel)
    engine.submit(handle, GenerationRequest(tok.encode(text), SamplingParams(temperature=0), n, stop_ids=[-1]))
    return [t for d in handle for t in d.token_ids]


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_the_engine_decodes_through_fused_steps_with_the_per_op_tokens(make_checkpoint, quant):
    from glmapp.engine.engine import Engine, EngineConfig

    model, tok = glmapp.load(str(make_checkpoint("chatglm2")), dtype="bfloat16", quant=quant)
    tokens, steps = [], []
    for fused in (True, False):
        engine = Engine(model, tok, EngineConfig())
        try:
            if not fused:
                engine.runner.fused = None
            tokens.append(_generate(engine, tok, "请介绍一下长城。"))
            tokens.append(_generate(engine, tok, "你好"))
            steps.append(engine.runner.fused.steps if fused else 0)
        finally:
            engine.shutdown()
    assert steps[0] >= 2 * 19  # every decode step of both requests (the first token comes from the prefill)
    assert tokens[:2] == tokens[2:] and len(tokens[0]) == 20


@pytest.mark.parametrize("output_bits", [None, "same"])
@pytest.mark.parametrize("quant", ["bf16", "int8", "int4"])
def test_fused_steps_give_the_per_op_steps_logits_exactly(make_checkpoint, quant, output_bits):
    from glmapp.engine.kv_cache import PagedKVCache
    from glmapp.engine.runner import ModelRunner

    path = make_checkpoint("chatglm2")
    model, tok = glmapp.load(str(path), dtype="bfloat16", quant=None if quant == "bf16" else quant)
    c = model.config
    bits = {"bf16": 8, "int8": 8, "int4": 4}[quant] if output_bits else None
    cpu_linear.pack(model, output_bits=bits)
    try:
        cache = PagedKVCache(c.num_layers, 8, 16, c.num_kv_groups, c.kv_channels, torch.bfloat16, "cpu")
        assert FusedDecode.supported(model, cache) is None
        fused = FusedDecode(model, cache)
        assert fused.plan() is not None
        assert fused._output is not None  # the output layer (bf16, or its int8/int4 copy) runs in the C step
        runner = ModelRunner(model, cache)
        # two rows: within every kind's row bound (cpu_kernels.MAX_ROWS); 1500 is past the first rotation table
        ids, positions = [5, 9], [3, 1500]
        rows = [torch.arange(16, 20), torch.arange(48, 56)]  # each ends with its new token's slot
        writes = torch.tensor([19, 55])
        for r in rows:  # some context already in the cache
            cache.k[:, r] = randn(c.num_layers, len(r), c.num_kv_groups, c.kv_channels, dtype=torch.bfloat16)
            cache.v[:, r] = randn(c.num_layers, len(r), c.num_kv_groups, c.kv_channels, dtype=torch.bfloat16)
        k0, v0 = cache.k.clone(), cache.v.clone()
        got = first = fused.logits(ids, positions, rows)
        k1, v1 = cache.k.clone(), cache.v.clone()
        cache.k.copy_(k0), cache.v.copy_(v0)
        from glmapp.engine.runner import StepContext

        ctx = StepContext(cache, writes, torch.arange(2), None, None, [], decode_slots=rows)
        with torch.inference_mode():
            want = model.forward_cached(torch.tensor([ids]), torch.tensor([positions]), ctx, torch.arange(2))
        assert torch.equal(got, want)
        assert torch.equal(cache.k, k1) and torch.equal(cache.v, v1)  # the same keys/values written
        assert fused.steps == 1 and runner.fused is not None
        with pytest.raises(ValueError, match="outside"):  # checked in C before anything is read or written
            fused.logits([c.padded_vocab_size], [3], [torch.arange(16, 20)])
        assert torch.equal(cache.k, k1)
        more = fused.max_rows + 1  # past the row bound: the per-op path, where each linear picks its kernel
        assert fused.logits([5] * more, [3] * more, [torch.arange(1)] * more) is None

        # a module replaced under the plan (as a reload or a quantization switch would): the plan follows it
        mlp = model.transformer.encoder.layers[1].mlp
        old = mlp.dense_4h_to_h
        new = copy.deepcopy(old)
        with torch.no_grad():
            for t in (new.weight, getattr(new, "weight_scale", None)):
                if t is not None and t.dtype.is_floating_point:
                    t.mul_(-1)  # a different layer of the same kind (the bf16 weight, or a quantized one's scales)
        mlp.dense_4h_to_h = new
        cache.k.copy_(k0), cache.v.copy_(v0)
        got = fused.logits(ids, positions, rows)
        cache.k.copy_(k0), cache.v.copy_(v0)
        with torch.inference_mode():
            want = model.forward_cached(torch.tensor([ids]), torch.tensor([positions]), ctx, torch.arange(2))
        assert torch.equal(got, want) and fused.steps == 2
        assert not torch.equal(got, first)  # the replaced layer did change the result
        mlp.dense_4h_to_h = old

        # an output layer the C step does not take (a plain nn.Linear): its module runs after the call
        top = model.transformer
        head = top.output_layer
        plain = torch.nn.Linear(c.hidden_size, head.out_features, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            plain.weight.copy_(head.weight)
        top.output_layer = plain
        cache.k.copy_(k0), cache.v.copy_(v0)
        got = fused.logits(ids, positions, rows)
        assert fused._output is None
        cache.k.copy_(k0), cache.v.copy_(v0)
        with torch.inference_mode():
            want = model.forward_cached(torch.tensor([ids]), torch.tensor([positions]), ctx, torch.arange(2))
        assert torch.equal(got, want) and fused.steps == 3
        top.output_layer = head
    finally:
        cpu_linear.unpack(model)


def test_the_plan_notices_weights_moved_under_the_same_tensor(make_checkpoint):
    """Module.to(dtype) swaps each parameter's data but keeps the Parameter object: the plan's pointers would then
    address freed memory, so its per-step check compares addresses too, and the step rebuilds the plan."""
    from glmapp.engine.kv_cache import PagedKVCache

    model, _ = glmapp.load(str(make_checkpoint("chatglm2")), dtype="bfloat16", quant="int4")
    c = model.config
    cache = PagedKVCache(c.num_layers, 8, 16, c.num_kv_groups, c.kv_channels, torch.bfloat16, "cpu")
    fused = FusedDecode(model, cache)
    first = fused.plan()
    assert first is not None and fused._valid()
    # classes swapped in place (no registration): the output layer given, then relieved of, a quantized copy
    cpu_linear.pack(model, output_bits=4)
    assert not fused._valid()
    assert fused.plan() is not None and fused._output is not None and fused._valid()
    cpu_linear.unpack(model)
    assert not fused._valid()
    first = fused.plan()
    norm = model.transformer.encoder.layers[0].input_layernorm.weight
    model.to(torch.float16)
    assert model.transformer.encoder.layers[0].input_layernorm.weight is norm  # the same object, new data
    assert not fused._valid()
    again = fused.plan()
    assert again is not first and again[0].norm1 == norm.data_ptr() and fused._valid()


def test_long_rows_stay_with_atens_kernels(fresh_kernel_state):
    """Past MAX_K columns oneDNN's bf16 and ATen's int8 kernels were faster (ChatGLM-6B's 4h -> h, K = 13696)."""
    from glmapp import quant_kernels
    from glmapp.quant import QuantizedLinear

    long_k = cpu_kernels.MAX_K[cpu_kernels.W_BF16] + 64
    model = torch.nn.Sequential(torch.nn.Linear(long_k, 256), torch.nn.Linear(1024, 256)).to(torch.bfloat16)
    cpu_linear.pack(model)
    assert [type(m) for m in model] == [cpu_linear.PackedLinear, cpu_linear.GemvLinear]
    x = randn(1, long_k, dtype=torch.bfloat16)
    for bits, expected in ((8, "int8pack"), (4, "gemv")):  # int4 still wins at long rows
        m = QuantizedLinear.from_float(torch.nn.Linear(long_k, 64).to(torch.bfloat16), bits)
        assert quant_kernels.choose(m, x) == expected


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("in_features", [64, 1024, 2816, 6144, 9000])  # blocks of 4, 2, 2, rows alone, 4 (long)
def test_int4_rows_in_blocks_equal_the_same_rows_alone_and_the_dequantized_weight(in_features, threads):
    """One activation row, int4: weight rows are multiplied a block at a time (glm_gemv). A row's output must not
    depend on whether it fell in a block or in the remainder, nor on the thread count, and must match the
    dequantized weight."""
    from glmapp.quant import dequantize, quantize_weight

    n = 4 * 9 + 3  # whole blocks and a remainder on either thread
    q, scale = quantize_weight(randn(n, in_features) * 0.05, 4)
    scale = scale.to(torch.bfloat16)
    x = randn(1, in_features, dtype=torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = cpu_kernels.linear(cpu_kernels.W_INT4, x, q, scale)
        alone = torch.cat([cpu_kernels.linear(cpu_kernels.W_INT4, x, q[i:i + 1].contiguous(), scale[i:i + 1])
                           for i in range(n)], dim=-1)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y, alone)
    want = x.float() @ dequantize(q, scale, 4).T
    assert close(y, want, 0.02)


@pytest.fixture()
def fresh_kernel_state(monkeypatch):
    from glmapp import quant_kernels

    monkeypatch.setattr(quant_kernels, "_PROVEN", set())
    monkeypatch.setattr(quant_kernels, "_BROKEN", set())


@pytest.mark.parametrize("arch", [("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"), ("-march=x86-64-v2",)])
def test_the_loops_of_older_cpus_agree_with_torch_too(tmp_path, arch):
    """Built for AVX-512 without BF16/VNNI (Skylake-class servers: fp32 FMA loops) and for no AVX-512 (scalar C),
    and run here, where both instruction sets exist: the self-tests that guard a user's first load pass."""
    flags = tuple(f for f in cpu_kernels.FLAGS if f != "-march=native") + arch
    lib = cpu_kernels._bind(cpu_kernels.build(tmp_path, flags))
    assert lib.glm_gemv_isa() == (512 if "-mavx512f" in arch else 0)
    assert cpu_kernels._self_test(lib) is None
    assert cpu_kernels._self_test_fused(lib) is None
