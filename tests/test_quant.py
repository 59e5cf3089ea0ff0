"""Quantization modes: ChatGLM's int8/int4 scheme (spec §2.2, §7) and bitsandbytes, on generated checkpoints."""

import gc
import json
import logging
import weakref

import pytest
import torch
import torch.nn.functional as F

import glmapp
from glmapp import cpu_kernels, quant_kernels
from glmapp.checkpoint import build_empty, load_model, write_int4_checkpoint, write_weights
from glmapp.demo import demo_config, random_state_dict
from glmapp.host import QuantizationSwitchFailed, switch_quantization
from glmapp.errors import QuantizationError
from glmapp.models.chatglm import ChatGLMConfig
from glmapp.quant import (
    MODES,
    QuantizedLinear,
    available_modes,
    dequantize,
    linear_weight_bytes,
    model_mode,
    pack_int4,
    quantize_weight,
    release_weights,
    unpack_int4,
)

# Layout of chatglm2-6b-int4 (spec §2.2): module -> (packed int8 weight shape, has bias).
OFFICIAL_INT4 = {
    "self_attention.query_key_value": ((4608, 2048), True),
    "self_attention.dense": ((4096, 2048), False),
    "mlp.dense_h_to_4h": ((27392, 2048), False),
    "mlp.dense_4h_to_h": ((4096, 6848), False),
}


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory):
    """The "mid" network (12 layers, hidden 1024) with demo weights, except the embedding std: 4.0, not 0.02.

    Why: with std 0.02 everywhere the residual stream is made only of layer outputs, so int4's per-weight
    noise (~16% of a row's std) reaches the final hidden state undamped, and the random output layer gives
    near-uniform logits (top-1 probability 0.002 over 4032 tokens) whose top-1/top-2 gaps are a small
    fraction of the logit spread: int4 agreed on 15% of positions, int8 on 91%. A strong embedding makes
    the residual stream carry its token as trained models' streams do; the swapped-nibble control below
    shows the test still separates a correct int4 from a broken one.
    """
    out = tmp_path_factory.mktemp("mid")
    cfg = demo_config("chatglm2", "mid", 4000)
    (out / "config.json").write_text(json.dumps(cfg))
    state = random_state_dict(ChatGLMConfig(**cfg, family="chatglm2"), seed=0)
    state["transformer.embedding.word_embeddings.weight"] *= 4.0 / 0.02
    write_weights(state, out, "safetensors")
    return out


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_loads_the_demo_checkpoint_and_chats(demo_v2, mode):
    model, tok = glmapp.load(str(demo_v2), quant=mode)
    assert model_mode(model) == mode
    response, history = model.chat(tok, "你好", [], do_sample=False, max_new_tokens=8)
    assert isinstance(response, str) and response and tuple(history[-1]) == ("你好", response)
    # The engine reads device and dtype here: never quantized.
    assert model.transformer.output_layer.weight.dtype == torch.float32


def test_weight_memory_of_each_mode_against_bf16_linears(demo_v2):
    def linear_bytes(mode):
        model, _ = glmapp.load(str(demo_v2), quant=mode, dtype="bfloat16")
        return linear_weight_bytes(model)

    base = linear_bytes("none")
    ratios = {mode: linear_bytes(mode) / base for mode in MODES[1:]}
    assert ratios["int8"] <= 0.55 and ratios["bnb-int8"] <= 0.55, ratios
    assert ratios["int4"] <= 0.32 and ratios["bnb-nf4"] <= 0.32, ratios


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_dequantize_error_is_at_most_half_a_step_per_layer(demo_v2, bits):
    from glmapp.checkpoint import iter_tensors
    from glmapp.quant import LINEARS

    layers = 0
    for name, w in iter_tensors(demo_v2):
        if not name.endswith(tuple(f"{n}.weight" for n in LINEARS)):
            continue
        q, scale = quantize_weight(w, bits)
        assert q.dtype == torch.int8 and scale.dtype == w.dtype
        assert unpack_int4(q).abs().max() <= 7 if bits == 4 else q.abs().max() <= 127
        err = (dequantize(q, scale, bits) - w.float()).abs()
        bound = scale.float()[:, None] / 2
        assert (err <= bound * (1 + 1e-3)).all(), f"{name}: max error {err.max()} over scale/2"
        layers += 1
    assert layers == 8


