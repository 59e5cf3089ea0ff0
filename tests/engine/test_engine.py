"""The batching engine on a real tiny model: batched == solo, cancellation, memory, prefix reuse, errors."""

import pytest
import torch

import glmapp
from glmapp.backends import RequestHandle
from glmapp.engine.engine import Engine, EngineConfig
from glmapp.engine.request import GenerationRequest
from glmapp.engine.sampling import SamplingParams

_ids = iter(range(10**9))


@pytest.fixture(scope="module")
def model_tok(demo_v2):
    return glmapp.load(str(demo_v2))


def make_engine(model_tok, **cfg):
    model, tok = model_tok
    return Engine(model, tok, EngineConfig(**cfg))


def submit(engine, prompt, params=None, max_new=24, stop_ids=None):
    handle = RequestHandle(f"r{next(_ids)}", engine.cancel)
    engine.submit(handle, GenerationRequest(list(prompt), params or SamplingParams(temperature=0), max_new,
                                            stop_ids=stop_ids))
    return handle


def collect(handle):
    tokens, text, last = [], "", None
    for delta in handle:
        tokens.extend(delta.token_ids)
        text += delta.text
        last = delta
    return tokens, text, last


def prompts_of(tok, n):
    subjects = ["长城", "Python", "the ocean", "量子计算", "bread", "春节", "a cat", "GPUs", "数学", "rain",
                "music", "历史", "coffee", "Rust", "moon", "tea"]
    return [tok.encode(f"请告诉我关于{subjects[i % len(subjects)]}的事情。" * (1 + i % 3)) for i in range(n)]


def solo(model_tok, prompt, params, max_new, **cfg):
    engine = make_engine(model_tok, **cfg)
    try:
        return collect(submit(engine, prompt, params, max_new))[:2]
    finally:
        engine.shutdown()


SETTINGS = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_p=0.8, seed=1),
            SamplingParams(temperature=0), SamplingParams(temperature=1.2, top_k=20, seed=2),
            SamplingParams(temperature=0, repetition_penalty=1.3), SamplingParams(temperature=0.7, seed=3,
                                                                                   repetition_penalty=1.1),
            SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.5, top_k=5, seed=4)]


def test_eight_concurrent_requests_equal_their_solo_runs(model_tok):
    tok = model_tok[1]
    prompts = prompts_of(tok, 8)
    lengths = [24, 40, 16, 32, 24, 48, 8, 30]
    engine = make_engine(model_tok, max_batch_tokens=64)  # small budget: prefills are chunked
    early = []  # deltas of request 0 read while the others were still arriving
    try:
        handles = []
        for i in range(8):
            handles.append(submit(engine, prompts[i], SETTINGS[i], lengths[i]))
            if i % 3 == 2:  # later arrivals join a batch that is already decoding
                early.extend(next(iter(handles[0])).token_ids)
        results = [collect(h)[0] for h in handles]
        results[0] = early + results[0]
        assert engine.steps < sum(lengths)  # they really ran batched
    finally:
        engine.shutdown()
    for i in range(8):
        assert results[i] == solo(model_tok, prompts[i], SETTINGS[i], lengths[i])[0], f"request {i}"


def test_seeded_sampling_does_not_depend_on_batch_neighbours(model_tok):
    tok = model_tok[1]
    p = prompts_of(tok, 3)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = solo(model_tok, p[0], params, 30)[0]
    engine = make_engine(model_tok)
    try:
        noise = [submit(engine, p[1], SamplingParams(temperature=1.0, seed=9), 40),
                 submit(engine, p[2], SamplingParams(temperature=0), 10)]
        target = submit(engine, p[0], params, 30)
        assert collect(target)[0] == alone
        for h in noise:
            collect(h)
    finally:
        engine.shutdown()


def test_cancelling_half_of_sixteen_frees_their_blocks_and_the_rest_finish(model_tok):
    tok = model_tok[1]
    prompts = prompts_of(tok, 16)
    engine = make_engine(model_tok)
    start_free = engine.allocator.num_free
    try:
        handles = [submit(engine, p, SamplingParams(temperature=0), 200, stop_ids=[-1]) for p in prompts]
        firsts = [next(iter(h)).token_ids for h in handles]  # all of them are running
        before_cancel = engine.allocator.num_free
        for h in handles[::2]:
            h.cancel()
        cancelled = [collect(h)[2] for h in handles[::2]]
        assert engine.allocator.num_free > before_cancel  # freed at the next step, while the rest still run
        assert engine.stats()["running"] == 8
        assert all(d.finish_reason == "cancelled" for d in cancelled)
        kept = [collect(h) for h in handles[1::2]]
        assert all(last.finish_reason == "length" for _, _, last in kept)
        assert engine.allocator.num_free == start_free
        assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
    finally:
        engine.shutdown()
    for i, (tokens, _, _) in zip(range(1, 16, 2), kept):
        expected = solo(model_tok, prompts[i], SamplingParams(temperature=0), 200)[0]
        assert firsts[i] + tokens == expected


