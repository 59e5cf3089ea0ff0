"""Database: one SQLAlchemy engine and session factory, migrated to the newest schema when opened.

Notable choices:
- Any SQLAlchemy URL works; `sqlite_url(data_dir)` is the default (one file, nothing to set up).
- SQLite runs in WAL mode with `synchronous=FULL`: a committed transaction survives a killed process
  (and a power cut); an uncommitted one leaves nothing behind. Foreign keys are switched on (SQLite's
  default is off) so deleting a conversation deletes its messages.
- Migrations are Alembic scripts shipped in the package and run on our own connection (no alembic.ini).
  On PostgreSQL an advisory lock serialises front ends that start at the same time. A database stamped
  with a revision this code does not know (written by a newer glmapp) is refused, never "downgraded".
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import sessionmaker

from glmapp.store.errors import StoreError

MIGRATIONS = Path(__file__).with_name("migrations")
DB_FILE = "glmapp.sqlite3"
_PG_LOCK_ID = 0x676C6D617070  # "glmapp": one advisory lock id for migrations


def sqlite_url(data_dir: str | Path) -> str:
    """URL of the default database: one SQLite file under data_dir (created if missing)."""
    folder = Path(data_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve() / DB_FILE}"


def _sqlite_pragmas(dbapi_connection, _record):
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=10000"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _alembic_config(connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


class Database:
    """Owns the engine; `session()` is one transaction, committed on success and rolled back on error."""

    def __init__(self, url: str, migrate: bool = True):
        try:
            parsed = make_url(url)
            self.engine: Engine = create_engine(parsed, pool_pre_ping=True)
        except (ArgumentError, ImportError, ValueError) as e:
            raise StoreError(f"Cannot use database URL {self._safe(url)!r}: {e}. Give an SQLAlchemy URL such as "
                             "sqlite:///path/glmapp.sqlite3 or postgresql+psycopg://user@host/db.") from None
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.migrate()

    @staticmethod
    def _safe(url: str) -> str:
        try:
            return make_url(url).render_as_string(hide_password=True)
        except (ArgumentError, ValueError):
            return "(unparseable)"

    @contextmanager
    def session(self):
        with self._sessions.begin() as session:
            yield session

    def head(self) -> str:
        return ScriptDirectory(str(MIGRATIONS)).get_current_head()

    def revision(self) -> str | None:
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def migrate(self) -> None:
        """Bring the schema to the newest revision; data is kept (migrations only add or transform)."""
        try:
            with self.engine.begin() as connection:
                if self.dialect == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
                current = MigrationContext.configure(connection).get_current_revision()
                scripts = ScriptDirectory(str(MIGRATIONS))
                if current is not None and current not in {r.revision for r in scripts.walk_revisions()}:
                    raise StoreError(f"The database is at schema revision {current!r}, which this glmapp does not "
                                     "know: it was written by a newer glmapp. Upgrade glmapp to use it.")
                command.upgrade(_alembic_config(connection), "head")
        except OperationalError as e:
            raise StoreError(f"Cannot open the database {self._safe(str(self.engine.url))!r}: {e.orig}.") from None

    def dispose(self) -> None:
        self.engine.dispose()

