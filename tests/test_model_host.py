"""ModelHost: one engine per model, whoever asks for it (the web app, a script's model.chat)."""

from __future__ import annotations

import pytest

import glmapp
from glmapp.errors import CheckpointError
from glmapp.host import ModelHost
from glmapp.tokenizer import ChatGLMTokenizer


def test_the_serving_host_is_shared_with_an_equal_tokenizer_and_never_closed_by_a_different_one(demo_v2, demo_v3):
    model, tokenizer = glmapp.load(str(demo_v2))
    host = ModelHost.of(model, tokenizer)
    try:
        stream = host.engine  # the engine a user of the host is streaming from
        again = ChatGLMTokenizer.from_pretrained(demo_v2, family="chatglm2")  # loaded again: the same vocabulary
        assert again is not tokenizer and ModelHost.of(model, again) is host
        other = ChatGLMTokenizer.from_pretrained(demo_v3, family="chatglm3")
        with pytest.raises(CheckpointError, match="already served with a different tokenizer"):
            ModelHost.of(model, other)
        assert host.serving and host.engine is stream  # still serving its users
        reply, _ = model.chat(again, "hello", max_length=64, do_sample=False)
        assert isinstance(reply, str)
    finally:
        host.close()
    fresh = ModelHost.of(model, tokenizer)  # once closed, the model gets a new host
    assert fresh is not host and fresh.serving
    fresh.close()
