"""Our GGUF export run by llama.cpp itself (through llama-cpp-python): its tokenizer and its greedy tokens equal
ours. Optional: skipped where `llama_cpp` is not installed (it is not a glmapp dependency; building it takes
about 10 minutes, see bench/llama_cpp.py)."""

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

import glmapp  # noqa: E402
from glmapp.gguf_export import export_gguf  # noqa: E402

TEXT = "你好，请介绍一下长城的历史。The Great Wall is long."


def _ours_greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens by full forward passes (no KV cache) and the prompt's last logits."""
    x = torch.tensor([ids])
    out, first = [], None
    with torch.no_grad():
        for _ in range(n):
            logits = model(x).logits[0, -1].float()
            first = logits.numpy() if first is None else first
            out.append(int(logits.argmax()))
            x = torch.cat([x, torch.tensor([[out[-1]]])], dim=1)
    return out, first


def _theirs_greedy(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    vocab = llm.n_vocab()

    def logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).copy()

    llm.reset()
    llm.eval(ids)
    first = logits()
    out = [int(first.argmax())]
    for _ in range(n - 1):
        llm.eval([out[-1]])
        out.append(int(logits().argmax()))
    return out, first


@pytest.mark.parametrize("fixture", ["demo_v2", "demo_v3"])
def test_llama_cpp_greedy_tokens_equal_ours_in_f32(request, tmp_path, fixture):
    path = request.getfixturevalue(fixture)
    model, tok = glmapp.load(str(path), device="cpu", dtype="float32")
    out = export_gguf(path, tmp_path / "m.gguf", "f32").path
    llm = llama_cpp.Llama(str(out), n_ctx=128, n_threads=1, verbose=False)
    assert llm.n_vocab() == model.config.padded_vocab_size
    # its SentencePiece tokenizer reads our vocabulary as ours does
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tok.sp_encode(TEXT)
    ids = tok.encode(TEXT)
    ours, ours_logits = _ours_greedy(model, ids, 20)
    theirs, their_logits = _theirs_greedy(llm, ids, 20)
    assert theirs == ours
    np.testing.assert_allclose(their_logits, ours_logits, atol=2e-4 * np.abs(ours_logits).max())


def test_llama_cpp_runs_our_q8_0_close_to_ours(demo_v2, tmp_path):
    model, tok = glmapp.load(str(demo_v2), device="cpu", dtype="float32")
    out = export_gguf(demo_v2, tmp_path / "m.gguf", "q8_0").path
    llm = llama_cpp.Llama(str(out), n_ctx=128, n_threads=1, verbose=False)
    ids = tok.encode(TEXT)
    _, ours_logits = _ours_greedy(model, ids, 1)
    _, their_logits = _theirs_greedy(llm, ids, 1)
    # Q8_0 weights (and llama.cpp's q8 activations): close, not equal
    assert np.abs(their_logits - ours_logits).max() < 0.05 * np.abs(ours_logits).max()
    assert not np.array_equal(their_logits, ours_logits)


@pytest.mark.parametrize("fixture", ["demo_v2", "demo_v3"])
def test_chat_template_tokenized_by_llama_cpp_gives_our_prompt_ids(request, tmp_path, fixture):
    jinja2 = pytest.importorskip("jinja2")
    from glmapp.prompts import build_prompt_ids

    path = request.getfixturevalue(fixture)
    _, tok = glmapp.load(str(path), device="cpu", dtype="float32")
    out = export_gguf(path, tmp_path / "m.gguf", "f32").path
    llm = llama_cpp.Llama(str(out), n_ctx=128, n_threads=1, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗨，有什么事？"},
                {"role": "user", "content": "长城有多长"}]
    text = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    history = messages[:2] if tok.family == "chatglm3" else [("你好", "嗨，有什么事？")]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == build_prompt_ids(tok, "长城有多长", history)
