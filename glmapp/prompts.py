"""Chat formats for ChatGLM-6B ("chatglm1"), ChatGLM2 ("chatglm2") and ChatGLM3 ("chatglm3"): prompt ids, history,
post-processing.

Notable choices:
- v1/v2 history is a list of (query, response) tuples; v3 history is a list of {role, content[, metadata][, tools]}
  dicts (spec §6). Functions return new lists and never mutate the caller's history.
- `fit_prompt` drops the oldest rounds (keeping a v3 system message) until the prompt fits, else `InputTooLong`.
- v3 tool calls are parsed with `ast` (literal values only); nothing from the model is ever evaluated.
- KV-cache continuation: v2 follows the official encoding; v3 does not re-insert `[gMASK] sop` mid-stream
  (see `build_continuation_ids`).
"""

from __future__ import annotations

import ast
import json
import re
import unicodedata

from glmapp.errors import InputError, InputTooLong

TRAINING_TIME_PLACEHOLDER = "[[训练时间]]"
TRAINING_TIME_VALUE = "2023年"
_KEEP_FORMAT_CHARS = {"\u200c", "\u200d"}  # ZWNJ/ZWJ: needed by emoji sequences and some scripts


def normalize_text(s: str) -> str:
    """Clean user input: unify newlines and odd spaces, drop control/format chars and lone surrogates."""
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\u3000", " ").replace("\xa0", " ")
    out = []
    for ch in s:
        if ch in "\n\t" or ch in _KEEP_FORMAT_CHARS:
            out.append(ch)
        elif unicodedata.category(ch) not in ("Cc", "Cf", "Cs"):
            out.append(ch)
    return "".join(out)


# ---- prompt ids -------------------------------------------------------------------------------------
def _v2_round_text(i: int, query: str, response: str | None = None) -> str:
    if response is None:
        return f"[Round {i}]\n\n问：{query}\n\n答："
    return f"[Round {i}]\n\n问：{query}\n\n答：{response}\n\n"


def _v1_prompt_text(query: str, history) -> str:
    """Spec §6 / §10.11: no history -> the bare query; else rounds numbered from 0 with single newlines."""
    if not history:
        return query
    text = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return text + f"[Round {len(history)}]\n问：{query}\n答："


def _v3_message_ids(tokenizer, message: dict) -> list[int]:
    content = message.get("content", "")
    if message["role"] == "system" and message.get("tools"):
        content = content + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
    return tokenizer.build_single_message(message["role"], message.get("metadata", ""), content)


def _with_system(history: list, system: str | None) -> list:
    if system and not (history and history[0].get("role") == "system"):
        return [{"role": "system", "content": system}, *history]
    return list(history)


def build_prompt_ids(tokenizer, query: str, history, system: str | None = None, role: str = "user") -> list[int]:
    """Ids of the whole prompt for `query` after `history`, ending where the model starts answering."""
    if tokenizer.family == "chatglm1":
        return tokenizer.encode(_v1_prompt_text(query, history))  # [gMASK] <sop> appended
    if tokenizer.family == "chatglm2":
        text = "".join(_v2_round_text(i, q, r) for i, (q, r) in enumerate(history, start=1))
        return tokenizer.encode(text + _v2_round_text(len(history) + 1, query))
    ids = list(tokenizer.prefix_ids)
    for message in _with_system(history, system):
        ids += _v3_message_ids(tokenizer, message)
    ids += tokenizer.build_single_message(role, "", query)
    return ids + [tokenizer.get_command("<|assistant|>")]


def build_continuation_ids(tokenizer, query: str, history, role: str = "user") -> list[int]:
    """Ids of a new turn appended to a KV cache holding the previous prompt + response (no stop token)."""
    if tokenizer.family == "chatglm1":
        # v1 has no KV continuation: [gMASK] <sop> close every prompt and the context attends both ways.
        raise InputError("ChatGLM-6B (v1) has no past_key_values continuation; pass the history instead.")
    if not history:
        return build_prompt_ids(tokenizer, query, history, role=role)
    if tokenizer.family == "chatglm2":
        text = "\n\n" + _v2_round_text(len(history) + 1, query)
        # Spec §6 "v2 KV reuse": the dummy "▁" SentencePiece adds at the start is dropped.
        return tokenizer.encode(text, add_special_tokens=False)[1:]
    # The official v3 stream_chat re-encodes the new turn with build_chat_input, which puts `[gMASK] sop` in the
    # middle of the cached sequence (spec §6, §10.12). A full re-encode of the same conversation has the prefix
    # only once, so we leave it out: cached and uncached turns then see identical ids.
    return tokenizer.build_single_message(role, "", query) + [tokenizer.get_command("<|assistant|>")]


