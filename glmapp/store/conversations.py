"""Conversations: create, list and search, branch, rename, delete with undo, export and import; per owner.

Notable choices:
- Every query filters on the owner; another owner's conversation or message raises the same `NotFound`
  as a missing one, so ids leak nothing.
- Each public method is one transaction: a message and the conversation's new leaf/updated time are written
  together or not at all. A reply is appended once it is complete, so a server killed mid-reply loses that
  reply only.
- Branches: `append` continues the shown branch (or from `parent_id`), `edit` adds a sibling of a message,
  `switch` shows another version; the shown branch is the path from the root to `leaf_id`. Switching to a
  message continues with its newest descendants.
- Export writes the app's export format (`glmapp.conversation/1`: a system message at the head, then the
  shown branch) plus a title; import takes one such record, a list of them, or `glmapp.conversations/1`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import delete, exists, or_, select, update

from glmapp.store.database import Database
from glmapp.store.errors import ImportFormatError, NotFound, StoreError
from glmapp.store.schema import OWNER_LENGTH, TITLE_LENGTH, Conversation, Message, as_utc, utcnow

FORMAT = "glmapp.conversation/1"
FORMAT_MANY = "glmapp.conversations/1"
ROLES = ("user", "assistant")
AUTO_TITLE_CHARS = 60
_SHOWN = object()  # append's default parent: the shown branch's last message


@dataclass
class MessageView:
    id: int
    role: str
    content: str
    parent_id: int | None
    meta: dict
    created_at: datetime
    version: int = 1  # 1-based position among its siblings (the versions of this message)
    versions: int = 1
    sibling_ids: list[int] = field(default_factory=list)


@dataclass
class ConversationSummary:
    id: str
    title: str
    created_at: datetime
    updated_at: datetime
    deleted: bool
    system_prompt: str
    model: dict
    adapter: str | None
    settings: dict


@dataclass
class ConversationView(ConversationSummary):
    messages: list[MessageView] = field(default_factory=list)  # the shown branch, root first


def _check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not owner or len(owner) > OWNER_LENGTH:
        raise StoreError(f"Owner must be a non-empty string of at most {OWNER_LENGTH} characters.")
    return owner


def _auto_title(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= AUTO_TITLE_CHARS else line[:AUTO_TITLE_CHARS - 1].rstrip() + "…"


def _summary(c: Conversation) -> dict:
    return dict(id=c.id, title=c.title, created_at=as_utc(c.created_at), updated_at=as_utc(c.updated_at),
                deleted=c.deleted_at is not None, system_prompt=c.system_prompt, model=dict(c.model or {}),
                adapter=c.adapter, settings=dict(c.settings or {}))


class ConversationStore:
    def __init__(self, db: Database):
        self.db = db

    # -- reading --------------------------------------------------------------------------------------------
    @staticmethod
    def _conversation(session, owner: str, conversation_id: str, deleted_ok: bool = False) -> Conversation:
        query = select(Conversation).where(Conversation.id == str(conversation_id),
                                           Conversation.owner == _check_owner(owner))
        if not deleted_ok:
            query = query.where(Conversation.deleted_at.is_(None))
        found = session.scalars(query).first()
        if found is None:
            raise NotFound(f"No conversation {conversation_id!r}: it was deleted, or it is not yours.")
        return found

    @staticmethod
    def _message(session, owner: str, message_id: int) -> tuple[Message, Conversation]:
        row = session.execute(
            select(Message, Conversation).join(Conversation, Message.conversation_id == Conversation.id)
            .where(Message.id == int(message_id), Conversation.owner == _check_owner(owner),
                   Conversation.deleted_at.is_(None))).first()
        if row is None:
            raise NotFound(f"No message {message_id!r}: it was deleted, or it is not yours.")
        return row[0], row[1]

    def list(self, owner: str, query: str = "", deleted: bool = False, limit: int = 200) -> list[ConversationSummary]:
        """Newest first; `query` matches titles and message text (any version), case-insensitively."""
        stmt = select(Conversation).where(Conversation.owner == _check_owner(owner))
        stmt = stmt.where(Conversation.deleted_at.is_not(None) if deleted else Conversation.deleted_at.is_(None))
        if query.strip():
            q = query.strip()
            in_messages = exists().where(Message.conversation_id == Conversation.id,
                                         Message.content.icontains(q, autoescape=True))
            stmt = stmt.where(or_(Conversation.title.icontains(q, autoescape=True), in_messages))
        stmt = stmt.order_by(Conversation.updated_at.desc(), Conversation.id).limit(limit)
        with self.db.session() as session:
            return [ConversationSummary(**_summary(c)) for c in session.scalars(stmt)]

    def get(self, owner: str, conversation_id: str) -> ConversationView:
        with self.db.session() as session:
            c = self._conversation(session, owner, conversation_id)
            messages = session.scalars(select(Message).where(Message.conversation_id == c.id)
                                       .order_by(Message.id)).all()
            return ConversationView(**_summary(c), messages=self._branch(messages, c.leaf_id))

    @staticmethod
    def _branch(messages: list[Message], leaf_id: int | None) -> list[MessageView]:
        by_id = {m.id: m for m in messages}
        children: dict[int | None, list[int]] = {}
        for m in messages:  # ordered by id: siblings oldest first
            children.setdefault(m.parent_id, []).append(m.id)
        path = []
        node = by_id.get(leaf_id)
        while node is not None:
            path.append(node)
            node = by_id.get(node.parent_id)
        views = []
        for m in reversed(path):
            siblings = children[m.parent_id]
            views.append(MessageView(id=m.id, role=m.role, content=m.content, parent_id=m.parent_id,
                                     meta=dict(m.meta or {}), created_at=as_utc(m.created_at),
                                     version=siblings.index(m.id) + 1, versions=len(siblings),
                                     sibling_ids=list(siblings)))
        return views

    # -- writing --------------------------------------------------------------------------------------------
    def create(self, owner: str, *, title: str = "", system_prompt: str = "", model: dict | None = None,
               adapter: str | None = None, settings: dict | None = None) -> str:
        now = utcnow()
        c = Conversation(id=uuid.uuid4().hex, owner=_check_owner(owner), title=self._title(title, allow_empty=True),
                         created_at=now, updated_at=now, system_prompt=system_prompt or "", model=model or {},
                         adapter=adapter, settings=settings or {})
        with self.db.session() as session:
            session.add(c)
        return c.id

    @staticmethod
    def _title(title: str, allow_empty: bool = False) -> str:
        title = " ".join(str(title or "").split())
        if not title and not allow_empty:
            raise StoreError("A title cannot be empty: type a few words.")
        if len(title) > TITLE_LENGTH:
            raise StoreError(f"A title has at most {TITLE_LENGTH} characters (got {len(title)}).")
        return title

    def append(self, owner: str, conversation_id: str, role: str, content: str, meta: dict | None = None,
               parent_id=_SHOWN) -> MessageView:
        """Add a message after `parent_id` (default: the shown branch's last message; None: a new first
        message) and show its branch. The first user message names an untitled conversation."""
        if role not in ROLES:
            raise StoreError(f"Unknown role {role!r}: a stored message is one of {', '.join(ROLES)}.")
        with self.db.session() as session:
            c = self._conversation(session, owner, conversation_id)
            parent = c.leaf_id if parent_id is _SHOWN else parent_id
            if parent is not None:
                _, owner_c = self._message(session, owner, parent)
                if owner_c.id != c.id:
                    raise NotFound(f"No message {parent!r} in conversation {conversation_id!r}.")
            m = self._add(session, c, role, content, meta, parent)
        return self._view(owner, conversation_id, m.id)

    @staticmethod
    def _add(session, c: Conversation, role: str, content: str, meta: dict | None, parent: int | None) -> Message:
        now = utcnow()
        m = Message(conversation_id=c.id, parent_id=parent, role=role, content=str(content), meta=meta or {},
                    created_at=now)
        session.add(m)
        session.flush()  # assigns m.id
        c.leaf_id, c.updated_at = m.id, now
        if not c.title and role == "user":
            c.title = _auto_title(m.content)
        return m

    def edit(self, owner: str, message_id: int, content: str, meta: dict | None = None) -> MessageView:
        """A new version of a message (the old one is kept as a sibling); its branch is shown."""
        with self.db.session() as session:
            old, c = self._message(session, owner, message_id)
            m = self._add(session, c, old.role, content, meta, old.parent_id)
            cid = c.id
        return self._view(owner, cid, m.id)

    def switch(self, owner: str, message_id: int) -> ConversationView:
        """Show the branch through `message_id` (one of a message's versions), continued by its newest replies."""
        with self.db.session() as session:
            m, c = self._message(session, owner, message_id)
            leaf = m.id
            while True:
                child = session.scalars(select(Message.id).where(Message.parent_id == leaf)
                                        .order_by(Message.id.desc()).limit(1)).first()
                if child is None:
                    break
                leaf = child
            c.leaf_id = leaf
            cid = c.id
        return self.get(owner, cid)

    def _view(self, owner: str, conversation_id: str, message_id: int) -> MessageView:
        return next(m for m in self.get(owner, conversation_id).messages if m.id == message_id)

    def update(self, owner: str, conversation_id: str, *, system_prompt: str | None = None,
               model: dict | None = None, adapter: str | None = None, settings: dict | None = None) -> None:
        """Record the system prompt, model, adapter or sampling settings the conversation now uses."""
        with self.db.session() as session:
            c = self._conversation(session, owner, conversation_id)
            if system_prompt is not None:
                c.system_prompt = system_prompt
            if model is not None:
                c.model = dict(model)
            if adapter is not None:
                c.adapter = adapter or None
            if settings is not None:
                c.settings = dict(settings)
            c.updated_at = utcnow()

    def rename(self, owner: str, conversation_id: str, title: str) -> None:
        title = self._title(title)
        with self.db.session() as session:
            self._conversation(session, owner, conversation_id).title = title

    def delete(self, owner: str, conversation_id: str) -> None:
        """Soft delete: hidden from the list and from reads until `restore` (undo) or `purge_deleted`."""
        with self.db.session() as session:
            self._conversation(session, owner, conversation_id).deleted_at = utcnow()

    def restore(self, owner: str, conversation_id: str) -> None:
        with self.db.session() as session:
            self._conversation(session, owner, conversation_id, deleted_ok=True).deleted_at = None

    def purge_deleted(self, owner: str, before: datetime) -> int:
        """Erase for good this owner's conversations deleted before `before`; returns how many."""
        cond = (Conversation.owner == _check_owner(owner), Conversation.deleted_at.is_not(None),
                Conversation.deleted_at < before)
        with self.db.session() as session:
            ids = session.scalars(select(Conversation.id).where(*cond)).all()
            if ids:
                # Children first: SQLite checks the self-reference row by row.
                session.execute(update(Message).where(Message.conversation_id.in_(ids)).values(parent_id=None))
                session.execute(delete(Message).where(Message.conversation_id.in_(ids)))
                session.execute(delete(Conversation).where(Conversation.id.in_(ids)))
            return len(ids)

    # -- export / import ------------------------------------------------------------------------------------
    def export(self, owner: str, conversation_id: str) -> dict:
        """The shown branch in the app's export format (`glmapp.conversation/1`), plus title and times."""
        c = self.get(owner, conversation_id)
        head = [{"role": "system", "content": c.system_prompt}] if c.system_prompt else []
        settings = {**c.settings, "adapter": c.adapter} if c.adapter else dict(c.settings)
        return {"format": FORMAT, "exported_at": utcnow().strftime("%Y-%m-%dT%H:%M:%S%z"), "model": c.model,
                "settings": settings, "title": c.title, "created_at": c.created_at.isoformat(),
                "updated_at": c.updated_at.isoformat(),
                "messages": head + [{"role": m.role, "content": m.content} for m in c.messages]}

    def export_all(self, owner: str) -> dict:
        everything = self.list(owner, limit=10**9)
        return {"format": FORMAT_MANY, "conversations": [self.export(owner, c.id) for c in everything]}

    def import_records(self, owner: str, data) -> list[str]:
        """Store conversations from an export (one record, a list, or `glmapp.conversations/1`) as new ones owned
        by `owner`, all or none; returns their ids in the file's order."""
        records = self._records(data)
        prepared = [self._prepare(i, r) for i, r in enumerate(records)]
        ids = []
        with self.db.session() as session:
            # Last record first: the list (newest first) then shows them in the file's order, above older ones.
            for title, system, model, settings, messages in reversed(prepared):
                now = utcnow()
                c = Conversation(id=uuid.uuid4().hex, owner=_check_owner(owner), title=title, created_at=now,
                                 updated_at=now, system_prompt=system, model=model, adapter=settings.get("adapter"),
                                 settings={k: v for k, v in settings.items() if k != "adapter"})
                session.add(c)
                session.flush()
                for role, content in messages:
                    self._add(session, c, role, content, None, c.leaf_id)
                ids.append(c.id)
        return ids[::-1]

    @staticmethod
    def _records(data) -> list:
        if isinstance(data, dict) and data.get("format") == FORMAT_MANY:
            data = data.get("conversations")
        elif isinstance(data, dict):
            data = [data]
        if not isinstance(data, list) or not data:
            raise ImportFormatError(f"Expected a {FORMAT} export, a list of them or a {FORMAT_MANY} file.")
        return data

    def _prepare(self, index: int, record) -> tuple:
        where = f"Conversation {index + 1}"
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ImportFormatError(f"{where}: expected an object with \"format\": \"{FORMAT}\".")
        messages = record.get("messages")
        if not isinstance(messages, list):
            raise ImportFormatError(f"{where}: \"messages\" must be a list of {{role, content}} objects.")
        system, turns = "", []
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ImportFormatError(f"{where}, message {j + 1}: expected {{\"role\": ..., \"content\": text}}.")
            if m.get("role") == "system" and j == 0:
                system = m["content"]
            elif m.get("role") in ROLES:
                turns.append((m["role"], m["content"]))
            else:
                raise ImportFormatError(f"{where}, message {j + 1}: role {m.get('role')!r} is not one of "
                                        f"{', '.join(ROLES)} (a system message may only come first).")
        model, settings = record.get("model") or {}, record.get("settings") or {}
        if not isinstance(model, dict) or not isinstance(settings, dict):
            raise ImportFormatError(f"{where}: \"model\" and \"settings\" must be objects.")
        for key, value in settings.items():  # opening a conversation puts these values into the page's widgets
            if key == "adapter" and not (value is None or isinstance(value, str)):
                raise ImportFormatError(f"{where}: settings.adapter must be an adapter name or null (got {value!r}).")
            if key != "adapter" and (isinstance(value, bool) or not (value is None or isinstance(value, (int, float)))):
                raise ImportFormatError(f"{where}: settings.{key} must be a number or null (got {value!r}).")
        title = record.get("title") or ""
        try:
            title = self._title(title, allow_empty=True)
        except StoreError as e:
            raise ImportFormatError(f"{where}: {e}") from None
        return title, system, model, settings, turns
