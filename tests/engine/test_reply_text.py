"""The text a request streams is the tokenizer's decode of the ids it generated, invalid bytes included."""

import glmapp
from glmapp.backends import RequestHandle
from glmapp.engine.engine import Engine, EngineConfig
from glmapp.engine.request import GenerationRequest
from glmapp.engine.sampling import SamplingParams


def test_streamed_reply_text_equals_decode_of_its_ids_with_invalid_bytes(demo_v2):
    model, tok = glmapp.load(str(demo_v2))
    engine = Engine(model, tok, EngineConfig())
    prompt = tok.encode("你好，请介绍一下你自己。")
    handles = []
    try:
        for seed in range(24):  # random weights emit byte-fallback pieces often, some not valid UTF-8
            handles.append(RequestHandle(f"seed{seed}", engine.cancel))
            engine.submit(handles[-1], GenerationRequest(list(prompt), SamplingParams(temperature=1.0, seed=seed),
                                                         32))
        replies = []
        for handle in handles:
            ids, text = [], ""
            for delta in handle:
                ids += delta.token_ids
                text += delta.text
            replies.append((ids, text))
    finally:
        engine.shutdown()
    decoded = [tok.decode(ids) for ids, _ in replies]
    assert any("\ufffd" in d.rstrip("\ufffd") for d in decoded)  # an invalid byte inside a reply
    assert any(d.endswith("\ufffd") for d in decoded)  # and at the end of one
    for (ids, text), full in zip(replies, decoded):
        assert ids and text == full
