"""Bradley–Terry ratings: known strengths are recovered, intervals cover the truth at their stated rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from glmapp.arena import BASE_RATING, SCALE, leaderboard, to_scale, votes_needed

TRUTH = {"base": -0.8, "lora-a": -0.2, "lora-b": 0.3, "lora-c": 0.7}  # logit strengths, mean 0


def synthetic_games(truth: dict, n_games: int, rng, draw_rate: float = 0.2) -> list:
    """Random pairs; a draw with probability draw_rate, else a win with the probability that makes the
    expected score equal σ(θa − θb), the quantity the fit estimates."""
    names = list(truth)
    games = []
    for _ in range(n_games):
        i, j = rng.choice(len(names), 2, replace=False)
        a, b = names[i], names[j]
        p = 1 / (1 + math.exp(truth[b] - truth[a]))
        if rng.random() < draw_rate:
            games.append((a, b, 0.5))
        else:
            games.append((a, b, 1.0 if rng.random() < (p - draw_rate / 2) / (1 - draw_rate) else 0.0))
    return games


def test_two_adapters_match_the_closed_form():
    # With two players the maximum-likelihood difference is logit(a's score share): independent of the optimiser.
    games = [("a", "b", 1.0)] * 60 + [("a", "b", 0.0)] * 25 + [("b", "a", 0.5)] * 10 + [("b", "a", 1.0)] * 5
    share = (60 + 5) / 100
    board = leaderboard(games, bootstrap=0)
    by_name = {r.name: r for r in board.ratings}
    assert by_name["a"].rating - by_name["b"].rating == pytest.approx(SCALE * math.log(share / (1 - share)), abs=0.5)
    assert by_name["a"].rating + by_name["b"].rating == pytest.approx(2 * BASE_RATING)
    assert (by_name["a"].votes, by_name["a"].win_rate) == (100, pytest.approx(share))


def test_known_strengths_give_the_right_order_and_matrices():
    games = synthetic_games(TRUTH, 4000, np.random.default_rng(1))
    board = leaderboard(games, bootstrap=100, seed=0)
    assert [r.name for r in board.ratings] == sorted(TRUTH, key=TRUTH.get, reverse=True)
    for r in board.ratings:
        assert r.low <= r.rating <= r.high
        assert abs(r.rating - to_scale(np.array(TRUTH[r.name]))) < 40
    assert board.names == [r.name for r in board.ratings]
    i, j = board.names.index("lora-c"), board.names.index("base")
    assert board.win_rate[i, j] + board.win_rate[j, i] == pytest.approx(1)
    assert board.win_rate[i, j] > 0.6 and board.games[i, j] == board.games[j, i] > 0
    assert np.isnan(board.win_rate[i, i]) and sum(r.votes for r in board.ratings) == 2 * len(games)


def test_intervals_cover_the_truth_at_the_stated_rate():
    rng = np.random.default_rng(2024)
    covered = total = 0
    widths = []
    for trial in range(30):
        board = leaderboard(synthetic_games(TRUTH, 500, rng), bootstrap=150, seed=trial)
        for r in board.ratings:
            truth = to_scale(np.array(TRUTH[r.name]))
            covered += r.low <= truth <= r.high
            total += 1
            widths.append(r.half_width)
    # 120 intervals at 95%: a binomial count outside [106, 119] would happen by chance < 1% of the time.
    assert 106 <= covered <= 119, f"{covered}/{total} intervals covered the truth"
    assert 20 < np.median(widths) < 120


def test_a_clean_sweep_stays_finite_and_draws_only_give_equal_ratings():
    board = leaderboard([("winner", "loser", 1.0)] * 20, bootstrap=50)
    assert [r.name for r in board.ratings] == ["winner", "loser"]
    assert all(math.isfinite(x) for r in board.ratings for x in (r.rating, r.low, r.high))
    draws = leaderboard([("x", "y", 0.5)] * 10 + [("y", "z", 0.5)] * 10, bootstrap=50)
    assert {round(r.rating, 3) for r in draws.ratings} == {BASE_RATING}


def test_bad_scores_are_refused_and_no_games_give_an_empty_board():
    with pytest.raises(ValueError, match="score is 1"):
        leaderboard([("a", "b", 2)])
    assert leaderboard([]).ratings == []


def test_votes_needed_follows_the_square_root_law():
    assert votes_needed(half_width=80, votes=100, target_half_width=40) == 400
    assert votes_needed(half_width=20, votes=100, target_half_width=40) == 100
    rng = np.random.default_rng(5)
    small = leaderboard(synthetic_games(TRUTH, 300, rng), bootstrap=200)
    large = leaderboard(synthetic_games(TRUTH, 1200, rng), bootstrap=200)
    ratio = np.median([r.half_width for r in small.ratings]) / np.median([r.half_width for r in large.ratings])
    assert 1.5 < ratio < 2.7  # four times the votes, about half the width
