"""ChatGLM2 / ChatGLM3 as a transformers `PreTrainedModel`, written from the spec (shared/spec/CHATGLM.md §1-3).

Notable choices:
- Module and parameter names equal the official checkpoint names, so official weights, PEFT LoRA
  adapters (`query_key_value`, `dense`, ...) and `save_pretrained` output interoperate unchanged.
- Activations are batch-first `[batch, seq, ...]` (the reference is seq-first; the math is the same).
- One layer implementation, two call paths: `forward(input_ids, labels=...)` for training and
  reference use (causal attention over the given sequence), and `forward_cached(input_ids,
  positions, cache)` for generation, where a KV-cache object owns where keys/values live and how
  attention over them is computed (dense here, paged in the engine).
- Rotary angles are computed from positions on the fly (no table), so any `seq_length` costs nothing.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from glmapp import cpu_kernels


class ChatGLMConfig(PreTrainedConfig):
    """Keys and class defaults of the official `configuration_chatglm.py` (spec §1), plus `family`."""

    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]

    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    seq_length: int = 2048
    hidden_dropout: float = 0.0
    classifier_dropout: float | None = None
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    bias_dropout_fusion: bool = True
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    fp32_residual_connection: bool = False
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    rope_ratio: float = 1.0
    original_rope: bool = True
    tie_word_embeddings: bool = False
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    # Not an official key: "chatglm2" or "chatglm3", set by the checkpoint loader (never guessed here).
    family: str | None = None

    def __post_init__(self, **kwargs):
        self.vocab_size = self.padded_vocab_size
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """ChatGLM-6B (v1) shares `model_type: "chatglm"`: AutoConfig reaches here, and a v1 dict is handed to
        `ChatGLM1Config` (glmapp/models/chatglm1.py), so Auto classes load every family without remote code."""
        from glmapp.models.chatglm1 import ChatGLM1Config, is_v1_config

        if cls is ChatGLMConfig and is_v1_config(config_dict):
            return ChatGLM1Config.from_dict(config_dict, **kwargs)
        return super().from_dict(config_dict, **kwargs)

    @property
    def num_kv_groups(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def qkv_size(self) -> int:
        return self.kv_channels * (self.num_attention_heads + 2 * self.num_kv_groups)


class KVCache(Protocol):
    """What `forward_cached` needs from a cache: store this step's keys/values, attend over all."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [b, t, heads, d], k/v [b, t, groups, d] (after RoPE) -> attention output [b, t, heads, d]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Spec §3.4: the whole computation runs in fp32 and is cast back once.
        if cpu_kernels.fused_usable(x, self.weight):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Holds the official (unused but persistent) `inv_freq` buffer and computes cos/sin from positions."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.rotary_dim = config.kv_channels // 2  # spec §3a: only the first half of each head rotates
        self.family = config.family or "chatglm2"
        self.rope_ratio = float(config.rope_ratio or 1.0)
        self.register_buffer("inv_freq", self.compute_inv_freq(torch.device("cpu")), persistent=True)

    def compute_inv_freq(self, device: torch.device) -> torch.Tensor:
        base = 10000.0
        if self.family == "chatglm3":
            base *= self.rope_ratio  # chatglm3-*-32k scales the base (spec §3a, §10.4)
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim
        return 1.0 / (base**exponents)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """positions [b, t] -> rotations (cos, sin) of each angle, fp32 [b, t, 1, rotary_dim/2, 2]."""
        inv_freq = self.compute_inv_freq(positions.device)
        if self.family == "chatglm3":
            pos = positions.float()
            angles = pos[..., None] * inv_freq
        else:
            # chatglm2 forms positions, theta and their product in the model's dtype (spec §3a quirk):
            # in fp16/bf16 long positions are rounded exactly as the reference rounds them.
            table_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
            pos = positions.to(table_dtype) / self.rope_ratio  # chatglm2-32k interpolates positions
            angles = pos[..., None] * inv_freq.to(table_dtype)
        angles = angles.float()
        return torch.stack((angles.cos(), angles.sin()), dim=-1)[:, :, None]


