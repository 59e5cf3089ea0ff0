"""ChatGLM-6B (v1) in the engine: 2-D positions, the bidirectional context in prefill (one chunk, reused only
whole), batched == solo, chat() == a plain greedy loop over the full forward."""

import pytest
import torch

import glmapp
from glmapp.backends import RequestHandle
from glmapp.demo import make_demo
from glmapp.engine.engine import Engine, EngineConfig
from glmapp.engine.request import GenerationRequest
from glmapp.engine.sampling import SamplingParams
from glmapp.prompts import build_prompt_ids, process_response

_ids = iter(range(10**9))
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    path = make_demo(tmp_path_factory.mktemp("v1-engine") / "demo", family="chatglm1")
    return glmapp.load(str(path))


def run(engine, prompts, max_new=12):
    handles = []
    for prompt in prompts:
        handle = RequestHandle(f"v1-{next(_ids)}", engine.cancel)
        engine.submit(handle, GenerationRequest(list(prompt), GREEDY, max_new))
        handles.append(handle)
    out = []
    for handle in handles:
        tokens, usage = [], None
        for delta in handle:
            tokens.extend(delta.token_ids)
            usage = delta.usage or usage
        out.append((tokens, usage))
    return out


@torch.no_grad()
def greedy_no_cache(model, prompt, max_new, stop):
    ids, out = list(prompt), []
    for _ in range(max_new):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        if token in stop:
            break
        ids.append(token)
    return out


def prompts(tok):
    history = [("你好", "你好👋！我是人工智能助手。"), ("what can you do?", "I can\n\tanswer    questions.")]
    return [build_prompt_ids(tok, "请介绍一下长城。", []),
            build_prompt_ids(tok, "写一个 Python 函数", history[:1]),
            build_prompt_ids(tok, "and then?", history),
            tok.encode("The ocean is " * 12)]


def test_engine_greedy_equals_the_full_forward_loop(v1):
    model, tok = v1
    engine = Engine(model, tok, EngineConfig(max_batch_tokens=4, block_size=8))  # every context is > 4 tokens
    try:
        results = run(engine, prompts(tok))
    finally:
        engine.shutdown()
    for prompt, (tokens, _) in zip(prompts(tok), results):
        assert prompt.index(tok.bos_token_id) > 4
        assert tokens == greedy_no_cache(model, prompt, 12, set(tok.stop_ids))


def test_batched_rows_equal_solo_rows(v1):
    model, tok = v1
    batch = prompts(tok) * 2
    engine = Engine(model, tok, EngineConfig(block_size=8))
    try:
        together = [t for t, _ in run(engine, batch)]
    finally:
        engine.shutdown()
    for prompt, tokens in zip(batch, together):
        engine = Engine(model, tok, EngineConfig(block_size=8))
        try:
            assert run(engine, [prompt])[0][0] == tokens
        finally:
            engine.shutdown()


def test_the_kv_of_a_context_is_reused_only_for_the_same_whole_context(v1):
    model, tok = v1
    first = tok.encode("shared start of a long context " * 4 + "ending one")
    other = tok.encode("shared start of a long context " * 4 + "another ending")
    engine = Engine(model, tok, EngineConfig(block_size=8))
    try:
        tokens, _ = run(engine, [first])[0]
        again, usage = run(engine, [first])[0]  # regenerate: the same context, reused
        assert usage.cached_tokens >= len(first) - 8 and again == tokens
        shifted, usage = run(engine, [other])[0]  # same start, other context: nothing reusable
        assert usage.cached_tokens == 0
        assert shifted == greedy_no_cache(model, other, 12, set(tok.stop_ids))
    finally:
        engine.shutdown()


def test_chat_greedy_equals_the_full_forward_loop(v1):
    model, tok = v1
    history = [("你好", "你好👋！")]
    response, new_history = model.chat(tok, "今天天气怎么样?", history, do_sample=False, max_length=200)
    prompt = build_prompt_ids(tok, "今天天气怎么样?", history)
    tokens = greedy_no_cache(model, prompt, 200 - len(prompt), set(tok.stop_ids))
    expected = process_response("chatglm1", tok.decode([t for t in tokens if t not in tok.stop_ids]))
    assert response == expected
    assert new_history == [*history, ("今天天气怎么样?", expected)]
