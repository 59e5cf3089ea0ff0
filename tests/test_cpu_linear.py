"""oneDNN-prepacked CPU linears: same results, plain weights back, engine lifetime, weight readers."""

import pytest
import torch
from torch import nn

import glmapp
from glmapp import cpu_linear
from glmapp.backends import RequestHandle
from glmapp.engine.engine import Engine, EngineConfig
from glmapp.engine.request import GenerationRequest
from glmapp.engine.sampling import SamplingParams

DTYPES = [d for d in (torch.float32, torch.bfloat16) if cpu_linear.supported(d) is None]
pytestmark = pytest.mark.skipif(not DTYPES, reason="no oneDNN in this PyTorch build")
# pack small test linears too (packing them does not pay); oneDNN packing, not glmapp's kernels (tested below)
ANY_SIZE = dict(min_elements=0, min_in_features=0, gemv=False)


def _linears(dtype, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96, bias=bias), nn.Linear(96, 32, bias=False)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (2, 5, 64), (0, 64)])
def test_packed_forward_matches_f_linear(dtype, shape):
    model = _linears(dtype)
    x = torch.randn(*shape).to(dtype)
    with torch.inference_mode():
        want = model(x)
        assert cpu_linear.pack(model, **ANY_SIZE) == 2
        assert all(type(m) is cpu_linear.PackedLinear and m.weight.is_mkldnn for m in model)
        got = model(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_gives_back_the_exact_plain_weights(dtype):
    model = _linears(dtype)
    model[0].weight.requires_grad_(False)
    before = [m.weight.detach().clone() for m in model]
    cpu_linear.pack(model, **ANY_SIZE)
    assert cpu_linear.pack(model, **ANY_SIZE) == 0  # already packed
    assert cpu_linear.is_packed(model)
    assert cpu_linear.unpack(model) == 2
    assert not cpu_linear.is_packed(model)
    for m, w in zip(model, before):
        assert type(m) is nn.Linear and not m.weight.is_mkldnn
        assert torch.equal(m.weight, w)
    assert [m.weight.requires_grad for m in model] == [False, True]  # each weight's flag as it was
    assert not hasattr(model[0], "plain_requires_grad")


def test_only_plain_float_cpu_linears_are_packed():
    class Sub(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), Sub(8, 8), nn.Linear(8, 8).half(), nn.Embedding(4, 8))
    assert cpu_linear.pack(model, **ANY_SIZE) == 1
    assert [type(m) for m in model][:3] == [cpu_linear.PackedLinear, Sub, nn.Linear]


@pytest.mark.parametrize("dtype", DTYPES)
def test_only_weights_big_enough_for_packing_to_pay_are_packed(dtype):
    k = cpu_linear.PACK_MIN_IN_FEATURES
    n = cpu_linear.PACK_MIN_ELEMENTS // k
    narrow = k // 2
    model = nn.Sequential(nn.Linear(k, n), nn.Linear(k, n - 1), nn.Linear(narrow, 4 * n), nn.Linear(4 * k, 4 * n))
    model = model.to(dtype)
    assert cpu_linear.pack(model, gemv=False) == 2
    assert [type(m) for m in model] == [cpu_linear.PackedLinear, nn.Linear, nn.Linear, cpu_linear.PackedLinear]
    assert not model[1].weight.is_mkldnn and not model[2].weight.is_mkldnn


def test_a_mismatched_input_dtype_still_gets_a_result():
    model = _linears(torch.float32)
    x = torch.randn(3, 64, dtype=torch.float64)
    want = model.double()(x).float()
    model.float()
    cpu_linear.pack(model, **ANY_SIZE)
    torch.testing.assert_close(model(x).float(), want, atol=1e-4, rtol=1e-4)


def test_gradients_flow_through_a_packed_linear():
    """LoRA training on a model an engine has packed: the input's gradient is what a plain linear gives."""
    model = _linears(torch.float32)
    x = torch.randn(4, 64, requires_grad=True)
    model(x).square().sum().backward()
    want = x.grad.clone()
    x.grad = None
    cpu_linear.pack(model, **ANY_SIZE)
    model(x).square().sum().backward()
    torch.testing.assert_close(x.grad, want, atol=1e-4, rtol=1e-4)


