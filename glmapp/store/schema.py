"""Tables of the store, as SQLAlchemy 2 declarative models.

Notable choices:
- Conversation ids are random UUID hex strings (not guessable, safe in a browser's state); message and vote
  ids are integers, never trusted without the owner check the queries make.
- Messages form a tree: `parent_id` points at the message answered or continued (None for a first
  message), so an edited or regenerated message is a sibling of the old one and both are kept.
  `Conversation.leaf_id` names the last message of the branch shown; it is a plain column, not a foreign
  key, to avoid a cycle between the two tables (both are always written in one transaction).
- Times are timezone-aware UTC; SQLite hands them back naive, `as_utc` puts the zone back.
- `deleted_at` is a soft delete: a deleted conversation can be restored until it is purged.
The migrations in `migrations/versions` create exactly these tables (a test compares them).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

OWNER_LENGTH = 200
TITLE_LENGTH = 200


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    pass


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(OWNER_LENGTH))
    title: Mapped[str] = mapped_column(String(TITLE_LENGTH), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[dict] = mapped_column(JSON, default=dict)
    adapter: Mapped[str | None] = mapped_column(String(200), nullable=True)
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    leaf_id: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (Index("ix_conversations_owner_updated", "owner", "updated_at"),)


class Message(Base):
    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(String(32), ForeignKey("conversations.id", ondelete="CASCADE"))
    parent_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("messages.id", ondelete="CASCADE"),
                                                  nullable=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    meta: Mapped[dict] = mapped_column(JSON, default=dict)  # adapter, tokens, tokens/s, finish reason

    __table_args__ = (Index("ix_messages_conversation_parent", "conversation_id", "parent_id"),)


class Vote(Base):
    __tablename__ = "votes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(OWNER_LENGTH))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    prompt: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(500), default="")
    columns: Mapped[list] = mapped_column(JSON)  # [{label, adapter, settings, output, finish_reason, ...}]
    choice: Mapped[str] = mapped_column(String(16))  # a column label, "tie" or "both_bad"
    note: Mapped[str] = mapped_column(Text, default="")
    anonymous: Mapped[bool] = mapped_column(Boolean)
    revealed_before_vote: Mapped[bool] = mapped_column(Boolean)
    counted: Mapped[bool] = mapped_column(Boolean)
    not_counted_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)

    __table_args__ = (Index("ix_votes_counted_created", "counted", "created_at"), Index("ix_votes_owner", "owner"))
