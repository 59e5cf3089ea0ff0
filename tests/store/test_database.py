"""Opening the database: migrations create exactly the declared schema, reopening keeps data, bad URLs and
databases from a newer glmapp are refused with a clear message."""

from __future__ import annotations

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from glmapp.store import Database, StoreError, open_store, sqlite_url
from glmapp.store.schema import Base


def test_migrations_create_exactly_the_declared_tables(db_url):
    db = Database(db_url)
    with db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    assert db.revision() == db.head()
    db.dispose()


def test_reopening_migrates_nothing_away(db_url):
    s = open_store(db_url)
    cid = s.conversations.create("alice")
    s.conversations.append("alice", cid, "user", "kept")
    s.close()
    for _ in range(2):
        s = open_store(db_url)
        assert [m.content for m in s.conversations.get("alice", cid).messages] == ["kept"]
        s.close()


def test_default_database_is_one_sqlite_file_in_the_data_dir(tmp_path):
    url = sqlite_url(tmp_path / "data")
    s = open_store(url)
    s.conversations.create("alice")
    s.close()
    assert (tmp_path / "data" / "glmapp.sqlite3").is_file()
    with sqlite3.connect(tmp_path / "data" / "glmapp.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_database_from_a_newer_glmapp_is_refused(sqlite_url):
    open_store(sqlite_url).close()
    path = sqlite_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f00d'")
    with pytest.raises(StoreError, match="revision 'f00d'.*newer glmapp"):
        open_store(sqlite_url)


@pytest.mark.parametrize("url, message", [
    ("nonsense", "Cannot use database URL"),
    ("nosuchdialect://x/y", "Cannot use database URL"),
    ("sqlite:////nonexistent-dir/sub/db.sqlite3", "Cannot open the database"),
])
def test_bad_urls_get_a_clear_error(url, message):
    with pytest.raises(StoreError, match=message):
        open_store(url)


def test_password_is_not_repeated_in_errors():
    with pytest.raises(StoreError) as raised:
        open_store("postgresql+psycopg://user:s3cret@127.0.0.1:1/db")
    assert "s3cret" not in str(raised.value) and "Cannot open the database" in str(raised.value)
