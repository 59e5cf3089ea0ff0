"""ChatGLM3 tool calls as OpenAI `tools` / `tool_calls` (spec §6, ChatGLM3's tools_using_demo).

Notable choices:
- The request's tools become ChatGLM3's system turn with `tools` (the function dicts: name, description,
  parameters), whose text is the request's system message, else the official "Answer the following questions
  as best as you can. You have access to the following tools:". `tool_choice: "none"` leaves the tools out.
- An assistant message's `tool_calls` become one assistant turn per call, metadata = the function's name and
  content = the fenced `tool_call(k=v, ...)` the model writes; a `tool` message is an `observation` turn. The
  prompt then ends with the model's `<|assistant|>` as always, so the model answers the observation.
- The model's reply is parsed by the family's own post-processing (`prompts.process_response`, literal values
  only, nothing evaluated): a turn with metadata whose code parses is a tool call (`finish_reason:
  "tool_calls"`, arguments as JSON). While streaming, text is shown only from turns known to be plain (their
  metadata line ended empty), so a call's code never reaches the client as content.
"""

from __future__ import annotations

import json
import uuid

from glmapp import prompts

TOOLS_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
ASSISTANT = "<|assistant|>"


class ToolMessageError(ValueError):
    """A message that cannot be a ChatGLM3 turn: (message, param)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def tool_call_turn(name: str, arguments: str, param: str) -> dict:
    """One OpenAI function call as the assistant turn ChatGLM3 writes for it."""
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        raise ToolMessageError(f"{param} is not valid JSON.", param) from None
    if not isinstance(args, dict):
        raise ToolMessageError(f"{param} must be a JSON object of the function's arguments.", param)
    code = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return {"role": "assistant", "metadata": name, "content": f"```python\ntool_call({code})\n```"}


def system_turn(tools, system: str | None) -> dict:
    return {"role": "system", "content": system or TOOLS_SYSTEM,
            "tools": [t.function.model_dump(exclude_none=True) for t in tools]}


def reply_parts(history, raw: str) -> tuple[str | None, list[dict]]:
    """The model's whole reply -> (text content or None, OpenAI tool_calls). `history` starts with the tools'
    system turn, as the prompt did (process_response parses calls only then). The content is what a stream of
    the same reply shows (`streamed_text`)."""
    calls = []
    for part in raw.split(ASSISTANT):
        response = prompts.process_response("chatglm3", ASSISTANT + part, history)
        if isinstance(response, dict) and "parameters" in response:
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": response["name"],
                                       "arguments": json.dumps(response["parameters"], ensure_ascii=False)}})
    return streamed_text(raw, final=True) or None, calls


def streamed_text(raw: str, final: bool) -> str:
    """The plain text of a reply streamed with tools: its turns before the first one whose metadata line is
    not known to be empty (a tool call, or, until the reply ends, a metadata line still being written)."""
    plain, parts = [], raw.split(ASSISTANT)
    for i, part in enumerate(parts):
        if "\n" not in part:
            if not part.strip() and i < len(parts) - 1:
                continue  # nothing between two role tokens
            if final:
                plain.append(part)
            break
        if part.split("\n", 1)[0].strip():
            break
        plain.append(part)
    response = prompts.process_response("chatglm3", ASSISTANT.join(plain))
    return response if isinstance(response, str) else ""