def test_top1_agreement_with_fp32_on_the_mid_checkpoint(mid_checkpoint):
    """512 positions (4 x 128): int8 agrees with fp32 on >= 95% of top-1 tokens, int4 on >= 85%."""
    ids = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(1))

    def top1(model):
        with torch.no_grad():
            return model(ids).logits.argmax(-1)

    reference = top1(load_model(mid_checkpoint))
    agreement = {mode: (top1(load_model(mid_checkpoint, quant=mode)) == reference).float().mean().item()
                 for mode in ("int8", "int4")}
    assert agreement["int8"] >= 0.95 and agreement["int4"] >= 0.85, agreement
    broken = load_model(mid_checkpoint, quant="int4")
    for module in broken.modules():  # control: nibbles in the wrong order must fail the bar clearly
        if isinstance(module, QuantizedLinear):
            w = module.weight.data
            module.weight.data = (((w & 0xF) << 4) | ((w >> 4) & 0xF)).to(torch.int8)
    assert (top1(broken) == reference).float().mean().item() < 0.7


def test_official_int4_layout_written_by_us_loads_with_the_logits_of_quantize_on_load(demo_v2, tmp_path):
    out = write_int4_checkpoint(demo_v2, tmp_path / "int4")
    assert json.loads((out / "config.json").read_text())["quantization_bit"] == 4
    on_disk = torch.load(out / "pytorch_model.bin", weights_only=True)
    w = on_disk["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"]
    assert w.dtype == torch.int8 and on_disk["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight_scale"].dtype \
        == torch.float16
    prequantized, tok = glmapp.load(str(out))  # as it lies on disk
    on_load = load_model(demo_v2, quant="int4")
    assert model_mode(prequantized) == "int4" and prequantized.config.quantization_bit == 4
    ids = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(prequantized(ids).logits, on_load(ids).logits, rtol=0, atol=0)
    # Our int4 model's state dict is the file's content, and writing from the model gives the same file.
    assert {k: (v.dtype, v.shape) for k, v in on_load.half().state_dict().items()} == \
        {k: (v.dtype, v.shape) for k, v in on_disk.items()}
    again = torch.load(write_int4_checkpoint(on_load, tmp_path / "again") / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(again[k], v) for k, v in on_disk.items())
    assert prequantized.chat(tok, "你好", [], do_sample=False, max_new_tokens=8)[0]
    with pytest.raises(QuantizationError, match="full-precision checkpoint"):
        load_model(out, quant="int8")


def test_int4_state_dict_matches_the_official_6b_layout():
    config = ChatGLMConfig(num_layers=28, hidden_size=4096, ffn_hidden_size=13696, kv_channels=128,
                           num_attention_heads=32, multi_query_attention=True, multi_query_group_num=2,
                           padded_vocab_size=65024, add_qkv_bias=True, seq_length=32768, family="chatglm2")
    state = build_empty(config, torch.float16, torch.device("meta"), quant="int4").state_dict()
    for n in range(28):
        for module, (shape, bias) in OFFICIAL_INT4.items():
            prefix = f"transformer.encoder.layers.{n}.{module}."
            assert state[prefix + "weight"].dtype == torch.int8 and tuple(state[prefix + "weight"].shape) == shape
            assert state[prefix + "weight_scale"].dtype == torch.float16
            assert tuple(state[prefix + "weight_scale"].shape) == (shape[0],)
            assert (prefix + "bias" in state) == bias
    others = [v for k, v in state.items() if not k.endswith(("weight_scale", "bias")) and v.dtype != torch.int8]
    assert all(v.dtype == torch.float16 for v in others)
    assert state["transformer.output_layer.weight"].shape == (65024, 4096)
    assert len(state) == 200 + 28 * 4  # the fp16 model's 200 tensors plus one scale per linear
    # spec §2.2: "payload computed from these shapes is 3,923,601,472 B"
    assert sum(v.numel() * v.element_size() for v in state.values()) == 3_923_601_472


