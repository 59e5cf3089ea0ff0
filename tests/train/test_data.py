"""Training data: the four formats give the chat template's ids and labels; every bad file stops with its line."""

import json

import pytest

from glmapp.cli import main
from glmapp.prompts import build_continuation_ids, build_prompt_ids
from glmapp.tokenizer import ChatGLMTokenizer
from glmapp.train.data import DataError, read_file
from glmapp.train.examples import build_rows

Q1, A1, Q2, A2 = "你好，介绍一下你自己", "我是一个助手。", "What is 2+2?", "It is 4."


@pytest.fixture
def v2(demo_sp_model):
    return ChatGLMTokenizer(demo_sp_model, family="chatglm2")


@pytest.fixture
def v3(demo_sp_model):
    return ChatGLMTokenizer(demo_sp_model, family="chatglm3")


def write(tmp_path, name, records):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


# The same two-round conversation in each format.
SAME_CONVERSATION = {
    "instruction": {"instruction": Q2, "input": "", "output": A2, "history": [[Q1, A1]]},
    "prompt": {"prompt": Q2, "response": A2, "history": [[Q1, A1]]},
    "conversations": {"conversations": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                                        {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]},
    "sharegpt": {"conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
                                   {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]},
}


@pytest.mark.parametrize("fmt", list(SAME_CONVERSATION))
@pytest.mark.parametrize("ext", [".jsonl", ".json"])
def test_each_format_is_detected_and_gives_the_v3_chat_template(tmp_path, v3, fmt, ext):
    path = write(tmp_path, "d" + ext, [SAME_CONVERSATION[fmt]])
    rows, report = build_rows(v3, [str(path)], max_length=1024)
    assert report.files == {path.name: {"format": fmt, "examples": 1}}
    assert len(rows) == 1
    ids, labels = rows[0].input_ids, rows[0].labels
    # The prompt before each reply is exactly what chat sends for that turn.
    p1 = build_prompt_ids(v3, Q1, [])
    r1 = v3.sp_encode("\n") + v3.sp_encode(A1)
    history = [{"role": "user", "content": Q1}, {"role": "assistant", "metadata": "", "content": A1}]
    p2 = build_prompt_ids(v3, Q2, history)
    r2 = v3.sp_encode("\n") + v3.sp_encode(A2)
    assert ids == p2 + r2 + [v3.eos_token_id]
    assert ids[:len(p1)] == p1 and ids[len(p1):len(p1) + len(r1)] == r1
    user = v3.get_command("<|user|>")
    # Labels: the replies, the role token that ends the first reply (a stop id) and eos; nothing else.
    expected = [-100] * len(p1) + r1 + [user] + [-100] * (len(p2) - len(p1) - len(r1) - 1) + r2 + [v3.eos_token_id]
    assert labels == expected


@pytest.mark.parametrize("fmt", list(SAME_CONVERSATION))
def test_each_format_gives_one_v2_row_per_reply_with_the_chat_prompt(tmp_path, v2, fmt):
    path = write(tmp_path, "d.jsonl", [SAME_CONVERSATION[fmt]])
    rows, report = build_rows(v2, [str(path)], max_length=1024)
    assert report.rows == 2
    for row, (query, reply, history) in zip(rows, [(Q1, A1, []), (Q2, A2, [(Q1, A1)])]):
        prompt = build_prompt_ids(v2, query, history)
        answer = v2.encode(reply, add_special_tokens=False) + [v2.eos_token_id]
        assert row.input_ids == prompt + answer
        assert row.labels == [-100] * len(prompt) + answer
    assert build_continuation_ids(v2, Q2, [(Q1, A1)])  # the template the prompt comes from exists for v2 too


