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
from torch.nn.modules import module as nn_module

from glmapp import cpu_kernels
from glmapp.adapters import LoraLinear
from glmapp.cpu_linear import GemvLinear, QuantizedOutputLinear

log = logging.getLogger(__name__)

_VP, _INT, _LONG = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _INT), ("w", _VP), ("scale", _VP), ("bias", _VP), ("skind", _INT), ("bkind", _INT),
                ("N", _LONG), ("K", _LONG)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm1", _VP), ("norm2", _VP), ("nkind", _INT), ("qkv", _Linear), ("dense", _Linear),
                ("up", _Linear), ("down", _Linear), ("kc", _VP), ("vc", _VP)]


class _Model(ctypes.Structure):
    _fields_ = [("layers", ctypes.POINTER(_Layer)), ("n_layers", _LONG), ("H", _LONG), ("heads", _LONG),
                ("groups", _LONG), ("D", _LONG), ("R2", _LONG), ("vocab", _LONG), ("rot_rows", _LONG),
                ("kind", _INT), ("ckind", _INT), ("ekind", _INT), ("fnkind", _INT), ("embed", _VP),
                ("final_norm", _VP), ("rot", _VP), ("output", ctypes.POINTER(_Linear)), ("eps", ctypes.c_float),
                ("final_eps", ctypes.c_float), ("scale", ctypes.c_float)]


def _bind(lib) -> None:
    if getattr(lib, "_decode_bound", False):
        return
    lib.glm_decode_step.restype = ctypes.c_int
    lib.glm_decode_step.argtypes = [ctypes.POINTER(_Model), _LONG, _VP, _VP, _VP, _VP, _VP, _LONG, _VP, _VP]
    lib._decode_bound = True


_REGISTRATIONS = [0]  # modules, parameters and buffers assigned anywhere in the process (see FusedDecode._valid)


def _note_registration(*_):
    _REGISTRATIONS[0] += 1  # returns None: the assigned object is kept as it is


