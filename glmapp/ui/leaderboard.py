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
from glmapp.errors import GlmappError
from glmapp.store import StoreError
from glmapp.store.votes import BASE as BASE_NAME
from glmapp.ui import notices
from glmapp.ui.adapter_handlers import BASE, cell
from glmapp.ui.chat_handlers import ChatSettings
from glmapp.ui.compare_handlers import CompareHandlers
from glmapp.ui.conversations import owner_of
from glmapp.ui.i18n import ENGLISH, lang_of, t, table

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
        lang = lang_of(request)
        pool = list(dict.fromkeys(str(p) for p in pool or []))
        if len(pool) < 2:
            raise gr.Error(t("arena.error_pool", lang))
        drawn = self.draw(pool, lang)
        d = ChatSettings.defaults(self.backend.family, self.backend.context_length, self.compare.max_new_tokens or 1)
        columns = []
        for name in drawn:
            columns += [None if name == BASE else name, d.temperature, d.top_p, -1]
        columns += [None] * len(columns)  # columns C and D are not used
        hidden = (t("stats.generating", lang),) * 2
        for out in self.compare.run(prompt, 2, max_new_tokens, *columns, request=request):
            record = out[-1]
            if record is None:
                yield out[0], out[1], *hidden, None, ""
                continue
            state = {"record": record, "revealed": False, "voted": None}
            yield (out[0], out[1], *(anonymous_stats(c, lang) for c in record["columns"]), state,
                   t("arena.which", lang))

    def draw(self, pool: list[str], lang: str = ENGLISH) -> list[str]:
        """Two entries of `pool` at random, each loaded first: one that cannot load (a truncated weight file
        the listing could not see) is left out with a notice naming it and another is drawn, so a vote never
        lands on a column that failed before it began."""
        candidates, drawn = list(pool), []
        while len(drawn) < 2 and candidates:
            name = candidates.pop(self.rng.randrange(len(candidates)))
            if name != BASE:
                try:
                    self.backend.load_adapter(name)
                except GlmappError as e:
                    notices.warning(t("arena.skipped", lang, name=name, error=e))
                    continue
            drawn.append(name)
        if len(drawn) < 2:
            raise gr.Error(t("arena.error_pool", lang))
        return drawn

    def reveal(self, state, request: gr.Request = None):
        """Show the names before voting: a vote made afterwards is kept but does not count."""
        lang = lang_of(request)
        if not state:
            raise gr.Error(t("arena.error_run_first", lang))
        state = {**state, "revealed": True}
        return state, names_line(state["record"]) + " · " + t("arena.revealed", lang)

    def vote(self, choice: str, note, state, browser_id, request: gr.Request = None):
        """An arena vote -> (state, status)."""
        lang = lang_of(request)
        if not state:
            raise gr.Error(t("arena.error_vote_first", lang))
        if state.get("voted"):
            raise gr.Error(t("arena.error_voted", lang))
        stored = self.record(choice, note, state["record"], browser_id, request, anonymous=True,
                             revealed=state["revealed"])
        state = {**state, "voted": choice}
        return state, f"{t(f'vote.{choice}', lang)} · {names_line(state['record'])} · {counted_line(stored, lang)}"

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
        lang = lang_of(request)
        return t("compare.saved", lang, vote=t(f"vote.{choice}", lang), file=self.compare.comparisons_file.name,
                 counted=counted_line(stored, lang))


def anonymous_stats(column: dict, lang: str = ENGLISH) -> str:
    reason = column.get("finish_reason")
    ending = t(f"finish.{reason}", lang) if lang != ENGLISH and f"finish.{reason}" in table(lang) else reason
    return (t("conv.tokens", lang, n=column.get("completion_tokens", 0)) + " · "
            + t("stats.speed", lang, rate=f"{column.get('tokens_per_second', 0):.1f}")
            + (f" · {ending}" if reason not in (None, "stop") else ""))


def names_line(record: dict) -> str:
    return " · ".join(f"{c['label']} = {cell(c.get('adapter') or BASE_NAME)}" for c in record["columns"])


def counted_line(stored, lang: str = ENGLISH) -> str:
    return t("board.counted", lang) if stored.counted else t("board.not_counted", lang, why=stored.not_counted_reason)


# ---- the Leaderboard tab ---------------------------------------------------------------------------------------
def leaderboard(votes, time_range: str = "All time", anonymous_only: bool = False, now: datetime | None = None,
                bootstrap: int = BOOTSTRAP, lang: str = ENGLISH) -> tuple[str, str, str]:
    """(ratings table, win-rate heat map, notes) for counted votes in the chosen time range."""
    if time_range not in TIME_RANGES:
        raise gr.Error(f"Unknown time range {time_range!r}: use one of {', '.join(TIME_RANGES)}.")
    span = TIME_RANGES[time_range]
    since = None if span is None else (now or datetime.now(timezone.utc)) - span
    board = arena.leaderboard(votes.games(since=since, anonymous_only=bool(anonymous_only)), bootstrap=bootstrap)
    if not board.ratings:
        return t("board.empty", lang), "", ""
    return ratings_table(board, lang), heat_map(board, lang), separation_notes(board, lang)


def ratings_table(board, lang: str = ENGLISH) -> str:
    pct = round(board.confidence * 100)
    rows = [t("board.header", lang, pct=pct, narrow=f"{NARROW:.0f}"),
            "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(board.ratings, 1):
        need = arena.votes_needed(r.half_width, r.votes, NARROW) if r.half_width > 0 else r.votes
        rows.append(f"| {i} | {cell(r.name)} | {r.rating:.0f} | {r.low:.0f} – {r.high:.0f} (±{r.half_width:.0f}) "
                    f"| {r.votes} | {r.win_rate:.0%} | {need} |")
    return "\n".join(rows)


def heat_map(board, lang: str = ENGLISH) -> str:
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
            cells.append(f'<td style="background:{color}" title="{html.escape(t("board.games", lang, n=games))}">'
                         f'{rate:.0%}<br><small>{games}'
                         "</small></td>")
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return ('<table id="win-rate-matrix" style="border-collapse:collapse;text-align:center">'
            f"<tr><th>{html.escape(t('board.row_beats_column', lang))}</th>{head}</tr>{''.join(rows)}</table>")


def separation_notes(board, lang: str = ENGLISH) -> str:
    """For neighbours whose intervals overlap: about how many more games would separate them."""
    notes = []
    for a, b in zip(board.ratings, board.ratings[1:]):
        if a.low > b.high:
            continue
        gap = a.rating - b.rating
        if gap < 1:
            notes.append("- " + t("board.same", lang, a=cell(a.name), b=cell(b.name)))
            continue
        factor = ((a.half_width + b.half_width) / gap) ** 2  # intervals must shrink by sqrt(factor)
        more = [max(0, math.ceil(r.votes * factor) - r.votes) for r in (a, b)]
        notes.append("- " + t("board.overlap", lang, a=cell(a.name), b=cell(b.name), gap=f"{gap:.0f}",
                              more_a=more[0], more_b=more[1]))
    return "\n".join(notes) or t("board.apart", lang)
