"""KV memory for generation.

`DenseKVCache` is the simplest cache the model's `forward_cached` accepts (contiguous, all rows advance
together): the reference the engine's paged cache is tested against, and a minimal example of the
`KVCache` protocol.
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
        # ChatGLM-6B (v1) prefix-LM: keys at slots < context_length are visible to every query (spec §4; a P-tuning
        # prefix seeded into the first slots counts in). The step that holds the first context token must hold
        # the last one too, since context tokens attend to later ones.
        self.context_length = 0

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
        if self.context_length > start and t > 1:
            if end < self.context_length:
                raise RuntimeError(f"the bidirectional context (first {self.context_length} slots) must be "
                                   f"prefilled in one step, got slots {start}..{end - 1}")
            slots = torch.arange(end, device=q.device)
            rows = start + torch.arange(t, device=q.device)
            mask = (slots[None, :] <= rows[:, None]) | (slots[None, :] < self.context_length)
            return attention(q, keys, values, mask[None, None])
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


class BlockAllocator:
    """Bookkeeping of fixed-size KV blocks: reference counts, an LRU free list, and prefix keys.

    A block whose last user finished keeps its contents and key while it sits in the free list, so a
    later request with the same prefix (the next turn of a chat, another comparison column) reuses it.
    Full blocks are shared read-only; an unused cached block can also be taken over by a request that
    matches only its first tokens (it then owns the block and overwrites the rest).
    Taking a block out of the free list for new content forgets its key.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion order = LRU order
        self.full: dict[tuple, int] = {}  # (parent hash, tokens) -> block holding exactly these tokens
        self.key_of: dict[int, tuple] = {}  # block -> (parent hash, tokens) of what it holds
        self.children: dict[int, set[int]] = {}  # parent hash -> blocks that continue it

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        block = next(iter(self.free))
        self.take(block)
        self.forget(block)
        return block

    def take(self, block: int) -> None:
        """Add a reference (reusing a cached block removes it from the free list)."""
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def release(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free[block] = None

    def reclaim(self, held) -> int:
        """Set each block's reference count to `held[block]` (the block tables that really hold it), after an
        internal error left them unknown. A corrected block also forgets its key. Returns how many were wrong."""
        wrong = 0
        for block in range(self.num_blocks):
            n = held.get(block, 0)
            if self.ref[block] == n and (n == 0) == (block in self.free):
                continue
            wrong += 1
            self.ref[block] = n
            self.forget(block)
            if n:
                self.free.pop(block, None)
            else:
                self.free.setdefault(block, None)
        return wrong

    def forget(self, block: int) -> None:
        key = self.key_of.pop(block, None)
        if key is None:
            return
        if self.full.get(key) == block:
            del self.full[key]
        siblings = self.children.get(key[0])
        if siblings is not None:
            siblings.discard(block)
            if not siblings:
                del self.children[key[0]]

    def register(self, block: int, parent: int, tokens: tuple) -> None:
        """Record that `block` holds the KV of `tokens` following the prefix hashed as `parent`."""
        key = (parent, tokens)
        if self.key_of.get(block) == key:
            return
        if len(tokens) == self.block_size and key in self.full:
            return  # an identical block is already cached; keep the first
        self.forget(block)
        if len(tokens) == self.block_size:
            self.full[key] = block
        self.key_of[block] = key
        self.children.setdefault(parent, set()).add(block)

    def lookup_full(self, parent: int, tokens: tuple) -> int | None:
        return self.full.get((parent, tokens))

    def lookup_partial(self, parent: int, tokens: list[int]) -> tuple[int, int] | None:
        """Unused cached block after `parent` sharing the longest run of leading `tokens`: (block, length)."""
        best = None
        for block in self.children.get(parent, ()):
            if self.ref[block]:
                continue  # in use: its tail may not be overwritten
            cached = self.key_of[block][1]
            n = 0
            for a, b in zip(cached, tokens):
                if a != b:
                    break
                n += 1
            if n and (best is None or n > best[1]):
                best = (block, n)
        return best


def chain_hash(parent: int, tokens: tuple) -> int:
    return hash((parent, tokens))


class PagedKVCache:
    """KV memory for the engine, allocated once:
        k, v: [num_layers, num_blocks * block_size, groups, head_dim]   (slot = block * block_size + offset)
    """

    def __init__(self, num_layers, num_blocks, block_size, groups, head_dim, dtype, device):
        shape = (num_layers, num_blocks * block_size, groups, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_groups * config.kv_channels * elem
