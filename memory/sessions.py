"""People, chats and sessions: who spoke where, and which session of a chat is open.

The base the turn methods build on: `_touch` and `_open_session` run inside a caller's
transaction, so recording a message and the person who sent it is one write.
"""

from __future__ import annotations

from core.files import now
from memory.db import Database


class SessionsMixin:
    """Users, chats and sessions rows."""

    database: Database

    def _touch(self, conn, chat_id: int, chat_type: str, title: str | None,
               user_id: int, username: str | None, first_name: str | None) -> None:
        """Record who spoke where. A group always has a title, so None (a /reset, a sticker's note:
        callers that do not know it) keeps the stored one rather than clearing it."""
        ts = now()
        conn.execute(
            "INSERT INTO users (id, username, first_name, created_at, last_seen) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET username=excluded.username, first_name=excluded.first_name, "
            "last_seen=excluded.last_seen", (user_id, username, first_name, ts, ts))
        conn.execute(
            "INSERT INTO chats (id, type, title, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET type=excluded.type, title=COALESCE(excluded.title, chats.title)",
            (chat_id, chat_type, title, ts))

    def _open_session(self, conn, chat_id: int) -> int:
        row = conn.execute("SELECT id FROM sessions WHERE chat_id = ? AND ended_at IS NULL ORDER BY id DESC LIMIT 1",
                           (chat_id,)).fetchone()
        if row:
            return row[0]
        return conn.execute("INSERT INTO sessions (chat_id, started_at) VALUES (?, ?)", (chat_id, now())).lastrowid

    def current_session(self, chat_id: int) -> int | None:
        return self.database.scalar(
            "SELECT id FROM sessions WHERE chat_id = ? AND ended_at IS NULL ORDER BY id DESC LIMIT 1", (chat_id,))

    def reset_session(self, chat_id: int, *, chat_type: str = "private", user_id: int = 0,
                      username: str | None = None, first_name: str | None = None) -> int:
        """End the chat's session and open a new one: the rolling context starts empty."""
        with self.database.transaction() as conn:
            self._touch(conn, chat_id, chat_type, None, user_id, username, first_name)
            conn.execute("UPDATE sessions SET ended_at = ? WHERE chat_id = ? AND ended_at IS NULL", (now(), chat_id))
            return conn.execute("INSERT INTO sessions (chat_id, started_at) VALUES (?, ?)",
                                (chat_id, now())).lastrowid
