"""What runs next: request state, admission, chunked prefill, prefix reuse, preemption.

Knows token counts and blocks, never tensors. Each `schedule()` returns the work of one model step:
running sequences decode one token each; prompts are prefilled in chunks within a token budget so
streams already running keep flowing; a waiting request is admitted when its blocks fit.
After an out-of-memory step the batch limits shrink (`shrink`) and double back after calm steps (`regrow`).

A P-tuning v2 prefix (spec §8) is P keys/values in front of a sequence's tokens: KV position P + i holds token i.
Its blocks are its own (`PrefixBlocks`, filled once by the runner) and shared by every sequence using it: the full
ones join each block table; a partial last one is copied into each sequence's first own block, whose remaining
slots take that sequence's first tokens. An idle prefix keeps its blocks until memory is needed. Block-level work
(hashing, prefix reuse, allocation) runs in KV positions, where the prefix counts as P pseudo-tokens under a root
hash of the adapter's uid, so prefix and non-prefix sequences never share cached blocks.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from glmapp.engine.kv_cache import BlockAllocator, chain_hash

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
PREFIX_TOKEN = -1  # stands for each P-tuning prefix position in block hashes (never a real token id)


@dataclass
class Sequence:
    """One request's tokens and cache position. `tokens[:num_computed]` have KV in `block_table`."""

    id: str
    prompt_ids: list[int]
    max_new_tokens: int
    adapter: str | None = None
    adapter_uid: str | None = None  # changes when an adapter of the same name is reloaded
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: str = WAITING
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache at (last) admission
    prefilled_tokens: int = 0  # tokens run through the model before the first new token
    num_registered: int = 0  # leading full blocks already published to the prefix cache
    last_hash: int = 0
    payload: object = None  # the engine's per-request state (handle, sampling tensors, decoder)
    # ChatGLM-6B (v1): (context length, mask position) of the prompt (`ModelRunner.v1_context`), else None.
    # The context attends both ways, so it is prefilled in one chunk and reused from the cache only whole.
    v1_context: tuple[int, int] | None = None
    prefix: object = None  # a P-tuning adapter (`glmapp.ptuning.PrefixAdapter`: uid, length) whose KV comes first
    prefix_blocks: PrefixBlocks | None = None  # its blocks, held from admission until the blocks are freed
    copy_prefix_tail: bool = False  # the runner still has to copy the prefix's partial block into block_table

    @property
    def prefix_len(self) -> int:
        return self.prefix.length if self.prefix is not None else 0

    def kv_slice(self, start: int, stop: int) -> list[int]:
        """What KV positions start..stop-1 hold: PREFIX_TOKEN for the prefix, then the tokens."""
        p = self.prefix_len
        if start >= p:
            return self.token_slice(start - p, stop - p)
        return [PREFIX_TOKEN] * (min(stop, p) - start) + (self.token_slice(0, stop - p) if stop > p else [])

    @property
    def bidirectional(self) -> int:
        """Leading prompt tokens that attend to each other both ways (0: all causal)."""
        return self.v1_context[0] if self.v1_context else 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, stop: int) -> list[int]:
        """tokens[start:stop] without building the whole prompt + output list (hot path: decode)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:stop - n]
        if stop <= n:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[:stop - n]

    def root_hash(self) -> int:
        uid = self.prefix.uid if self.prefix is not None else self.adapter_uid
        return hash(("glmapp-root", uid))  # KV depends on the adapter: never share across adapters


@dataclass(eq=False)
class PrefixBlocks:
    """A P-tuning prefix's KV positions 0..P-1 in blocks of its own (one reference held on each while pinned)."""

    prefix: object  # glmapp.ptuning.PrefixAdapter (the runner reads its keys/values)
    blocks: list[int]
    written: bool = False  # the runner has filled them
    users: int = 0  # sequences holding them


