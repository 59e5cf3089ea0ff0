"""LoRA over glmapp's own int8/int4 `QuantizedLinear` (QLoRA on ChatGLM's scheme), registered with peft.

Notable choices:
- peft wraps only layer types it knows; ours is registered through `LoraConfig._register_custom_module`
  with `QuantizedLoraLinear`, peft's own `lora.Linear` whose base output comes from `frozen_linear`.
- `frozen_linear` runs the module's inference kernel forward (no weight gradient exists) and returns the
  input gradient `grad @ W` with W dequantized for that backward only, as QLoRA does: the packed int8 kernels
  have no autograd formula, and the base stays quantized in memory.
"""

from __future__ import annotations

import torch
from peft.tuners import lora

from glmapp.quant import QuantizedLinear


class _FrozenQuantized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.module.dequantized_weight(grad.dtype)
        return grad @ weight, None


def frozen_linear(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """module(x), differentiable with respect to x only."""
    return _FrozenQuantized.apply(x, module)


class QuantizedLoraLinear(lora.Linear):
    """peft's LoRA layer around a `QuantizedLinear`: base(x) + sum of active adapters' scale * B(A(drop(x)))."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = frozen_linear(self.base_layer, x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            result = result + b(a(self.lora_dropout[name](x.to(a.weight.dtype)))).to(result.dtype) * self.scaling[name]
        return result


def register(lora_config) -> None:
    """Let peft wrap our quantized linears with `QuantizedLoraLinear`."""
    lora_config._register_custom_module({QuantizedLinear: QuantizedLoraLinear})