def test_int4_packing_puts_the_even_column_in_the_high_nibble():
    q = torch.tensor([[1, -2, 7, -8], [-1, 3, 0, -7]], dtype=torch.int8)
    packed = pack_int4(q)
    # 1 | -2 -> 0x1E;  7 | -8 -> 0x78;  -1 | 3 -> 0xF3;  0 | -7 -> 0x09
    expected = torch.tensor([[0x1E, 0x78], [0xF3, 0x09]], dtype=torch.uint8).view(torch.int8)
    assert torch.equal(packed, expected)
    assert torch.equal(unpack_int4(expected), q)
    linear = QuantizedLinear(4, 2, bits=4, dtype=torch.float32)
    linear.weight.copy_(expected)
    linear.weight_scale.copy_(torch.tensor([0.5, 2.0]))
    want = q.float() * torch.tensor([[0.5], [2.0]])
    assert torch.equal(linear.dequantized_weight(torch.float32), want)
    x = torch.randn(3, 4)
    torch.testing.assert_close(quant_kernels.KERNELS["split"](linear, x), x @ want.T)  # fp32 throughout
    torch.testing.assert_close(linear(x), x @ want.T, atol=0.05, rtol=0.02)  # the CPU forward computes in bf16


def test_an_unavailable_mode_raises_quantization_error_naming_the_alternative(demo_v2, monkeypatch):
    from glmapp import quant

    assert available_modes("cpu") == dict.fromkeys(MODES)  # bitsandbytes 0.50 runs on CPU
    monkeypatch.setattr(quant, "_bnb_import_error", lambda: "bitsandbytes is not installed")
    modes = available_modes("cpu")
    assert modes["int4"] is None and "not installed" in modes["bnb-nf4"]
    with pytest.raises(QuantizationError, match="Use 'int4' instead"):
        glmapp.load(str(demo_v2), quant="bnb-nf4")
    with pytest.raises(QuantizationError, match="Unknown quantization 'int3'"):
        glmapp.load(str(demo_v2), quant="int3")


def test_switching_modes_frees_the_old_weights_before_loading_and_reports_progress(demo_v2):
    model, tok = glmapp.load(str(demo_v2), quant="int8")
    old = weakref.ref(model.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight)
    seen = []

    def progress(fraction, message):
        seen.append((fraction, message, old() is None))

    model = switch_quantization(demo_v2, model, "int4", progress=progress)
    gc.collect()
    assert old() is None
    loading = [alive_gone for fraction, message, alive_gone in seen if message.startswith("Loading transformer")]
    assert loading and all(loading)  # freed before the first new tensor was read
    fractions = [f for f, _, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert model_mode(model) == "int4"
    assert model.chat(tok, "你好", [], do_sample=False, max_new_tokens=8)[0]


def test_a_failing_switch_reloads_the_previous_mode(demo_v2, monkeypatch):
    from glmapp import quant

    model, tok = glmapp.load(str(demo_v2), quant="int8")
    expected, _ = model.chat(tok, "你好", [], do_sample=False, max_new_tokens=8)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(quant, "bnb_linear", out_of_memory)
    with pytest.raises(QuantizationSwitchFailed, match="reloaded as 'int8'") as failure:
        switch_quantization(demo_v2, model, "bnb-nf4")
    assert isinstance(failure.value.__cause__, RuntimeError)
    restored = failure.value.model
    assert model_mode(restored) == "int8"
    assert restored.chat(tok, "你好", [], do_sample=False, max_new_tokens=8)[0] == expected


def test_cli_chat_takes_quant():
    from glmapp.cli import build_parser

    assert build_parser().parse_args(["chat", "--quant", "int4"]).quant == "int4"
    assert build_parser().parse_args(["chat"]).quant is None


# ---- kernels behind QuantizedLinear (glmapp.quant_kernels) ------------------------------------------
KERNEL_BITS = [("dequantize", 8), ("dequantize", 4), ("rowscale", 8), ("int8pack", 8), ("split", 4),
               ("nibbles_int8pack", 4), ("tinygemm", 4), ("int8pack_bf16", 8), ("rowscale_bf16", 8),
               ("nibbles_int8pack_bf16", 4), ("split_bf16", 4)]


def quantized(bits, dtype, out_features=256, in_features=512, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.02)
    return QuantizedLinear.from_float(linear.to(dtype), bits)


def relative_error(y, reference):
    return ((y.float() - reference).abs().max() / reference.abs().max()).item()


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}  # of max|reference|; bf16 keeps 8 mantissa bits


