"""ChatGLM-6B (v1) as a transformers `PreTrainedModel`, written from the spec (shared/spec/CHATGLM.md §1, 2.3, 4).

Notable choices:
- Parameter names equal the official v1 names (`transformer.layers.N.attention.query_key_value`, 368 tensors
  with the tied `lm_head.weight` and the per-layer `rotary_emb.inv_freq` buffers), so official checkpoints,
  the int4/int8 layouts and PEFT LoRA adapters load unchanged.
- Shared with v2/v3 (`chatglm.py`): the attention core (`attention`, SDPA), the `KVCache` protocol and the
  attention module's flow (`SelfAttention.forward`). The v1 differences are named here: `project_qkv` (per-head
  interleaved q/k/v rows and 2-D rotary), `LayerNorm` with bias, the α-scaled residual on the *normed* input,
  the tanh-GELU MLP, the prefix-LM mask and the tied `lm_head`.
- The config also answers to the v2/v3 names the rest of glmapp reads (`kv_channels`, `num_kv_groups`,
  `seq_length`, `padded_vocab_size`, `ffn_hidden_size`), as read-only properties derived from the v1 keys.
- Positions are 2-D: `forward_cached` takes positions [b, t, 2] = (position, block position) per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from glmapp.models.chatglm import KVCache, SelfAttention

# Spec §4: alpha = sqrt(2 * 28); the reference's blocks never receive num_layers, so it is 28 for any depth.
RESIDUAL_ALPHA = math.sqrt(2 * 28)


class ChatGLM1Config(PreTrainedConfig):
    """Keys of the official v1 `configuration_chatglm.py` (class defaults are the old 150528-row vocab)."""

    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 150528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    layernorm_epsilon: float = 1e-5
    inner_hidden_size: int = 16384
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int | None = 150004
    eos_token_id: int | list[int] | None = 150005
    mask_token_id: int = 150000
    gmask_token_id: int = 150001
    pad_token_id: int | None = 0
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    tie_word_embeddings: bool = True
    # Not an official key; always "chatglm1" (kept so code that reads config.family works on every family).
    family: str | None = "chatglm1"

    def __post_init__(self, **kwargs):
        if not self.position_encoding_2d:
            raise ValueError("position_encoding_2d=false is not supported: every ChatGLM-6B checkpoint uses 2-D "
                             "positions")
        self.family = "chatglm1"
        super().__post_init__(**kwargs)

    # ---- the v2/v3 names the engine, cache and quantization code read ---------------------------------
    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads  # full multi-head attention

    @property
    def qkv_size(self) -> int:
        return 3 * self.hidden_size

    @property
    def seq_length(self) -> int:
        return self.max_sequence_length

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size

    @property
    def ffn_hidden_size(self) -> int:
        return self.inner_hidden_size

    @property
    def add_bias_linear(self) -> bool:
        return True  # every v1 linear has a bias

    add_qkv_bias = add_bias_linear


class LayerNorm(nn.LayerNorm):
    """LayerNorm with bias, computed in fp32 and cast back (the file stores these weights in fp32, §2.3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class RotaryEmbedding2D(nn.Module):
    """The per-layer `rotary_emb.inv_freq` buffer [head_dim / 4] (stored but recomputed, §2.3) and the angles."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.dim = head_dim // 2  # each half of the head rotates with its own position stream
        self.register_buffer("inv_freq", self.compute_inv_freq(torch.device("cpu")), persistent=True)

    def compute_inv_freq(self, device: torch.device) -> torch.Tensor:
        """Spec §4: computed in fp32 and rounded to fp16 (the values stay fp16-exact in any dtype)."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        return (1.0 / (10000.0**exponents)).half().float()


def rotations_2d(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """positions [b, t, 2] (position, block position) -> angles [b, t, 1, 2, head_dim/4] in fp32.

    The reference forms positions and products in the buffer's dtype (fp16 in an fp16 model, §4 / §10.5).
    """
    table_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    angles = positions.to(table_dtype)[..., None] * inv_freq.to(table_dtype)
    return angles.float()[:, :, None]


def apply_rotary_2d(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [b, t, n, d]: half [0, d/2) rotates by the position, half [d/2, d) by the block position; inside
    each half dim j pairs with j + d/4 (rotate-half style, spec §4 / §10.3). fp32 math, cast back."""
    halves = x.float().unflatten(-1, (2, 2, -1))  # [b, t, n, half, part, d/4]
    x1, x2 = halves.unbind(-2)
    cos, sin = angles.cos(), angles.sin()
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-2)
    return out.flatten(-3).to(x.dtype)


class SelfAttention1(SelfAttention):
    """v2/v3 attention flow with the v1 projection: rows per head are [q_h | k_h | v_h] (spec §4, §10.1)."""

    def __init__(self, config: ChatGLM1Config, layer_number: int):
        super().__init__(config, layer_number)
        self.rotary_emb = RotaryEmbedding2D(self.head_dim)

    def project_qkv(self, x: torch.Tensor, rotations: torch.Tensor):
        q, k, v = self.query_key_value(x).unflatten(-1, (self.num_heads, 3 * self.head_dim)).chunk(3, dim=-1)
        return apply_rotary_2d(q, rotations), apply_rotary_2d(k, rotations), v


class MLP1(nn.Module):
    def __init__(self, config: ChatGLM1Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))  # not gated (§4)


class GLMBlock1(nn.Module):
    def __init__(self, config: ChatGLM1Config, layer_number: int):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention1(config, layer_number)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP1(config)

    def forward(self, x, rotations, attn_mask=None, cache=None):
        # Spec §4 / §10.7: the residual branch is the *normed* input times alpha, not x.
        normed = self.input_layernorm(x)
        h = normed * RESIDUAL_ALPHA + self.attention(normed, rotations, attn_mask, cache)
        normed = self.post_attention_layernorm(h)
        return normed * RESIDUAL_ALPHA + self.mlp(normed)


class ChatGLM1Model(nn.Module):
    """`transformer.*` of the official v1 state dict."""

    def __init__(self, config: ChatGLM1Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock1(config, i) for i in range(config.num_layers)])
        self.final_layernorm = LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None

    @property
    def output_layer(self) -> nn.Embedding:
        """The tied output projection's weight holder (code that probes device/dtype reads it here)."""
        return self.word_embeddings

    def hidden_states(self, input_ids, positions, attn_mask=None, cache: KVCache | None = None) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        rotations = rotations_2d(self.layers[0].attention.rotary_emb.compute_inv_freq(x.device), positions, x.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, rotations, attn_mask)
            else:
                x = layer(x, rotations, attn_mask, cache)
        return self.final_layernorm(x)


def positions_2d(ids: list[int], bos_id: int, mask_id: int, gmask_id: int) -> tuple[list[list[int]], int]:
    """([[position, block position] per token], context length) of one unpadded row (spec §4).

    Context = everything before `<sop>`; from `<sop>` on the position stays at the [gMASK] (else [MASK])
    index while the block position counts 1, 2, ... A row without `<sop>` is all context.
    """
    context, mask_position = context_and_mask_position(ids, bos_id, mask_id, gmask_id)
    return [[i, 0] if i < context else [mask_position, i - context + 1] for i in range(len(ids))], context


def context_and_mask_position(ids: list[int], bos_id: int, mask_id: int, gmask_id: int) -> tuple[int, int]:
    """(index of `<sop>` (else len), index of [gMASK] (else [MASK], else the last context token))."""
    context = ids.index(bos_id) if bos_id in ids else len(ids)
    mask_token = gmask_id if gmask_id in ids else mask_id
    return context, ids.index(mask_token) if mask_token in ids else max(context - 1, 0)


def prefix_lm_mask(context_lengths: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Boolean [b, 1, s, s], True = may attend: causal, plus every real query sees the whole context
    (the first `context_lengths[i]` real tokens of row i); left pads are never attended and a pad query row
    sees everything (no NaN; its output is unused)."""
    b, s = keep.shape
    pads = s - keep.sum(-1, keepdim=True)  # [b, 1]
    cols = torch.arange(s, device=keep.device)
    causal = cols[None, :] <= cols[:, None]
    context = cols[None, :] < (pads + context_lengths[:, None])  # [b, s] absolute columns of the context
    mask = (causal[None] | context[:, None, :]) & keep[:, None, :]
    mask = mask | ~keep[:, :, None]
    return mask[:, None]


class ChatGLM1PreTrainedModel(PreTrainedModel):
    config_class = ChatGLM1Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock1"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"transformer\.prefix_encoder\..*"]
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, RotaryEmbedding2D):
            module.inv_freq.copy_(module.compute_inv_freq(module.inv_freq.device))


class ChatGLM1ForConditionalGeneration(ChatGLM1PreTrainedModel):
    """The official v1 top-level class: `transformer` and the tied `lm_head`."""

    def __init__(self, config: ChatGLM1Config):
        super().__init__(config)
        self.transformer = ChatGLM1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.tie_lm_head()

    def tie_lm_head(self) -> None:
        """lm_head shares the embedding matrix (spec §2.3); call again after anything that re-creates
        parameters (`to_empty`, a dtype cast from meta)."""
        self.lm_head.weight = self.transformer.word_embeddings.weight

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def positions_and_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Official 2-D positions [b, s, 2] and prefix-LM mask [b, 1, s, s] for (left-padded) rows."""
        c = self.config
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = torch.zeros(*input_ids.shape, 2, dtype=torch.long)
        contexts = []
        for row, (ids, k) in enumerate(zip(input_ids.tolist(), keep.tolist())):
            real = [i for i, kept in zip(ids, k) if kept]
            pos, context = positions_2d(real, c.bos_token_id, c.mask_token_id, c.gmask_token_id)
            if real:
                positions[row, len(ids) - len(real):] = torch.tensor(pos)
            contexts.append(context)
        contexts = torch.tensor(contexts, device=input_ids.device)
        return positions.to(input_ids.device), prefix_lm_mask(contexts, keep)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        return_last_logit: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Training / reference path over whole (left-padded) sequences with the prefix-LM mask.

        `attention_mask` is the 2-D keep-mask [b, s] (1 = real token); `position_ids`, when given, is the
        official [b, 2, s] layout (else computed from `<sop>` and [gMASK] as the reference does).
        """
        positions, mask = self.positions_and_mask(input_ids, attention_mask)
        if position_ids is not None:
            positions = position_ids.transpose(1, 2)
        hidden = self.transformer.hidden_states(input_ids, positions, mask)
        if return_last_logit:
            hidden = hidden[:, -1:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def forward_cached(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                       logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Generation path: new tokens [b, t] at 2-D `positions` [b, t, 2]; the cache owns the mask (a prefill
        must let the context attend both ways). Returns logits [n, vocab] as in v2/v3."""
        hidden = self.transformer.hidden_states(input_ids, positions, None, cache)
        hidden = hidden[:, -1] if logits_index is None else hidden.flatten(0, 1)[logits_index]
        return self.lm_head(hidden)


def is_v1_config(raw: dict) -> bool:
    """Whether a config.json dict describes ChatGLM-6B v1 (its 2-D positions / inner_hidden_size keys)."""
    return bool(raw.get("position_encoding_2d")) or "inner_hidden_size" in raw