def test_five_hundred_short_requests_leave_allocator_and_queues_as_they_were(model_tok):
    tok = model_tok[1]
    engine = make_engine(model_tok, kv_cache_mb=1)
    start = engine.stats()
    try:
        for i in range(0, 500, 25):
            handles = [submit(engine, tok.encode(f"hello {i + j}"), SamplingParams(temperature=0.5, seed=j), 3)
                       for j in range(25)]
            for h in handles:
                assert collect(h)[2].finish_reason in ("length", "stop")
        end = engine.stats()
    finally:
        engine.shutdown()
    assert end["free_blocks"] == start["free_blocks"] == start["num_blocks"]
    assert end["running"] == end["waiting"] == 0


def test_next_turn_prefills_only_the_new_tokens(model_tok):
    tok = model_tok[1]
    engine = make_engine(model_tok)
    try:
        first = tok.encode("第一轮：你好，请介绍一下长城。")
        out, _, last = collect(submit(engine, first, SamplingParams(temperature=0), 20, stop_ids=[-1]))
        assert last.usage.cached_tokens == 0
        new = tok.encode("第二轮：谢谢！", add_special_tokens=False)
        second = first + out + new
        _, _, last2 = collect(submit(engine, second, SamplingParams(temperature=0), 5))
        # cached: the first prompt and every reply token that was run through the model
        assert last2.usage.cached_tokens == len(first) + len(out) - 1
        assert last2.usage.prompt_tokens - last2.usage.cached_tokens == len(new) + 1
    finally:
        engine.shutdown()


