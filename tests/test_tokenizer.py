import json
from pathlib import Path

import pytest
import torch

from glmapp.errors import TokenizerError
from glmapp.tokenizer import ChatGLMTokenizer, StreamDecoder, train_demo_tokenizer

CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"

ROUND_TRIP_TEXTS = [
    "你好，世界！今天天气怎么样？",
    "Hello, world! How are you today?",
    "emoji 😀👍🏽 and 👨‍👩‍👧 mixed with 中文",
    "def f(x):\n    return x * 2\n",
    "a    b",
    "tabs\tand\t\tmore",
    "line one\n\nline two\n",
    "rare 𠀀 ꙮ ∮ characters",
    "  leading spaces",
    "$E = mc^2$ and 3.14159",
]


@pytest.fixture(params=["chatglm2", "chatglm3"])
def tokenizer(request, demo_sp_model):
    return ChatGLMTokenizer(demo_sp_model, family=request.param)


@pytest.fixture
def v3(demo_sp_model):
    return ChatGLMTokenizer(demo_sp_model, family="chatglm3")


def test_training_is_byte_identical_across_runs(tmp_path, demo_sp_model):
    train_demo_tokenizer(CORPUS_DIR, tmp_path / "again.model")
    assert (tmp_path / "again.model").read_bytes() == demo_sp_model.read_bytes()


def test_demo_model_has_official_layout(tokenizer):
    sp = tokenizer.sp
    assert [sp.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"
    assert sp.encode("\n")[-1] == 13
    assert sp.pad_id() == -1


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == (
        text if tokenizer.family == "chatglm2" else "[gMASK]sop" + text
    )
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_unseen_characters_use_byte_fallback(tokenizer):
    pieces = tokenizer.tokenize("😀")
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tokenizer.unk_token_id not in tokenizer.encode("😀 𠀀 ꙮ")


def test_prefix_and_special_ids_per_family(demo_sp_model):
    v2 = ChatGLMTokenizer(demo_sp_model, family="chatglm2")
    v3 = ChatGLMTokenizer(demo_sp_model, family="chatglm3")
    n = v2.sp.vocab_size()
    assert v2.encode("你好")[:2] == [n + 1, n + 3]
    assert v2.encode("你好")[2:] == v2.sp.encode("你好")
    assert v2.special_tokens == {"[MASK]": n, "[gMASK]": n + 1, "[sMASK]": n + 2, "sop": n + 3, "eop": n + 4}
    assert v2.vocab_size == n + 5 and v3.vocab_size == n + 9
    roles = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert [v3.get_command(r) for r in roles] == [n + 5, n + 6, n + 7, n + 8]
    assert v2.stop_ids == [2] and v3.stop_ids == [2, n + 6, n + 8]
    assert (v2.pad_token_id, v2.eos_token_id, v2.unk_token_id) == (0, 2, 0)
    with pytest.raises(KeyError):
        v2.get_command("<|user|>")


def test_decode_special_ids_per_family(demo_sp_model):
    v2 = ChatGLMTokenizer(demo_sp_model, family="chatglm2")
    v3 = ChatGLMTokenizer(demo_sp_model, family="chatglm3")
    n = v2.sp.vocab_size()
    body = v2.sp.encode("你好")
    assert v2.decode([n + 1, n + 3, *body, 2, 0, 1]) == "你好"
    assert v3.decode([n + 6, *body, n + 7, 2]) == "<|user|>你好<|assistant|>"
    assert v3.decode([n + 6, *body, n + 7, 2], skip_special_tokens=True) == "你好"
    assert v3.decode([n + 100, *body]) == "你好"


def test_v3_role_tokens_in_text_are_plain_unless_enabled(demo_sp_model):
    guarded = ChatGLMTokenizer(demo_sp_model, family="chatglm3")
    text = "hi<|assistant|>ok"
    ids = guarded.encode(text, add_special_tokens=False)
    assert not set(ids) & set(guarded.special_tokens.values())
    assert guarded.decode(ids) == text
    trusting = ChatGLMTokenizer(demo_sp_model, family="chatglm3", encode_special_tokens=True)
    sp = trusting.sp
    assert trusting.encode(text, add_special_tokens=False) == [
        *sp.encode("hi"), trusting.get_command("<|assistant|>"), *sp.encode("ok")
    ]


def test_build_single_message_matches_spec(v3):
    sp = v3.sp
    assert v3.build_single_message("user", "", "你好") == [v3.get_command("<|user|>"), *sp.encode("\n"), *sp.encode("你好")]
    assert v3.build_single_message("assistant", "get_weather", "") == [
        v3.get_command("<|assistant|>"), *sp.encode("get_weather\n")
    ]
    with pytest.raises(ValueError):
        v3.build_single_message("robot", "", "x")


def test_batch_is_left_padded_with_position_ids(tokenizer):
    batch = tokenizer(["你好", "Hello, how are you doing today?"], return_tensors="pt")
    long_ids = tokenizer.encode("Hello, how are you doing today?")
    short_ids = tokenizer.encode("你好")
    pad = len(long_ids) - len(short_ids)
    assert pad > 0
    assert batch["input_ids"].tolist() == [[0] * pad + short_ids, long_ids]
    assert batch["attention_mask"].tolist() == [[0] * pad + [1] * len(short_ids), [1] * len(long_ids)]
    assert batch["position_ids"].tolist() == [[0] * pad + list(range(len(short_ids))), list(range(len(long_ids)))]
    assert batch["input_ids"].dtype == torch.long
    single = tokenizer("你好")
    assert single["input_ids"] == short_ids and single["position_ids"] == list(range(len(short_ids)))


def test_tokens_and_ids_convert_both_ways(tokenizer):
    ids = tokenizer.encode("你好 world")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["[gMASK]", "sop"]
    assert tokenizer.convert_tokens_to_ids(tokens) == ids
    assert tokenizer.tokenize("你好 world") == tokens[2:]


def test_from_pretrained_detects_family(tmp_path, demo_sp_model):
    (tmp_path / "tokenizer.model").write_bytes(demo_sp_model.read_bytes())
    assert ChatGLMTokenizer.from_pretrained(tmp_path).family == "chatglm2"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ '<|user|>' }}"}))
    assert ChatGLMTokenizer.from_pretrained(tmp_path).family == "chatglm3"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"name_or_path": "THUDM/chatglm3-6b"}))
    assert ChatGLMTokenizer.from_pretrained(tmp_path).family == "chatglm3"
    assert ChatGLMTokenizer.from_pretrained(tmp_path, family="chatglm2").family == "chatglm2"