def test_state_dict_load_and_to_see_plain_weights():
    model = _linears(torch.float32)
    x = torch.randn(3, 64)
    want_state = {k: v.clone() for k, v in model.state_dict().items()}
    want = model(x).detach()
    cpu_linear.pack(model, **ANY_SIZE)
    state = model.state_dict()
    assert state.keys() == want_state.keys()
    for k, v in state.items():  # save_pretrained writes these
        assert not v.is_mkldnn and torch.equal(v, want_state[k]), k
    other = _linears(torch.float32)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    cpu_linear.pack(other, **ANY_SIZE)
    other.load_state_dict(state)  # loads plain weights, stays packed
    assert all(m.weight.is_mkldnn for m in other)
    torch.testing.assert_close(other(x), want, atol=1e-5, rtol=1e-5)
    doubled = model.to(torch.float64)  # unpacks, then converts
    assert all(not m.weight.is_mkldnn and m.weight.dtype == torch.float64 for m in doubled)
    torch.testing.assert_close(doubled(x.double()).float(), want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def model_tok(make_checkpoint):
    return glmapp.load(str(make_checkpoint("chatglm2", size="small")))  # the tiny one's linears are all too small


def _generate(engine, tok, text, n=24):
    handle = RequestHandle(f"p{id(engine)}-{n}", engine.cancel)
    engine.submit(handle, GenerationRequest(tok.encode(text), SamplingParams(temperature=0), n, stop_ids=[-1]))
    return [t for d in handle for t in d.token_ids]


def test_the_engine_packs_while_it_runs_and_unpacks_when_it_stops(model_tok):
    model, tok = model_tok
    plain_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = Engine(model, tok, EngineConfig(prepack=False))
    try:
        assert engine.packed_linears == 0 and not cpu_linear.is_packed(model)
        want = _generate(engine, tok, "请介绍一下长城。")
    finally:
        engine.shutdown()
    big = {name for name, m in model.named_modules() if type(m) is nn.Linear
           and m.weight.numel() >= cpu_linear.PACK_MIN_ELEMENTS and m.in_features >= cpu_linear.PACK_MIN_IN_FEATURES}
    assert 0 < len(big) < 4 * model.config.num_layers + 1  # some linears are packed, some stay plain
    engine = Engine(model, tok, EngineConfig())  # CPU default: packed
    try:
        packed = {name for name, m in model.named_modules() if type(m) is cpu_linear.PackedLinear}
        assert engine.packed_linears == len(packed) and packed == big
        assert _generate(engine, tok, "请介绍一下长城。") == want
    finally:
        engine.shutdown()
    assert not cpu_linear.is_packed(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, plain_weights[n]), n


def test_weight_readers_work_on_a_packed_model(demo_v2, tmp_path):
    from safetensors.torch import load_file

    from glmapp.models.glm_convert import to_transformers_glm
    from glmapp.quant import quantize_model

    from glmapp.quant import linear_weight_bytes

    model, _ = glmapp.load(str(demo_v2))
    ids = torch.tensor([[5, 9, 23, 42, 7]])
    with torch.inference_mode():
        want = model(ids).logits
        plain = {k: v.clone() for k, v in model.state_dict().items()}
        plain_bytes = linear_weight_bytes(model)
        assert cpu_linear.pack(model, **ANY_SIZE) == 4 * model.config.num_layers + 1
        assert linear_weight_bytes(model) == plain_bytes  # counted by element, packed or not
        model.save_pretrained(tmp_path)  # e.g. after model.chat(), whose engine packed the model
        saved = load_file(tmp_path / "model.safetensors")
        assert saved.keys() == plain.keys() and all(torch.equal(saved[k], plain[k]) for k in plain)
        ref = to_transformers_glm(model)  # reads the state dict (plain copies); the model stays packed
        assert cpu_linear.is_packed(model)
        torch.testing.assert_close(ref(ids).logits, want, atol=1e-4, rtol=1e-4)
        quantize_model(model, "int8")  # unpacks, then quantizes the plain weights
        assert not cpu_linear.is_packed(model)
        torch.testing.assert_close(model(ids).logits, want, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("bits, tol", [(8, 0.02), (4, 0.25)])
def test_a_quantized_output_layer_is_close_and_leaves_the_model_as_it_was(model_tok, tmp_path, bits, tol):
    model, tok = model_tok
    out = model.transformer.output_layer
    weight = out.weight.detach().clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, out.in_features, generator=torch.Generator().manual_seed(1)).to(weight.dtype)
    with torch.inference_mode():
        want = out(x)
        assert cpu_linear.pack(model, output_bits=bits) >= 1
        assert type(out) is cpu_linear.QuantizedOutputLinear and cpu_linear.is_packed(model)
        got = out(x)
        assert not torch.equal(got, want)  # the quantized copy answered
        # Per-row scales: each logit is off by a small share of its row's scale of the whole output.
        assert ((got - want).abs().max() / want.abs().max()).item() < tol
        assert model.state_dict().keys() == state.keys()  # the copy is not a parameter or a buffer
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    x.requires_grad_(True)
    torch.testing.assert_close(out(x), want)  # a backward (training) sees the full-precision weight
    cpu_linear.unpack(model)
    assert type(out) is nn.Linear and "quantized" not in out.__dict__ and torch.equal(out.weight, weight)


def test_the_engine_quantizes_the_output_layer_while_it_runs_when_asked(model_tok):
    model, tok = model_tok
    weight = model.transformer.output_layer.weight.detach().clone()
    engine = Engine(model, tok, EngineConfig(output_quant="int4"))
    try:
        assert type(model.transformer.output_layer) is cpu_linear.QuantizedOutputLinear
        assert len(_generate(engine, tok, "请介绍一下长城。", n=8)) == 8
    finally:
        engine.shutdown()
    assert type(model.transformer.output_layer) is nn.Linear
    assert torch.equal(model.transformer.output_layer.weight, weight)
    with pytest.raises(ValueError, match="output_quant must be one of none, int8, int4 .got 'int3'."):
        EngineConfig(output_quant="int3")


def test_chatglm1s_tied_lm_head_gets_the_quantized_copy_and_stays_tied(make_checkpoint):
    model, tok = glmapp.load(str(make_checkpoint("chatglm1")))
    head, embedding = model.lm_head, model.transformer.word_embeddings
    x = torch.randn(2, head.in_features, generator=torch.Generator().manual_seed(2)).to(head.weight.dtype)
    with torch.inference_mode():
        want = head(x)
        assert cpu_linear.pack(model, output_bits=8) >= 1
        assert type(head) is cpu_linear.QuantizedOutputLinear and head.weight is embedding.weight
        got = head(x)
        assert not torch.equal(got, want) and ((got - want).abs().max() / want.abs().max()).item() < 0.02
    cpu_linear.unpack(model)
    assert type(head) is nn.Linear and head.weight is embedding.weight