def test_a_shared_start_shorter_than_a_block_is_not_reused(model_tok):
    """Conversations that only share ChatGLM's first prompt tokens prefill from 0 (causal attention)."""
    tok = model_tok[1]
    engine = make_engine(model_tok)
    bs = engine.config.block_size
    try:
        a = tok.encode("第一个问题：长城有多长？" * 4)
        collect(submit(engine, a, max_new=2))
        b = a[:bs // 2] + tok.encode("完全不同的问题：面包怎么做？" * 4, add_special_tokens=False)
        assert len(b) > 2 * bs and b[bs // 2] != a[bs // 2]
        assert collect(submit(engine, b, max_new=2))[2].usage.cached_tokens == 0
        c = a[:bs + 3] + tok.encode("第三个问题。" * 4, add_special_tokens=False)  # one block and a bit shared
        assert collect(submit(engine, c, max_new=2))[2].usage.cached_tokens >= bs
    finally:
        engine.shutdown()


def test_comparison_rows_share_the_prompt_blocks(model_tok):
    tok = model_tok[1]
    prompt = tok.encode("比较一下这几个回答：" * 12)  # several full blocks
    engine = make_engine(model_tok)
    try:
        free0 = engine.allocator.num_free
        handles = [submit(engine, prompt, SamplingParams(temperature=0.8, seed=s), 200, stop_ids=[-1])
                   for s in range(4)]
        for h in handles:
            next(iter(h))
        used = free0 - engine.allocator.num_free
        prompt_blocks = len(prompt) // engine.config.block_size
        # 4 rows but the full prompt blocks exist once: at most one private tail + a few decode blocks each
        assert used <= prompt_blocks + 4 * 3
        for h in handles:
            h.cancel()
            last = collect(h)[2]
    finally:
        engine.shutdown()
    assert last.usage.cached_tokens >= prompt_blocks * engine.config.block_size


def test_request_bigger_than_the_whole_kv_budget_gets_a_clear_error(model_tok):
    tok = model_tok[1]
    engine = make_engine(model_tok, kv_cache_mb=0.05)  # a few hundred tokens in all
    try:
        huge = tok.encode("很长的输入。" * 400)
        _, _, last = collect(submit(engine, huge))
        assert last.finish_reason == "error"
        assert "KV cache holds" in last.error and "--kv-cache-mb" in last.error
        assert engine.stats()["running"] == 0
    finally:
        engine.shutdown()


def test_request_bigger_than_what_is_free_waits_then_completes(model_tok):
    tok = model_tok[1]
    engine = make_engine(model_tok, kv_cache_mb=0.05)
    capacity = engine.capacity_tokens
    try:
        big = tok.encode("字" * (capacity // 2 + 20), add_special_tokens=False)[: capacity // 2 + 20]
        first = submit(engine, big, SamplingParams(temperature=0), 30, stop_ids=[-1])
        next(iter(first))
        second = submit(engine, big[::-1], SamplingParams(temperature=0), 30, stop_ids=[-1])
        assert collect(first)[2].finish_reason == "length"
        assert collect(second)[2].finish_reason == "length"
    finally:
        engine.shutdown()


def test_preempted_requests_resume_and_match_solo(model_tok):
    tok = model_tok[1]
    prompts = prompts_of(tok, 4)
    engine = make_engine(model_tok, kv_cache_mb=0.0625, block_size=8)  # 128 tokens: one request at a time fits
    try:
        assert all(len(p) + 60 <= engine.capacity_tokens for p in prompts)
        handles = [submit(engine, p, SamplingParams(temperature=0), 60, stop_ids=[-1]) for p in prompts]
        results = [collect(h)[0] for h in handles]
        assert engine.scheduler.preemptions > 0
    finally:
        engine.shutdown()
    for p, got in zip(prompts, results):
        assert got == solo(model_tok, p, SamplingParams(temperature=0), 60)[0]


def test_an_exception_in_one_request_ends_only_that_request(model_tok):
    model, tok = model_tok
    poison = tok.encode("☠", add_special_tokens=False)[-1]

    def explode(module, args):
        if (args[0] == poison).any():
            raise RuntimeError("poisoned input")

    hook = model.transformer.embedding.register_forward_pre_hook(explode)
    engine = make_engine(model_tok)
    try:
        good = prompts_of(tok, 2)
        handles = [submit(engine, good[0]), submit(engine, tok.encode("☠ hi")), submit(engine, good[1])]
        results = [collect(h) for h in handles]
    finally:
        engine.shutdown()
        hook.remove()
    assert results[1][2].finish_reason == "error" and "poisoned input" in results[1][2].error
    for i, p in ((0, good[0]), (2, good[1])):
        assert results[i][2].finish_reason == "length"
        assert results[i][0] == solo(model_tok, p, SamplingParams(temperature=0), 24)[0]


def test_bad_requests_are_refused_at_submit(model_tok):
    engine = make_engine(model_tok)
    try:
        assert "empty" in collect(submit(engine, []))[2].error
        assert "token ids must be in" in collect(submit(engine, [1, 10**9]))[2].error
        assert "max_new_tokens" in collect(submit(engine, [5, 6], max_new=0))[2].error
    finally:
        engine.shutdown()


def test_a_request_out_of_memory_even_alone_ends_and_the_others_match_solo(model_tok):
    model, tok = model_tok
    poison = tok.encode("☠", add_special_tokens=False)[-1]

    def out_of_memory(module, args):
        if (args[0] == poison).any():
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = model.transformer.embedding.register_forward_pre_hook(out_of_memory)
    engine = make_engine(model_tok, max_seqs=8, oom_regrow_steps=4)
    try:
        good = prompts_of(tok, 2)
        handles = [submit(engine, good[0], max_new=40), submit(engine, good[1], max_new=40)]
        first = next(iter(handles[0])).token_ids
        bad = submit(engine, tok.encode("☠ hi"))
        last = collect(bad)[2]
        results = [collect(h) for h in handles]
    finally:
        engine.shutdown()
        hook.remove()
    # The batch shrank around it until it ran alone; only then is it the one that does not fit.
    assert last.finish_reason == "error" and "Out of memory even with this request running alone" in last.error
    assert all(r[2].finish_reason == "length" for r in results)
    assert first + results[0][0] == solo(model_tok, good[0], SamplingParams(temperature=0), 40)[0]
    assert results[1][0] == solo(model_tok, good[1], SamplingParams(temperature=0), 40)[0]


def test_token_slice_equals_slicing_the_whole_sequence():
    from glmapp.engine.scheduler import Sequence

    seq = Sequence("s", [1, 2, 3, 4, 5], 10, output_ids=[6, 7, 8])
    for start in range(9):
        for stop in range(start, 9):
            assert seq.token_slice(start, stop) == seq.tokens[start:stop]