@dataclass
class ScheduledWork:
    seq: Sequence
    num_tokens: int  # tokens[num_computed : num_computed + num_tokens] are fed this step
    samples: bool = field(init=False)  # the chunk reaches the end of the sequence: its last logits pick a token

    def __post_init__(self):
        self.samples = self.seq.num_computed + self.num_tokens == self.seq.length


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_seqs: int = 32, max_batch_tokens: int = 512,
                 regrow_steps: int = 16):
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.max_seqs, self.max_batch_tokens = max_seqs, max_batch_tokens  # lowered for a while after an OOM
        self.seq_limit, self.token_limit = max_seqs, max_batch_tokens  # the configured values they return to
        self.regrow_steps = regrow_steps
        self.calm_steps = 0  # successful steps since the limits last changed
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prefixes: dict[str, PrefixBlocks] = {}  # prefix uid -> its pinned blocks

    # ---- queue -----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Leave the scheduler and give the blocks back (they stay cached for prefix reuse)."""
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._publish_partial(seq)
        self._free(seq)
        seq.status = FINISHED

    def drop(self, seq: Sequence) -> None:
        """Leave after an internal error: give the blocks back without publishing them (their KV may be
        half written)."""
        self.running[:] = [s for s in self.running if s is not seq]
        if any(s is seq for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if s is not seq)
        self._free(seq)
        seq.status = FINISHED

    def reconcile(self, open_seqs: list[Sequence]) -> int:
        """After an internal error: keep only `open_seqs` in the queues and set every block's reference count
        to the number of their block tables holding it. Returns how many blocks were wrong (leaked or lost)."""
        keep = {id(s) for s in open_seqs}
        self.running[:] = [s for s in self.running if id(s) in keep]
        self.waiting = deque(s for s in self.waiting if id(s) in keep)
        held = Counter(b for s in open_seqs for b in s.block_table)
        for pin in self.prefixes.values():
            held.update(pin.blocks)
            pin.users = sum(1 for s in open_seqs if s.prefix_blocks is pin)
        return self.allocator.reclaim(held)

    def _free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # tail blocks first: they are the least likely to be reused
            self.allocator.release(block)
        seq.block_table = []
        if seq.prefix_blocks is not None:
            seq.prefix_blocks.users -= 1
            seq.prefix_blocks, seq.copy_prefix_tail = None, False

    # ---- P-tuning prefixes --------------------------------------------------------------------------
    def _pin(self, prefix) -> PrefixBlocks | None:
        """The blocks of `prefix`, allocated (to be filled by the runner) at its first use; None: no memory yet."""
        pin = self.prefixes.get(prefix.uid)
        if pin is None:
            n = -(-prefix.length // self.block_size)
            if n > self.allocator.num_free:
                self._unpin_idle()
                if n > self.allocator.num_free:
                    return None
            pin = self.prefixes[prefix.uid] = PrefixBlocks(prefix, [self.allocator.allocate() for _ in range(n)])
        return pin

    def _unpin_idle(self, keep: PrefixBlocks | None = None) -> bool:
        """Give back the blocks of prefixes no sequence uses (an unloaded adapter's too); True if any."""
        idle = [uid for uid, pin in self.prefixes.items() if pin.users == 0 and pin is not keep]
        for uid in idle:
            for block in self.prefixes.pop(uid).blocks:
                self.allocator.release(block)
        return bool(idle)

    def preempt(self, seq: Sequence) -> None:
        """Give a running sequence's blocks back and queue it first; it resumes by re-prefilling."""
        self.running.remove(seq)
        self._publish_partial(seq)  # its blocks stay cached: resuming may find most of them again
        self._free(seq)
        self.preemptions += 1
        seq.num_computed, seq.num_registered, seq.last_hash = 0, 0, 0
        seq.status = WAITING
        self.waiting.appendleft(seq)

    # ---- out of memory ------------------------------------------------------------------------------
    def shrink(self, step_tokens: int) -> bool:
        """After a step ran out of memory: halve the running batch (the newest wait again, keeping what
        they generated) or, with one sequence left, the prefill chunk. False when neither can shrink."""
        self.calm_steps = 0
        if len(self.running) > 1:
            self.max_seqs = max(1, len(self.running) // 2)
            while len(self.running) > self.max_seqs:
                self.preempt(self.running[-1])
            return True
        smallest = min(self.block_size, self.token_limit)
        if step_tokens > smallest:
            self.max_batch_tokens = max(smallest, step_tokens // 2)
            return True
        return False

    def regrow(self) -> None:
        """After a successful step: every `regrow_steps` of them, double the limits back toward the configured ones."""
        if self.max_seqs == self.seq_limit and self.max_batch_tokens == self.token_limit:
            return
        self.calm_steps += 1
        if self.calm_steps >= self.regrow_steps:
            self.calm_steps = 0
            self.max_seqs = min(self.seq_limit, self.max_seqs * 2)
            self.max_batch_tokens = min(self.token_limit, self.max_batch_tokens * 2)

    # ---- prefix cache -----------------------------------------------------------------------------
    def publish(self, seq: Sequence) -> None:
        """After a step: make newly completed full blocks of `seq` findable by later requests."""
        bs, done = self.block_size, seq.prefix_len + seq.num_computed
        while (seq.num_registered + 1) * bs <= done:
            i = seq.num_registered
            chunk = tuple(seq.kv_slice(i * bs, (i + 1) * bs))
            parent = seq.last_hash if i else seq.root_hash()
            self.allocator.register(seq.block_table[i], parent, chunk)
            seq.last_hash = chain_hash(parent, chunk)
            seq.num_registered += 1

    def _publish_partial(self, seq: Sequence) -> None:
        """A finished conversation's last, partly filled block can be continued by its next turn."""
        self.publish(seq)
        i, bs, done = seq.num_registered, self.block_size, seq.prefix_len + seq.num_computed
        if done > i * bs and i < len(seq.block_table) and not seq.copy_prefix_tail:  # (a tail never copied: no KV)
            parent = seq.last_hash if i else seq.root_hash()
            self.allocator.register(seq.block_table[i], parent, tuple(seq.kv_slice(i * bs, done)))

    def _match_prefix(self, seq: Sequence, pending: set[int],
                      pin: PrefixBlocks | None = None) -> tuple[list[int], int, int, bool]:
        """Cached blocks for the start of `seq`: (blocks, KV positions covered, last hash, blocked by pending).
        The full blocks of its P-tuning prefix (`pin`) always match."""
        bs, alloc = self.block_size, self.allocator
        tokens = seq.kv_slice(0, seq.prefix_len + seq.length)
        limit = len(tokens) - 1  # the last token must run to produce logits
        pinned = pin.blocks[:seq.prefix_len // bs] if pin is not None else []
        parent, blocks = seq.root_hash(), []
        while (len(blocks) + 1) * bs <= limit:
            chunk = tuple(tokens[len(blocks) * bs:(len(blocks) + 1) * bs])
            block = pinned[len(blocks)] if len(blocks) < len(pinned) else alloc.lookup_full(parent, chunk)
            h = chain_hash(parent, chunk)
            if block is None:
                if h in pending:
                    return blocks, len(blocks) * bs, parent, True
                break
            blocks.append(block)
            parent = h
        covered = len(blocks) * bs
        partial = alloc.lookup_partial(parent, tokens[covered:limit])
        # Less than a block in all (every new ChatGLM conversation shares its first few prompt tokens)
        # saves nothing worth having: a prefill that starts past 0 needs a masked attention, ~1.5x the
        # causal one on CPU (bench/RESULTS.md).
        if partial is not None and covered + partial[1] >= bs:
            blocks.append(partial[0])
            covered += partial[1]
        return blocks, covered, parent, False

    def _future_hashes(self, seq: Sequence) -> set[int]:
        """Hashes of the full prompt blocks `seq` has yet to compute."""
        pending, bs = set(), self.block_size
        if seq.num_computed >= len(seq.prompt_ids):
            return pending
        parent = seq.last_hash if seq.num_registered else seq.root_hash()
        for i in range(seq.num_registered, (seq.prefix_len + len(seq.prompt_ids)) // bs):
            parent = chain_hash(parent, tuple(seq.kv_slice(i * bs, (i + 1) * bs)))
            pending.add(parent)
        return pending

    # ---- one step -----------------------------------------------------------------------------------
    def _ensure_blocks(self, seq: Sequence, upto: int) -> bool:
        """Blocks for tokens 0..upto-1 (and the prefix before them)."""
        need = -(-(seq.prefix_len + upto) // self.block_size) - len(seq.block_table)
        if need > self.allocator.num_free and not (self._unpin_idle() and need <= self.allocator.num_free):
            return False
        for _ in range(need):
            seq.block_table.append(self.allocator.allocate())
        return True

    def schedule(self) -> list[ScheduledWork]:
        work: list[ScheduledWork] = []
        budget = self.max_batch_tokens
        # 1. Decode: one token for every running sequence that finished its prompt (oldest first).
        for seq in list(self.running):
            if seq.status != RUNNING or seq.num_computed < seq.length - 1:
                continue
            while not self._ensure_blocks(seq, seq.length):
                victim = self.running[-1]
                self.preempt(victim)
                work = [w for w in work if w.seq is not victim]
                if victim is seq:
                    break
            if seq.status == RUNNING:
                work.append(ScheduledWork(seq, 1))
                budget -= 1
        # 2. Continue chunked prefills of running sequences.
        for seq in self.running:
            remaining = seq.length - seq.num_computed
            if remaining > 1:  # (remaining == 1 is a decode, handled above)
                n = self._chunk(seq, seq.num_computed, min(remaining, budget))
                if n > 0 and self._ensure_blocks(seq, seq.num_computed + n):
                    work.append(ScheduledWork(seq, n))
                    budget -= n
        # 3. Admit waiting requests while blocks, slots and budget allow (FIFO; a request waiting for a
        #    prefix that another is computing right now lets later ones pass and joins next step).
        pending = set().union(*(self._future_hashes(seq) for seq in self.running))
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_seqs:
                break
            pin = None
            if seq.prefix is not None:
                pin = self._pin(seq.prefix)
                if pin is None:
                    break  # wait for memory for the prefix's blocks
            p, bs = seq.prefix_len, self.block_size
            blocks, covered, _, blocked = self._match_prefix(seq, pending, pin)  # covered: KV positions
            if covered < p + seq.bidirectional:
                # v1: the KV of a context token depends on the whole context (it attends both ways), so cached
                # blocks are valid only when the entire context matched; a shared start alone is not reusable.
                blocks, blocked = blocks[:p // bs], False
                covered = len(blocks) * bs
            if blocked:
                continue
            tail = covered < p  # the prefix's partial last block is copied into a block of our own
            if tail:
                blocks = blocks[:p // bs]  # (not into a cached block that held only part of it)
            covered = max(covered, p) - p  # in tokens from here on
            n = self._chunk(seq, covered, min(seq.length - covered, budget))
            need = -(-(p + covered + n) // bs) - len(blocks)
            reusable_free = sum(1 for b in blocks if self.allocator.ref[b] == 0)
            if need + reusable_free > self.allocator.num_free and not (
                    self._unpin_idle(keep=pin) and need + reusable_free <= self.allocator.num_free):
                break  # wait for memory; keep FIFO order
            for b in blocks:
                self.allocator.take(b)
            if (p + covered) % bs and not tail:  # continuing a partial block: it is ours now, forget its old key
                self.allocator.forget(blocks[-1])
            if pin is not None:
                pin.users += 1
                seq.prefix_blocks, seq.copy_prefix_tail = pin, tail
            seq.block_table = blocks
            seq.num_computed = seq.cached_tokens = covered
            seq.num_registered = (p + covered) // bs
            seq.last_hash = self._hash_upto(seq, seq.num_registered)
            self._ensure_blocks(seq, covered + n)
            self.waiting.remove(seq)
            seq.status = RUNNING
            self.running.append(seq)
            work.append(ScheduledWork(seq, n))
            budget -= n
            pending |= self._future_hashes(seq)
        return work

    @staticmethod
    def _chunk(seq: Sequence, start: int, n: int) -> int:
        """Tokens to prefill from `start`: `n` (the budget's share), but a chunk that starts inside a v1 context
        runs to its end, over the budget if need be: a context split across steps would miss later tokens."""
        return max(n, seq.bidirectional - start) if 0 < n else n

    def _hash_upto(self, seq: Sequence, num_blocks: int) -> int:
        h, bs = seq.root_hash(), self.block_size
        for i in range(num_blocks):
            h = chain_hash(h, tuple(seq.kv_slice(i * bs, (i + 1) * bs)))
        return h if num_blocks else 0
