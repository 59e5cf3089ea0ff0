"""A CPU decode step whose layers run in one call to glmapp's kernels (`cpu_kernels.c: glm_decode_layers`).

After the linears were made to stream at memory speed, the rest of a CPU decode step was Python and torch
dispatch: ~20 module calls and small ops per layer (4-5 ms of a 12 ms int4 step on the mid model). For decode
rows of ChatGLM2/3 without adapter rows, `FusedDecode.logits` runs the embedding and rotary angles in torch,
every layer in C (norms, QKV, rotary, the cache write, attention over each row's slots, dense, SwiGLU MLP,
residuals), then the final norm and the output layer as modules (so a quantized output layer copy is used).
The C layers call the same kernels as the per-op path (GemvLinear, the "gemv" quantized kernel, the fused
norm/rotary/SwiGLU/attention), in the same dtype with the same roundings, so both paths give the same logits.

The plan (pointers to every layer's weights and cache) is built once and checked cheaply at every step: a
module or tensor that was replaced since (an adapter wrapped a linear, weights reloaded) rebuilds it, and a
layer the kernels do not take (fp32 or oneDNN-packed weights, LoRA deltas, other shapes) turns the path off.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from glmapp import cpu_kernels
from glmapp.adapters import LoraLinear
from glmapp.cpu_linear import GemvLinear

log = logging.getLogger(__name__)

_VP, _INT, _LONG = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _INT), ("w", _VP), ("scale", _VP), ("bias", _VP), ("skind", _INT), ("bkind", _INT),
                ("N", _LONG), ("K", _LONG)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm1", _VP), ("norm2", _VP), ("nkind", _INT), ("qkv", _Linear), ("dense", _Linear),
                ("up", _Linear), ("down", _Linear), ("kc", _VP), ("vc", _VP)]


def _bind(lib) -> None:
    if getattr(lib, "_decode_bound", False):
        return
    lib.glm_decode_layers.restype = ctypes.c_int
    lib.glm_decode_layers.argtypes = [ctypes.POINTER(_Layer), _LONG, _VP, _INT, _LONG, _LONG, _LONG, _LONG, _LONG,
                                      _LONG, _VP, _VP, _VP, _VP, _INT, ctypes.c_float, ctypes.c_float]
    lib._decode_bound = True


def _unwrapped(module):
    # fused steps have no adapter rows: a LoRA wrapper would only call its base
    return module.base if type(module) is LoraLinear else module


def _linear(module, dtype: torch.dtype) -> tuple[_Linear, tuple] | None:
    """The C description of a linear and the tensors it reads, or None when the kernels do not take it."""
    from glmapp.quant import QuantizedLinear

    k = module.in_features
    if type(module) is GemvLinear and module.weight.dtype == dtype == torch.bfloat16:
        w, scale, kind = module.weight, None, cpu_kernels.W_BF16
    elif type(module) is QuantizedLinear and module.weight.dtype == torch.int8 and module.weight.device.type == "cpu":
        w, scale = module.weight, module.weight_scale
        kind = cpu_kernels.W_INT8 if module.bits == 8 else cpu_kernels.W_INT4
        if not cpu_kernels.takes(kind, k):  # ATen's kernel is faster for this one: the per-op path runs it
            return None
    else:
        return None
    bias = module.bias
    tensors = tuple(t for t in (w, scale, bias) if t is not None)
    if any(not t.is_contiguous() or t.dtype not in cpu_kernels.DTYPES and t is not w for t in tensors):
        return None
    dt = cpu_kernels.DTYPES
    desc = _Linear(kind, w.data_ptr(), 0 if scale is None else scale.data_ptr(), 0 if bias is None else bias.data_ptr(),
                   0 if scale is None else dt[scale.dtype], 0 if bias is None else dt[bias.dtype],
                   module.out_features, k)
    return desc, tensors


class FusedDecode:
    """Decode-only steps of a ChatGLM2/3 model on CPU, layers in one C call (see the module docstring)."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self._plan: ctypes.Array | None = None
        self._slots: list[tuple] = []  # (dict, key, object that must still be there): checked at every step
        self._classes: list[tuple] = []  # (object, the class it must still have)
        self._pointers: list[tuple] = []  # (tensor, the address its data had)
        self.max_rows = 0  # rows up to which every linear of the plan is faster in glmapp's kernels
        self.off_reason: str | None = None
        self.steps = 0  # steps run here (tests and benchmarks read it)

    @staticmethod
    def supported(model, cache) -> str | None:
        """None when the fused path can serve this model and cache, else why not (decided once per engine)."""
        c = model.config
        if getattr(c, "family", None) == "chatglm1":
            return "ChatGLM-6B (v1) layers differ"
        if not cpu_kernels.available():
            return "glmapp's CPU kernels are unavailable"
        if cache.k.device.type != "cpu" or not cache.k.is_contiguous() or not cache.v.is_contiguous():
            return "the KV cache is not a contiguous CPU tensor"
        if (not c.rmsnorm or c.apply_residual_connection_post_layernorm or not c.post_layer_norm
                or c.add_bias_linear or c.num_attention_heads % c.num_kv_groups):
            return "this configuration's layer structure is not the fused one"
        if model.dtype not in cpu_kernels.DTYPES or cache.k.dtype not in cpu_kernels.DTYPES:
            return f"dtype {model.dtype}"
        return None

    def _valid(self) -> bool:
        """Does every module and tensor the plan read still sit where it was, with the same class? One dict
        lookup per slot (nn.Module attribute access cost 0.6 ms a step on the mid model, 10% of an int4 step)."""
        return (all(d.get(key) is obj for d, key, obj in self._slots)
                and all(type(obj) is cls for obj, cls in self._classes)
                and all(t.data_ptr() == ptr for t, ptr in self._pointers))  # `.data =` (as Module.to) keeps t

    def _watch(self, owner, name: str, module) -> None:
        """Check at every step that owner.name is still `module`, or a LoRA wrapper whose base is `module`, of
        the same class, holding the same weight, weight_scale and bias tensors."""
        found = owner._modules[name]
        self._slots.append((owner._modules, name, found))
        if found is not module:  # the wrapper, and its base
            self._slots.append((found._modules, "base", module))
        self._classes += [(found, type(found)), (module, type(module))]
        for attr in ("weight", "weight_scale", "bias"):
            for d in (module._parameters, module._buffers, module.__dict__):
                if attr in d:
                    self._slots.append((d, attr, d[attr]))
                    if isinstance(d[attr], torch.Tensor):
                        self._pointers.append((d[attr], d[attr].data_ptr()))
                    break

    def _build(self) -> ctypes.Array | None:
        model, cache = self.model, self.cache
        dtype = model.dtype
        layers = model.transformer.encoder.layers
        plan = (_Layer * len(layers))()
        self._plan, self._slots, self._classes, self._pointers = None, [], [], []
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attention, layer.mlp
            self._watch(layers, str(i), layer)
            self._watch(layer, "self_attention", attn)
            self._watch(layer, "mlp", mlp)
            linears = []
            for owner, name in ((attn, "query_key_value"), (attn, "dense"), (mlp, "dense_h_to_4h"),
                                (mlp, "dense_4h_to_h")):
                module = _unwrapped(getattr(owner, name))
                described = _linear(module, dtype)
                if described is None:
                    return None
                linears.append(described[0])
                self._watch(owner, name, module)
            n1, n2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            if n1.dtype != n2.dtype or not (n1.is_contiguous() and n2.is_contiguous()):
                return None
            self._watch(layer, "input_layernorm", layer.input_layernorm)
            self._watch(layer, "post_attention_layernorm", layer.post_attention_layernorm)
            plan[i] = _Layer(n1.data_ptr(), n2.data_ptr(), cpu_kernels.DTYPES[n1.dtype], *linears,
                             cache.k[i].data_ptr(), cache.v[i].data_ptr())
        self.max_rows = min(cpu_kernels.MAX_ROWS[lin.kind] for layer in plan for lin in
                            (layer.qkv, layer.dense, layer.up, layer.down))
        self._plan = plan
        return plan

    def plan(self) -> ctypes.Array | None:
        """The current plan, rebuilt when the model's modules or tensors changed; None when a layer is not fused."""
        if self._plan is None or not self._valid():
            self._build()
        return self._plan

    @torch.inference_mode()
    def logits(self, ids: list[int], positions: list[int], write_slots: torch.Tensor,
               row_slots: list[torch.Tensor]) -> torch.Tensor | None:
        """Logits [rows, vocab] of one decode step (one new token per row), or None when the plan does not
        cover the model now or there are more rows than its kernels are fast for (the caller runs the per-op
        path, where each linear picks its kernel)."""
        plan = self.plan()
        if plan is None or len(ids) > self.max_rows:
            return None
        lib = cpu_kernels.library()
        _bind(lib)
        model, c = self.model.transformer, self.model.config
        x = model.embedding(torch.tensor([ids])).contiguous()  # [1, M, H], updated in place by the layers
        rotations = model.rotary_pos_emb(torch.tensor([positions]), x.dtype).contiguous()
        slots = torch.cat(row_slots).to(torch.int64).contiguous()
        offsets = torch.tensor([0] + [len(s) for s in row_slots], dtype=torch.int64).cumsum(0)
        write = write_slots.to(torch.int64).contiguous()
        heads, groups, d = c.num_attention_heads, c.num_kv_groups, c.kv_channels
        rc = lib.glm_decode_layers(plan, len(plan), x.data_ptr(), cpu_kernels.DTYPES[x.dtype], len(ids), x.shape[-1],
                                   heads, groups, d, rotations.shape[-2], rotations.data_ptr(), write.data_ptr(),
                                   slots.data_ptr(), offsets.data_ptr(), cpu_kernels.DTYPES[self.cache.k.dtype],
                                   c.layernorm_epsilon, d ** -0.5)
        if rc != 0:
            raise MemoryError("the fused decode step could not allocate its buffers")
        self.steps += 1
        return model.output_layer(model.encoder.final_layernorm(x[0]))