@pytest.fixture()
def fresh_kernels(monkeypatch):
    """No kernel proven or switched off yet (as at process start)."""
    monkeypatch.setattr(quant_kernels, "_PROVEN", set())
    monkeypatch.setattr(quant_kernels, "_BROKEN", set())


@pytest.fixture()
def no_cpu_kernels(monkeypatch):
    """As on a machine where glmapp's own CPU kernels cannot be built (ATen's kernels run)."""
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)


@pytest.fixture()
def packed_copy_on_cpu(monkeypatch):
    monkeypatch.setitem(quant_kernels.INT4_PACKED_COPY, "cpu", True)


@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel,bits", KERNEL_BITS)
def test_each_kernel_matches_the_dequantized_weight(kernel, bits, dtype, rows):
    for out_features, in_features in ((256, 512), (64, 160)):  # 160: tinygemm's smallest group size (32)
        m = quantized(bits, dtype, out_features, in_features)
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
        reference = F.linear(x.float(), m.dequantized_weight(torch.float32))
        y = quant_kernels.KERNELS[kernel](m, x)
        assert y.dtype == dtype and y.shape == reference.shape
        tolerance = TOLERANCE[torch.bfloat16 if kernel.endswith("_bf16") else dtype]  # computed in bf16
        assert relative_error(y, reference) <= tolerance, (kernel, out_features, in_features)


@pytest.mark.parametrize("bits,dtype,rows,copy,expected", [
    (8, torch.float32, 1, True, "int8pack_bf16"),  # fp32 activations: the bf16 kernels, 2-8x faster
    (8, torch.float32, 16, True, "int8pack_bf16"),
    (8, torch.float32, 17, True, "rowscale_bf16"),
    (8, torch.bfloat16, 32, False, "int8pack"),
    (8, torch.bfloat16, 33, False, "rowscale"),
    (8, torch.float16, 1, False, "dequantize"),  # fp16 x @ q.T could overflow before the scale
    (4, torch.float32, 32, True, "nibbles_int8pack_bf16"),
    (4, torch.float32, 33, True, "split_bf16"),
    (4, torch.bfloat16, 16, False, "nibbles_int8pack"),
    (4, torch.bfloat16, 17, False, "split"),
    (4, torch.bfloat16, 32, True, "tinygemm"),
    (4, torch.bfloat16, 33, True, "split"),
    (4, torch.float16, 1, True, "dequantize"),
])
def test_cpu_dispatch_follows_the_measured_table(monkeypatch, fresh_kernels, no_cpu_kernels, bits, dtype, rows, copy,
                                                 expected):
    monkeypatch.setitem(quant_kernels.INT4_PACKED_COPY, "cpu", copy)
    m = quantized(bits, dtype, bias=True)
    x = torch.randn(rows, 1, m.in_features).to(dtype)
    assert quant_kernels.choose(m, x[:, 0]) == expected
    y = m(x)  # through the module: any leading shape, bias added
    reference = F.linear(x.float(), m.dequantized_weight(torch.float32), m.bias.float())
    tolerance = TOLERANCE[torch.bfloat16] if expected.endswith("_bf16") else TOLERANCE.get(dtype, 1e-3)
    assert y.shape == (rows, 1, m.out_features) and y.dtype == dtype and relative_error(y, reference) <= tolerance
    assert not quant_kernels._BROKEN  # the chosen kernel ran; nothing fell back
    assert (expected == "tinygemm") == (m.packed_bytes() > 0)


needs_cpu_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="glmapp's CPU kernels do not build here")


@needs_cpu_kernels
@pytest.mark.parametrize("bits,dtype,rows,expected", [
    (8, torch.float32, 4, "gemv"),  # glmapp's own kernel first, up to its measured row bound
    (8, torch.float32, 5, "int8pack_bf16"),
    (8, torch.bfloat16, 4, "gemv"),
    (8, torch.bfloat16, 5, "int8pack"),
    (8, torch.float16, 4, "gemv"),  # fp32 sums: no fp16 overflow
    (8, torch.float16, 5, "dequantize"),
    (4, torch.float32, 8, "gemv"),
    (4, torch.bfloat16, 8, "gemv"),
    (4, torch.bfloat16, 9, "nibbles_int8pack"),
    (4, torch.float16, 8, "gemv"),
    (4, torch.float16, 9, "dequantize"),
    (8, torch.bfloat16, 33, "rowscale"),
    (8, torch.float32, 17, "rowscale_bf16"),
    (4, torch.bfloat16, 17, "dense_c"),  # many rows: dequantized in one pass by glmapp's kernel, one GEMM
    (4, torch.float32, 33, "dense_c"),
])
def test_cpu_dispatch_takes_glmapps_kernel_for_few_rows(fresh_kernels, bits, dtype, rows, expected):
    m = quantized(bits, dtype, bias=True)
    x = torch.randn(rows, 1, m.in_features).to(dtype)
    assert quant_kernels.choose(m, x[:, 0]) == expected
    y = m(x)
    reference = F.linear(x.float(), m.dequantized_weight(torch.float32), m.bias.float())
    assert y.shape == (rows, 1, m.out_features) and y.dtype == dtype
    assert relative_error(y, reference) <= TOLERANCE[torch.bfloat16]  # int4 sums bf16 activations
    assert not quant_kernels._BROKEN


