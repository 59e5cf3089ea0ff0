"""Compare votes in the store: counted or not and why, owner-only reads, filters, games for the arena."""

from __future__ import annotations

from datetime import timedelta

import pytest

from glmapp.arena import leaderboard
from glmapp.store import StoreError
from glmapp.store.schema import utcnow


def comparison(*adapters, outputs=None, finish=None):
    """A record shaped as CompareHandlers.run yields it."""
    outputs = outputs or [f"answer {i}" for i in range(len(adapters))]
    return {"prompt": "Say hi", "model": "demo",
            "columns": [{"label": "ABCD"[i], "adapter": a, "settings": {"temperature": 0.8, "seed": 1},
                         "output": outputs[i], "finish_reason": (finish or {}).get(i, "stop"),
                         "completion_tokens": 3} for i, a in enumerate(adapters)]}


def test_a_vote_is_stored_with_the_comparison_and_read_back_by_its_owner_only(store):
    votes = store.votes
    v = votes.record_comparison("alice", comparison(None, "lora-a"), "B", note="better tone", anonymous=True)
    assert (v.counted, v.not_counted_reason, v.anonymous) == (True, None, True)
    [back] = votes.list("alice")
    assert (back.prompt, back.model, back.choice, back.note) == ("Say hi", "demo", "B", "better tone")
    assert back.columns[1]["adapter"] == "lora-a" and back.columns[1]["settings"] == {"temperature": 0.8, "seed": 1}
    assert votes.list("bob") == []


@pytest.mark.parametrize("record, kwargs, reason", [
    (comparison(None, "a"), dict(anonymous=True, revealed_before_vote=True), "names were shown before the vote"),
    (comparison(None, "a", outputs=["fine", "  "]), {}, "column B is empty"),
    (comparison(None, "a", finish={0: "error"}), {}, "column A failed"),
    (comparison("a", "a"), {}, "the same adapter is in more than one column"),
])
def test_votes_that_do_not_count_are_kept_with_the_reason(store, record, kwargs, reason):
    v = store.votes.record_comparison("alice", record, "A", **kwargs)
    assert (v.counted, v.not_counted_reason) == (False, reason)
    assert store.votes.counted() == [] and len(store.votes.list("alice")) == 1


def test_revealing_names_in_the_non_anonymous_mode_still_counts(store):
    v = store.votes.record_comparison("alice", comparison(None, "a"), "tie", revealed_before_vote=True)
    assert v.counted


def test_games_winner_beats_every_other_column_and_draws_are_half(store):
    votes = store.votes
    votes.record_comparison("alice", comparison(None, "a"), "A")
    votes.record_comparison("alice", comparison(None, "a"), "tie")
    votes.record_comparison("bob", comparison("a", "b"), "both_bad")
    votes.record_comparison("bob", comparison("a", "b", "c"), "C")
    assert votes.games() == [("base", "a", 1.0), ("base", "a", 0.5), ("a", "b", 0.5),
                             ("a", "c", 0.0), ("b", "c", 0.0)]


def test_filters_by_time_and_anonymous_only(store):
    votes = store.votes
    now = utcnow()
    old = votes.record("alice", prompt="p", columns=comparison(None, "a")["columns"], choice="A",
                       at=now - timedelta(days=10))
    anon = votes.record("alice", prompt="p", columns=comparison(None, "a")["columns"], choice="B", anonymous=True)
    assert [v.id for v in votes.counted()] == [old.id, anon.id]
    assert [v.id for v in votes.counted(since=now - timedelta(days=1))] == [anon.id]
    assert [v.id for v in votes.counted(until=now - timedelta(days=1))] == [old.id]
    assert [v.id for v in votes.counted(anonymous_only=True)] == [anon.id]


@pytest.mark.parametrize("record, choice, message", [
    (comparison(None, "a"), "C", "Unknown vote 'C'"),
    (None, "A", "Run a comparison first"),
    ({"columns": [{"label": "A"}]}, "A", "at least two"),
])
def test_bad_votes_are_refused_by_name(store, record, choice, message):
    with pytest.raises(StoreError, match=message):
        store.votes.record_comparison("alice", record, choice)
    assert store.votes.list("alice") == []


def test_stored_votes_feed_the_leaderboard(store):
    for _ in range(6):
        store.votes.record_comparison("alice", comparison(None, "good"), "B", anonymous=True)
    store.votes.record_comparison("alice", comparison(None, "good"), "A", anonymous=True)
    store.votes.record_comparison("alice", comparison(None, "good"), "A", anonymous=True, revealed_before_vote=True)
    board = leaderboard(store.votes.games(anonymous_only=True), bootstrap=50)
    assert [(r.name, r.votes) for r in board.ratings] == [("good", 7), ("base", 7)]