for _register in (nn_module.register_module_module_registration_hook,
                  nn_module.register_module_parameter_registration_hook,
                  nn_module.register_module_buffer_registration_hook):
    _register(_note_registration)


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
        self._check: tuple | None = None
        self._registrations = -1
        self._output: _Linear | None = None
        self._model: _Model | None = None
        self._rot, self._rot_rows = None, 0
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
        """Does every module and tensor the plan read still sit where it was, with the same class and data?
        Checked before every step, so it has to be cheap (a step of the mid model in int4 takes ~4 ms; attribute
        walks took 0.6 ms, then per-slot dict lookups 0.24 ms with the caches cold from streaming weights):
        - any module, parameter or buffer assigned anywhere (an adapter wrapping a linear, a reloaded weight)
          bumps a global count through torch's registration hooks (`_note_registration`);
        - class swaps in place (cpu_linear's pack/unpack, the output layer's quantized copy) and entries of a
          module's __dict__ (that copy) are compared here;
        - each tensor's data address: `.data =` (as Module.to does) swaps the memory under the same tensor.
        These lists hold every module and tensor the plan read, so none of that memory is freed under it."""
        if self._check is None or self._registrations != _REGISTRATIONS[0]:
            return False
        where, ids, objects, classes, tensors, pointers = self._check
        return ([type(o) for o in objects] == classes and [id(d.get(key)) for d, key in where] == ids
                and [t.data_ptr() for t in tensors] == pointers)

    def _freeze(self) -> None:
        """The checks `_valid` runs, as lists compared in one go."""
        classes = {id(obj): (obj, cls) for obj, cls in self._classes}.values()  # each object once
        self._check = ([(d, key) for d, key, _ in self._slots], [id(obj) for _, _, obj in self._slots],
                       [obj for obj, _ in classes], [cls for _, cls in classes],
                       [t for t, _ in self._pointers], [ptr for _, ptr in self._pointers])

    def _watch(self, owner, name: str, module, where: dict | None = None) -> None:
        """Watch owner.name (a submodule, or a key of the __dict__ `where`) being `module`, or a LoRA wrapper
        whose base is `module`, of the same class, with the same weight, weight_scale, bias (and quantized copy)."""
        found = owner._modules[name] if where is None else where[name]
        if where is not None:  # not a registration: compared at every step
            self._slots.append((where, name, found))
        self._classes += [(found, type(found)), (module, type(module))]
        for attr in ("weight", "weight_scale", "bias", "quantized"):
            for d in (module._parameters, module._buffers, module.__dict__):
                if attr in d:
                    value = d[attr]
                    if d is module.__dict__:
                        self._slots.append((d, attr, value))
                    if isinstance(value, torch.Tensor):
                        self._pointers.append((value, value.data_ptr()))
                    break

    def _build(self) -> ctypes.Array | None:
        """Describe the model for the C step; the checks watch what was read, also when a part is not taken
        (so an unchanged model is not described again at every step)."""
        self._plan, self._slots, self._classes, self._pointers = None, [], [], []
        self._registrations = _REGISTRATIONS[0]  # read first: a registration while describing rebuilds again
        self._plan = self._describe()
        self._freeze()
        return self._plan

    def _describe(self) -> ctypes.Array | None:
        model, cache = self.model, self.cache
        dtype, c, top = model.dtype, model.config, model.transformer
        layers = top.encoder.layers
        plan = (_Layer * len(layers))()
        self._watch(model, "transformer", top)
        self._watch(top, "encoder", top.encoder)
        self._watch(top.encoder, "layers", layers)
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attention, layer.mlp
            self._watch(layers, str(i), layer)
            self._watch(layer, "self_attention", attn)
            self._watch(layer, "mlp", mlp)
            linears = []
            for owner, name in ((attn, "query_key_value"), (attn, "dense"), (mlp, "dense_h_to_4h"),
                                (mlp, "dense_4h_to_h")):
                module = _unwrapped(getattr(owner, name))
                self._watch(owner, name, module)
                described = _linear(module, dtype)
                if described is None:
                    return None
                linears.append(described[0])
            self._watch(layer, "input_layernorm", layer.input_layernorm)
            self._watch(layer, "post_attention_layernorm", layer.post_attention_layernorm)
            n1, n2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            if n1.dtype != n2.dtype or not (n1.is_contiguous() and n2.is_contiguous()):
                return None
            plan[i] = _Layer(n1.data_ptr(), n2.data_ptr(), cpu_kernels.DTYPES[n1.dtype], *linears,
                             cache.k[i].data_ptr(), cache.v[i].data_ptr())
        embed, final = top.embedding.word_embeddings, top.encoder.final_layernorm
        self._watch(top, "embedding", top.embedding)
        self._watch(top.embedding, "word_embeddings", embed)
        self._watch(top.encoder, "final_layernorm", final)
        self._watch(top, "output_layer", top.output_layer)
        if (embed.weight.dtype != dtype or not embed.weight.is_contiguous()
                or final.weight.dtype not in cpu_kernels.DTYPES or not final.weight.is_contiguous()):
            return None
        kinds = [lin.kind for layer in plan for lin in (layer.qkv, layer.dense, layer.up, layer.down)]
        self._output = None  # the output layer in C when the loops take it, else its module runs after the call
        out = top.output_layer
        inner = out.__dict__.get("quantized") if type(out) is QuantizedOutputLinear else out
        described = None if inner is None else _linear(inner, dtype)
        if described is not None:
            if inner is not out:
                self._watch(out, "quantized", inner, where=out.__dict__)
            self._output = described[0]
            kinds.append(described[0].kind)
        self.max_rows = min(cpu_kernels.MAX_ROWS[k] for k in kinds)
        rot = self._rotations(max(self._rot_rows, 1024))
        self._model = _Model(ctypes.cast(plan, ctypes.POINTER(_Layer)), len(plan), c.hidden_size,
                             c.num_attention_heads, c.num_kv_groups, c.kv_channels, rot.shape[1],
                             embed.weight.shape[0], rot.shape[0], cpu_kernels.DTYPES[dtype],
                             cpu_kernels.DTYPES[cache.k.dtype], cpu_kernels.DTYPES[dtype],
                             cpu_kernels.DTYPES[final.weight.dtype], embed.weight.data_ptr(), final.weight.data_ptr(),
                             rot.data_ptr(), None if self._output is None else ctypes.pointer(self._output),
                             c.layernorm_epsilon, final.eps, c.kv_channels ** -0.5)
        return plan

    def _rotations(self, rows: int) -> torch.Tensor:
        """The model's rotations (cos, sin) of positions 0..rows-1, fp32 [rows, R2, 2]: computed by its own
        module (each position's row is what the module gives for that position alone)."""
        top = self.model.transformer
        with torch.inference_mode():
            rot = top.rotary_pos_emb(torch.arange(rows)[None], self.model.dtype)[0, :, 0].contiguous()
        self._rot, self._rot_rows = rot, rows
        return rot

    def plan(self) -> ctypes.Array | None:
        """The current plan, rebuilt when the model's modules or tensors changed; None when a layer is not fused."""
        if not self._valid():
            self._build()
        return self._plan

    def logits(self, ids: list[int], positions: list[int], row_slots: list[torch.Tensor]) -> torch.Tensor | None:
        """`step` with each row's context slots listed (its last one receives the new token's key and value)."""
        tables = [int(v) for s in row_slots for v in s]
        return self.step(ids, positions, tables, [len(s) for s in row_slots], [len(s) for s in row_slots], 1)

    def step(self, ids: list[int], positions: list[int], tables: list[int], table_lengths: list[int],
             lengths: list[int], block_size: int) -> torch.Tensor | None:
        """Logits [rows, vocab] of one decode step (one new token per row), or None when the plan does not
        cover the model now or there are more rows than its kernels are fast for (the caller runs the per-op
        path, where each linear picks its kernel). Row m: token ids[m] at rotary position positions[m], its
        context of lengths[m] cache slots (its new token's last) given by the block table that fills the next
        table_lengths[m] entries of `tables`."""
        plan = self.plan()
        m = len(ids)
        if plan is None or m > self.max_rows:
            return None
        if max(positions) >= self._rot_rows:  # a longer context than the table: grow it
            rows = self._rot_rows
            while rows <= max(positions):
                rows *= 2
            self._model.rot = self._rotations(rows).data_ptr()
            self._model.rot_rows = rows
        lib = cpu_kernels.library()
        _bind(lib)
        top = self.model.transformer
        dtype = self.model.dtype
        offsets = [0]
        for n in table_lengths:
            offsets.append(offsets[-1] + n)
        i64 = ctypes.c_int64
        h = torch.empty(m, self.model.config.hidden_size, dtype=dtype)
        logits = torch.empty(m, self._model.vocab, dtype=dtype) if self._output is not None else None
        rc = lib.glm_decode_step(ctypes.byref(self._model), m, (i64 * m)(*ids), (i64 * m)(*positions),
                                 (i64 * len(tables))(*tables), (i64 * (m + 1))(*offsets), (i64 * m)(*lengths),
                                 block_size, h.data_ptr(), None if logits is None else logits.data_ptr())
        if rc == -1:
            raise ValueError("a token id, position or cache slot outside the model's tables")
        if rc != 0:
            raise MemoryError("the fused decode step could not allocate its buffers")
        self.steps += 1
        if logits is None:
            with torch.inference_mode():
                logits = top.output_layer(h)
        return logits
