"""P-tuning v2 prefixes in the engine (spec §8): a prefix adapter's replies equal a greedy loop over a DenseKVCache
seeded with the prefix (the reference tested in test_v1_ptuning) on v1, v2 and v3, with chunked prefill and a prefix
that does not fill its last block; prefix, LoRA and base rows in one batch equal each row alone; the prefix's KV
sits in blocks of its own shared by its rows; cached blocks are never shared between prefix and non-prefix rows."""

import pytest
import torch

import glmapp
from glmapp.adapters import AdapterManager, list_adapters
from glmapp.backends import RequestHandle
from glmapp.demo import make_demo
from glmapp.engine.engine import Engine, EngineConfig
from glmapp.engine.kv_cache import BlockAllocator, DenseKVCache
from glmapp.engine.request import GenerationRequest
from glmapp.engine.sampling import SamplingParams
from glmapp.engine.scheduler import FINISHED, Scheduler, Sequence
from glmapp.errors import AdapterError
from glmapp.models.chatglm1 import positions_2d
from glmapp.ptuning import seed_cache
from glmapp.prompts import build_prompt_ids
from tests.conftest import _make_peft_adapter
from tests.test_v1_ptuning import P, make_ptuning

_ids = iter(range(10**9))
GREEDY = SamplingParams(temperature=0)
MAX_NEW = 10


@pytest.fixture(scope="module")
def v1_base(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("pt-engine-v1") / "base", family="chatglm1")


def run(engine, jobs, max_new=MAX_NEW):
    """Submit every (prompt, adapter) at once; (tokens, usage) of each."""
    handles = []
    for prompt, adapter in jobs:
        handle = RequestHandle(f"pt-{next(_ids)}", engine.cancel)
        engine.submit(handle, GenerationRequest(list(prompt), GREEDY, max_new, adapter=adapter))
        handles.append(handle)
    out = []
    for handle in handles:
        tokens, usage, error = [], None, None
        for delta in handle:
            tokens.extend(delta.token_ids)
            usage, error = delta.usage or usage, delta.error or error
        assert error is None, error
        out.append((tokens, usage))
    return out


@torch.no_grad()
def dense_greedy(model, tok, prompt, kv=None, max_new=MAX_NEW):
    """Greedy decode over a DenseKVCache, the prefix (if any) seeded into its first slots."""
    v1 = model.config.family == "chatglm1"
    ids = list(prompt)
    cache = DenseKVCache.for_model(model, batch=1, capacity=P + len(ids) + max_new)
    p = seed_cache(cache, kv) if kv is not None else 0

    def pos(upto):
        if v1:
            return positions_2d(ids[:upto], tok.bos_token_id, tok.mask_token_id, tok.gmask_token_id)[0]
        return list(range(upto))

    if v1:
        cache.context_length = p + ids.index(tok.bos_token_id)
    logits = model.forward_cached(torch.tensor([ids]), torch.tensor([pos(len(ids))]), cache)
    cache.commit(len(ids))
    out = []
    for _ in range(max_new):
        token = int(logits[-1].argmax())
        if token in tok.stop_ids:
            break
        out.append(token)
        ids.append(token)
        if len(out) == max_new:
            break
        logits = model.forward_cached(torch.tensor([[token]]), torch.tensor([pos(len(ids))[-1:]]), cache)
        cache.commit(1)
    return out


def v1_prompts(tok):
    history = [("你好", "你好👋！我是人工智能助手。")]
    return [build_prompt_ids(tok, "请介绍一下长城。", []), build_prompt_ids(tok, "写一个 Python 函数", history),
            tok.encode("The ocean is " * 6)]


def v2_prompts(tok):
    return [tok.encode("hello there, how are you?"), tok.encode("The ocean is " * 6), tok.encode("Tell me a story")]


@pytest.mark.parametrize("block_size", [4, 8])  # P = 6: one full block + a partial one, or a partial one only
@pytest.mark.parametrize("family", ["chatglm1", "chatglm2", "chatglm3"])
def test_engine_prefix_replies_equal_the_seeded_dense_cache(family, block_size, v1_base, request, tmp_path):
    base = v1_base if family == "chatglm1" else request.getfixturevalue("demo_v2" if family == "chatglm2"
                                                                         else "demo_v3")
    model, tok = glmapp.load(str(base), dtype="float32")
    make_ptuning(base, tmp_path / "prefix", projection=family != "chatglm2", seed=2)
    adapter = AdapterManager.of(model).load("prefix", tmp_path)
    kv = adapter.kv(model.config, torch.float32, "cpu")
    kv = [(kv[0][i], kv[1][i]) for i in range(model.config.num_layers)]
    prompts = v1_prompts(tok) if family == "chatglm1" else v2_prompts(tok)
    engine = Engine(model, tok, EngineConfig(block_size=block_size, max_batch_tokens=5))  # chunked prefill
    try:
        results = run(engine, [(p, "prefix") for p in prompts])
    finally:
        engine.shutdown()
    changed = False
    for prompt, (tokens, _) in zip(prompts, results):
        assert tokens == dense_greedy(model, tok, prompt, kv)
        changed |= tokens != dense_greedy(model, tok, prompt)
    assert changed  # the prefix matters


