"""`chat()` / `stream_chat()` with the official signatures, running on the engine.

Notable choices:
- The prompt is always the official full encoding of history + query; the engine's prefix cache
  reuses the KV of the previous call for the longest common token prefix, so a next turn prefills
  only what is new and the result is identical to a fresh run.
- Passing `past_key_values` (as the official demos do) switches to the official continuation
  encoding: only the new round is encoded and appended after the previous call's tokens.
- One engine per model serves every caller; concurrent `stream_chat` calls are batched together.
"""

from __future__ import annotations

from dataclasses import dataclass, field


from glmapp import prompts
from glmapp.engine.sampling import SamplingParams
from glmapp.errors import InputError, InputTooLong
from glmapp.models.chatglm import ChatGLMForConditionalGeneration
from glmapp.models.chatglm1 import ChatGLM1Config, ChatGLM1ForConditionalGeneration


@dataclass
class ConversationCache:
    """What `return_past_key_values=True` returns: the exact tokens of the conversation so far.

    Their keys/values live in the engine's prefix cache; passing this back continues after them.
    """

    ids: list[int] = field(default_factory=list)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0  # submit -> last token
    first_token_seconds: float = 0.0  # submit -> first token (prefill)
    finish_reason: str = ""

    @property
    def decode_tokens_per_second(self) -> float:
        span = self.seconds - self.first_token_seconds
        return (self.new_tokens - 1) / span if self.new_tokens > 1 and span > 0 else 0.0


class ChatModel(ChatGLMForConditionalGeneration):
    """ChatGLM with the official `chat` / `stream_chat` API (what `glmapp.load` returns)."""

    engine_config = None  # an EngineConfig for the engine created on first use (None: defaults)

    def backend(self, tokenizer):
        """The LocalBackend on the one host (and engine) serving this model, started on first use."""
        from glmapp.backends import LocalBackend

        self.__dict__.setdefault("last_stats", GenerationStats())
        return LocalBackend.for_model(self, tokenizer, self.engine_config)

    def stream_chat(self, tokenizer, query: str, history=None, past_key_values=None, max_length: int = 8192,
                    do_sample: bool = True, top_p: float = 0.8, temperature: float = 0.8,
                    repetition_penalty: float = 1.0, top_k: int = 0, max_new_tokens: int | None = None,
                    seed: int | None = None, system: str | None = None, return_past_key_values: bool = False,
                    adapter: str | None = None, **kwargs):
        """Yield (response, history) after each new token, as the official stream_chat does.

        `max_length` counts prompt + reply and is capped by the model's `seq_length`. If the prompt does
        not fit, the oldest rounds of history are dropped; if the query alone does not fit,
        `InputTooLong` says the limit. `adapter` names a loaded LoRA adapter (None: the base model).
        """
        backend = self.backend(tokenizer)
        history = list(history or [])
        params = SamplingParams(temperature=temperature if do_sample else 0.0, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, seed=seed)
        limit = min(int(max_length), int(self.config.seq_length))
        if limit < 2:
            raise InputError(f"max_length must be at least 2 (got {max_length}).")
        if past_key_values is not None:
            if not isinstance(past_key_values, ConversationCache):
                raise InputError("past_key_values must be the value returned by stream_chat(..., "
                                 "return_past_key_values=True).")
            query = prompts.normalize_text(query if isinstance(query, str) else "")
            if not query.strip():
                raise InputError("Empty message: type something to send.")
            prompt_ids = past_key_values.ids + prompts.build_continuation_ids(tokenizer, query, history)
            if len(prompt_ids) >= limit:
                raise InputTooLong(f"The conversation has {len(prompt_ids)} tokens; the limit is "
                                   f"{limit - 1} prompt tokens (max_length {limit}). Start a new chat.")
        else:
            prompt_ids, history, query = backend.prepare_chat(query, history, system, limit)
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.__dict__["last_stats"] = stats
        updates = backend.stream_prompt(prompt_ids, history, query, max_length=limit,
                                        max_new_tokens=max_new_tokens, params=params, adapter=adapter)
        try:
            yield from self._official(updates, prompt_ids, stats, return_past_key_values)
        finally:
            updates.close()  # a caller that stops iterating cancels the request at once

    @staticmethod
    def _official(updates, prompt_ids, stats, with_past):
        """ChatUpdates -> the official (response, history[, past]) yields, with stats kept current. The end is
        always yielded unless the text shown last is already final (an empty reply too: `chat()` returns "")."""
        response, output, shown = "", [], False
        for update in updates:
            output.extend(update.token_ids)
            if update.usage is not None:
                u = update.usage
                stats.reused_tokens, stats.new_tokens, stats.seconds = u.cached_tokens, u.completion_tokens, u.seconds
                stats.first_token_seconds = u.first_token_seconds
                stats.prefilled_tokens = u.prompt_tokens - u.cached_tokens
            if update.error:
                raise InputError(update.error)
            if update.finish_reason is not None:
                stats.finish_reason = update.finish_reason
                if shown and update.response == response:
                    continue  # the last yield already showed the final text
            elif not update.new_text:
                continue  # a token that completes no character yet (official: no yield)
            response, shown = update.response, True
            past = ConversationCache(prompt_ids + output)
            yield (response, update.history, past) if with_past else (response, update.history)

    def chat(self, tokenizer, query: str, history=None, **kwargs):
        """Blocking chat: returns (response, history + this round), like the official `chat`."""
        kwargs.pop("return_past_key_values", None)
        result = None
        for result in self.stream_chat(tokenizer, query, history, **kwargs):
            pass
        return result


