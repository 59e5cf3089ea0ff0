"""v1 (ChatGLM-6B) chat prompt, history and post-processing (spec §6, §10.11)."""

import pytest

from glmapp import prompts
from glmapp.demo import CORPUS_DIR
from glmapp.errors import InputError, InputTooLong
from glmapp.tokenizer import ChatGLM1Tokenizer, train_demo_tokenizer_v1


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v1tok")
    train_demo_tokenizer_v1(CORPUS_DIR, folder / "ice_text.model")
    return ChatGLM1Tokenizer(folder / "ice_text.model")


def test_first_round_is_the_bare_query(tok):
    assert prompts.build_prompt_ids(tok, "你好", []) == tok.encode("你好")


def test_rounds_count_from_zero_with_single_newlines(tok):
    history = [("你好", "你好👋"), ("hi", "hello")]
    text = "[Round 0]\n问：你好\n答：你好👋\n[Round 1]\n问：hi\n答：hello\n[Round 2]\n问：再见\n答："
    ids = prompts.build_prompt_ids(tok, "再见", history)
    assert ids == tok.encode(text)
    assert ids[-2:] == [tok.gmask_token_id, tok.bos_token_id]


def test_fit_prompt_drops_the_oldest_rounds(tok):
    history = [("first " * 30, "reply " * 30), ("second", "ok")]
    short = len(prompts.build_prompt_ids(tok, "third", history[1:]))
    ids, kept = prompts.fit_prompt(tok, "third", history, max_input_tokens=short)
    assert kept == history[1:] and len(ids) == short
    with pytest.raises(InputTooLong):
        prompts.fit_prompt(tok, "third", history, max_input_tokens=3)


def test_history_is_query_response_tuples(tok):
    assert prompts.append_history("chatglm1", [("a", "b")], "c", "d") == [("a", "b"), ("c", "d")]


@pytest.mark.parametrize("raw, expected", [
    ("  你好,世界!  ", "你好，世界！"),
    ("时间:[[训练时间]]", "时间：2023年"),
    ("what?好的;ok", "what？好的；ok"),
    ("English, stays: as is; right? yes!", "English, stays: as is; right? yes!"),
    ("数字1,2", "数字1,2"),  # the comma touches digits, not a CJK ideograph
])
def test_v1_post_processing_normalises_punctuation_next_to_cjk(raw, expected):
    assert prompts.process_response("chatglm1", raw) == expected


def test_v2_post_processing_keeps_ascii_punctuation():
    assert prompts.process_response("chatglm2", "你好,世界!") == "你好,世界!"


def test_no_kv_continuation_for_v1(tok):
    with pytest.raises(InputError, match="past_key_values"):
        prompts.build_continuation_ids(tok, "q", [("a", "b")])
