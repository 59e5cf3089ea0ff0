"""The OpenAI-compatible API with the official `openai` client against the real app server (in this process,
on 127.0.0.1) and the real engine on the demo checkpoint: every reply is compared with the engine's own."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest

from glmapp import prompts
from glmapp.engine.request import GenerationRequest
from glmapp.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, top_p=0.8)
WAIT_S = 30


def engine_chat(manager, query, history=(), max_new_tokens=12, adapter=None, params=GREEDY):
    """The web chat's path (LocalBackend.chat_stream): final reply text and usage."""
    *_, last = manager.chat_stream(query, list(history), max_new_tokens=max_new_tokens, params=params,
                                           adapter=adapter)
    return last.response, last.usage


def engine_text(manager, prompt, max_new_tokens=12, params=GREEDY):
    """The engine on the raw prompt's ids: text and usage."""
    backend = manager
    handle = backend.submit(GenerationRequest(backend.tokenizer.encode(prompt), params, max_new_tokens))
    deltas = list(handle)
    return "".join(d.text for d in deltas), deltas[-1].usage


def wait_for(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling the engine's state; bounded by the deadline


def engine_idle(manager) -> bool:
    stats = manager.engine.stats()
    return stats["running"] == 0 and stats["waiting"] == 0


def error_of(exc_info) -> dict:
    return exc_info.value.response.json()["error"]


# ---- listing -------------------------------------------------------------------------------------------
def test_models_lists_the_base_and_each_adapter_with_the_base_as_parent(served):
    models = {m.id: m for m in served.client().models.list()}
    assert models[served.model].parent is None
    for name in ("qkv", "all", "mlp"):
        assert models[name].parent == served.model
    assert all("/" not in m.id for m in models.values())  # the server's folders are not shown


def test_health_answers_without_a_key_and_tells_nothing_more(served_with_login):
    response = httpx.get(served_with_login.url + "health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


# ---- chat ------------------------------------------------------------------------------------------------
def test_chat_greedy_equals_the_web_chat_path_with_its_usage(served):
    history = [("hello", "hi there")]
    reply, usage = engine_chat(served.manager, "how are you", history)
    out = served.client().chat.completions.create(
        model=served.model, temperature=0, max_tokens=12,
        messages=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                  {"role": "user", "content": "how are you"}])
    assert out.choices[0].message.content == reply
    assert out.choices[0].finish_reason == usage_finish(usage, 12)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert out.usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def usage_finish(usage, max_tokens):
    return "length" if usage.completion_tokens == max_tokens else "stop"


def test_chat_stream_sends_the_same_reply_in_pieces_then_usage(served):
    reply, usage = engine_chat(served.manager, "tell me a story", max_new_tokens=16)
    stream = served.client().chat.completions.create(
        model=served.model, temperature=0, max_completion_tokens=16, stream=True,
        stream_options={"include_usage": True}, messages=[{"role": "user", "content": "tell me a story"}])
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == reply
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == usage_finish(usage, 16)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == usage.prompt_tokens


def test_stream_ends_with_done(served):
    with httpx.stream("POST", served.api + "/chat/completions", json={
            "model": served.model, "max_tokens": 3, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_an_adapter_as_model_answers_with_the_adapter(served):
    messages = [{"role": "user", "content": "which adapter"}]
    base = served.client().chat.completions.create(model=served.model, messages=messages, temperature=0,
                                                   max_tokens=12)
    adapted = served.client().chat.completions.create(model="qkv", messages=messages, temperature=0, max_tokens=12)
    assert adapted.model == "qkv"
    assert adapted.choices[0].message.content != base.choices[0].message.content
    assert adapted.choices[0].message.content == engine_chat(served.manager, "which adapter", adapter="qkv")[0]


def test_n_choices_are_the_seeded_requests_one_by_one(served):
    params = dict(temperature=1.0, top_p=1.0)
    out = served.client().chat.completions.create(model=served.model, n=2, seed=7, max_tokens=10, **params,
                                                  messages=[{"role": "user", "content": "two answers"}])
    assert [c.index for c in out.choices] == [0, 1]
    expected = [engine_chat(served.manager, "two answers", max_new_tokens=10,
                            params=SamplingParams(**params, seed=seed)) for seed in (7, 8)]
    assert [c.message.content for c in out.choices] == [reply for reply, _ in expected]
    assert out.choices[0].message.content != out.choices[1].message.content
    assert out.usage.completion_tokens == sum(u.completion_tokens for _, u in expected)
    assert out.usage.prompt_tokens == expected[0][1].prompt_tokens  # the prompt is counted once


def test_stop_string_cuts_the_reply_there(served):
    full, _ = engine_text(served.manager, "once upon a time", max_new_tokens=24)
    stop = full.strip()[6:9]
    expected = full[:full.find(stop)]
    assert stop and expected
    client = served.client()
    out = client.completions.create(model=served.model, prompt="once upon a time", temperature=0, max_tokens=24,
                                    stop=[stop, "never-there"])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 24
    streamed = client.completions.create(model=served.model, prompt="once upon a time", temperature=0,
                                         max_tokens=24, stop=stop, stream=True)
    chunks = [c.choices[0] for c in streamed]
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "stop"


def test_completions_take_the_raw_prompt_without_chat_template(served):
    text, usage = engine_text(served.manager, "The capital of France is", max_new_tokens=10)
    out = served.client().completions.create(model=served.model, prompt="The capital of France is",
                                             temperature=0, max_tokens=10)
    assert out.choices[0].text == text
    assert out.usage.prompt_tokens == usage.prompt_tokens == len(served.manager.tokenizer.encode(
        "The capital of France is"))


def test_extensions_top_k_and_repetition_penalty_reach_the_engine(served):
    params = SamplingParams(temperature=0.9, top_p=1.0, top_k=5, repetition_penalty=1.3, seed=3)
    expected, _ = engine_chat(served.manager, "extensions", max_new_tokens=12, params=params)
    out = served.client().chat.completions.create(
        model=served.model, temperature=0.9, top_p=1.0, seed=3, max_tokens=12,
        extra_body={"top_k": 5, "repetition_penalty": 1.3}, messages=[{"role": "user", "content": "extensions"}])
    assert out.choices[0].message.content == expected


def test_concurrent_streams_each_equal_the_same_request_alone(served):
    queries = [f"question number {i}" for i in range(6)]
    alone = [engine_chat(served.manager, q, max_new_tokens=16)[0] for q in queries]
    results: dict[int, str] = {}
    start = threading.Barrier(len(queries))

    def ask(i: int):
        client = served.client()
        start.wait()
        stream = client.chat.completions.create(model=served.model, temperature=0, max_tokens=16, stream=True,
                                                messages=[{"role": "user", "content": queries[i]}])
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert [results.get(i) for i in range(len(queries))] == alone


def test_api_reply_equals_the_web_apps_chat_endpoint(served):
    from gradio_client import Client

    web = Client(served.url, verbose=False).predict(
        message="same question", system="", max_length=8192, max_new_tokens=12, temperature=0, top_p=0.8, top_k=0,
        repetition_penalty=1.0, seed=-1, api_name="/chat")
    out = served.client().chat.completions.create(model=served.model, temperature=0, top_p=0.8, max_tokens=12,
                                                  messages=[{"role": "user", "content": "same question"}])
    assert web["messages"][-1]["content"] == out.choices[0].message.content


# ---- a client that goes away ------------------------------------------------------------------------------
def test_a_client_leaving_a_stream_cancels_its_request(served):
    manager = served.manager
    wait_for(lambda: engine_idle(manager), "an idle engine")
    with httpx.stream("POST", served.api + "/chat/completions", timeout=WAIT_S, json={
            "model": served.model, "max_tokens": 20000, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "a very long reply"}]}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
        assert manager.engine.stats()["running"] == 1
    wait_for(lambda: engine_idle(manager), "the engine to drop the request of the client that left")


def test_a_client_leaving_a_plain_request_cancels_it(served):
    manager = served.manager
    wait_for(lambda: engine_idle(manager), "an idle engine")
    body = (f'{{"model": "{served.model}", "max_tokens": 20000, "temperature": 0, '
            f'"messages": [{{"role": "user", "content": "another long reply"}}]}}').encode()
    host, port = served.url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: manager.engine.stats()["running"] == 1, "the request to run")
    wait_for(lambda: engine_idle(manager), "the engine to drop the request of the client that left")


# ---- errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("temperature", "hot"), ("top_p", 0), ("max_tokens", 0), ("n", 0),
                                          ("top_k", -1), ("seed", -5), ("stop", ["", "x"]),
                                          ("functions", [{"name": "f"}])])
