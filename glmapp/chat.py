"""`chat()` / `stream_chat()` with the official signatures, on our model and KV cache.

Notable choices:
- The prompt is always the official full encoding of history + query; the KV cache of the previous
  call is reused for the longest common token prefix, so a next turn prefills only what is new
  and the result is identical to a fresh run.
- Passing `past_key_values` (as the official demos do) switches to the official continuation
  encoding: only the new round is encoded and appended after the cached tokens.
- Text is streamed through `StreamDecoder`, so no yield ends in a broken multi-byte character.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from glmapp import prompts
from glmapp.engine.kv_cache import DenseKVCache
from glmapp.engine.sampling import SamplingParams, sample
from glmapp.errors import InputError, InputTooLong
from glmapp.models.chatglm import ChatGLMForConditionalGeneration
from glmapp.tokenizer import StreamDecoder

PREFILL_CHUNK = 512


@dataclass
class ConversationCache:
    """KV state of one conversation: `ids` are exactly the tokens whose keys/values are cached."""

    kv: DenseKVCache
    ids: list[int] = field(default_factory=list)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _cache_for(model, conv: ConversationCache | None, prompt_ids: list[int], capacity: int) -> tuple[ConversationCache, int]:
    """Reuse `conv` for the common prefix with `prompt_ids`, growing the buffer if needed."""
    if conv is None:
        return ConversationCache(DenseKVCache.for_model(model, 1, capacity)), 0
    # At least the last prompt token must be run to get logits for the first new token.
    reuse = min(_common_prefix(conv.ids, prompt_ids), len(prompt_ids) - 1)
    conv.kv.truncate(reuse)
    conv.ids = conv.ids[:reuse]
    if conv.kv.capacity < capacity:
        bigger = DenseKVCache.for_model(model, 1, capacity)
        bigger.k[:, :, :reuse] = conv.kv.k[:, :, :reuse]
        bigger.v[:, :, :reuse] = conv.kv.v[:, :, :reuse]
        bigger.length = reuse
        conv.kv = bigger
    return conv, reuse


@torch.inference_mode()
def generate_tokens(model, conv: ConversationCache, prompt_ids, params: SamplingParams, stop_ids,
                    max_new_tokens: int, stats: GenerationStats):
    """Prefill what is not cached, then decode one token at a time; yields each new id (stop excluded)."""
    device = model.transformer.output_layer.weight.device
    vocab = model.config.padded_vocab_size
    start = conv.kv.length
    t0 = time.perf_counter()
    logits = None
    for s in range(start, len(prompt_ids), PREFILL_CHUNK):
        chunk = prompt_ids[s:s + PREFILL_CHUNK]
        ids = torch.tensor([chunk], device=device)
        pos = torch.arange(s, s + len(chunk), device=device)[None]
        logits = model.forward_cached(ids, pos, conv.kv)
        conv.kv.commit(len(chunk))
        conv.ids.extend(chunk)
    stats.prefilled_tokens = len(prompt_ids) - start
    stats.prefill_seconds = time.perf_counter() - t0
    seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
    seen[0, torch.tensor(prompt_ids, device=device)] = True
    one = lambda v, dt: torch.tensor([v], dtype=dt, device=device)  # noqa: E731
    temp, top_p = one(params.temperature, torch.float32), one(params.top_p, torch.float32)
    top_k, penalty = one(params.top_k, torch.int64), one(params.repetition_penalty, torch.float32)
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    seeds = one(seed, torch.int64)
    stop = set(stop_ids)
    t1 = time.perf_counter()
    stats.finish_reason = "length"
    for step in range(max_new_tokens):
        token = sample(logits, temp, top_p, top_k, penalty, seen, seeds, one(step, torch.int64))
        tid = int(token.item())
        if tid in stop:
            stats.finish_reason = "stop"
            break
        stats.new_tokens += 1
        stats.decode_seconds = time.perf_counter() - t1
        yield tid
        if step + 1 == max_new_tokens:
            break
        seen[0, tid] = True
        pos = torch.tensor([[conv.kv.length]], device=device)
        logits = model.forward_cached(token[:, None], pos, conv.kv)
        conv.kv.commit(1)
        conv.ids.append(tid)
    stats.decode_seconds = time.perf_counter() - t1


class ChatModel(ChatGLMForConditionalGeneration):
    """ChatGLM with the official `chat` / `stream_chat` API (what `glmapp.load` returns)."""

    def _chat_state(self):
        if not hasattr(self, "_glmapp_lock"):
            self._glmapp_lock = threading.Lock()
            self._glmapp_conv = None
            self.last_stats = GenerationStats()
        return self._glmapp_lock

    @torch.inference_mode()
    def stream_chat(self, tokenizer, query: str, history=None, past_key_values=None, max_length: int = 8192,
                    do_sample: bool = True, top_p: float = 0.8, temperature: float = 0.8,
                    repetition_penalty: float = 1.0, top_k: int = 0, max_new_tokens: int | None = None,
                    seed: int | None = None, system: str | None = None, return_past_key_values: bool = False,
                    **kwargs):
        """Yield (response, history) after each new token, as the official stream_chat does.

        `max_length` counts prompt + reply and is capped by the model's `seq_length`. If the prompt does
        not fit, the oldest rounds of history are dropped; if the query alone does not fit,
        `InputTooLong` says the limit.
        """
        lock = self._chat_state()
        family = tokenizer.family
        history = list(history or [])
        query = prompts.normalize_text(query if isinstance(query, str) else "")
        if not query.strip():
            raise InputError("Empty message: type something to send.")
        params = SamplingParams(temperature=temperature if do_sample else 0.0, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, seed=seed)
        limit = min(int(max_length), int(self.config.seq_length))
        if limit < 2:
            raise InputError(f"max_length must be at least 2 (got {max_length}).")
        with lock:
            if past_key_values is not None:
                if not isinstance(past_key_values, ConversationCache):
                    raise InputError("past_key_values must be the value returned by stream_chat(..., "
                                     "return_past_key_values=True).")
                new_ids = prompts.build_continuation_ids(tokenizer, query, history)
                prompt_ids = past_key_values.ids + new_ids
                if len(prompt_ids) >= limit:
                    raise InputTooLong(f"The conversation has {len(prompt_ids)} tokens; the limit is "
                                       f"{limit - 1} prompt tokens (max_length {limit}). Start a new chat.")
                conv, reuse = _cache_for(self, past_key_values, prompt_ids, limit)
            else:
                prompt_ids, history = prompts.fit_prompt(tokenizer, query, history, system, limit - 1)
                conv, reuse = _cache_for(self, self._glmapp_conv, prompt_ids, limit)
                self._glmapp_conv = conv
            budget = limit - len(prompt_ids)
            if max_new_tokens is not None:
                budget = min(budget, int(max_new_tokens))
            stats = GenerationStats(prompt_tokens=len(prompt_ids), reused_tokens=reuse)
            self.last_stats = stats
            decoder = StreamDecoder(tokenizer)
            response = ""
            for tid in generate_tokens(self, conv, prompt_ids, params, tokenizer.stop_ids, budget, stats):
                if decoder.push(tid):
                    response = prompts.process_response(family, decoder.text, history)
                    yield self._result(family, history, query, response, conv, return_past_key_values)
            decoder.flush()
            final = prompts.process_response(family, decoder.text, history)
            if final != response or stats.new_tokens == 0:
                yield self._result(family, history, query, final, conv, return_past_key_values)

    @staticmethod
    def _result(family, history, query, response, conv, with_past):
        new_history = prompts.append_history(family, history, query, response)
        return (response, new_history, conv) if with_past else (response, new_history)

    def chat(self, tokenizer, query: str, history=None, **kwargs):
        """Blocking chat: returns (response, history + this round), like the official `chat`."""
        kwargs.pop("return_past_key_values", None)
        result = None
        for result in self.stream_chat(tokenizer, query, history, **kwargs):
            pass
        return result