def apply_rotary(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """x [b, t, n, d]: rotate interleaved pairs (2i, 2i+1) of dims [0, rotary_dim) in fp32
    (out[2i] = x[2i]·cos − x[2i+1]·sin, out[2i+1] = x[2i+1]·cos + x[2i]·sin); the other dims pass through.
    Real arithmetic rather than complex numbers: torch.compile's code generator does not handle complex."""
    rot_dim = rotations.shape[-2] * 2
    pairs = x[..., :rot_dim].float().unflatten(-1, (-1, 2))
    even, odd = pairs.unbind(-1)
    cos, sin = rotations.unbind(-1)
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat((rotated, x[..., rot_dim:]), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_kv_groups
        self.head_dim = config.kv_channels
        self.query_key_value = nn.Linear(
            config.hidden_size, config.qkv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def project_qkv(self, x: torch.Tensor, rotations: torch.Tensor):
        # Spec §3.5: rows are [all q heads | all k groups | all v groups], not per-head interleaved,
        # so q and k are adjacent and get their rotary embedding in one go.
        heads, groups, d = self.num_heads, self.num_groups, self.head_dim
        qkv = self.query_key_value(x)
        if cpu_kernels.fused_usable(qkv):
            qk = cpu_kernels.rope(qkv, heads + groups, d, rotations)
        else:
            qk = apply_rotary(qkv[..., : (heads + groups) * d].unflatten(-1, (heads + groups, d)), rotations)
        q, k = qk.split([heads, groups], dim=2)
        return q, k, qkv[..., (heads + groups) * d:].unflatten(-1, (groups, d))

    def forward(self, x, rotations, attn_mask=None, cache: KVCache | None = None):
        q, k, v = self.project_qkv(x, rotations)
        if cache is not None:
            out = cache.attend(self.layer_number, q, k, v)
        else:
            out = attention(q, k, v, attn_mask)
        return self.dense(out.flatten(2))


def attention(q, k, v, attn_mask=None, is_causal=True):
    """Grouped-query SDPA on [b, t, n, d] tensors; query head h reads group h // (heads/groups) (spec §3.6).

    `attn_mask` is a boolean [b, 1, tq, tk] (True = may attend) or None for plain causal attention.
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if attn_mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal and q.shape[2] > 1, enable_gqa=True)
    return out.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense_h_to_4h(x)
        if cpu_kernels.fused_usable(h):
            return self.dense_4h_to_h(cpu_kernels.swiglu(h))
        gate, up = h.chunk(2, dim=-1)  # spec §3.10: SiLU on the FIRST half
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_number: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, layer_number)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, rotations, attn_mask=None, cache=None):
        h = x + self.self_attention(self.input_layernorm(x), rotations, attn_mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.gradient_checkpointing = False


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class ChatGLMModel(nn.Module):
    """`transformer.*` of the official state dict."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)

    def hidden_states(self, input_ids, positions, attn_mask=None, cache=None) -> torch.Tensor:
        x = self.embedding(input_ids)
        rotations = self.rotary_pos_emb(positions, x.dtype)
        encoder = self.encoder
        for layer in encoder.layers:
            if encoder.gradient_checkpointing and self.training:
                x = encoder._gradient_checkpointing_func(layer.__call__, x, rotations, attn_mask)
            else:
                x = layer(x, rotations, attn_mask, cache)
        return encoder.final_layernorm(x)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """2-D keep-mask [b, s] (1 = real token) -> boolean [b, 1, s, s] causal mask, True = may attend.

    Fully padded query rows see everything, as in the reference (spec §3.9), so no row is NaN.
    """
    keep = attention_mask.bool()
    s = keep.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=keep.device).tril()
    mask = causal[None] & keep[:, None, :]
    mask = mask | ~mask.any(-1, keepdim=True)
    return mask[:, None]


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"transformer\.prefix_encoder\..*"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(module.compute_inv_freq(module.inv_freq.device))


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    """The official top-level class: `transformer` (embedding, encoder, output_layer)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def set_output_embeddings(self, value):
        self.transformer.output_layer = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        return_last_logit: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Training / reference path: full sequences, causal attention, optional loss over `labels`."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = padding_mask(attention_mask)
        hidden = self.transformer.hidden_states(input_ids, position_ids, mask)
        if return_last_logit:
            hidden = hidden[:, -1:]
        logits = self.transformer.output_layer(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def forward_cached(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, logits_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Generation path: new tokens [b, t] at `positions` [b, t]; keys/values go through `cache`.

        Returns logits for the rows/positions picked by `logits_index` (flat indices into b*t), or the
        last position of every row when None: [n, vocab] either way.
        """
        hidden = self.transformer.hidden_states(input_ids, positions, None, cache)
        if logits_index is None:
            hidden = hidden[:, -1]
        else:
            hidden = hidden.flatten(0, 1)[logits_index]
        return self.transformer.output_layer(hidden)