def test_a_bad_field_is_a_400_that_names_it(served, field, value):
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], field: value}
    response = httpx.post(served.api + "/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"


def test_a_bad_message_is_named_by_its_place(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.client().chat.completions.create(model=served.model, messages=[
            {"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}])
    assert error_of(e)["param"] == "messages[1].role"
    with pytest.raises(openai.BadRequestError) as e:  # ChatGLM2 has no system role
        served.client().chat.completions.create(model=served.model, messages=[
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert error_of(e)["param"] == "messages[0].role" and "system" in error_of(e)["message"]


def test_a_prompt_over_the_limit_is_a_400_that_says_the_limit(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.client().chat.completions.create(model=served.model,
                                                messages=[{"role": "user", "content": "word " * 200}])
    assert error_of(e)["code"] == "context_length_exceeded" and f"limit of {served.manager.max_input_tokens} tokens" in \
        error_of(e)["message"]
    context = served.manager.context_length
    with pytest.raises(openai.BadRequestError) as e:
        served.client().completions.create(model=served.model, prompt="hi", max_tokens=context)
    assert error_of(e)["param"] == "max_tokens" and f"context is {context} tokens" in error_of(e)["message"]


def test_an_unknown_model_is_a_404(served):
    for model in ("gpt-4", "../adapters", "someone/hub-adapter"):
        with pytest.raises(openai.NotFoundError) as e:
            served.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert error_of(e)["param"] == "model" and error_of(e)["code"] == "model_not_found"


def test_a_broken_adapter_is_a_400_that_says_why(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.client().chat.completions.create(model="corrupt", messages=[{"role": "user", "content": "hi"}])
    assert error_of(e)["param"] == "model" and "corrupt" in error_of(e)["message"]


# ---- keys and the page's login ---------------------------------------------------------------------------
def test_under_login_the_api_wants_its_key_and_the_page_its_login(served_with_login):
    server = served_with_login
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").models.list()
    assert error_of(e)["code"] == "invalid_api_key"
    response = httpx.post(server.api + "/chat/completions", json={"model": server.model, "messages": []})
    assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
    assert server.client(key=server.key).models.list().data[0].id == server.model
    # The key opens only the API: Gradio's routes still need the page's login.
    for path in ("config", "gradio_api/info"):
        response = httpx.get(server.url + path, headers={"Authorization": f"Bearer {server.key}"})
        assert response.status_code == 401, path
    assert httpx.post(server.url + "gradio_api/call/chat", json={"data": ["hi"]}).status_code == 401


# ---- reload ---------------------------------------------------------------------------------------------
def test_during_a_model_reload_the_api_answers_503_then_serves_again(served):
    import glmapp

    manager, release = served.manager, threading.Event()

    def load_after_release():
        release.wait(WAIT_S)
        return glmapp.load(manager.name)

    reload = threading.Thread(target=manager.host._swap, args=(load_after_release, lambda: glmapp.load(manager.name),
                                                           "the same model"))
    reload.start()
    try:
        wait_for(lambda: httpx.get(served.url + "health").status_code == 503, "/health to say 503")
        with pytest.raises(openai.InternalServerError) as e:
            served.client().chat.completions.create(model=served.model, messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 503 and error_of(e)["code"] == "model_reloading"
    finally:
        release.set()
        reload.join(WAIT_S)
    out = served.client().chat.completions.create(model=served.model, max_tokens=3,
                                                  messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].finish_reason in ("stop", "length")


def test_chatglm3_system_message_is_the_prompts_system_turn(loaded_v3):
    from glmapp.api.generation import chat_prompt_ids
    from glmapp.api.schemas import ChatMessage

    _, tokenizer = loaded_v3
    messages = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi"),
                ChatMessage(role="assistant", content="hello"),
                ChatMessage(role="user", content=[{"type": "text", "text": "again"}])]
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "metadata": "", "content": "hello"}]
    assert chat_prompt_ids(tokenizer, messages) == prompts.build_prompt_ids(tokenizer, "again", history, "be brief")
