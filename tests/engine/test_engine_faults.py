"""The engine survives its own bugs, on the real engine and demo model: a bug injected into scheduling,
advancing or cancelling ends the requests it touched with a message and the next request is served; a dead
engine ends every open stream; an out-of-memory shrinks the batch and it grows back.

Faults are injected by making a real method raise (the rest of it runs for real), never by faking a part.
"""

import threading

import pytest
import torch

import glmapp
from glmapp.backends import RequestHandle
from glmapp.engine.engine import Engine, EngineConfig
from glmapp.engine.request import GenerationRequest
from glmapp.engine.sampling import SamplingParams
from glmapp.errors import EngineStopped

GREEDY = SamplingParams(temperature=0)
READ_TIMEOUT_S = 60  # generous for a busy 2-core machine; a stream that never ends fails here, not hangs
_ids = iter(range(10**9))


@pytest.fixture(scope="module")
def model_tok(demo_v2):
    return glmapp.load(str(demo_v2))


@pytest.fixture
def engine(model_tok):
    engine = Engine(*model_tok, EngineConfig(max_seqs=4, oom_regrow_steps=4))
    yield engine
    engine.shutdown()


def submit(engine, prompt, max_new=24, name="f"):
    handle = RequestHandle(f"{name}{next(_ids)}", engine.cancel, engine.is_running)
    engine.submit(handle, GenerationRequest(list(prompt), GREEDY, max_new, stop_ids=[-1]))
    return handle


def read(handle, timeout=READ_TIMEOUT_S):
    """-> (token ids, last delta) of the rest of the stream; fails if it does not end within `timeout`."""
    tokens, last = [], []

    def drain():
        for delta in handle:
            tokens.extend(delta.token_ids)
            last.append(delta)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), f"stream {handle.id} did not end within {timeout}s"
    return tokens, last[-1]


def first_tokens(handle):
    delta = next(iter(handle))
    assert delta.finish_reason is None
    return delta.token_ids


def solo(model_tok, prompt, max_new):
    engine = Engine(*model_tok, EngineConfig())
    try:
        return read(submit(engine, prompt, max_new))[0]
    finally:
        engine.shutdown()


def free_blocks(engine):
    return engine.call(lambda: engine.allocator.num_free)  # read between steps, on the engine thread


def prompts(tok):
    return [tok.encode(f"请告诉我关于{s}的事情。") for s in ("长城", "the ocean", "bread", "春节")]


def test_a_bug_in_scheduling_fails_the_open_requests_with_a_message_and_the_next_is_served(model_tok, engine):
    tok = model_tok[1]
    a, b, c = prompts(tok)[:3]
    start = free_blocks(engine)
    real_schedule, raised = engine.scheduler.schedule, []

    def buggy_schedule():  # admits B for real, leaks a block, then fails: state is half changed
        work = real_schedule()
        if not raised and any(seq.id.startswith("second") for seq in engine.scheduler.running):
            engine.allocator.allocate()
            raised.append(True)
            raise RuntimeError("injected scheduling bug")
        return work

    first = submit(engine, a, 200)
    first_tokens(first)
    engine.scheduler.schedule = buggy_schedule
    second = submit(engine, b, 200, name="second")
    for handle in (first, second):  # no telling which request the bug was about: both end
        last = read(handle)[1]
        assert last.finish_reason == "error"
        assert "internal error while scheduling (RuntimeError: injected scheduling bug)" in last.error
    assert raised and engine.error_count == 2
    assert free_blocks(engine) == start  # the leaked block is back too
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0
    tokens, last = read(submit(engine, c, 24))
    assert last.finish_reason == "length" and tokens == solo(model_tok, c, 24)
    assert free_blocks(engine) == start


def test_a_bug_while_advancing_one_request_fails_only_it(model_tok, engine):
    tok = model_tok[1]
    a, b, c = prompts(tok)[:3]
    start = free_blocks(engine)
    real_publish, raised = engine.scheduler.publish, []

    def buggy_publish(seq):
        if seq.id.startswith("victim") and len(seq.output_ids) >= 3 and not raised:
            raised.append(True)
            raise KeyError("injected advance bug")
        return real_publish(seq)

    engine.scheduler.publish = buggy_publish
    victim, other = submit(engine, a, 40, name="victim"), submit(engine, b, 40)
    last = read(victim)[1]
    assert last.finish_reason == "error" and "internal error while advancing it (KeyError" in last.error
    tokens, last = read(other)
    assert last.finish_reason == "length" and tokens == solo(model_tok, b, 40)
    assert free_blocks(engine) == start and engine.error_count == 1
    tokens, last = read(submit(engine, c, 24))
    assert last.finish_reason == "length" and tokens == solo(model_tok, c, 24)
    assert free_blocks(engine) == start


