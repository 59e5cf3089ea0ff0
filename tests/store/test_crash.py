"""A process killed with SIGKILL loses at most the message it was writing: a real child process, a real kill."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

from glmapp.store import open_store

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Appends messages as fast as it can, printing the count after each commit, until killed.
WRITER = textwrap.dedent("""
    import sys
    from glmapp.store import open_store
    store = open_store(sys.argv[1])
    i = 0
    while True:
        store.conversations.append("alice", sys.argv[2], "user" if i % 2 == 0 else "assistant", f"message {i}")
        i += 1
        print(i, flush=True)
""")

# Writes a question, then the first part of a reply inside a transaction it never commits, and waits.
MID_REPLY = textwrap.dedent("""
    import sys
    from glmapp.store import open_store
    from glmapp.store.schema import Message, utcnow
    store = open_store(sys.argv[1])
    store.conversations.append("alice", sys.argv[2], "user", "the question")
    with store.db.session() as session:
        session.add(Message(conversation_id=sys.argv[2], parent_id=None, role="assistant", content="half a re",
                            meta={}, created_at=utcnow()))
        session.flush()
        print("mid-reply", flush=True)
        sys.stdin.readline()
""")


def _child(script: str, url: str, cid: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, url, cid], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL


def _check_sqlite(url: str) -> None:
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_killed_mid_reply_keeps_earlier_messages_and_drops_the_partial_reply(db_url):
    store = open_store(db_url)
    cid = store.conversations.create("alice")
    store.conversations.append("alice", cid, "user", "earlier")
    store.conversations.append("alice", cid, "assistant", "earlier answer")
    child = _child(MID_REPLY, db_url, cid)
    assert child.stdout.readline().strip() == "mid-reply"
    _kill(child)
    _check_sqlite(db_url)
    view = open_store(db_url).conversations.get("alice", cid)
    assert [m.content for m in view.messages] == ["earlier", "earlier answer", "the question"]
    assert store.conversations.list("alice", "half a re") == []
    store.close()


def test_killed_while_writing_fast_loses_at_most_the_message_being_written(db_url):
    store = open_store(db_url)
    cid = store.conversations.create("alice")
    child = _child(WRITER, db_url, cid)
    acknowledged = 0
    for _ in range(30):  # kill right after an acknowledgement: the child is inside its next write
        line = child.stdout.readline()
        assert line, "the writer died on its own"
        acknowledged = int(line)
    _kill(child)
    _check_sqlite(db_url)
    view = open_store(db_url).conversations.get("alice", cid)
    contents = [m.content for m in view.messages]
    assert acknowledged <= len(contents) <= acknowledged + 1
    assert contents == [f"message {i}" for i in range(len(contents))]  # the shown branch is whole and in order
    store.close()
