"""The inline engine (the reader's thread runs the steps) gives the threaded engine's tokens and frees its KV."""

import gc
import threading
import weakref

import pytest

import glmapp
from glmapp.backends import RequestHandle
from glmapp.engine.engine import Engine, EngineConfig
from glmapp.engine.inline import InlineEngine
from glmapp.engine.request import GenerationRequest
from glmapp.engine.sampling import SamplingParams

_ids = iter(range(10**9))
SETTINGS = [SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_p=0.8, seed=1),
            SamplingParams(temperature=1.2, top_k=20, seed=2), SamplingParams(temperature=0, repetition_penalty=1.3)]
LENGTHS = [24, 40, 16, 32]


@pytest.fixture(scope="module")
def model_tok(demo_v2):
    return glmapp.load(str(demo_v2))


@pytest.fixture(scope="module")
def threaded_results(model_tok):
    """Each (prompt, setting) alone on the threaded engine."""
    model, tok = model_tok
    engine = Engine(model, tok, EngineConfig(kv_cache_mb=8))
    try:
        return {(p, i): collect(submit(engine, PROMPTS(tok)[p], SETTINGS[i], LENGTHS[i]))[0]
                for p in range(2) for i in range(4)}
    finally:
        engine.shutdown()


def PROMPTS(tok):
    return [tok.encode("请告诉我关于长城的事情。"), tok.encode("Tell me about the ocean, please." * 3)]


@pytest.fixture
def inline(model_tok):
    engine = InlineEngine(*model_tok, EngineConfig(kv_cache_mb=8))
    yield engine
    engine.shutdown()


def request(prompt, i):
    return GenerationRequest(list(prompt), SETTINGS[i], LENGTHS[i])


def submit(engine, prompt, params, max_new):
    handle = RequestHandle(f"r{next(_ids)}", engine.cancel, engine.is_running)
    engine.submit(handle, GenerationRequest(list(prompt), params, max_new))
    return handle


def together(engine, requests):
    handles = [RequestHandle(f"r{next(_ids)}", engine.cancel, engine.is_running) for _ in requests]
    engine.submit_together(list(zip(handles, requests)))
    return handles


def collect(handle):
    tokens, last = [], None
    for delta in handle:
        tokens.extend(delta.token_ids)
        last = delta
    return tokens, last


def test_a_chat_reply_equals_the_threaded_engines_greedy_and_seeded(model_tok, inline, threaded_results):
    tok = model_tok[1]
    for i in range(4):
        tokens, last = collect(submit(inline, PROMPTS(tok)[1], SETTINGS[i], LENGTHS[i]))
        assert last.finish_reason == "length" and last.error is None
        assert tokens == threaded_results[(1, i)], f"setting {i}"


def test_requests_submitted_together_run_as_one_batch_with_the_same_tokens(model_tok, inline, threaded_results):
    tok = model_tok[1]
    handles = together(inline, [request(PROMPTS(tok)[0], i) for i in range(4)])
    results = [[] for _ in handles]
    # One thread reads all columns round-robin (what one ZeroGPU call does): every read advances all of them.
    while not all(h.done for h in handles):
        for k, h in enumerate(handles):
            if not h.done:
                results[k].extend(h._next().token_ids)
    assert results == [threaded_results[(0, i)] for i in range(4)]
    assert inline.steps <= max(LENGTHS) + 1  # one batch: as many steps as the longest column, not their sum


def test_columns_read_by_a_thread_each_stay_one_batch(model_tok, inline, threaded_results):
    tok = model_tok[1]
    handles = together(inline, [request(PROMPTS(tok)[1], i) for i in range(4)])
    results = [None] * 4

    def read(k):
        results[k] = collect(handles[k])[0]

    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [threaded_results[(1, i)] for i in range(4)]
    assert inline.steps <= max(LENGTHS) + 1