@needs_cpu_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_glmapps_kernel_matches_the_dequantized_weight_at_any_row_count(bits, dtype, rows):
    for out_features, in_features in ((256, 512), (37, 192), (1, 64), (5, 98), (3, 4226)):  # 4226: long-row loops
        m = quantized(bits, dtype, out_features, in_features, seed=rows)
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
        reference = F.linear(x.float(), m.dequantized_weight(torch.float32))
        y = quant_kernels.KERNELS["gemv"](m, x)
        assert y.dtype == dtype and y.shape == reference.shape
        dense = quant_kernels.KERNELS["dense_c"](m, x)  # the many-row kernel, on the same weight
        assert torch.equal(dense, F.linear(x, m.dequantized_weight(dtype)))
        # int8 sums x as int16 with a power-of-two scale (14-15 significant bits), int4 sums bf16 x
        assert relative_error(y, reference) <= (1e-4 if bits == 8 and dtype == torch.float32
                                                else TOLERANCE[torch.bfloat16]), (out_features, in_features)


@needs_cpu_kernels
def test_glmapps_kernel_takes_any_k_but_not_atens_int4_layout(fresh_kernels):
    for bits, k in ((4, 160), (4, 46), (8, 24), (8, 7)):  # vector steps while whole ones fit, then a scalar tail
        m = quantized(bits, torch.bfloat16, 64, k)
        x = torch.randn(1, k, dtype=torch.bfloat16)
        assert quant_kernels.choose(m, x) == "gemv"
        reference = F.linear(x.float(), m.dequantized_weight(torch.float32))
        assert relative_error(m(x), reference) <= TOLERANCE[torch.bfloat16], (bits, k)
    quant_kernels.to_kernel_layout(big := quantized(4, torch.bfloat16))  # ATen's layout: not what it reads
    assert quant_kernels.choose(big, torch.randn(1, 512, dtype=torch.bfloat16)) == "tinygemm"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,in_features", [(8, 24), (8, 8), (4, 48), (4, 4)])
def test_int8pack_is_never_given_a_k_it_gets_wrong(fresh_kernels, dtype, bits, in_features):
    """ATen's int8 kernel segfaults or sums wrongly unless K % 16 == 0 (nibble planes: K/2)."""
    m = quantized(bits, dtype, 32, in_features)
    x = torch.randn(3, in_features).to(dtype)
    assert "int8pack" not in quant_kernels.choose(m, x)
    reference = F.linear(x.float(), m.dequantized_weight(torch.float32))
    assert relative_error(m(x), reference) <= TOLERANCE[torch.bfloat16]


def test_tinygemm_needs_a_shape_its_packers_accept(packed_copy_on_cpu, no_cpu_kernels):
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    assert quant_kernels.choose(quantized(4, torch.bfloat16, 200, 512), x) == "nibbles_int8pack"  # N % 16
    # K % 32 rules out tinygemm; K/2 = 40 rules out the nibble planes (int8pack needs K % 16, see above)
    assert quant_kernels.choose(quantized(4, torch.bfloat16, 256, 80), x[:, :80]) == "split"
    x.requires_grad_(True)
    assert quant_kernels.choose(quantized(4, torch.bfloat16), x) == "dequantize"  # no autograd formulas
    # ChatGLM2-6B's linears (spec §2.2): group size and CUDA inner k-tiles for K = 4096 and 13696
    assert [quant_kernels.group_size(k) for k in (4096, 13696, 1024, 2816)] == [256, 128, 256, 256]
    assert [quant_kernels.inner_k_tiles(k) for k in (4096, 13696, 160)] == [8, 8, 2]


