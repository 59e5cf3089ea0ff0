"""chat() on a reply whose tokens decode to no text returns "" (and the round in the history), not None: on v1
(ChatModel1) and on v2 (ChatModel), whose shared stream always yields its end."""

import pytest
import torch

import glmapp
from glmapp.chat import ChatModel
from glmapp.demo import make_demo


@pytest.fixture(scope="module")
def v1_base(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("v1-chat") / "base", family="chatglm1")


@torch.no_grad()
def silent(model, tok):
    """The model now says only a token that decodes to nothing (v1: <pad> 3; v2: 0, every logit equal)."""
    t = model.transformer
    if model.config.family == "chatglm1":
        t.final_layernorm.weight.zero_()
        t.final_layernorm.bias.copy_(t.word_embeddings.weight[tok.pad_token_id] * 10)
    else:
        t.encoder.final_layernorm.weight.zero_()
    return model


@pytest.mark.parametrize("family", ["chatglm1", "chatglm2"])
def test_chat_returns_an_empty_reply_when_no_token_has_text(family, v1_base, demo_v2):
    model, tok = glmapp.load(str(v1_base if family == "chatglm1" else demo_v2))
    silent(model, tok)
    history = [("你好", "你好👋！")]
    for chat in (model.chat, lambda *a, **k: ChatModel.chat(model, *a, **k)):  # the shared code path too
        assert chat(tok, "hello", history, do_sample=False, max_length=80) == ("", [*history, ("hello", "")])
        assert model.last_stats.new_tokens > 0 and model.last_stats.finish_reason == "length"
