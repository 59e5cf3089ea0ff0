"""The CPU int4 weight held in ATen's int4 kernel layout in place (glmapp.quant_kernels.to_kernel_layout)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmapp import cpu_linear, quant_kernels
from glmapp.quant import QuantizedLinear

pytestmark = pytest.mark.skipif(quant_kernels.cpu_layout() is None, reason="no CPU int4 kernel in this build")


def int4(out_features=112, in_features=512, bias=False, seed=0):  # 112 rows: a full 64-row block and a partial one
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.02)
        if bias:
            dense.bias.copy_(torch.randn(out_features, generator=gen) * 0.02)
    return QuantizedLinear.from_float(dense.to(torch.bfloat16), 4)


@pytest.mark.parametrize("shape", [(112, 512), (64, 256), (48, 1024), (5632, 1024)])
def test_kernel_layout_round_trips_to_the_official_bytes(shape):
    m = int4(*shape)
    official = m.weight.detach().clone()
    assert quant_kernels.to_kernel_layout(m)
    assert m.weight.dtype == torch.uint8 and m.weight.shape == official.shape  # in place of, not beside
    assert m.packed_bytes() == 4 * shape[0] * shape[1] // quant_kernels.CPU_GROUP_SIZE  # scales + zeros only
    assert torch.equal(m.state_dict()["weight"], official)
    assert torch.equal(m.dequantized_weight(torch.float32), int4(*shape).dequantized_weight(torch.float32))
    assert quant_kernels.to_official_layout(m)
    assert m.weight.dtype == torch.int8 and torch.equal(m.weight, official)


def test_our_tiling_is_atens_packer():
    gen = torch.Generator().manual_seed(1)
    u = torch.randint(0, 16, (176, 96), generator=gen, dtype=torch.uint8)
    packed = torch._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 1).view(torch.uint8).reshape(176, 48)
    layout = quant_kernels.cpu_layout()
    assert torch.equal(quant_kernels._tile(u, *layout), packed)
    assert torch.equal(quant_kernels._untile(packed, *layout), u)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 32, 40])
def test_outputs_in_kernel_layout_match_the_dequantized_reference(dtype, rows):
    m = int4(bias=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(rows, m.in_features, generator=gen).to(dtype)
    reference = F.linear(x.float(), m.dequantized_weight(torch.float32), m.bias.float())
    quant_kernels.to_kernel_layout(m)
    kernel = quant_kernels.choose(m, x)
    assert kernel == ("layout_dense" if rows > 32 else "tinygemm" if dtype == torch.bfloat16 else "tinygemm_bf16")
    with torch.no_grad():
        y = m(x).float()
    assert (y - reference).abs().max() <= 0.02 * reference.abs().max(), kernel


def test_pack_and_unpack_convert_int4_linears_and_leave_int8_alone():
    model = nn.Sequential(int4(), QuantizedLinear.from_float(nn.Linear(512, 64).to(torch.bfloat16), 8))
    official = model[0].weight.detach().clone()
    x = torch.randn(1, 512).to(torch.bfloat16)
    with torch.no_grad():
        before = model[0](x)
        assert cpu_linear.pack(model, gemv=False) == 1
        assert model[0].weight.dtype == torch.uint8 and model[1].weight.dtype == torch.int8
        assert cpu_linear.is_packed(model)
        assert torch.equal(model[0](x), before) or (model[0](x) - before).abs().max() <= 0.02 * before.abs().max()
        assert cpu_linear.unpack(model) == 1
    assert torch.equal(model[0].weight, official) and not cpu_linear.is_packed(model)


def test_load_and_to_while_in_kernel_layout():
    m, other = int4(seed=0), int4(seed=3)
    quant_kernels.to_kernel_layout(m)
    m.load_state_dict(other.state_dict())
    assert m.weight.dtype == torch.uint8  # laid out again after loading
    assert torch.equal(quant_kernels.official_weight(m), other.weight)
    m.to(torch.device("cpu"))
    assert m.weight.dtype == torch.int8 and torch.equal(m.weight, other.weight)
