"""v1 (ChatGLM-6B) tokenizer conventions (spec §5.3) on the v1-style demo model trained from assets/corpus."""

import pytest

from glmapp.demo import CORPUS_DIR
from glmapp.errors import TokenizerError
from glmapp.tokenizer import (
    ChatGLM1Tokenizer, ChatGLMTokenizer, StreamDecoder, train_demo_tokenizer, train_demo_tokenizer_v1,
)

TEXTS = [
    "你好",
    "line one\nline two\n\n\nend\n",
    "\tindented\t\ttabs\t",
    "a  b   c" + " " * 80 + "d" + " " * 81 + "e" + " " * 200,
    " leading space and trailing ",
    "混合 Chinese、English 😀🎉 and code:\n```python\ndef f(x):\n    return {'k': [1, 2]}\n```",
    "emoji family 👨‍👩‍👧 and 🇨🇳 flags",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> ChatGLM1Tokenizer:
    folder = tmp_path_factory.mktemp("v1tok")
    train_demo_tokenizer_v1(CORPUS_DIR, folder / "ice_text.model")
    return ChatGLMTokenizer.from_pretrained(folder)  # ice_text.model in the folder -> the v1 tokenizer


def test_from_pretrained_picks_v1_by_its_vocab_file(tok):
    assert isinstance(tok, ChatGLM1Tokenizer) and tok.family == "chatglm1"
    assert tok.sp.piece_to_id("<n>") == 4  # as in the official ice_text.model
    assert tok.pad_token_id == 3


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_whitespace_becomes_its_own_tokens(tok):
    ids = tok.encode("a\tb\nc" + " " * 100 + "d", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert "<|tab|>" in pieces and "<n>" in pieces
    assert "<|blank_80|>" in pieces and "<|blank_20|>" in pieces  # 100 spaces: the longest run first
    assert not any(p.strip("▁") == "" for p in pieces)  # no run of spaces left to SentencePiece


def test_gmask_and_sop_come_after_the_text(tok):
    text_ids = tok.encode("你好", add_special_tokens=False)
    assert tok.encode("你好") == text_ids + [tok.get_command("[gMASK]"), tok.get_command("<sop>")]
    b = tok.encode("答案", add_special_tokens=False)
    assert tok.build_inputs_with_special_tokens(text_ids, b) == [*text_ids, tok.gmask_token_id, tok.bos_token_id,
                                                                *b, tok.eos_token_id]
    assert tok.stop_ids == [tok.get_command("<eop>")]


def test_batch_is_left_padded_with_2d_positions(tok):
    batch = tok(["你好", "line one\nline two"])
    short, long = batch["input_ids"]
    pad = len(long) - len(tok.encode("你好"))
    assert pad > 0 and short[:pad] == [3] * pad and batch["attention_mask"][0][:pad + 1] == [0] * pad + [1]
    positions, blocks = batch["position_ids"][0]
    n = len(tok.encode("你好"))
    # context = text + [gMASK]; <sop> keeps the [gMASK] index, block positions count from 1 there
    assert positions[pad:] == list(range(n - 1)) + [n - 2]
    assert blocks[pad:] == [0] * (n - 1) + [1]


def test_decode_drops_pad_and_special_ids(tok):
    ids = [3, 3, *tok.encode("hi\nthere"), tok.eos_token_id]
    assert tok.decode(ids) == "hi\nthere"


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_joins_to_decode_and_never_splits_a_character(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    dec = StreamDecoder(tok)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_a_v2_model_is_not_taken_for_v1(tmp_path):
    train_demo_tokenizer(CORPUS_DIR, tmp_path / "ice_text.model")
    with pytest.raises(TokenizerError, match="not a ChatGLM-6B tokenizer"):
        ChatGLM1Tokenizer(tmp_path / "ice_text.model")


def test_missing_vocab_file_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="ice_text.model"):
        ChatGLMTokenizer.from_pretrained(tmp_path, family="chatglm1")
