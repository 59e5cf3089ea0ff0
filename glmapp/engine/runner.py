"""How one step runs: flatten the scheduled chunks into one token batch, run the model once over the
paged KV cache, sample one token for every sequence that reached its end. Knows nothing of requests.

The batch is "varlen": all new tokens of all sequences in one [1, N] row with explicit positions.
Attention writes the step's keys/values into their slots first, then decode rows attend together
(`paged_attention.paged_decode`: the Triton kernel on CUDA, gather + mask elsewhere; on CPU row by row
over exact context slots when its cost model says so, `paged_decode_rows`) and prefill chunks
attend one by one. Decode-only steps without LoRA rows go to the static-shape path instead when the
engine has one (`static_decode.py`: CUDA graphs).
A P-tuning prefix (spec §8) is written into its own blocks at the first step that needs it (`PrefixBlocks`), its
partial last block copied into each new sequence's first block; a prefix row then attends over KV positions
P + i (the prefix first, visible to every query; positions of the tokens are not shifted by P).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmapp import cpu_kernels
from glmapp.adapters import AdapterManager
from glmapp.engine.cpu_decode import FusedDecode
from glmapp.engine.kv_cache import PagedKVCache
from glmapp.engine.paged_attention import paged_decode, paged_decode_rows, rows_cheaper
from glmapp.engine.sampling import sample
from glmapp.engine.static_decode import StaticDecoder
from glmapp.models.chatglm import attention
from glmapp.models.chatglm1 import context_and_mask_position


@dataclass
class StepContext:
    """The KV-cache handle the model sees for one step (implements `KVCache.attend`)."""

    cache: PagedKVCache
    slots: torch.Tensor  # [N] cache slot of every new token
    decode_index: torch.Tensor | None  # [B] token index of each decode row
    decode_tables: torch.Tensor | None  # [B, W] int32 block table of each decode row (padded)
    decode_lengths: torch.Tensor | None  # [B] int32 context length of each decode row, its new token included
    # (first token index, n, context slots, offset, bidirectional: v1's leading tokens that every query sees)
    prefills: list[tuple[int, int, torch.Tensor, int, int]]
    decode_slots: list[torch.Tensor] | None = None  # CPU: each decode row's context slots (row-by-row path)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[self.slots] = k[0]
        vc[self.slots] = v[0]
        if self.decode_slots is not None:
            rows = paged_decode_rows(q[0, self.decode_index], kc, vc, self.decode_slots)
        elif self.decode_index is not None:
            rows = paged_decode(q[0, self.decode_index], kc, vc, self.decode_tables, self.decode_lengths,
                                self.cache.block_size)
        if self.decode_index is not None and not self.prefills:
            return rows[None]  # decode-only steps: rows are already in token order
        out = torch.empty_like(q[0])
        if self.decode_index is not None:
            out[self.decode_index] = rows
        for start, n, ctx_slots, offset, bidirectional in self.prefills:
            mask = None
            if offset or bidirectional > offset:
                ctx = torch.arange(offset + n, device=q.device)
                mask = ctx[None, :] <= (offset + torch.arange(n, device=q.device))[:, None]
                if bidirectional > offset:  # v1 prefix-LM (spec §4); the scheduler keeps the context in one chunk
                    mask = mask | (ctx[None, :] < bidirectional)
                mask = mask[None, None]
            out[start:start + n] = attention(q[:, start:start + n], kc[ctx_slots][None], vc[ctx_slots][None],
                                             mask, is_causal=True)[0]
        return out[None]


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, static: StaticDecoder | None = None):
        self.model, self.cache, self.static = model, cache, static
        self.device = model.transformer.output_layer.weight.device
        self.vocab = model.config.padded_vocab_size
        self._block_offsets = torch.arange(cache.block_size)
        self.adapters = AdapterManager.of(model)
        self.v1 = getattr(model.config, "family", None) == "chatglm1"
        # CPU decode-only steps with every layer in one C call (cpu_decode.py), where the kernels take the model
        self.fused = FusedDecode(model, cache) if self.device.type == "cpu" else None
        if self.fused is not None and (why := FusedDecode.supported(model, cache)) is not None:
            self.fused.off_reason, self.fused = why, None

    def v1_context(self, prompt_ids: list[int]) -> tuple[int, int] | None:
        """v1: (context length, mask position) of a prompt, for `Sequence.v1_context`; None for v2/v3."""
        if not self.v1:
            return None
        c = self.model.config
        return context_and_mask_position(prompt_ids, c.bos_token_id, c.mask_token_id, c.gmask_token_id)

    @staticmethod
    def _positions(seq, start: int, stop: int):
        """Positions of tokens start..stop-1: plain, or v1's (position, block position) pairs (spec §4)."""
        if seq.v1_context is None:
            return range(start, stop)
        context, mask_position = seq.v1_context
        return [(i, 0) if i < context else (mask_position, i - context + 1) for i in range(start, stop)]

    def _dev(self, values, dtype=torch.long) -> torch.Tensor:
        """A step input built on the host, sent without waiting for the GPU (no sync per tensor)."""
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        return t.to(self.device, non_blocking=True)

    def _slots(self, block_table: list[int], start: int, stop: int) -> torch.Tensor:
        """Cache slots of tokens start..stop-1, as a host tensor."""
        bs = self.cache.block_size
        blocks = torch.tensor(block_table[start // bs: (stop - 1) // bs + 1])
        slots = (blocks[:, None] * bs + self._block_offsets).flatten()
        first = start - (start // bs) * bs
        return slots[first:first + stop - start]

    @torch.inference_mode()
    def step(self, work) -> list[int]:
        """Run scheduled work (list of ScheduledWork); returns the new token of each sampling sequence,
        in the order of `work` entries whose `samples` is True."""
        if self.static is not None and not self.v1 and self.static.accepts(work):  # static path: 1-D positions
            with self.adapters.rows([]):  # base rows only; holds adapter installs off until the step is done
                logits = self.static.run(work)
            return self._sample(logits, [w.seq for w in work])
        self._place_prefixes(work)
        if self.fused is not None and all(w.num_tokens == 1 and w.samples and w.seq.num_computed > 0
                                          and (w.seq.adapter is None or w.seq.prefix is not None) for w in work):
            logits = self._fused_step(work)
            if logits is not None:
                return self._sample(logits, [w.seq for w in work])
        ids, positions, slots, prefills, decode_rows, logits_index = [], [], [], [], [], []
        adapter_rows: dict[str, list[int]] = {}
        n_tokens = 0
        for w in work:
            seq, start = w.seq, w.seq.num_computed
            stop, p = start + w.num_tokens, seq.prefix_len  # token i is at KV position p + i
            ids.extend(seq.token_slice(start, stop))
            positions.extend(self._positions(seq, start, stop))
            slots.append(self._slots(seq.block_table, p + start, p + stop))
            if w.num_tokens == 1 and start > 0:
                decode_rows.append((n_tokens, seq.block_table, p + stop))
            else:
                prefills.append((n_tokens, w.num_tokens, self._dev(self._slots(seq.block_table, 0, p + stop)),
                                 p + start, p + seq.bidirectional))
            if seq.adapter is not None and seq.prefix is None:  # (a prefix changes the KV, not the linears)
                adapter_rows.setdefault(seq.adapter, []).extend(range(n_tokens, n_tokens + w.num_tokens))
            n_tokens += w.num_tokens
            if w.samples:
                logits_index.append(n_tokens - 1)
        ctx = StepContext(self.cache, self._dev(torch.cat(slots)), None, None, None, prefills)
        if decode_rows:
            bs = self.cache.block_size
            lengths = [n for _, _, n in decode_rows]
            ctx.decode_index = self._dev([i for i, _, _ in decode_rows])
            if self.device.type == "cpu" and rows_cheaper(lengths, bs):
                ctx.decode_slots = [self._slots(bt, 0, n) for _, bt, n in decode_rows]
            else:
                width = -(-max(lengths) // bs)
                ctx.decode_tables = self._dev([bt[:width] + [0] * (width - len(bt)) for _, bt, _ in decode_rows],
                                              torch.int32)
                ctx.decode_lengths = self._dev(lengths, torch.int32)
        input_ids = self._dev([ids])
        pos = self._dev([positions])
        groups = [(name, self._dev(rows)) for name, rows in adapter_rows.items()]
        with self.adapters.rows(groups):  # also keeps adapters from changing mid-step
            logits = self.model.forward_cached(input_ids, pos, ctx, self._dev(logits_index))
        if not logits_index:
            return []
        return self._sample(logits, [w.seq for w in work if w.samples])

    def _fused_step(self, work) -> torch.Tensor | None:
        """Logits of a decode-only step without adapter rows through `FusedDecode`, or None (not covered now)."""
        ids, positions, tables, table_lengths, lengths = [], [], [], [], []
        bs = self.cache.block_size
        for w in work:
            seq, start = w.seq, w.seq.num_computed
            n = seq.prefix_len + start + 1  # token i is at KV position prefix_len + i; its rotary position stays i
            used = -(-n // bs)
            ids.append(seq.token_slice(start, start + 1)[0])
            positions.append(start)
            tables.extend(seq.block_table[:used])
            table_lengths.append(used)
            lengths.append(n)
        with self.adapters.rows([]):  # base rows only; holds adapter installs off until the step is done
            return self.fused.step(ids, positions, tables, table_lengths, lengths, bs)

    def _place_prefixes(self, work) -> None:
        """Fill new prefix blocks from the adapter's keys/values; copy a partial last one into a new sequence."""
        k_cache, v_cache, bs = self.cache.k, self.cache.v, self.cache.block_size
        for w in work:
            seq, pin = w.seq, w.seq.prefix_blocks
            if pin is None:
                continue
            if not pin.written:
                keys, values = pin.prefix.kv(self.model.config, k_cache.dtype, self.device)  # [L, P, groups, d]
                where = self._dev(self._slots(pin.blocks, 0, pin.prefix.length))
                k_cache[:, where], v_cache[:, where] = keys, values
                pin.written = True
            if seq.copy_prefix_tail:
                p = seq.prefix_len
                src = self._dev(self._slots(pin.blocks, p - p % bs, p))
                dst = self._dev(self._slots(seq.block_table, p - p % bs, p))
                k_cache[:, dst], v_cache[:, dst] = k_cache[:, src], v_cache[:, src]
                seq.copy_prefix_tail = False

    def _sample(self, logits: torch.Tensor, seqs) -> list[int]:
        states = [s.payload.sampling for s in seqs]
        if all(st.greedy and not st.penalised for st in states):
            if cpu_kernels.fused_usable(logits):
                return cpu_kernels.argmax(logits).tolist()
            return logits.argmax(-1).tolist()
        dev = self.device
        seen = torch.stack([st.seen_mask(self.vocab, dev) for st in states])
        f = self._dev
        out = sample(
            logits,
            f([st.params.temperature for st in states], torch.float32),
            f([st.params.top_p for st in states], torch.float32),
            f([st.params.top_k for st in states], torch.int64),
            f([st.params.repetition_penalty for st in states], torch.float32),
            seen,
            f([st.seed for st in states], torch.int64),
            f([len(s.output_ids) for s in seqs], torch.int64),
        )
        return out.tolist()
