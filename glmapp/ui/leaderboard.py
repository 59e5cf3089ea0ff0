"""The arena (anonymous A/B in the Compare tab) and the Leaderboard tab, as plain handlers.

Notable choices:
- The arena draws two different entries at random from the adapters a user ticks (the base model counts) and
  runs them through CompareHandlers.run, so they are decoded as one batch like any comparison. Until the vote
  the page sees only "A" and "B": the stats shown are built from the finished record (tokens, tokens/s),
  never from lines that name the adapter.
- Every vote (arena or not) goes to comparisons.jsonl as before and to the store with its owner; the store
  decides whether it counts (names shown before an anonymous vote, an empty or failed column: not counted).
- The leaderboard is computed from the store on each refresh (bootstrap of `BOOTSTRAP` resamples: well under a
  second for a few adapters). The win-rate matrix is an HTML table coloured by win rate. Adapter names come
  from folder names: escaped in HTML, made inert (adapter_handlers.cell) in Markdown.
- "Votes to separate" two neighbours whose intervals overlap: half-widths shrink like 1/sqrt(votes), so both
  intervals must shrink by the factor that makes the sum of half-widths smaller than the gap.
"""

from __future__ import annotations

import html
import math
import random
from datetime import datetime, timedelta, timezone

import gradio as gr

from glmapp import arena
from glmapp.store import StoreError
from glmapp.store.votes import BASE as BASE_NAME
from glmapp.ui import notices
from glmapp.ui.adapter_handlers import BASE, cell
from glmapp.ui.chat_handlers import ChatSettings
from glmapp.ui.compare_handlers import VOTES, CompareHandlers
from glmapp.ui.conversations import owner_of

BOOTSTRAP = 300
NARROW = 50.0  # a "narrow" interval: ±50 rating points
TIME_RANGES = {"All time": None, "Last 30 days": timedelta(days=30), "Last 7 days": timedelta(days=7),
               "Last 24 hours": timedelta(days=1)}
ARENA_VOTES = ("A", "B", "tie", "both_bad")


class ArenaHandlers:
    def __init__(self, compare: CompareHandlers, store, backend, rng: random.Random | None = None):
        self.compare = compare
        self.votes = store.votes
        self.backend = backend
        self.rng = rng or random.SystemRandom()

    def run(self, prompt, max_new_tokens, pool, request: gr.Request = None):
        """Draw two of the ticked adapters and stream them as A and B, names hidden.
        Yields (output A, output B, stats A, stats B, arena state, status)."""
        pool = list(dict.fromkeys(str(p) for p in pool or []))
        if len(pool) < 2:
            raise gr.Error("Tick at least two entries to draw from (the base model counts as one).")
        drawn = self.rng.sample(pool, 2)
        d = ChatSettings.defaults(self.backend.family, self.backend.context_length, self.compare.max_new_tokens or 1)
        columns = []
        for name in drawn:
            columns += [None if name == BASE else name, d.temperature, d.top_p, -1]
        columns += [None] * len(columns)  # columns C and D are not used
        hidden = ("generating…", "generating…")
        for out in self.compare.run(prompt, 2, max_new_tokens, *columns, request=request):
            record = out[-1]
            if record is None:
                yield out[0], out[1], *hidden, None, ""
                continue
            state = {"record": record, "revealed": False, "voted": None}
            yield (out[0], out[1], *(anonymous_stats(c) for c in record["columns"]), state,
                   "Which answer is better? The names are shown after your vote.")

    def reveal(self, state):
        """Show the names before voting: a vote made afterwards is kept but does not count."""
        if not state:
            raise gr.Error("Run the arena first.")
        state = {**state, "revealed": True}
        return state, names_line(state["record"]) + " · a vote now is kept but not counted for the leaderboard"

    def vote(self, choice: str, note, state, browser_id, request: gr.Request = None):
        """An arena vote -> (state, status)."""
        if not state:
            raise gr.Error("Run the arena first, then vote.")
        if state.get("voted"):
            raise gr.Error("You already voted on this pair: draw a new one.")
        stored = self.record(choice, note, state["record"], browser_id, request, anonymous=True,
                             revealed=state["revealed"])
        state = {**state, "voted": choice}
        return state, f"{VOTES[choice]} · {names_line(state['record'])} · {counted_line(stored)}"

    def record(self, choice: str, note, record, browser_id, request, anonymous=False, revealed=False):
        """The vote to comparisons.jsonl (CompareHandlers.vote checks it) and to the store."""
        self.compare.vote(choice, note, record)
        try:
            return self.votes.record_comparison(owner_of(browser_id, request), record, choice,
                                                note=str(note or "").strip(), anonymous=anonymous,
                                                revealed_before_vote=revealed)
        except StoreError as e:
            raise notices.error(e) from None

    def compare_vote(self, choice: str, note, record, browser_id, request: gr.Request = None) -> str:
        """A vote in the Compare tab's own columns (names visible, not anonymous) -> status."""
        stored = self.record(choice, note, record, browser_id, request)
        return f"Saved: **{VOTES[choice]}** → `{self.compare.comparisons_file.name}` and the leaderboard " \
               f"({counted_line(stored)})"


