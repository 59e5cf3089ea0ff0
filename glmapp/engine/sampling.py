"""Vectorised per-row sampling as pure tensor functions (no `.item()`, no per-row Python).

Every parameter is a tensor with one entry per row, so one batch can mix greedy rows, sampled
rows, different top_p/top_k and penalties. Randomness is counter-based: the noise of a row is a
hash of (seed, step, token id), so a seeded row samples the same text whatever else is in the batch.
Order follows the reference generation: repetition penalty, NaN/Inf guard, temperature, top_k, top_p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmapp.errors import InputError

_M1 = 0x9E3779B97F4A7C15 - (1 << 64)
_M2 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M3 = 0x94D049BB133111EB - (1 << 64)
INVALID_SCORE_TOKEN = 5  # spec §6: the reference forces id 5 when scores hold NaN/Inf


@dataclass
class SamplingParams:
    """Per-request sampling settings (Hugging Face names). temperature 0 means greedy."""

    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.top_k >= 0, f"top_k must be >= 0, 0 = off (got {self.top_k})"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (got {self.repetition_penalty})"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift on int64."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[b, vocab] uniforms in (0, 1) from splitmix64 of (seed, step, token id): batch-independent."""
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = seeds[:, None] * _M1 + steps[:, None] * _M2 + idx[None, :]
    x = (x ^ _shr(x, 30)) * _M2
    x = (x ^ _shr(x, 27)) * _M3
    x = x ^ _shr(x, 31)
    return (_shr(x, 11).double() + 0.5) * (1.0 / (1 << 53))


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Seen tokens: negative scores multiplied by the penalty, positive ones divided (as in HF/CTRL)."""
    p = penalty[:, None].to(logits.dtype)
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def invalid_score_guard(logits: torch.Tensor) -> torch.Tensor:
    bad = ~torch.isfinite(logits).all(-1, keepdim=True)
    forced = torch.zeros_like(logits)
    forced[:, INVALID_SCORE_TOKEN] = 5e4
    return torch.where(bad, forced, logits)


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the k best per row (k = 0: keep all). Ties at the k-th score are kept."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = logits.sort(-1, descending=True).values.gather(-1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of strictly better tokens
    drop_sorted = before >= top_p[:, None].to(probs.dtype)
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits, temperature, top_p, top_k, penalty, seen, seeds, steps) -> torch.Tensor:
    """logits [b, V] -> next ids [b]. All parameters are per-row tensors; temperature 0 = argmax."""
    logits = repetition_penalty(logits.float(), seen, penalty)
    logits = invalid_score_guard(logits)
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    scaled = top_p_filter(top_k_filter(scaled, top_k), top_p)
    probs = scaled.softmax(-1).double()
    # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i.
    race = probs / -torch.log(uniform_noise(seeds, steps, logits.shape[-1]))
    return torch.where(greedy, logits.argmax(-1), race.argmax(-1))
