"""Opening the database the same way everywhere: WAL, a busy timeout, private file modes.

The bot (event loop + inference thread) and a training cycle (another process) share one
file. WAL lets readers and one writer overlap; `busy_timeout` makes a writer wait for the
other instead of failing with "database is locked"; transactions that read then write use
BEGIN IMMEDIATE so two writers never deadlock on a lock upgrade.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.files import ensure_private_dir

BUSY_TIMEOUT_MS = 15_000


class Database:
    """One sqlite3 connection plus a lock, so the event loop and the worker thread can share it.

    Plain sqlite3, no wrapper library: the store writes its own SQL (every query is in
    memory/store.py) and memory/migrations.py keeps its own record of applied migrations, so
    sqlite-utils was a dependency nothing used and is gone."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path) if str(path) != ":memory:" else None
        if self.path is not None:
            ensure_private_dir(self.path.parent)
            fresh = not self.path.exists()
            if fresh:  # created 0600 from the start (SQLite gives its -wal and -shm files the same mode)
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
            if fresh:
                os.chmod(self.path, 0o600)
        else:
            conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        self.conn = conn
        self.lock = threading.RLock()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any exception; re-entrant within one thread."""
        with self.lock:
            if self.conn.in_transaction:
                yield self.conn
                return
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict]:
        with self.lock:
            cur = self.conn.execute(sql, params)
            cols = [c[0] for c in cur.description or ()]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def one(self, sql: str, params: tuple | dict = ()) -> dict | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: tuple | dict = ()):
        with self.lock:
            row = self.conn.execute(sql, params).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        with self.lock:
            self.conn.close()
