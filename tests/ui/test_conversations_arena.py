"""Arena and leaderboard handlers as plain functions: the real demo backend with peft adapters, a real store."""

from __future__ import annotations

import json
import random
import warnings
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import gradio as gr
import pytest

from glmapp.backends import LocalBackend
from glmapp.store import open_store, sqlite_url
from glmapp.ui.adapter_handlers import cell
from glmapp.ui.compare_handlers import CompareHandlers
from glmapp.ui.conversations import new_browser_id
from glmapp.ui.leaderboard import ArenaHandlers, leaderboard

BROWSER = new_browser_id()
TAB = SimpleNamespace(session_hash="arena-tab", username=None)


@pytest.fixture(scope="module")
def backend(demo_v2, adapters_copy):
    b = LocalBackend.load(str(demo_v2), max_input_tokens=64, adapters_dir=str(adapters_copy("arena-adapters")))
    yield b
    b.close()


@pytest.fixture()
def store(tmp_path):
    s = open_store(sqlite_url(tmp_path))
    yield s
    s.close()


@pytest.fixture()
def arena(backend, store, tmp_path):
    compare = CompareHandlers(backend, tmp_path / "comparisons.jsonl")
    return ArenaHandlers(compare, store, backend, rng=random.Random(3))


def run(arena, pool, prompt="hello"):
    updates = list(arena.run(prompt, 4, pool, request=TAB))
    return updates


def test_arena_draws_two_ticked_entries_hides_names_and_stores_a_counted_anonymous_vote(arena, store):
    pool = ["none", "qkv", "mlp"]
    updates = run(arena, pool)
    out_a, out_b, stats_a, stats_b, state, status = updates[-1]
    drawn = [c["adapter"] or "none" for c in state["record"]["columns"]]
    assert len(set(drawn)) == 2 and set(drawn) <= set(pool)
    shown = " ".join(str(x) for u in updates for x in u[:4] + (u[5],))
    assert not any(name in shown for name in ("qkv", "mlp", "base model", "adapter"))  # names hidden until the vote
    assert "4 tokens" in stats_a and "tokens/s" in stats_b and out_a and out_b

    state, status = arena.vote("B", " clearer ", state, BROWSER, request=TAB)
    assert "counted" in status and "not counted" not in status
    assert all(name in status for name in drawn if name != "none")  # the names, now
    [vote] = store.votes.list(f"browser:{BROWSER}")
    assert vote.anonymous and vote.counted and vote.choice == "B" and vote.note == "clearer"
    with pytest.raises(gr.Error, match="already voted"):
        arena.vote("A", "", state, BROWSER, request=TAB)
    line = json.loads(arena.compare.comparisons_file.read_text().splitlines()[-1])
    assert line["vote"] == "B" and line["columns"][1]["adapter"] == state["record"]["columns"][1]["adapter"]


def test_a_vote_after_the_names_were_shown_is_kept_but_not_counted(arena, store):
    *_, state, _ = run(arena, ["none", "all"])[-1]
    state, status = arena.reveal(state)
    assert "all" in status and "not counted" in status
    _, status = arena.vote("both_bad", "", state, BROWSER, request=TAB)
    [vote] = store.votes.list(f"browser:{BROWSER}")
    assert vote.choice == "both_bad" and not vote.counted
    assert vote.not_counted_reason == "names were shown before the vote"
    assert store.votes.games() == []


def test_the_arena_needs_two_entries_and_compare_votes_reach_the_store(arena, store):
    with pytest.raises(gr.Error, match="at least two"):
        run(arena, ["qkv", "qkv"])
    *_, state, _ = run(arena, ["none", "qkv"])[-1]
    status = arena.compare_vote("both_bad", "", state["record"], BROWSER, request=TAB)
    assert "Both bad" in status and "counted" in status
    [vote] = store.votes.list(f"browser:{BROWSER}")
    assert not vote.anonymous and vote.counted
    with pytest.raises(gr.Error, match="reload the page"):
        arena.compare_vote("A", "", state["record"], None, request=TAB)


def _record(a, b):
    return {"prompt": "p", "model": "m", "columns": [{"label": "A", "adapter": a, "output": "x"},
                                                      {"label": "B", "adapter": b, "output": "y"}]}


def test_leaderboard_ranks_filters_and_says_how_many_votes_would_separate(store):
    now = datetime.now(timezone.utc)
    old = now - timedelta(days=10)
    for i in range(12):  # "good<b>" beats base 9 of 12, anonymously, recently
        store.votes.record("u", prompt="p", columns=_record("good<b>", None)["columns"], choice="A" if i < 9 else "B",
                           anonymous=True, at=now - timedelta(hours=1))
    for _ in range(6):  # old, not anonymous: base always wins against "weak"
        store.votes.record("u", prompt="p", columns=_record("weak", None)["columns"], choice="B", at=old)
    table, heat, notes = leaderboard(store.votes, bootstrap=200)
    names = [row.split("|")[2].strip() for row in table.splitlines()[2:]]
    assert names == [cell("good<b>"), "base", "weak"] and "95% interval" in table and "<b>" not in table
    assert "<b>" not in heat and "good&lt;b&gt;" in heat and "75%" in heat  # good<b> won 9 of 12 against base
    assert "Games for ±50" in table
    recent, _, _ = leaderboard(store.votes, "Last 7 days", bootstrap=50)
    assert "weak" not in recent and "good" in recent
    anonymous, _, _ = leaderboard(store.votes, "All time", True, bootstrap=50)
    assert "weak" not in anonymous
    assert "more games" in notes or "apart" in notes
    close, _, close_notes = leaderboard(store.votes, "Last 7 days", bootstrap=200)
    assert "intervals overlap" in close_notes and f"more games for {cell('good<b>')}" in close_notes
    with pytest.raises(gr.Error, match="Unknown time range"):
        leaderboard(store.votes, "forever")
    empty_store_table, _, _ = leaderboard(SimpleNamespace(games=lambda **_: []))
    assert "No counted votes yet" in empty_store_table


def test_an_adapter_that_cannot_load_is_left_out_of_the_draw_with_a_notice(demo_v2, adapters_copy, store, tmp_path):
    """A truncated weight file passes the listing; drawn, it is named in a notice and another entry is drawn, so
    both columns run (a vote on a column that failed to start would not be counted)."""
    backend = LocalBackend.load(str(demo_v2), max_input_tokens=64,
                                adapters_dir=str(adapters_copy("arena-corrupt", corrupt=["corrupt"])))
    try:
        arena = ArenaHandlers(CompareHandlers(backend, tmp_path / "c.jsonl"), store, backend, rng=random.Random(0))
        skipped = 0
        for _ in range(6):  # bounded: P(corrupt never drawn in 6 draws of 2 from 3) = 1/729
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                *_, state, status = run(arena, ["none", "corrupt", "qkv"])[-1]
            notes = [str(w.message) for w in warned if "left out" in str(w.message)]
            skipped += len(notes)
            assert all("corrupt" in n for n in notes)
            drawn = {c["adapter"] or "none" for c in state["record"]["columns"]}
            assert drawn == {"none", "qkv"} and all(c["finish_reason"] != "error" for c in state["record"]["columns"])
        assert skipped >= 1
        with pytest.raises(gr.Error):
            run(arena, ["none", "corrupt"])  # one loadable entry is not enough
    finally:
        backend.close()
