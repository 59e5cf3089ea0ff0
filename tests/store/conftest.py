"""Store fixtures: a fresh SQLite file, and a real PostgreSQL server started from Debian's binaries.

The PostgreSQL server (initdb + pg_ctl in a temp dir, 127.0.0.1 on a free port, trust auth) is started
once per session and each test gets its own database. As root, the server runs as the `postgres` user
(initdb refuses root). Tests that need it are skipped, with the reason, only when the binaries are absent.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from glmapp.store import open_store


def _pg_bin() -> str | None:
    for folder in ["/usr/local/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        if os.access(os.path.join(folder, "initdb"), os.X_OK) and os.access(os.path.join(folder, "pg_ctl"), os.X_OK):
            return folder
    found = shutil.which("initdb")
    return os.path.dirname(found) if found and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """URL prefix `postgresql+psycopg://glmapp@127.0.0.1:PORT/` of a running server; stopped at the end."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) not installed: pip install psycopg[binary]")
    root = Path(tempfile.mkdtemp(prefix="glmapp-test-pg-"))  # not under pytest's root-only (0700) folder
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    _run([*prefix, f"{bindir}/initdb", "-D", str(data), "-U", "glmapp", "--auth=trust", "-E", "UTF8", "--no-sync"])
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -F"
    _run([*prefix, f"{bindir}/pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "-t", "60",
          "start"])
    try:
        yield f"postgresql+psycopg://glmapp@127.0.0.1:{port}/"
    finally:
        subprocess.run([*prefix, f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr or done.stdout}")


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's server."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server.replace("postgresql+psycopg", "postgresql") + "postgres",
                         autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_server + name


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'glmapp.sqlite3'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request):
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def store(db_url):
    s = open_store(db_url)
    yield s
    s.close()
