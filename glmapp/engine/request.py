"""Request and stream types shared by the engine and the backends."""

from __future__ import annotations

from dataclasses import dataclass, field

from glmapp.engine.sampling import SamplingParams


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused instead of prefilled
    seconds: float = 0.0  # from submit to the last token
    first_token_seconds: float = 0.0  # from submit to the first new token (queueing + prefill)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Generation speed after the first token (excludes queueing and prefill)."""
        span = self.seconds - self.first_token_seconds
        return (self.completion_tokens - 1) / span if self.completion_tokens > 1 and span > 0 else 0.0


@dataclass
class Delta:
    """One event of a request stream: new text (finalised, never a broken character) and/or the end."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    usage: Usage | None = None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 512
    stop_ids: list[int] | None = None  # None: the tokenizer's family stop ids
    adapter: str | None = None  # LoRA adapter name, None = base model