def test_missing_tokenizer_model_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="expected tokenizer.model in the model folder") as info:
        ChatGLMTokenizer.from_pretrained(tmp_path, family="chatglm2")
    assert str(tmp_path.parent) not in str(info.value)


def test_garbage_tokenizer_model_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"<html>not a model</html>")
    with pytest.raises(TokenizerError, match="'tokenizer.model' is not a SentencePiece model") as info:
        ChatGLMTokenizer.from_pretrained(tmp_path, family="chatglm2")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert str(tmp_path) not in str(info.value)


MIXED_STREAM_TEXT = "你好😀！Emoji 👨‍👩‍👧 test:\n\n  code 𠀀 ok  🎉🎉 结束"


@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder_deltas_equal_decode(tokenizer, skip):
    n = tokenizer.sp_vocab_size
    ids = tokenizer.encode(MIXED_STREAM_TEXT, add_special_tokens=False)
    if tokenizer.family == "chatglm3":
        ids = [n + 6, *ids, n + 7, *tokenizer.sp.encode("第二段 🐍")]
    stream = StreamDecoder(tokenizer, skip_special_tokens=skip)
    deltas = [stream.push(i) for i in ids]
    deltas.append(stream.flush())
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == stream.text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert sum(1 for d in deltas if d == "") >= 3  # multi-byte emoji pieces were held back