def test_the_kv_memory_of_a_call_is_freed_when_it_ends(model_tok, inline):
    tok = model_tok[1]
    handles = together(inline, [request(PROMPTS(tok)[0], i) for i in range(2)])
    run = handles[0].drive.__self__
    cache = weakref.ref(run.cache.k)
    assert inline.stats()["runs"] == 1 and inline.stats()["kv_bytes"] > 0
    # sized for its requests (prompt + max new tokens each), not for the whole --kv-cache-mb budget
    assert run.allocator.num_blocks * 16 < inline.capacity_tokens
    for h in handles:
        collect(h)
    del run
    gc.collect()
    assert cache() is None
    assert inline.stats()["runs"] == 0 and inline.stats()["kv_bytes"] == 0


def test_cancel_ends_one_request_and_the_others_go_on(model_tok, inline, threaded_results):
    tok = model_tok[1]
    keep, drop = together(inline, [request(PROMPTS(tok)[0], 1), request(PROMPTS(tok)[0], 3)])
    first = keep._next().token_ids
    drop.cancel()
    tokens, last = collect(drop)
    assert last.finish_reason == "cancelled"
    assert len(tokens) < LENGTHS[3]
    assert first + collect(keep)[0] == threaded_results[(0, 1)]
    assert inline.stats()["runs"] == 0


def test_a_reader_that_leaves_and_cancels_frees_the_memory(model_tok, inline):
    tok = model_tok[1]
    (handle,) = together(inline, [request(PROMPTS(tok)[0], 1)])
    handle._next()
    assert inline.stats()["runs"] == 1
    handle.cancel()  # nobody drives any more: the cancel itself ends the request
    assert inline.stats()["runs"] == 0 and inline.stats()["kv_bytes"] == 0
    assert collect(handle)[1].finish_reason == "cancelled"


def test_two_calls_from_two_threads_at_once_both_finish_correctly(model_tok, inline, threaded_results):
    tok = model_tok[1]
    results, barrier = {}, threading.Barrier(2)

    def call(p, i):
        barrier.wait(timeout=30)
        results[(p, i)] = collect(submit(inline, PROMPTS(tok)[p], SETTINGS[i], LENGTHS[i]))[0]

    threads = [threading.Thread(target=call, args=(0, 2)), threading.Thread(target=call, args=(1, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {k: threaded_results[k] for k in [(0, 2), (1, 1)]}


def test_bad_requests_get_the_threaded_engines_errors(model_tok, inline):
    handle = submit(inline, [], SamplingParams(), 8)
    assert collect(handle)[1].error == "The prompt is empty."
    assert inline.stats()["runs"] == 0


def test_an_event_loop_reader_gets_the_same_tokens_without_blocking_its_loop(model_tok, inline, threaded_results):
    import asyncio

    tok = model_tok[1]

    async def read(handle):
        arrived, tokens = asyncio.Event(), []
        handle.listen(arrived)
        while not handle.done:
            await asyncio.wait_for(arrived.wait(), timeout=60)
            arrived.clear()
            for delta in handle.take():
                tokens.extend(delta.token_ids)
        return tokens

    async def main():
        handle = together(inline, [request(PROMPTS(tok)[1], 1)])[0]
        return await read(handle)

    # A loop of its own in a thread of its own: this thread may already run one (Playwright's sync API does, when
    # the browser tests ran first in the same session), and asyncio.run refuses to nest.
    result = []
    runner = threading.Thread(target=lambda: result.append(asyncio.run(main())))
    runner.start()
    runner.join(120)
    assert result == [threaded_results[(1, 1)]]
    assert inline.stats()["runs"] == 0


def test_finished_requests_measure_the_decode_rate_for_the_next_call(model_tok, inline):
    tok = model_tok[1]
    assert inline.stats()["decode_tokens_per_s"] == 0.0
    handle = submit(inline, PROMPTS(tok)[0], SETTINGS[0], 16)
    usage = collect(handle)[1].usage
    assert inline.stats()["decode_tokens_per_s"] == pytest.approx(usage.decode_tokens_per_second)
    assert usage.decode_tokens_per_second > 0
