"""ChatGLM3 tool calls through the OpenAI API: the mapping functions on the real tokenizer's output, and the
official `openai` client against the real app on the demo ChatGLM3 checkpoint (whose random weights call no
tool by themselves: the end-to-end tests check the prompt the model gets and the reply it gives to it)."""

from __future__ import annotations

import json

import openai
import pytest

from glmapp import prompts
from glmapp.api.generation import chat_prompt
from glmapp.api.schemas import ChatCompletionRequest
from glmapp.api.tools import TOOLS_SYSTEM, reply_parts, streamed_text
from glmapp.engine.request import GenerationRequest
from glmapp.engine.sampling import SamplingParams
from glmapp.tokenizer import StreamDecoder

from test_openai_api import error_of

WEATHER = {"name": "get_weather", "description": "今天的天气", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]
CONVERSATION = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "北京明天天气怎么样?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "北京", "days": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'},
]
# The same conversation as ChatGLM3's own history (spec §6, the tools demo's format), written out by hand.
HISTORY = [
    {"role": "system", "content": "You are a weather bot.", "tools": [WEATHER]},
    {"role": "user", "content": "北京明天天气怎么样?"},
    {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='北京', days=1)\n```"},
]
OBSERVATION = '{"temperature": 21, "sky": "sunny"}'
GREEDY = SamplingParams(temperature=0, top_p=0.8)


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": CONVERSATION, "tools": TOOLS} | fields)


@pytest.fixture(scope="module")
def tokenizer(loaded_v3):
    return loaded_v3[1]


def test_tools_and_a_tool_result_make_the_chat_templates_observation_prompt(tokenizer):
    body = request()
    prompt = chat_prompt(tokenizer, body.messages, body.tools)
    assert prompt.ids == prompts.build_prompt_ids(tokenizer, OBSERVATION, HISTORY, role="observation")
    assert prompt.tools and prompt.history == HISTORY
    observation = tokenizer.get_command("<|observation|>")
    assert prompt.ids[-1] == tokenizer.get_command("<|assistant|>") and observation in prompt.ids
    assert json.dumps([WEATHER], indent=4, ensure_ascii=False) in tokenizer.decode(prompt.ids)


def test_without_a_system_message_the_official_tool_text_is_the_system_turn(tokenizer):
    body = request(messages=CONVERSATION[1:2])
    prompt = chat_prompt(tokenizer, body.messages, body.tools)
    history = [{"role": "system", "content": TOOLS_SYSTEM, "tools": [WEATHER]}]
    assert prompt.ids == prompts.build_prompt_ids(tokenizer, CONVERSATION[1]["content"], history)


def generated(tokenizer, metadata: str, content: str) -> list[int]:
    """Ids as the model writes a turn after `<|assistant|>`: its metadata line, then its content."""
    return tokenizer.build_single_message("assistant", metadata, content)[1:]


def stream_of(tokenizer, ids) -> list[str]:
    """The reply's raw text after each token, as the API's reader decodes it."""
    decoder, out = StreamDecoder(tokenizer), []
    for token in ids:
        decoder.push(token)
        out.append(decoder.text)
    return out[:-1] + [decoder.text + decoder.flush()]


def test_a_tool_call_reply_becomes_tool_calls_and_never_streams_as_text(tokenizer):
    ids = generated(tokenizer, "get_weather", "```python\ntool_call(city='北京', days=3)\n```")
    raws = stream_of(tokenizer, ids)
    content, calls = reply_parts(HISTORY, raws[-1])
    assert content is None and len(calls) == 1 and calls[0]["type"] == "function"
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "北京", "days": 3}
    assert [streamed_text(raw, final=False) for raw in raws] == [""] * len(raws)


def test_text_then_a_tool_call_streams_the_text_only(tokenizer):
    ids = generated(tokenizer, "", "Let me look that up.") + [tokenizer.get_command("<|assistant|>")]
    ids += generated(tokenizer, "get_weather", "```python\ntool_call(city='上海')\n```")
    raws = stream_of(tokenizer, ids)
    content, calls = reply_parts(HISTORY, raws[-1])
    assert content == "Let me look that up." and [c["function"]["name"] for c in calls] == ["get_weather"]
    shown = [streamed_text(raw, final=False) for raw in raws]
    assert all(content.startswith(s) for s in shown) and shown[-1] == content


def test_a_plain_reply_streams_as_it_would_without_tools(tokenizer):
    raws = stream_of(tokenizer, generated(tokenizer, "", "晴天, 21 度."))
    assert reply_parts(HISTORY, raws[-1]) == ("晴天, 21 度.", [])
    shown = [streamed_text(raw, final=False) for raw in raws]
    assert all(shown[-1].startswith(s) for s in shown) and shown[-1] == prompts.process_response("chatglm3", raws[-1])


# ---- end to end: the official client, the real app, the demo ChatGLM3 checkpoint ---------------------------
def engine_reply(served, ids, max_new_tokens):
    deltas = list(served.manager.submit(GenerationRequest(ids, GREEDY, max_new_tokens)))
    return reply_parts(HISTORY, "".join(d.text for d in deltas)), deltas[-1].usage


@pytest.fixture
def submitted(served_v3, monkeypatch):
    """The prompt ids the server submits to the real engine (recorded on the way, the call goes through)."""
    seen, submit = [], served_v3.manager.submit

    def recording(request):
        seen.append(request.prompt_ids)
        return submit(request)

    monkeypatch.setattr(served_v3.manager, "submit", recording)
    return seen


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_with_tools_gets_the_templates_prompt_and_its_reply(served_v3, tokenizer, submitted, stream):
    ids = prompts.build_prompt_ids(tokenizer, OBSERVATION, HISTORY, role="observation")
    (content, calls), usage = engine_reply(served_v3, ids, 12)
    submitted.clear()
    kwargs = dict(model=served_v3.model, messages=CONVERSATION, tools=TOOLS, temperature=0, top_p=0.8, max_tokens=12)
    client = served_v3.client()
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        got_calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        got_usage = chunks[-1].usage
    else:
        out = client.chat.completions.create(**kwargs)
        text, got_calls = out.choices[0].message.content or "", out.choices[0].message.tool_calls or []
        finish, got_usage = out.choices[0].finish_reason, out.usage
    assert submitted == [ids]  # the chat template's prompt, exactly
    assert got_usage.prompt_tokens == len(ids) == usage.prompt_tokens
    assert got_usage.completion_tokens == usage.completion_tokens
    assert text == (content or "")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got_calls] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert finish == ("tool_calls" if calls else "length" if usage.completion_tokens == 12 else "stop")


def test_tool_choice_none_leaves_the_tools_out_of_the_prompt(served_v3, tokenizer):
    out = served_v3.client().chat.completions.create(model=served_v3.model, messages=CONVERSATION[:2], tools=TOOLS,
                                                     tool_choice="none", max_tokens=1)
    history = [{"role": "system", "content": "You are a weather bot."}]
    assert out.usage.prompt_tokens == len(prompts.build_prompt_ids(tokenizer, CONVERSATION[1]["content"], history))


@pytest.mark.parametrize("change, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": CONVERSATION[:2] + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": "{city: 北京"}}]}, CONVERSATION[3]]},
     "messages[2].tool_calls[0].function.arguments"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"messages": CONVERSATION[:3]}, "messages[2].role"),
])
def test_a_bad_tool_request_is_a_400_that_names_the_field(served_v3, change, param):
    with pytest.raises(openai.BadRequestError) as e:
        served_v3.client().chat.completions.create(**({"model": served_v3.model, "messages": CONVERSATION,
                                                       "tools": TOOLS} | change))
    assert error_of(e)["param"] == param


def test_tools_on_a_chatglm2_model_are_a_400_that_says_why(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.client().chat.completions.create(model=served.model, tools=TOOLS,
                                                messages=[{"role": "user", "content": "hi"}])
    assert error_of(e)["param"] == "tools" and "ChatGLM3" in error_of(e)["message"]