def test_a_bug_while_cancelling_fails_that_request_and_the_others_go_on(model_tok, engine):
    tok = model_tok[1]
    a, b, c = prompts(tok)[:3]
    start = free_blocks(engine)
    real_finish = engine.scheduler.finish

    def buggy_finish(seq):
        if seq.id == cancelled.id:
            raise ValueError("injected cancel bug")
        return real_finish(seq)

    cancelled, other = submit(engine, a, 200), submit(engine, b, 60)
    first_tokens(cancelled)
    kept = first_tokens(other)
    engine.scheduler.finish = buggy_finish
    cancelled.cancel()
    last = read(cancelled)[1]
    assert last.finish_reason == "error" and "internal error while cancelling it (ValueError" in last.error
    tokens, last = read(other)
    assert last.finish_reason == "length" and kept + tokens == solo(model_tok, b, 60)
    assert free_blocks(engine) == start
    tokens, last = read(submit(engine, c, 24))
    assert last.finish_reason == "length" and tokens == solo(model_tok, c, 24)


class EngineKiller(BaseException):
    """Escapes every `except Exception`: the engine thread itself dies."""


def test_a_dead_engine_ends_every_open_stream_and_refuses_new_requests(model_tok, engine):
    tok = model_tok[1]
    a, b, c = prompts(tok)[:3]
    handles = [submit(engine, p, 200) for p in (a, b, c)]
    for h in handles[:2]:
        first_tokens(h)

    def killing_schedule():
        raise EngineKiller("injected fatal bug")

    engine.scheduler.schedule = killing_schedule
    for handle in handles:
        last = read(handle)[1]
        assert last.finish_reason == "error"
        assert "The engine stopped after an internal error (EngineKiller: injected fatal bug)" in last.error
    with pytest.raises(EngineStopped, match="reload the model or restart the app"):
        submit(engine, c)
    with pytest.raises(EngineStopped):
        engine.call(lambda: None)
    # A handle the engine never got to end (its thread is gone) still ends, with an error, within a poll.
    orphan = RequestHandle("orphan", engine.cancel, engine.is_running)
    last = read(orphan, timeout=10 * RequestHandle.POLL_S)[1]
    assert last.finish_reason == "error" and "engine stopped" in last.error


def test_out_of_memory_shrinks_the_batch_and_it_grows_back(model_tok, engine):
    tok = model_tok[1]
    four = prompts(tok)
    limits = (engine.scheduler.max_seqs, engine.scheduler.max_batch_tokens)
    start = free_blocks(engine)
    real_step, seen, ooms = engine.runner.step, [], []

    def step_short_of_memory(work):  # the first three batched steps do not fit
        seen.append(engine.scheduler.max_seqs)
        if len(work) > 1 and len(ooms) < 3:
            ooms.append(len(work))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_step(work)

    engine.runner.step = step_short_of_memory
    handles = [submit(engine, p, 48) for p in four]
    results = [read(h) for h in handles]
    assert len(ooms) == 3 and min(seen) < limits[0]  # it shrank...
    assert (engine.scheduler.max_seqs, engine.scheduler.max_batch_tokens) == limits  # ...and grew back
    assert engine.error_count == 0 and free_blocks(engine) == start
    for p, (tokens, last) in zip(four, results):
        assert last.finish_reason == "length" and tokens == solo(model_tok, p, 48)


def test_out_of_memory_with_one_sequence_halves_the_prefill_chunk_then_gives_up():
    from glmapp.engine.kv_cache import BlockAllocator
    from glmapp.engine.scheduler import Scheduler, Sequence

    sched = Scheduler(BlockAllocator(64, 16), max_seqs=4, max_batch_tokens=256, regrow_steps=2)
    sched.add(Sequence("s", list(range(1, 200)), 10))
    chunks = [sum(w.num_tokens for w in sched.schedule())]
    while sched.shrink(chunks[-1]):
        chunks.append(sched.max_batch_tokens)
    assert chunks == [199, 99, 49, 24, 16]  # down to one block per step, then nothing is left to shrink
    assert sched.max_seqs == 4  # a single sequence: the sequence limit had nothing to do with it
    grown = []
    while sched.max_batch_tokens < 256:
        sched.regrow()
        grown.append(sched.max_batch_tokens)
    assert grown == [16, 32, 32, 64, 64, 128, 128, 256]
