"""Arena ratings: Bradley–Terry strengths of adapters from pairwise votes, with bootstrap intervals.

Notable choices:
- Model: P(a beats b) = σ(θa − θb). A draw ("tie", "both bad") is half a win each way, so a game with score
  s for a adds s·log σ(θa − θb) + (1 − s)·log σ(θb − θa) to the log-likelihood.
- Games are aggregated per (a, b, score) cell before fitting, so a fit costs O(cells), not O(votes); the fit
  is scipy's L-BFGS-B on the exact gradient. A weak Gaussian prior (precision `PRIOR_PRECISION` in logit
  units) keeps ratings finite when an adapter won or lost every game; with a few dozen votes per adapter it
  moves ratings by far less than their interval.
- Ratings are centred (mean 0) and shown on the Elo-like scale 1000 + 400·log10(e)·θ: 400 points = 10:1 odds.
- Intervals are percentile bootstrap: the votes are resampled with replacement (a multinomial draw over the
  cells) and refitted; a seeded generator makes them reproducible.
- An interval's half-width shrinks like 1/√votes, so `votes_needed` says how many votes reach a target width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

SCALE = 400 / math.log(10)
BASE_RATING = 1000.0
PRIOR_PRECISION = 1e-3


@dataclass
class Rating:
    name: str
    rating: float
    low: float  # interval bounds on the same scale
    high: float
    votes: int  # games this adapter played (a 3-column vote is 2 games for each column)
    win_rate: float  # draws count half

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


@dataclass
class Leaderboard:
    ratings: list[Rating]  # best first
    names: list[str] = field(default_factory=list)  # order of the matrices' rows and columns (best first)
    win_rate: np.ndarray | None = None  # [i, j]: share of i's games against j that i won (draws half); nan if none
    games: np.ndarray | None = None  # [i, j]: games between i and j
    confidence: float = 0.95


def _cells(games, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (a, b, score) rows and how many games each stands for."""
    counts: dict[tuple[int, int, float], int] = {}
    for a, b, score in games:
        if score not in (0, 0.5, 1):
            raise ValueError(f"A game's score is 1 (first won), 0.5 (draw) or 0 (second won), got {score!r}.")
        key = (index[a], index[b], float(score))
        counts[key] = counts.get(key, 0) + 1
    rows = np.array(list(counts), dtype=float).reshape(-1, 3)
    return rows[:, 0].astype(int), rows[:, 1].astype(int), rows[:, 2], np.array(list(counts.values()), dtype=float)


def fit(a: np.ndarray, b: np.ndarray, score: np.ndarray, weight: np.ndarray, n: int,
        start: np.ndarray | None = None) -> np.ndarray:
    """Centred Bradley–Terry strengths θ (logit units) maximising the weighted log-likelihood plus prior."""

    def loss(theta):
        d = theta[a] - theta[b]
        nll = -np.sum(weight * (score * log_expit(d) + (1 - score) * log_expit(-d)))
        residual = weight * (score - expit(d))  # -∂nll/∂d
        grad = -np.bincount(a, residual, n) + np.bincount(b, residual, n) + PRIOR_PRECISION * theta
        return nll + PRIOR_PRECISION / 2 * theta @ theta, grad

    x0 = np.zeros(n) if start is None else start
    result = minimize(loss, x0, jac=True, method="L-BFGS-B", options={"gtol": 1e-9, "maxiter": 1000})
    return result.x - result.x.mean()


def to_scale(theta: np.ndarray) -> np.ndarray:
    return BASE_RATING + SCALE * theta


def leaderboard(games, bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> Leaderboard:
    """Ratings with `confidence` intervals from `bootstrap` resamples; `games` are (a, b, score of a)."""
    games = list(games)
    if not games:
        return Leaderboard([], confidence=confidence)
    names = sorted({x for g in games for x in g[:2]})
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    a, b, score, weight = _cells(games, index)
    theta = fit(a, b, score, weight, n)
    rng = np.random.default_rng(seed)
    samples = np.empty((bootstrap, n))
    total = int(weight.sum())
    for k in range(bootstrap):
        samples[k] = fit(a, b, score, rng.multinomial(total, weight / total).astype(float), n, start=theta)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0) if bootstrap else (theta, theta)

    played = np.zeros((n, n))
    won = np.zeros((n, n))
    np.add.at(played, (a, b), weight)
    np.add.at(played, (b, a), weight)
    np.add.at(won, (a, b), weight * score)
    np.add.at(won, (b, a), weight * (1 - score))
    order = np.argsort(-theta, kind="stable")
    ratings = [Rating(names[i], float(to_scale(theta[i])), float(to_scale(low[i])), float(to_scale(high[i])),
                      int(played[i].sum()), float(won[i].sum() / played[i].sum())) for i in order]
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(played > 0, won / played, np.nan)
    return Leaderboard(ratings, [names[i] for i in order], rates[np.ix_(order, order)],
                       played[np.ix_(order, order)].astype(int), confidence)


def votes_needed(half_width: float, votes: int, target_half_width: float) -> int:
    """Votes an adapter needs for its interval to shrink to ±target (half-widths shrink like 1/√votes)."""
    if target_half_width <= 0:
        raise ValueError("The target half-width must be positive.")
    return max(votes, math.ceil(votes * (half_width / target_half_width) ** 2))