def test_prefix_lora_and_base_rows_in_one_batch_equal_each_row_alone(v1_base, tmp_path):
    _make_peft_adapter(v1_base, tmp_path / "lora", ["query_key_value", "dense_h_to_4h"], seed=5)
    make_ptuning(v1_base, tmp_path / "prefix", projection=True, seed=3)
    model, tok = glmapp.load(str(v1_base), dtype="float32")
    manager = AdapterManager.of(model)
    manager.load("lora", tmp_path)
    manager.load("prefix", tmp_path)
    jobs = [(p, a) for p in v1_prompts(tok) for a in ("prefix", "lora", None)]
    engine = Engine(model, tok, EngineConfig(block_size=4))
    try:
        together = [t for t, _ in run(engine, jobs)]
    finally:
        engine.shutdown()
    for job, tokens in zip(jobs, together):
        engine = Engine(model, tok, EngineConfig(block_size=4))
        try:
            assert run(engine, [job])[0][0] == tokens, job[1]
        finally:
            engine.shutdown()
    by_adapter = {a: [t for (_, b), t in zip(jobs, together) if b == a] for a in ("prefix", "lora", None)}
    assert by_adapter["prefix"] != by_adapter[None] and by_adapter["lora"] != by_adapter[None]


def test_prefix_and_plain_rows_never_share_cached_blocks(v1_base, tmp_path):
    make_ptuning(v1_base, tmp_path / "prefix", projection=False, seed=4)
    model, tok = glmapp.load(str(v1_base), dtype="float32")
    AdapterManager.of(model).load("prefix", tmp_path)
    prompt = build_prompt_ids(tok, "请介绍一下长城。" * 3, [])
    engine = Engine(model, tok, EngineConfig(block_size=4))
    try:
        (with_prefix, _), = run(engine, [(prompt, "prefix")])
        (plain, usage), = run(engine, [(prompt, None)])  # same tokens, no prefix: nothing reusable
        assert usage.cached_tokens == 0 and plain == dense_greedy(model, tok, prompt)
        (again, usage), = run(engine, [(prompt, "prefix")])  # the prefix row's own blocks are reused
        assert usage.cached_tokens > 0 and again == with_prefix
        (plain_again, usage), = run(engine, [(prompt, None)])
        assert usage.cached_tokens > 0 and plain_again == plain
        assert with_prefix != plain
    finally:
        engine.shutdown()


class _Prefix:
    """What the scheduler reads of a P-tuning adapter."""

    def __init__(self, uid, length):
        self.uid, self.length = uid, length


def _admit(sched, prompt, prefix=None):
    seq = Sequence(f"s{next(_ids)}", prompt, 4, adapter="p" if prefix else None)
    seq.prefix = prefix
    sched.add(seq)
    sched.schedule()
    return seq


def test_a_prefix_holds_blocks_of_its_own_shared_by_its_rows_until_memory_is_needed():
    alloc = BlockAllocator(12, 4)
    sched = Scheduler(alloc, max_batch_tokens=64)
    prefix = _Prefix("p#1", 6)  # one full block and 2 positions of a second
    a, b = _admit(sched, [1, 2, 3], prefix), _admit(sched, [1, 2, 3], prefix)
    pin = sched.prefixes["p#1"]
    assert len(pin.blocks) == 2 and a.prefix_blocks is pin and b.prefix_blocks is pin and pin.users == 2
    assert a.block_table[0] == b.block_table[0] == pin.blocks[0]  # the full prefix block: shared
    assert a.block_table[1] != b.block_table[1] and pin.blocks[1] not in a.block_table + b.block_table
    assert a.copy_prefix_tail and b.copy_prefix_tail  # the partial one is copied into each row's own block
    assert alloc.ref[pin.blocks[0]] == 3 and alloc.ref[pin.blocks[1]] == 1
    assert sched.reconcile([a, b]) == 0  # an error's clean-up counts the prefix's own references
    plain = _admit(sched, [-5, 2, 3])  # (a token that cannot collide with the prefix's hash tokens)
    assert plain.block_table[0] not in pin.blocks
    for seq in (a, b, plain):
        sched.finish(seq)
        assert seq.status == FINISHED
    assert pin.users == 0 and alloc.ref[pin.blocks[0]] == 1  # idle: kept for the next row
    big = _admit(sched, list(range(100, 144)))  # needs all 11 other blocks: the idle prefix gives its blocks back
    assert "p#1" not in sched.prefixes and len(big.block_table) == 11


def test_ptuning_adapters_are_listed_usable_and_not_mergeable(v1_base, loaded_v2, tmp_path):
    root = tmp_path / "adapters"
    make_ptuning(v1_base, root / "prefix", projection=False)
    [info] = list_adapters(root)
    assert (info.kind, info.pre_seq_len, info.error) == ("ptuning", P, None)
    model, _ = glmapp.load(str(v1_base))
    manager = AdapterManager.of(model)
    assert manager.load("prefix", root).info.kind == "ptuning" and manager.names() == ["prefix"]
    with pytest.raises(AdapterError, match="P-tuning v2 prefix: .*no weights to merge"):
        manager.merge("prefix")
    with pytest.raises(AdapterError, match="trained on a chatglm1 model"):
        AdapterManager.of(loaded_v2[0]).load(str(root / "prefix"), tmp_path)
