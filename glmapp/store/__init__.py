"""Conversations and Compare votes in a database: SQLite by default (one file), or any SQLAlchemy URL.

`open_store(url)` opens (and migrates) the database and returns a `Store` with `conversations` and `votes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmapp.store.conversations import ConversationStore
from glmapp.store.database import Database, sqlite_url
from glmapp.store.errors import ImportFormatError, NotFound, StoreError
from glmapp.store.votes import VoteStore


@dataclass
class Store:
    db: Database
    conversations: ConversationStore
    votes: VoteStore

    def close(self) -> None:
        self.db.dispose()


def open_store(url: str) -> Store:
    db = Database(url)
    return Store(db, ConversationStore(db), VoteStore(db))


__all__ = ["Store", "open_store", "sqlite_url", "Database", "StoreError", "NotFound", "ImportFormatError"]
