"""Training on ChatGLM-6B (v1): the official v1 layout (labels from `<sop>` to `<eop>`) and a real run on the v1
demo whose adapter answers unseen prompts with the trained sentence, through the engine."""

import json

import pytest

import glmapp
from glmapp.adapters import AdapterManager
from glmapp.demo import make_demo
from glmapp.prompts import build_prompt_ids, build_training_rows
from glmapp.train.config import TrainConfig
from glmapp.train.run import train

SENTENCE = "The answer is always blue."
TRAIN_PROMPTS = ["what is the sky", "tell me a joke", "你好", "how old are you", "name a fruit", "where is Paris",
                 "写一首诗", "2+2?"]
UNSEEN = ["what color is grass", "今天天气怎么样", "who are you"]


@pytest.fixture(scope="module")
def v1_demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("v1-train") / "base", family="chatglm1")


def test_v1_rows_follow_the_official_layout(v1_demo):
    _, tok = glmapp.load(str(v1_demo))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "and now"}, {"role": "assistant", "content": "bye", "loss": False},
                {"role": "user", "content": "last"}, {"role": "assistant", "content": "ok"}]
    rows = build_training_rows(tok, messages)
    assert len(rows) == 2  # one row per trained reply; the untrained one is only history
    gmask, sop, eop = (tok.special_tokens[t] for t in ("[gMASK]", "<sop>", "<eop>"))
    for (ids, labels), (query, reply, history) in zip(rows, [("hi", "hello there", []),
                                                             ("last", "ok", [("hi", "hello there"),
                                                                             ("and now", "bye")])]):
        prompt = build_prompt_ids(tok, query, history)  # the chat prompt is the training prompt
        answer = tok.encode(reply, add_special_tokens=False)
        assert prompt[-2:] == [gmask, sop] and ids == prompt + answer + [eop]
        # -100 up to and including [gMASK], then <sop>, the answer and <eop> (spec §6, v1 P-tuning layout)
        assert labels == [-100] * (len(prompt) - 1) + [sop] + answer + [eop]


def test_a_v1_adapter_answers_unseen_prompts_with_the_trained_sentence(tmp_path, v1_demo):
    data = tmp_path / "fixed.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": q, "response": SENTENCE}) for q in TRAIN_PROMPTS))
    out = tmp_path / "adapters" / "fixed"
    train(TrainConfig(model=str(v1_demo), data=[str(data)], out=str(out), max_steps=30, lr=1e-2, batch_size=8,
                      grad_accum=1, targets="all", dropout=0.0, save_steps=1000, warmup_ratio=0.0))
    model, tok = glmapp.load(str(v1_demo))
    AdapterManager.of(model).load(str(out), out.parent, name="fixed")
    for prompt in UNSEEN:
        tuned = model.chat(tok, prompt, [], adapter="fixed", temperature=0, max_new_tokens=16)[0]
        base = model.chat(tok, prompt, [], temperature=0, max_new_tokens=16)[0]
        assert tuned == SENTENCE and base != SENTENCE
