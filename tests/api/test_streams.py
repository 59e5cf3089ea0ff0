"""Many API streams at once on the real app and engine: how deltas reach the event loop, what each stream
gets, and that nothing is left behind in the engine after a thousand requests."""

from __future__ import annotations

import asyncio
import threading

import httpx
from openai import AsyncOpenAI

from glmapp.backends import RequestHandle
from glmapp.engine.delivery import LoopWaker, deliver
from glmapp.engine.request import Delta, GenerationRequest, Usage
from glmapp.engine.sampling import SamplingParams

from test_openai_api import WAIT_S, engine_chat, engine_idle, wait_for

STREAMS = 32


def async_client(served) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=served.api, api_key="unused", max_retries=0, timeout=WAIT_S * 4,
                       http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=STREAMS + 4)))


async def stream_text(client, model: str, query: str, max_tokens: int, **kwargs) -> str:
    stream = await client.chat.completions.create(model=model, max_tokens=max_tokens, stream=True,
                                                  messages=[{"role": "user", "content": query}], **kwargs)
    async with stream:
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


def test_a_step_for_many_streams_wakes_their_loop_once_and_readers_decode(api_manager):
    tokenizer = api_manager.tokenizer
    ids = tokenizer.encode("hello there, how are you", add_special_tokens=False)
    loop = asyncio.new_event_loop()
    try:
        waker = LoopWaker.of(loop)
        runs = []
        original = waker._run
        waker._run = lambda: (runs.append(1), original())  # counts the loop's wake-ups
        handles = [RequestHandle(f"d{i}", lambda _id: None, tokenizer=tokenizer) for i in range(STREAMS)]

        async def read_all() -> list[str]:
            arrived = asyncio.Event()
            for h in handles:
                h.listen(arrived)
            step = threading.Thread(target=deliver, args=([(h, Delta("", ids[:-1], usage=Usage(1, 1)))
                                                           for h in handles],))
            step.start()  # one engine step (as the engine thread calls it), from another thread
            await asyncio.wait_for(arrived.wait(), WAIT_S)
            step.join()
            texts = ["".join(d.text for d in h.take()) for h in handles]
            arrived.clear()
            threading.Thread(target=deliver, args=([(h, Delta("", ids[-1:], "length")) for h in handles],)).start()
            await asyncio.wait_for(arrived.wait(), WAIT_S)
            return [t + "".join(d.text for d in h.take()) for t, h in zip(texts, handles)]

        texts = loop.run_until_complete(read_all())
    finally:
        loop.close()
    assert texts == [tokenizer.decode(ids)] * STREAMS  # the engine sent ids only; the reader made the text
    assert len(runs) == 2 and all(h.done for h in handles)


def test_an_async_reader_of_a_dead_engine_gets_an_error_instead_of_waiting(api_manager):
    handle = RequestHandle("dead", lambda _id: None, engine_alive=lambda: False)

    async def read():
        handle.listen(asyncio.Event())
        return handle.take()

    [last] = asyncio.run(read())
    assert last.finish_reason == "error" and "engine stopped" in last.error


def test_many_api_streams_with_direct_engine_requests_each_equal_alone_and_use_no_thread_each(served):
    manager = served.manager
    queries = [f"stream {i} asks something" for i in range(STREAMS)]
    seeded = SamplingParams(temperature=0.9, top_p=0.8, seed=7)
    alone = [engine_chat(manager, q, max_new_tokens=8)[0] for q in queries[:STREAMS // 2]]
    alone += [engine_chat(manager, q, max_new_tokens=8, params=seeded)[0] for q in queries[STREAMS // 2:]]
    direct_prompt = manager.tokenizer.encode("the engine directly")
    direct_alone = list(manager.submit(GenerationRequest(direct_prompt, seeded, 8)))
    threads_before = threading.active_count()
    most_threads = []

    async def run():
        client = async_client(served)
        asks = [stream_text(client, served.model, q, 8, temperature=0) for q in queries[:STREAMS // 2]]
        asks += [stream_text(client, served.model, q, 8, temperature=0.9, top_p=0.8, seed=7)
                 for q in queries[STREAMS // 2:]]
        tasks = [asyncio.ensure_future(a) for a in asks]
        direct = [manager.submit(GenerationRequest(direct_prompt, seeded, 8)) for _ in range(2)]  # with them
        while not all(t.done() for t in tasks):
            most_threads.append(threading.active_count())
            await asyncio.sleep(0.01)  # sampling the thread count while the streams run, not synchronising
        await client.close()
        return await asyncio.gather(*tasks), [await asyncio.to_thread(list, h) for h in direct]

    texts, direct = asyncio.run(run())
    assert texts == alone
    assert all([d.token_ids for d in deltas] == [d.token_ids for d in direct_alone] for deltas in direct)
    assert max(most_threads) < threads_before + 8  # no worker thread per stream (it was one each)


def test_a_thousand_requests_leave_the_engine_allocator_and_queues_as_they_started(served):
    manager = served.manager
    wait_for(lambda: engine_idle(manager), "the engine to be idle")
    engine = manager.engine
    start = engine.stats()
    free_at_start = engine.allocator.num_free

    async def run():
        client = async_client(served)
        gate = asyncio.Semaphore(STREAMS)

        async def one(i: int):
            async with gate:
                if i % 2:
                    return await stream_text(client, served.model, f"request {i}", 2, temperature=0)
                out = await client.chat.completions.create(model=served.model, max_tokens=2, temperature=0.7,
                                                           seed=i, messages=[{"role": "user", "content": f"q{i}"}])
                return out.choices[0].message.content

        results = await asyncio.gather(*(one(i) for i in range(1000)))
        await client.close()
        return results

    assert len(asyncio.run(run())) == 1000
    wait_for(lambda: engine_idle(manager), "the engine to be idle again")
    end = engine.stats()
    assert (end["running"], end["waiting"]) == (0, 0) and engine.allocator.num_free == free_at_start
    assert end["free_blocks"] == start["free_blocks"] and end["errors"] == start["errors"]
    assert not engine._open and not engine._inbox and not engine._outbox