# ---- history ----------------------------------------------------------------------------------------
def history_rounds(family: str, history) -> tuple[list, list[list]]:
    """Split history into (kept head, rounds): v1/v2 rounds are tuples; v3 rounds start at each user message."""
    if family in ("chatglm1", "chatglm2"):
        return [], [[turn] for turn in history]
    head, rounds = [], []
    for message in history:
        if message.get("role") == "system" and not rounds:
            head.append(message)
        elif message.get("role") == "user" or not rounds:
            rounds.append([message])
        else:
            rounds[-1].append(message)
    return head, rounds


def fit_prompt(tokenizer, query: str, history, system: str | None = None,
               max_input_tokens: int = 8192, role: str = "user") -> tuple[list[int], list]:
    """Prompt ids and the history actually used, dropping the oldest rounds until the prompt fits."""
    query = normalize_text(query)
    if not query.strip():
        raise InputError("Empty message: type something to send.")
    head, rounds = history_rounds(tokenizer.family, history)
    if tokenizer.family == "chatglm3":
        head = _with_system(head, system)
    for start in range(len(rounds) + 1):
        kept = head + [turn for r in rounds[start:] for turn in r]
        ids = build_prompt_ids(tokenizer, query, kept, role=role)
        if len(ids) <= max_input_tokens:
            return ids, kept
    raise InputTooLong(
        f"Message too long: the prompt is {len(ids)} tokens even with no earlier turns, over the limit of "
        f"{max_input_tokens} tokens. Shorten the message or raise max_length."
    )


def append_history(family: str, history, query: str, response, raw: str | None = None, role: str = "user") -> list:
    """A new history with this turn added; `raw` (decoded v3 output) keeps tool-call text exact when given."""
    if family in ("chatglm1", "chatglm2"):
        return [*history, (query, response)]
    new = [*history, {"role": role, "content": query}]
    if raw is not None:
        for metadata, content in _v3_segments(raw):
            if not metadata.strip():
                content = _clean_v2_text(content)
            new.append({"role": "assistant", "metadata": metadata, "content": content})
    elif isinstance(response, dict) and "parameters" in response:
        args = ", ".join(f"{k}={v!r}" for k, v in response["parameters"].items())
        content = f"```python\ntool_call({args})\n```"
        new.append({"role": "assistant", "metadata": response["name"], "content": content})
    elif isinstance(response, dict):
        new.append({"role": "assistant", "metadata": response["name"], "content": response["content"]})
    else:
        new.append({"role": "assistant", "metadata": "", "content": response})
    return new


# ---- post-processing --------------------------------------------------------------------------------
def _clean_v2_text(text: str) -> str:
    return text.strip().replace(TRAINING_TIME_PLACEHOLDER, TRAINING_TIME_VALUE)


_V1_PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))


def _clean_v1_text(text: str) -> str:
    """v2 cleaning, then ASCII , ! : ; ? next to a CJK ideograph (either side) become full-width (spec §6);
    the substitutions run in the official order, each over the whole text."""
    text = _clean_v2_text(text)
    for ascii_mark, full_width in _V1_PUNCTUATION:
        text = re.sub(r"([\u4e00-\u9fff])%s" % ascii_mark, r"\1%s" % full_width, text)
        text = re.sub(r"%s([\u4e00-\u9fff])" % ascii_mark, r"%s\1" % full_width, text)
    return text


def _v3_segments(text: str) -> list[tuple[str, str]]:
    segments = []
    for part in text.split("<|assistant|>"):
        if not part.strip():
            continue
        # No newline means the model never wrote a metadata line: all of it is plain content.
        metadata, content = part.split("\n", 1) if "\n" in part else ("", part)
        segments.append((metadata.strip(), content))
    return segments


