"""Training data: read .jsonl/.json files, detect their format, turn each record into chat messages.

Notable choices:
- Four formats, detected per file from its first record and then required of every record: `instruction`
  (instruction/input/output[, system, history]), `prompt` (prompt/response[, history], ChatGLM's own
  fine-tuning scripts), `conversations` (role/content turns, ChatGLM3 observation/tool turns, optional
  top-level `tools` and per-turn `"loss": false`) and `sharegpt` (from/value turns).
- Every record becomes one list of {role, content[, metadata][, tools][, loss]} messages: the shape
  `glmapp.prompts.build_training_rows` takes, so there is one template for chat and training.
- Any problem stops the whole read with `DataError`: file name, line number and what is wrong. Nothing is
  written before the data has been read whole.
- A `.json` list is scanned element by element (`JSONDecoder.raw_decode`) to know each record's line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from glmapp.errors import GlmappError

FORMATS = ("instruction", "prompt", "conversations", "sharegpt")
ROLES = ("system", "user", "assistant", "observation")
# ShareGPT speaker names -> roles (the common spellings; "function_call" is an assistant tool call).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "observation",
                  "tool": "observation"}


class DataError(GlmappError):
    """A training data file cannot be used: which file, which line, what is wrong."""


@dataclass
class Record:
    """One example as read: where it came from and its messages."""

    file: str
    line: int
    messages: list[dict]


def _records(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) of each record of a .jsonl or .json (list) file."""
    name = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start}); save the file as UTF-8.") from None
    if not text.strip():
        raise DataError(f"{name}: the file is empty; expected one JSON example per line (.jsonl) or a JSON list.")
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{name} line {i}: invalid JSON ({e.msg} at column {e.colno}).") from None
        return out
    if path.suffix != ".json":
        raise DataError(f"{name}: unknown file type {path.suffix!r}; use .jsonl (one example per line) or .json "
                        f"(a list of examples).")
    decoder, pos, out = json.JSONDecoder(), 0, []

    def line_at(p: int) -> int:
        return text.count("\n", 0, p) + 1

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if text[pos] != "[":
        raise DataError(f"{name} line {line_at(pos)}: a .json file must hold a list of examples ([...]); "
                        f"for one example per line use .jsonl.")
    pos = skip(pos + 1)
    while pos < len(text) and text[pos] != "]":
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}).") from None
        out.append((line_at(pos), value))
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            raise DataError(f"{name} line {line_at(pos)}: invalid JSON (expected ',' or ']' after an example).")
    if pos >= len(text):
        raise DataError(f"{name} line {line_at(pos)}: invalid JSON (the list is not closed with ']').")
    if text[skip(pos + 1):].strip():
        raise DataError(f"{name} line {line_at(skip(pos + 1))}: invalid JSON (text after the closing ']').")
    return out


def detect_format(value: object) -> str | None:
    """The format a record is written in, or None."""
    if not isinstance(value, dict):
        return None
    if "conversations" in value:
        turns = value["conversations"]
        first = turns[0] if isinstance(turns, list) and turns else None
        return "sharegpt" if isinstance(first, dict) and "from" in first else "conversations"
    if "instruction" in value:
        return "instruction"
    if "prompt" in value:
        return "prompt"
    return None


def _str(where: str, value: dict, key: str, required: bool = True) -> str:
    if key not in value or value[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}.")
        return ""
    if not isinstance(value[key], str):
        raise DataError(f"{where}: field {key!r} must be a string, found {type(value[key]).__name__}.")
    return value[key]


def _history(where: str, value: dict) -> list[dict]:
    history = value.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field 'history' must be a list of [question, answer] pairs.")
    out = []
    for j, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: history[{j}] must be a [question, answer] pair of strings.")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return out


def _turns(where: str, value: dict, fmt: str) -> list[dict]:
    turns = value.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of turns.")
    role_key, text_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    messages = []
    for j, turn in enumerate(turns):
        at = f"{where}: conversations[{j}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object with {role_key!r} and {text_key!r}.")
        role = _str(at, turn, role_key)
        if fmt == "sharegpt":
            if role not in SHAREGPT_ROLES:
                raise DataError(f"{at}: unknown speaker {role!r}; use one of {', '.join(SHAREGPT_ROLES)}.")
            role = SHAREGPT_ROLES[role]
        elif role == "tool":
            role = "observation"  # ChatGLM3's tool-result turn goes by both names
        elif role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r}; use one of {', '.join(ROLES)} (or tool).")
        message = {"role": role, "content": _str(at, turn, text_key)}
        if turn.get("metadata") is not None:
            message["metadata"] = _str(at, turn, "metadata")
        if "loss" in turn:
            if not isinstance(turn["loss"], bool):
                raise DataError(f"{at}: field 'loss' must be true or false.")
            message["loss"] = turn["loss"]
        messages.append(message)
    tools = value.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise DataError(f"{where}: field 'tools' must be a list of tool descriptions.")
        if messages[0]["role"] == "system":
            messages[0]["tools"] = tools
        else:
            messages.insert(0, {"role": "system", "content": "", "tools": tools})
    return messages


def to_messages(where: str, value: object, fmt: str) -> list[dict]:
    """The chat messages of one record written in `fmt`."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(value).__name__}.")
    if fmt in ("conversations", "sharegpt"):
        return _turns(where, value, fmt)
    if fmt == "instruction":
        query = _str(where, value, "instruction")
        extra = _str(where, value, "input", required=False)
        query = f"{query}\n{extra}" if extra else query
        reply = _str(where, value, "output")
    else:
        query, reply = _str(where, value, "prompt"), _str(where, value, "response")
    system = _str(where, value, "system", required=False)
    head = [{"role": "system", "content": system}] if system else []
    return head + _history(where, value) + [{"role": "user", "content": query},
                                            {"role": "assistant", "content": reply}]


def check_family(where: str, messages: list[dict], family: str) -> None:
    """chatglm2 knows only alternating question/answer rounds."""
    if family != "chatglm2":
        return
    roles = [m["role"] for m in messages]
    if any(r not in ("user", "assistant") for r in roles) or roles != ["user", "assistant"] * (len(roles) // 2):
        raise DataError(f"{where}: chatglm2 models take alternating user/assistant turns only (no system, "
                        f"observation or tools; found {' '.join(roles)}); use a chatglm3 model for these.")


def read_file(path: str | Path, family: str) -> tuple[str, list[Record]]:
    """(detected format, records) of one data file; raises DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file {str(path)!r} not found.")
    raw = _records(path)
    if not raw:
        raise DataError(f"{path.name}: the file holds no examples.")
    fmt = detect_format(raw[0][1])
    if fmt is None:
        raise DataError(f"{path.name} line {raw[0][0]}: unknown example format; expected one of: "
                        "{instruction, input, output}, {prompt, response}, {conversations: [{role, content}]}, "
                        "{conversations: [{from, value}]}.")
    records = []
    for line, value in raw:
        where = f"{path.name} line {line}"
        messages = to_messages(where, value, fmt)
        check_family(where, messages, family)
        records.append(Record(path.name, line, messages))
    return fmt, records
