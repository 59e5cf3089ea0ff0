"""KV memory for generation.

`DenseKVCache` is the simple contiguous cache used by `chat`/`stream_chat` for one conversation:
    k/v storage: [num_layers, batch, capacity, groups, head_dim], allocated once.
Keys are stored after RoPE and before the group broadcast (spec §3.7), so a cache is only 2/32 of a
full multi-head cache on ChatGLM2/3.
"""

from __future__ import annotations

import torch

from glmapp.models.chatglm import attention


class DenseKVCache:
    """Contiguous per-row cache. Call `attend` from every layer, then `commit(t)` once per step."""

    def __init__(self, num_layers, batch, capacity, groups, head_dim, dtype, device):
        shape = (num_layers, batch, capacity, groups, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # tokens committed (all rows advance together)

    @classmethod
    def for_model(cls, model, batch: int, capacity: int) -> "DenseKVCache":
        cfg = model.config
        p = model.transformer.output_layer.weight
        dtype = p.dtype if p.dtype.is_floating_point else torch.float16
        return cls(cfg.num_layers, batch, capacity, cfg.num_kv_groups, cfg.kv_channels, dtype, p.device)

    def attend(self, layer: int, q, k, v):
        t, start = q.shape[1], self.length
        end = start + t
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} > capacity {self.capacity}")
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        keys, values = self.k[layer, :, :end], self.v[layer, :, :end]
        if t == 1 or start == 0:
            return attention(q, keys, values, None, is_causal=start == 0)
        # New tokens at absolute slots start..end-1 see every earlier slot and themselves.
        slots = torch.arange(end, device=q.device)
        mask = slots[None, :] <= (start + torch.arange(t, device=q.device))[:, None]
        return attention(q, keys, values, mask[None, None])

    def commit(self, t: int) -> None:
        self.length += t

    def truncate(self, length: int) -> None:
        """Forget everything after `length` tokens (prefix reuse keeps the common prefix)."""
        self.length = min(self.length, length)
