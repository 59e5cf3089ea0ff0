"""Request and response bodies of the OpenAI-compatible API (pydantic models, OpenAI's field names).

Notable choices:
- Fields OpenAI defines but this server does not implement (logprobs, penalties, ...) are named
  in `UNSUPPORTED` and refused with a 400 that names them, instead of being silently ignored; fields
  nobody defines are ignored, as OpenAI-compatible servers do.
- `top_k` and `repetition_penalty` are extensions (vLLM's names); the ranges are SamplingParams' own.
- `tools` (function tools) and `tool_choice` "auto" / "none" are ChatGLM3's tool calls (see `tools.py`); the
  legacy `functions` / `function_call` are not implemented.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# field -> the value that means "not used": anything else gets a 400 naming the field.
UNSUPPORTED = {"functions": None, "function_call": None, "logprobs": (None, False),
               "top_logprobs": None, "logit_bias": None, "response_format": None, "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "echo": (None, False), "suffix": None, "best_of": (None, 1)}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)  # a list once validated
    seed: int | None = Field(None, ge=0, lt=2**62)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 non-empty stop strings")
        return stops

    def unsupported(self) -> str | None:
        """The first field set that this server does not implement, else None."""
        extra = self.model_extra or {}
        for name, unused in UNSUPPORTED.items():
            allowed = unused if isinstance(unused, tuple) else (unused,)
            if name in extra and extra[name] not in allowed:
                return name
        return None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str = Field(min_length=1)
    arguments: str  # a JSON object, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only on an assistant message with tool_calls
    tool_calls: list[ToolCall] | None = None  # assistant messages only
    tool_call_id: str | None = None  # tool messages: the call answered (ChatGLM3 matches them by order)
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionTool(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionTool


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["auto", "none"] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def token_limit(self) -> int | None:
        return self.max_tokens


# ---- responses -------------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt: int, completion: int) -> UsageInfo:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "glmapp"
    root: str
    parent: str | None = None
    max_model_len: int | None = None  # the context length, as vLLM lists it (RemoteBackend reads it)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None