def parse_tool_call(code: str) -> dict | None:
    """Keyword arguments of a `tool_call(k=v, ...)` expression with literal values, else None."""
    try:
        node = ast.parse(code.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tool_call"):
        return None
    if node.args or any(kw.arg is None for kw in node.keywords):
        return None
    try:
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _strip_code_fence(content: str) -> str:
    lines = content.strip().split("\n")
    if lines and lines[0].lstrip().startswith("```"):
        lines = lines[1:]
    if lines and lines[-1].strip().startswith("```"):
        lines = lines[:-1]
    return "\n".join(lines)


def _has_tools(history) -> bool:
    return bool(history) and history[0].get("role") == "system" and bool(history[0].get("tools"))


def process_response(family: str, text: str, history=None):
    """Final reply from decoded text: a string, or for v3 tool/metadata turns a dict (spec §6)."""
    if family == "chatglm1":
        return _clean_v1_text(text)
    if family == "chatglm2":
        return _clean_v2_text(text)
    response: str | dict = ""
    for metadata, content in _v3_segments(text):
        if not metadata:
            response = _clean_v2_text(content)
            continue
        parameters = parse_tool_call(_strip_code_fence(content)) if _has_tools(history) else None
        if parameters is not None:
            response = {"name": metadata, "parameters": parameters}
        else:
            # Unparseable tool calls fall back to the metadata form instead of raising mid-chat.
            response = {"name": metadata, "content": content}
    return response


# ---- training examples ------------------------------------------------------------------------------
def build_training_rows(tokenizer, messages: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) rows for one conversation, built with the same code as the chat prompts above.

    `messages`: {role, content[, metadata][, tools][, loss]} dicts; `loss: False` leaves an assistant turn
    untrained. Labels are -100 everywhere except over trained assistant replies and the token that ends each:
    - chatglm3: one row, the messages encoded one by one (so the prompt before every reply equals
      `build_prompt_ids` of that turn); the token after a reply is the next role token (a stop id) or eos.
    - chatglm2: the prompt is the full encoding of the text so far, so an earlier reply inside a later prompt
      is not tokenised as it was generated; each trained reply gets its own row: `build_prompt_ids` of its turn
      + reply + eos.
    - chatglm1: as chatglm2 with v1's prompt, which ends `[gMASK] <sop>`; as in the official v1 P-tuning
      layout the labels start at `<sop>` (the model learns to open its reply) and end with `<eop>` (eos).
    """
    eos = tokenizer.eos_token_id
    if tokenizer.family == "chatglm1":
        rows, history = [], []
        for query, reply in zip(messages[0::2], messages[1::2]):
            if reply.get("loss", True):
                prompt = build_prompt_ids(tokenizer, query["content"], history)  # ... [gMASK] <sop>
                answer = tokenizer.encode(reply["content"], add_special_tokens=False) + [eos]
                rows.append((prompt + answer, [-100] * (len(prompt) - 1) + prompt[-1:] + answer))
            history.append((query["content"], reply["content"]))
        return rows
    if tokenizer.family == "chatglm2":
        rows, history = [], []
        for query, reply in zip(messages[0::2], messages[1::2]):
            if reply.get("loss", True):
                prompt = build_prompt_ids(tokenizer, query["content"], history)
                answer = tokenizer.encode(reply["content"], add_special_tokens=False) + [eos]
                rows.append((prompt + answer, [-100] * len(prompt) + answer))
            history.append((query["content"], reply["content"]))
        return rows
    ids, labels = list(tokenizer.prefix_ids), [-100] * len(tokenizer.prefix_ids)
    end_pending = False
    for message in messages:
        part = _v3_message_ids(tokenizer, message)
        trained = message["role"] == "assistant" and message.get("loss", True)
        # A message's role token is prompt, except after a trained reply: there it is the token ending it.
        labels.append(part[0] if end_pending else -100)
        labels += part[1:] if trained else [-100] * (len(part) - 1)
        ids += part
        end_pending = trained
    return [(ids + [eos], labels + [eos if end_pending else -100])]
