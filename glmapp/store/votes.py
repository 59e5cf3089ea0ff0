"""Compare votes: the comparison, the vote, whether it counts for the arena and why not.

Notable choices:
- A vote is always recorded; `counted` says whether the leaderboard uses it. Not counted: an anonymous
  vote made after the names were shown, a vote on a column whose output is empty or failed, and a
  comparison of one adapter with itself (it says nothing about a ranking).
- Columns are stored as the Compare tab's record has them (2-4 columns, adapter None = base model).
  `games()` turns counted votes into pairwise results for `glmapp.arena`: the chosen column beats each
  other column; "tie" and "both_bad" are a draw for every pair (half a win each way).
- Individual votes are read back by their owner only; `games()` is the aggregate every user's
  leaderboard shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from itertools import combinations

from sqlalchemy import select

from glmapp.store.database import Database
from glmapp.store.errors import StoreError
from glmapp.store.schema import Vote, as_utc, utcnow

BASE = "base"  # the name the base model (adapter None) has in the arena
DRAWS = ("tie", "both_bad")


@dataclass
class VoteRecord:
    id: int
    owner: str
    created_at: datetime
    prompt: str
    model: str
    columns: list
    choice: str
    note: str
    anonymous: bool
    revealed_before_vote: bool
    counted: bool
    not_counted_reason: str | None

    def games(self) -> list[tuple[str, str, float]]:
        """(a, b, score of a): 1 a won, 0.5 a draw, 0 b won; one per pair of columns."""
        names = {c["label"]: c.get("adapter") or BASE for c in self.columns}
        out = []
        for a, b in combinations(names, 2):
            score = 0.5 if self.choice in DRAWS else 1.0 if self.choice == a else 0.0 if self.choice == b else None
            if score is not None:
                out.append((names[a], names[b], score))
        return out


def not_counted_reason(columns: list, anonymous: bool, revealed_before_vote: bool) -> str | None:
    if anonymous and revealed_before_vote:
        return "names were shown before the vote"
    for c in columns:
        if c.get("finish_reason") == "error" or c.get("error"):
            return f"column {c['label']} failed"
        if not str(c.get("output") or "").strip():
            return f"column {c['label']} is empty"
    if len({c.get("adapter") or BASE for c in columns}) < len(columns):
        return "the same adapter is in more than one column"
    return None


class VoteStore:
    def __init__(self, db: Database):
        self.db = db

    def record(self, owner: str, *, prompt: str, columns: list, choice: str, model: str = "", note: str = "",
               anonymous: bool = False, revealed_before_vote: bool = False, at: datetime | None = None) -> VoteRecord:
        """Store one vote on a finished comparison; `choice` is a column label, "tie" or "both_bad"."""
        if not owner:
            raise StoreError("A vote needs an owner (the user or browser id).")
        if not isinstance(columns, list) or len(columns) < 2 or not all(isinstance(c, dict) and c.get("label")
                                                                        for c in columns):
            raise StoreError("A vote needs the comparison's columns: at least two, each with a label.")
        labels = [c["label"] for c in columns]
        if choice not in (*labels, *DRAWS):
            raise StoreError(f"Unknown vote {choice!r}: use one of {', '.join((*labels, *DRAWS))}.")
        reason = not_counted_reason(columns, anonymous, revealed_before_vote)
        row = Vote(owner=owner, created_at=at or utcnow(), prompt=prompt, model=model or "", columns=columns,
                   choice=choice, note=note or "", anonymous=bool(anonymous),
                   revealed_before_vote=bool(revealed_before_vote), counted=reason is None, not_counted_reason=reason)
        with self.db.session() as session:
            session.add(row)
            session.flush()
            return self._view(row)

    def record_comparison(self, owner: str, record: dict, choice: str, note: str = "", anonymous: bool = False,
                          revealed_before_vote: bool = False) -> VoteRecord:
        """Store a vote on a Compare-tab record (`{"prompt", "model", "columns": [...]}`, as written to
        comparisons.jsonl)."""
        if not isinstance(record, dict) or "columns" not in record:
            raise StoreError("Run a comparison first, then vote: there is no finished comparison to vote on.")
        return self.record(owner, prompt=str(record.get("prompt", "")), columns=list(record["columns"]), choice=choice,
                           model=str(record.get("model") or ""), note=note, anonymous=anonymous,
                           revealed_before_vote=revealed_before_vote)

    @staticmethod
    def _view(v: Vote) -> VoteRecord:
        return VoteRecord(id=v.id, owner=v.owner, created_at=as_utc(v.created_at), prompt=v.prompt, model=v.model,
                          columns=list(v.columns), choice=v.choice, note=v.note, anonymous=v.anonymous,
                          revealed_before_vote=v.revealed_before_vote, counted=v.counted,
                          not_counted_reason=v.not_counted_reason)

    def list(self, owner: str, limit: int = 200) -> list[VoteRecord]:
        """This owner's votes, newest first."""
        stmt = select(Vote).where(Vote.owner == owner).order_by(Vote.created_at.desc(), Vote.id.desc()).limit(limit)
        with self.db.session() as session:
            return [self._view(v) for v in session.scalars(stmt)]

    def counted(self, since: datetime | None = None, until: datetime | None = None,
                anonymous_only: bool = False) -> list[VoteRecord]:
        """Every user's counted votes in [since, until), oldest first: what the leaderboard is computed from."""
        stmt = select(Vote).where(Vote.counted.is_(True))
        if since is not None:
            stmt = stmt.where(Vote.created_at >= since)
        if until is not None:
            stmt = stmt.where(Vote.created_at < until)
        if anonymous_only:
            stmt = stmt.where(Vote.anonymous.is_(True))
        with self.db.session() as session:
            return [self._view(v) for v in session.scalars(stmt.order_by(Vote.created_at, Vote.id))]

    def games(self, **filters) -> list[tuple[str, str, float]]:
        return [g for v in self.counted(**filters) for g in v.games()]