class ChatModel1(ChatGLM1ForConditionalGeneration):
    """ChatGLM-6B (v1) with the official v1 `chat` / `stream_chat` signatures and defaults (spec §6): max_length
    2048, top_p 0.7, temperature 0.95; no past_key_values. Generation is ChatModel's (one engine per model)."""

    engine_config = None
    backend = ChatModel.backend
    _official = staticmethod(ChatModel._official)

    def stream_chat(self, tokenizer, query: str, history=None, max_length: int = 2048, do_sample: bool = True,
                    top_p: float = 0.7, temperature: float = 0.95, logits_processor=None, **kwargs):
        """Yield (response, history) after each new token, as the official v1 stream_chat does."""
        if logits_processor is not None:
            raise InputError("logits_processor is not supported; use temperature, top_p, top_k and "
                             "repetition_penalty.")
        yield from ChatModel.stream_chat(self, tokenizer, query, history, max_length=max_length, do_sample=do_sample,
                                         top_p=top_p, temperature=temperature, **kwargs)

    def chat(self, tokenizer, query: str, history=None, max_length: int = 2048, num_beams: int = 1,
             do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95, logits_processor=None, **kwargs):
        """Blocking chat: returns (response, history + [(query, response)]), like the official v1 `chat`."""
        if num_beams != 1:
            raise InputError(f"num_beams={num_beams} is not supported: glmapp samples or decodes greedily "
                             "(num_beams=1).")
        result = None
        for result in self.stream_chat(tokenizer, query, history, max_length=max_length, do_sample=do_sample,
                                       top_p=top_p, temperature=temperature, logits_processor=logits_processor,
                                       **kwargs):
            pass
        return result


# glmapp.checkpoint.load_model builds the class of the checkpoint's family from the class it is asked for.
ChatModel.family_classes = {"chatglm1": ChatModel1}


def _register_auto_classes() -> None:
    """`AutoConfig` / `AutoModel(ForCausalLM).from_pretrained` on a ChatGLM folder give our classes, no
    remote code. Done here, where the model code is imported, so that `import glmapp` stays light."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from glmapp.models.chatglm import ChatGLMConfig

    AutoConfig.register("chatglm", ChatGLMConfig, exist_ok=True)
    for auto in (AutoModel, AutoModelForCausalLM):
        auto.register(ChatGLMConfig, ChatModel, exist_ok=True)
        auto.register(ChatGLM1Config, ChatModel1, exist_ok=True)  # reached through ChatGLMConfig.from_dict


_register_auto_classes()