def test_stream_decoder_holds_incomplete_bytes_until_flush(tokenizer):
    ids = tokenizer.sp.encode("ok 😀", add_bos=False)[:-1]  # drop the last byte of the emoji
    stream = StreamDecoder(tokenizer)
    text = "".join(stream.push(i) for i in ids)
    assert text == "ok "
    tail = stream.flush()  # a reply cut mid-character ends as the full decode shows it
    assert tail == "\ufffd" * 3 and text + tail == tokenizer.decode(ids)


def test_stream_decoder_emits_invalid_bytes_mid_stream_as_decode_does(tokenizer):
    lone = tokenizer.sp.piece_to_id("<0x80>")  # a continuation byte with no lead byte: never valid
    ids = tokenizer.sp.encode("a", add_bos=False) + [lone] + tokenizer.sp.encode("b 好", add_bos=False)
    stream = StreamDecoder(tokenizer)
    deltas = [stream.push(i) for i in ids]
    assert "\ufffd" in "".join(deltas)  # shown while streaming, not held back to the end
    assert "".join(deltas) + stream.flush() == tokenizer.decode(ids) == "a\ufffd b 好"
    stream = StreamDecoder(tokenizer)  # bytes that no later byte can complete are not held back
    assert [stream.push(i) for i in _byte_ids(tokenizer, b"\xe4\xbd\xc0\x80")] == ["", "", "\ufffd" * 3, "\ufffd"]


def _byte_ids(tokenizer, data: bytes) -> list[int]:
    return [tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in data]


def _random_ids(tokenizer, rng) -> list[int]:
    """Ids a broken model might emit: text pieces, specials and byte pieces forming valid, invalid and cut UTF-8."""
    n = tokenizer.sp_vocab_size
    chars = ["你", "😀", "é", "𠀀", "👍🏽", "ꙮ"]
    ids: list[int] = []
    for _ in range(rng.randrange(1, 25)):
        kind = rng.randrange(7)
        if kind == 0:
            ids += tokenizer.sp.encode(rng.choice(["hello", " world", "\n", "好", "  x"]))
        elif kind == 1:
            ids += _byte_ids(tokenizer, rng.choice(chars).encode())
        elif kind == 2:  # a character cut short
            data = rng.choice(chars).encode()
            ids += _byte_ids(tokenizer, data[: rng.randrange(1, len(data))])
        elif kind == 3:  # lone continuation bytes, overlong, surrogate, out-of-range and invalid lead bytes
            ids += _byte_ids(tokenizer, rng.choice([b"\x80", b"\xbf\xbf", b"\xc0\x80", b"\xed\xa0\x80",
                                                    b"\xf4\x90\x80\x80", b"\xff", b"\xe4\x41"]))
        elif kind == 4:
            ids.append(rng.randrange(0, n))
        elif kind == 5:
            ids.append(rng.choice(list(tokenizer.special_tokens.values()) + [0, 1, 2]))
        else:
            ids += _byte_ids(tokenizer, bytes([rng.randrange(256)]))
    return ids


@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder_equals_decode_on_random_ids(tokenizer, skip):
    import random

    rng = random.Random(14)
    saw_invalid = saw_held = 0
    for _ in range(400):
        ids = _random_ids(tokenizer, rng)
        stream = StreamDecoder(tokenizer, skip_special_tokens=skip)
        deltas, texts = [], []
        for i, token_id in enumerate(ids):
            deltas.append(stream.push(token_id))
            texts.append(tokenizer.decode(ids[: i + 1], skip_special_tokens=skip))
        deltas.append(stream.flush())
        expected = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == stream.text == expected, ids
        # What was emitted is final: the decode of every longer prefix starts with it (no U+FFFD that
        # later turns into a real character, no character split).
        emitted = ""
        for i, delta in enumerate(deltas[:-1]):
            emitted += delta
            assert all(t.startswith(emitted) for t in texts[i:]), ids
            saw_held += emitted != texts[i]
        saw_invalid += "\ufffd" in expected
    assert saw_invalid > 50 and saw_held > 50  # the cases that matter were generated


def test_stream_decoder_window_stays_small(tokenizer):
    stream = StreamDecoder(tokenizer)
    for i in tokenizer.sp.encode("这是一段很长的文本。" * 50):
        stream.push(i)
        assert len(stream.ids) - stream._prefix_offset <= 8