def anonymous_stats(column: dict) -> str:
    return (f"{column.get('completion_tokens', 0)} tokens · {column.get('tokens_per_second', 0):.1f} tokens/s"
            + (f" · {column['finish_reason']}" if column.get("finish_reason") not in (None, "stop") else ""))


def names_line(record: dict) -> str:
    return " · ".join(f"{c['label']} = {cell(c.get('adapter') or BASE_NAME)}" for c in record["columns"])


def counted_line(stored) -> str:
    return "counted" if stored.counted else f"not counted: {stored.not_counted_reason}"


# ---- the Leaderboard tab ---------------------------------------------------------------------------------------
def leaderboard(votes, time_range: str = "All time", anonymous_only: bool = False, now: datetime | None = None,
                bootstrap: int = BOOTSTRAP) -> tuple[str, str, str]:
    """(ratings table, win-rate heat map, notes) for counted votes in the chosen time range."""
    if time_range not in TIME_RANGES:
        raise gr.Error(f"Unknown time range {time_range!r}: use one of {', '.join(TIME_RANGES)}.")
    span = TIME_RANGES[time_range]
    since = None if span is None else (now or datetime.now(timezone.utc)) - span
    board = arena.leaderboard(votes.games(since=since, anonymous_only=bool(anonymous_only)), bootstrap=bootstrap)
    if not board.ratings:
        return "No counted votes yet: vote in the Compare tab (the arena's anonymous votes rank best).", "", ""
    return ratings_table(board), heat_map(board), separation_notes(board)


def ratings_table(board) -> str:
    pct = round(board.confidence * 100)
    rows = [f"| # | Adapter | Rating | {pct}% interval | Games | Win rate | Games for ±{NARROW:.0f} |",
            "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(board.ratings, 1):
        need = arena.votes_needed(r.half_width, r.votes, NARROW) if r.half_width > 0 else r.votes
        rows.append(f"| {i} | {cell(r.name)} | {r.rating:.0f} | {r.low:.0f} – {r.high:.0f} (±{r.half_width:.0f}) "
                    f"| {r.votes} | {r.win_rate:.0%} | {need} |")
    return "\n".join(rows)


def heat_map(board) -> str:
    """Win rate of the row against the column (draws half), coloured red (0%) to green (100%)."""
    head = "".join(f"<th>{html.escape(n)}</th>" for n in board.names)
    rows = []
    for i, name in enumerate(board.names):
        cells = []
        for j in range(len(board.names)):
            rate, games = board.win_rate[i, j], int(board.games[i, j])
            if i == j or games == 0 or math.isnan(rate):
                cells.append('<td style="background:#eee">–</td>')
                continue
            color = f"hsl({rate * 120:.0f}, 65%, 75%)"
            cells.append(f'<td style="background:{color}" title="{games} games">{rate:.0%}<br><small>{games}'
                         "</small></td>")
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return ('<table id="win-rate-matrix" style="border-collapse:collapse;text-align:center">'
            f"<tr><th>row beats column</th>{head}</tr>{''.join(rows)}</table>")


def separation_notes(board) -> str:
    """For neighbours whose intervals overlap: about how many more games would separate them."""
    notes = []
    for a, b in zip(board.ratings, board.ratings[1:]):
        if a.low > b.high:
            continue
        gap = a.rating - b.rating
        if gap < 1:
            notes.append(f"- {cell(a.name)} and {cell(b.name)} are rated the same: more votes would not tell "
                         "them apart unless one is really better.")
            continue
        factor = ((a.half_width + b.half_width) / gap) ** 2  # intervals must shrink by sqrt(factor)
        more = [max(0, math.ceil(r.votes * factor) - r.votes) for r in (a, b)]
        notes.append(f"- {cell(a.name)} vs {cell(b.name)}: intervals overlap (gap {gap:.0f}); about "
                     f"{more[0]} more games for {cell(a.name)} and {more[1]} for {cell(b.name)} would separate "
                     "them if the gap stays.")
    return "\n".join(notes) or "Every neighbour's interval is apart from the next one's."