def test_v3_system_tools_observation_and_loss_false(tmp_path, v3):
    tools = [{"name": "weather", "parameters": {"city": {"type": "string"}}}]
    record = {"tools": tools, "conversations": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "北京天气"},
        {"role": "assistant", "metadata": "weather", "content": "tool_call(city='北京')"},
        {"role": "tool", "content": "{\"temp\": 20}"},
        {"role": "assistant", "content": "20度。", "loss": False},
        {"role": "user", "content": "谢谢"},
        {"role": "assistant", "content": "不客气"}]}
    rows, _ = build_rows(v3, [str(write(tmp_path, "t.jsonl", [record]))], max_length=2048)
    ids, labels = rows[0].input_ids, rows[0].labels
    system = {"role": "system", "content": "You are helpful.", "tools": tools}
    call = {"role": "assistant", "metadata": "weather", "content": "tool_call(city='北京')"}
    obs = {"role": "observation", "content": "{\"temp\": 20}"}
    untrained = {"role": "assistant", "metadata": "", "content": "20度。"}
    p_obs = build_prompt_ids(v3, obs["content"], [system, {"role": "user", "content": "北京天气"}, call],
                             role="observation")
    assert ids[:len(p_obs)] == p_obs  # the observation turn is encoded as chat encodes it
    trained = [(i, t) for i, t in zip(ids, labels) if t != -100]
    assert all(i == t for i, t in trained)
    text = v3.decode([t for _, t in trained])
    assert "tool_call" in text and "不客气" in text and "20度" not in text
    p_last = build_prompt_ids(v3, "谢谢", [system, {"role": "user", "content": "北京天气"}, call, obs, untrained])
    assert ids[:len(p_last)] == p_last


def test_report_counts_duplicates_empty_replies_overlength_and_chinese(tmp_path, v2):
    records = [{"prompt": "你好", "response": "你好呀"}, {"prompt": "你好", "response": "你好呀"},
               {"prompt": "empty", "response": "  "}, {"prompt": "long " * 200, "response": "x"},
               {"prompt": "q", "response": "a " * 300}]
    path = write(tmp_path, "d.jsonl", records)
    rows, report = build_rows(v2, [str(path)], max_length=64, overlength="truncate")
    assert (report.examples, report.duplicates_removed, report.empty_replies_dropped) == (5, 1, 1)
    # over length: the long prompt has nothing left to train and is dropped; the long reply is cut to 64
    assert report.over_length == 2 and report.dropped_over_length == 1 and report.rows == 2
    assert max(len(r.input_ids) for r in rows) == 64
    assert report.length_percentiles["max"] > 64
    assert 0 < report.chinese_share < 0.2
    _, dropped = build_rows(v2, [str(path)], max_length=64, overlength="drop")
    assert dropped.rows == 1 and dropped.dropped_over_length == 2
    assert any("Detected format: d.jsonl: prompt" in line for line in report.lines())


BAD_FILES = [
    ("empty.jsonl", "", "empty", None),
    ("bad.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": }\n', "invalid JSON", 2),
    ("bad.json", '[\n {"prompt": "a", "response": "b"},\n {"prompt": "a" "response": "b"}\n]', "invalid JSON", 3),
    ("missing.jsonl", '{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n', "missing field 'response'", 3),
    ("missing.json", '[\n {"prompt": "a", "response": "b"},\n {"prompt": "a"}\n]', "missing field 'response'", 3),
    ("type.jsonl", '{"instruction": "a", "output": 5}\n', "must be a string, found int", 1),
    ("role.jsonl", '{"conversations": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n',
     "unknown role 'bot'", 1),
    ("speaker.json", '[{"conversations": [{"from": "alien", "value": "a"}]}]', "unknown speaker 'alien'", 1),
    ("unknown.jsonl", '{"question": "a", "answer": "b"}\n', "unknown example format", 1),
    ("long.jsonl", '{"prompt": "' + "word " * 400 + '", "response": "b"}\n', "every example is over", None),
]


@pytest.mark.parametrize("name, text, message, line", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_data_stops_with_file_line_and_reason_and_writes_nothing(tmp_path, demo_v2, capsys, name, text,
                                                                      message, line):
    data = tmp_path / name
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "adapters" / "run"
    code = main(["train", "--model", str(demo_v2), "--data", str(data), "--out", str(out), "--max-length", "256"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and name in err
    if line is not None:
        assert f"line {line}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "adapters").exists()


def test_chatglm2_refuses_roles_it_does_not_have(tmp_path):
    path = write(tmp_path, "s.jsonl", [{"prompt": "q", "response": "a", "system": "be nice"}])
    with pytest.raises(DataError, match=r"s.jsonl line 1: chatglm2 models take alternating user/assistant"):
        read_file(path, "chatglm2")
    assert read_file(path, "chatglm3")[0] == "prompt"