def test_xor_0x88_turns_both_signed_nibbles_into_offset_8():
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8)[None]
    q = unpack_int4(every_byte)
    offset = every_byte.view(torch.uint8) ^ 0x88
    assert torch.equal((offset >> 4).to(torch.int32) - 8, q[0, 0::2].to(torch.int32)[None])
    assert torch.equal((offset & 0x0F).to(torch.int32) - 8, q[0, 1::2].to(torch.int32)[None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [4096, 13696, 160])
def test_tinygemm_inputs_unpack_to_the_official_dequantization(dtype, in_features):
    """What the CUDA packer is given, checked on CPU: even column in the high nibble, w = (u - 8) * s + z."""
    m = quantized(4, dtype, 32, in_features)
    offset, scales_and_zeros, g = quant_kernels.tinygemm_inputs(m.weight, m.weight_scale, torch.bfloat16)
    n, k = m.out_features, m.in_features
    assert offset.dtype == torch.uint8 and offset.shape == (n, k // 2)
    assert scales_and_zeros.dtype == torch.bfloat16 and scales_and_zeros.shape == (k // g, n, 2)
    assert scales_and_zeros.is_contiguous()
    u = torch.empty(n, k, dtype=torch.int32)
    u[:, 0::2], u[:, 1::2] = offset >> 4, offset & 0x0F
    group = torch.arange(k) // g
    scale, zero = scales_and_zeros[group, :, 0].T.float(), scales_and_zeros[group, :, 1].T.float()
    w = (u - 8).float() * scale + zero
    assert torch.equal(w, dequantize(m.weight, m.weight_scale.to(torch.bfloat16), 4))


def test_the_packed_copy_follows_new_weights_and_never_enters_the_state_dict(packed_copy_on_cpu, no_cpu_kernels):
    m, other, third = (quantized(4, torch.bfloat16, seed=s, bias=True) for s in (0, 1, 2))
    layout = {k: (v.dtype, v.shape) for k, v in m.state_dict().items()}
    x = torch.randn(1, 512).to(torch.bfloat16)
    m(x)
    assert m.packed_bytes() == 256 * 256 + 2 * 256 * 2 * 2  # the int4 weight again + [K/256, N, 2] bf16
    assert {k: (v.dtype, v.shape) for k, v in m.state_dict().items()} == layout  # official tensors only

    m.load_state_dict(other.state_dict())
    assert m.packed_bytes() == 0  # dropped on load, rebuilt by the next forward
    assert torch.equal(m(x), other(x))
    with torch.no_grad():  # in place: caught by the version counter
        m.weight.copy_(third.weight)
        m.weight_scale.copy_(third.weight_scale)
        m.bias.copy_(third.bias)
    assert torch.equal(m(x), third(x))
    m.weight.data = other.weight.data.clone()  # new storage
    m.weight_scale.data = other.weight_scale.data.clone()
    m.bias.data = other.bias.data.clone()
    assert torch.equal(m(x), other(x))
    m.to("cpu")
    assert m.packed_bytes() == 0


@pytest.mark.parametrize("error", [RuntimeError, NotImplementedError, AttributeError])
def test_a_kernel_failing_at_first_use_is_switched_off_with_one_warning(monkeypatch, caplog, fresh_kernels, error,
                                                                       no_cpu_kernels):
    calls = []

    def unavailable(*args):
        calls.append(args)
        raise error("simulated: no kernel for this device")

    monkeypatch.setattr(torch, "_weight_int8pack_mm", unavailable)
    m = quantized(8, torch.bfloat16)
    x = torch.randn(1, 512).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="glmapp.quant_kernels"):
        y, again = m(x), m(x)
    assert len(calls) == 1 and len(caplog.records) == 1 and "int8pack" in caplog.text
    assert ("int8pack", "cpu") in quant_kernels._BROKEN and quant_kernels.choose(m, x) == "rowscale"
    reference = F.linear(x.float(), m.dequantized_weight(torch.float32))
    assert relative_error(y, reference) <= TOLERANCE[torch.bfloat16] and torch.equal(y, again)


def test_after_a_first_success_kernel_errors_propagate(monkeypatch, fresh_kernels, no_cpu_kernels):
    m = quantized(8, torch.bfloat16)
    x = torch.randn(1, 512).to(torch.bfloat16)
    m(x)
    assert ("int8pack", "cpu") in quant_kernels._PROVEN

    def broken(*args):
        raise RuntimeError("a real failure")

    monkeypatch.setattr(torch, "_weight_int8pack_mm", broken)
    with pytest.raises(RuntimeError, match="a real failure"):
        m(x)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bf16_model_logits_through_the_kernels_match_dequantize(demo_v2, monkeypatch, packed_copy_on_cpu, mode):
    model, _ = glmapp.load(str(demo_v2), quant=mode, dtype="bfloat16")
    ids = torch.randint(0, 4000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(ids).logits.float()
        monkeypatch.setattr(quant_kernels, "DISPATCH", {})
        reference = model(ids).logits.float()
    assert relative_error(fast, reference) <= 3e-2
    assert (fast.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_packed_copies_count_as_linear_memory_and_go_with_the_weights(demo_v2, packed_copy_on_cpu):
    model, tok = glmapp.load(str(demo_v2), quant="int4", dtype="bfloat16")
    modules = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    loaded = linear_weight_bytes(model)
    assert model.chat(tok, "你好", [], do_sample=False, max_new_tokens=2)[0]
    packed = sum(m.packed_bytes() for m in modules)
    assert all(m.packed_bytes() >= m.weight.numel() for m in modules)
    assert linear_weight_bytes(model) == loaded + packed
    model.backend(tok).close()
    release_weights(model)
    assert all(m.packed_bytes() == 0 for m in modules)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits,rows,expected", [(8, 1, "int8pack"), (8, 8, "int8pack"), (8, 9, "dequantize"),
                                                (4, 1, "tinygemm"), (4, 64, "tinygemm"), (4, 65, "dequantize")])
def test_cuda_kernels_match_the_dequantized_weight(fresh_kernels, bits, rows, expected):
    """ChatGLM2-6B's dense_4h_to_h shape (K = 13696: group size 128) in bf16."""
    m, other = (quantized(bits, torch.bfloat16, 4096, 13696, seed=s).cuda() for s in (0, 1))
    x = torch.randn(rows, 13696, device="cuda").to(torch.bfloat16)
    assert quant_kernels.choose(m, x) == expected
    y = m(x)
    assert not quant_kernels._BROKEN, "a CUDA kernel failed and fell back (see the logged warning)"
    assert relative_error(y, F.linear(x.float(), m.dequantized_weight(torch.float32))) <= TOLERANCE[torch.bfloat16]
    m.load_state_dict(other.state_dict())  # the packed copy follows
    assert relative_error(m(x), F.linear(x.float(), other.dequantized_weight(torch.float32))) <= 1.5e-2


def test_the_engine_builds_int4_copies_before_it_sizes_the_kv_cache(demo_v2, monkeypatch, fresh_kernels):
    from glmapp.engine.engine import Engine

    model, tok = glmapp.load(str(demo_v2), quant="int4", dtype="bfloat16")
    modules = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    engine = Engine(model, tok)  # default on CPU: no second copy
    engine.shutdown()
    assert all(m.packed_bytes() == 0 for m in modules)
    monkeypatch.setitem(quant_kernels.INT4_PACKED_COPY, "cpu", True)
    budgets = []
    monkeypatch.setattr("glmapp.engine.engine._kv_budget_bytes",
                        lambda cfg, device: budgets.append(sum(m.packed_bytes() for m in modules)) or 2**20)
    engine = Engine(model, tok)  # no request yet: the copies exist before the KV budget is read
    engine.shutdown()
    assert budgets and budgets[0] > 0 and all(m.packed_bytes() > 0 for m in modules)


def test_the_engine_builds_no_int4_copy_that_dispatch_would_never_use(demo_v2, monkeypatch, fresh_kernels):
    from glmapp.engine.engine import Engine

    monkeypatch.setitem(quant_kernels.INT4_PACKED_COPY, "cpu", True)
    model, tok = glmapp.load(str(demo_v2), quant="int4", dtype="float32")  # fp32 int4 runs `split` on CPU
    Engine(model, tok).shutdown()
    assert all(m.packed_bytes() == 0 for m in model.modules() if isinstance(m, QuantizedLinear))
