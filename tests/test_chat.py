"""The official chat()/stream_chat() API on our model: streaming, history, KV reuse, limits, bad input."""

import pytest

import glmapp
from glmapp import prompts
from glmapp.chat import ChatModel, ConversationCache
from glmapp.errors import InputError, InputTooLong

GREEDY = dict(do_sample=False, max_new_tokens=24)


def fresh(path):
    return glmapp.load(str(path))


@pytest.mark.parametrize("which", ["v2", "v3"])
def test_stream_chat_yields_growing_responses_ending_in_chat_result(which, demo_v2, demo_v3):
    model, tok = fresh(demo_v2 if which == "v2" else demo_v3)
    seen = [r for r, _ in model.stream_chat(tok, "你好，请介绍一下你自己。", [], **GREEDY)]
    assert len(seen) >= 2 and seen[-1].strip()
    # Each yield extends the previous one, so no yield showed a half character that later changed (U+FFFD
    # for invalid bytes is shown, as the reference does; the reference strips whitespace, so compare stripped).
    for a, b in zip(seen, seen[1:]):
        assert b.startswith(a.strip()) or b.strip().startswith(a.strip())
    response, history = model.chat(tok, "你好，请介绍一下你自己。", [], **GREEDY)
    assert response == seen[-1] and model.last_stats.new_tokens == GREEDY["max_new_tokens"]
    if which == "v2":
        assert history == [("你好，请介绍一下你自己。", response)]
    else:
        assert history[0] == {"role": "user", "content": "你好，请介绍一下你自己。"}
        assert history[1]["role"] == "assistant" and history[1]["content"] == response


def test_seeded_sampling_is_reproducible_and_seed_dependent(loaded_v2):
    model, tok = loaded_v2
    args = dict(max_new_tokens=20, temperature=1.0, top_p=0.95)
    a = model.chat(tok, "Tell me a story", [], seed=7, **args)[0]
    b = model.chat(tok, "Tell me a story", [], seed=7, **args)[0]
    c = model.chat(tok, "Tell me a story", [], seed=8, **args)[0]
    assert a.strip() and a == b and a != c


def test_second_turn_reuses_the_first_turns_cache_and_matches_a_fresh_run(demo_v2):
    model, tok = fresh(demo_v2)
    r1, h1 = model.chat(tok, "What is the capital of France?", [], **GREEDY)
    first = model.last_stats
    r2, h2 = model.chat(tok, "And of Germany?", h1, **GREEDY)
    second = model.last_stats
    assert second.reused_tokens >= first.prompt_tokens  # at least the whole first prompt is reused
    assert second.prefilled_tokens < second.prompt_tokens
    assert second.prefilled_tokens == second.prompt_tokens - second.reused_tokens
    assert r2.strip() and second.new_tokens > 0  # an empty reply would match a fresh run trivially
    other, tok2 = fresh(demo_v2)  # no cache: full prefill
    assert other.chat(tok2, "And of Germany?", h1, **GREEDY)[0] == r2
    assert other.last_stats.reused_tokens == 0


def test_official_past_key_values_continuation(demo_v2):
    model, tok = fresh(demo_v2)
    *_, (r1, h1, past) = model.stream_chat(tok, "你好", [], return_past_key_values=True, **GREEDY)
    assert isinstance(past, ConversationCache)
    assert past.ids[:len(prompts.build_prompt_ids(tok, "你好", []))] == prompts.build_prompt_ids(tok, "你好", [])
    cached = len(past.ids)
    new_ids = prompts.build_continuation_ids(tok, "再说一遍", h1)
    *_, (r2, h2, past2) = model.stream_chat(tok, "再说一遍", h1, past_key_values=past,
                                            return_past_key_values=True, **GREEDY)
    # Everything but the last reply token (sampled, never run through the model) is reused.
    assert model.last_stats.reused_tokens == cached - 1
    assert model.last_stats.prefilled_tokens == len(new_ids) + 1
    assert len(h2) == 2 and h2[1] == ("再说一遍", r2) and r1.strip() and r2.strip()
    with pytest.raises(InputError, match="past_key_values"):
        next(model.stream_chat(tok, "x", h2, past_key_values=("not", "a cache")))


def test_v3_system_prompt_and_history_format(loaded_v3):
    model, tok = loaded_v3
    r, h = model.chat(tok, "Hi", [], system="You are a pirate.", **GREEDY)
    assert h[0] == {"role": "system", "content": "You are a pirate."}
    assert h[1] == {"role": "user", "content": "Hi"}
    assert h[2] == {"role": "assistant", "metadata": "", "content": r} and r.strip()
    ids = prompts.build_prompt_ids(tok, "Hi", [], system="You are a pirate.")
    assert ids[:3] == [tok.get_command("[gMASK]"), tok.get_command("sop"), tok.get_command("<|system|>")]


@pytest.mark.parametrize("query", ["", "   ", "\n\t ", "\x00\x07"])
def test_empty_queries_are_refused(loaded_v2, query):
    model, tok = loaded_v2
    with pytest.raises(InputError, match="Empty message"):
        model.chat(tok, query, [])


def test_odd_characters_are_normalised_not_crashed_on(loaded_v2):
    model, tok = loaded_v2
    response, history = model.chat(tok, "a\u3000b\xa0c\x1b[31m\r\nd\ud800 😀", [], **GREEDY)
    assert history[0][0] == "a b c[31m\nd 😀"
    assert isinstance(response, str) and response.strip() and model.last_stats.new_tokens > 0


def test_too_long_input_drops_oldest_rounds_then_refuses(loaded_v2):
    model, tok = loaded_v2
    history = [(f"question {i} " + "word " * 30, f"answer {i} " + "word " * 30) for i in range(6)]
    full = len(prompts.build_prompt_ids(tok, "final question", history))
    limit = full - 10  # too small for all six rounds
    r, new_history = model.chat(tok, "final question", history, max_length=limit, **GREEDY)
    kept = new_history[:-1]
    assert 0 < len(kept) < 6 and kept == history[-len(kept):]  # the oldest rounds went first
    assert r.strip() and new_history[-1] == ("final question", r)  # the trimmed prompt was answered
    with pytest.raises(InputTooLong, match="limit") as e:
        model.chat(tok, "word " * 400, [], max_length=100)
    assert "99" in str(e.value)


def test_generation_stops_on_the_family_stop_ids(demo_v3):
    model, tok = fresh(demo_v3)
    user = tok.get_command("<|user|>")

    def prefer_user_token(module, inputs, logits):  # after 3 tokens, <|user|> wins every step
        if fresh.calls >= 3:
            logits[..., user] = 1e4
        fresh.calls += 1
        return logits

    fresh.calls = 0
    model.transformer.output_layer.register_forward_hook(prefer_user_token)
    response, history = model.chat(tok, "hello", [], **GREEDY)
    assert model.last_stats.finish_reason == "stop"
    assert model.last_stats.new_tokens == 3  # prefill + 2 decode steps produced 3 tokens, then the stop
    assert history[-1]["content"] == response


def test_max_length_caps_the_reply(loaded_v2):
    model, tok = loaded_v2
    prompt_len = len(prompts.build_prompt_ids(tok, "hello", []))
    response, _ = model.chat(tok, "hello", [], max_length=prompt_len + 5, do_sample=False)
    assert (model.last_stats.new_tokens, model.last_stats.finish_reason) == (5, "length") and response.strip()


def test_load_returns_chat_model(loaded_v2):
    assert isinstance(loaded_v2[0], ChatModel)
