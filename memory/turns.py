"""Turns: what a user said and what the model replied, from pending to answered.

The user's message is written (`add_user_turn`) before the model sees it and the reply lands in
one transaction (`complete_turn`), so a crash in between leaves a visible pending turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from core.files import now
from memory import language
from memory.sessions import SessionsMixin
from memory.speakers import label_for


@dataclass(frozen=True)
class Exchange:
    """One answered turn as the model will see it again: what the user said, what it replied; in a
    group, who said it and when (memory/speakers.py renders them)."""

    turn_id: int
    user_text: str
    reply_text: str
    speaker: str | None = None      # a group turn's label; None in private chats
    created_at: str | None = None


@dataclass(frozen=True)
class TurnRef:
    id: int
    chat_id: int
    user_id: int
    session_id: int
    status: str
    user_text: str
    reply_text: str | None
    reply_message_ids: list[int]
    generation_id: str | None
    context_start_turn_id: int | None = None
    speaker: str | None = None      # a group turn's label (memory/speakers.py); None in private chats
    created_at: str | None = None


class TurnsMixin(SessionsMixin):
    """Turns rows and the conversation history read back from them."""

    def add_user_turn(self, *, chat_id: int, user_id: int, text: str, user_message_id: int | None = None,
                      chat_type: str = "private", chat_title: str | None = None,
                      username: str | None = None, first_name: str | None = None,
                      status: str = "pending") -> int:
        """Store what the user said, before anything else happens to it; in a group, with the name
        it will be read under from now on (memory/speakers.py); with its language (memory/language.py),
        or, for a message too short to tell ("ok", 👍), the language of the conversation so far."""
        speaker = label_for(chat_type, first_name, username, user_id)
        lang = language.detect(text)
        with self.database.transaction() as conn:
            self._touch(conn, chat_id, chat_type, chat_title, user_id, username, first_name)
            session_id = self._open_session(conn, chat_id)
            if lang is None:
                row = conn.execute("SELECT language FROM turns WHERE session_id = ? AND language IS NOT NULL "
                                   "ORDER BY id DESC LIMIT 1", (session_id,)).fetchone()
                lang = row[0] if row else None
            return conn.execute(
                "INSERT INTO turns (session_id, chat_id, user_id, user_message_id, user_text, created_at, status, "
                "speaker, language) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (session_id, chat_id, user_id, user_message_id, text, now(), status, speaker, lang)).lastrowid

    def complete_turn(self, turn_id: int, *, reply_text: str, generation_id: str | None, prompt_tokens: int,
                      completion_tokens: int, latency_s: float, ttft_s: float | None,
                      context_start_turn_id: int | None, status: str = "answered") -> None:
        with self.database.transaction() as conn:
            conn.execute(
                "UPDATE turns SET status = ?, reply_text = ?, generation_id = ?, prompt_tokens = ?, "
                "completion_tokens = ?, latency_s = ?, ttft_s = ?, context_start_turn_id = ?, answered_at = ? "
                "WHERE id = ?",
                (status, reply_text, generation_id, prompt_tokens, completion_tokens, latency_s, ttft_s,
                 context_start_turn_id, now(), turn_id))

    def mark_turn(self, turn_id: int, status: str, reply_text: str | None = None) -> None:
        """Close a turn that the model did not answer (refused, busy, failed) with what the user was told."""
        with self.database.transaction() as conn:
            conn.execute("UPDATE turns SET status = ?, reply_text = COALESCE(?, reply_text), answered_at = ? "
                         "WHERE id = ?", (status, reply_text, now(), turn_id))

    def set_reply_message_ids(self, turn_id: int, message_ids: list[int]) -> None:
        with self.database.transaction() as conn:
            conn.execute("UPDATE turns SET reply_message_ids = ? WHERE id = ?", (json.dumps(message_ids), turn_id))

    def turn(self, turn_id: int) -> TurnRef | None:
        row = self.database.one("SELECT * FROM turns WHERE id = ?", (turn_id,))
        if row is None:
            return None
        return TurnRef(id=row["id"], chat_id=row["chat_id"], user_id=row["user_id"], session_id=row["session_id"],
                       status=row["status"], user_text=row["user_text"], reply_text=row["reply_text"],
                       reply_message_ids=json.loads(row["reply_message_ids"] or "[]"),
                       generation_id=row["generation_id"], context_start_turn_id=row["context_start_turn_id"],
                       speaker=row["speaker"], created_at=row["created_at"])

    def latest_answered_turn(self, chat_id: int) -> int | None:
        session_id = self.current_session(chat_id)
        if session_id is None:
            return None
        return self.database.scalar(
            "SELECT id FROM turns WHERE session_id = ? AND status = 'answered' ORDER BY id DESC LIMIT 1",
            (session_id,))

    def history(self, session_id: int, *, before_turn_id: int | None = None, since_turn_id: int | None = None,
                last: int | None = None) -> list[Exchange]:
        """Answered turns of a session, oldest first, with the 🔁 sample the user kept if any.

        `since_turn_id`: from the rolling window's anchor on (what a reply is built from; a session
        lasts until /reset, so months of a group's turns would otherwise be read for every message);
        `last`: only the latest n."""
        rows = self.database.query(
            "SELECT t.id, t.user_text, COALESCE(a.text, t.reply_text) AS reply, t.speaker, t.created_at FROM turns t "
            "LEFT JOIN alternatives a ON a.id = t.picked_alternative_id "
            "WHERE t.session_id = ? AND t.status = 'answered' AND (? IS NULL OR t.id < ?) AND (? IS NULL OR t.id >= ?) "
            "ORDER BY t.id DESC LIMIT ?",
            (session_id, before_turn_id, before_turn_id, since_turn_id, since_turn_id, -1 if last is None else last))
        return [Exchange(r["id"], r["user_text"], r["reply"], r["speaker"], r["created_at"]) for r in reversed(rows)]

    def recent_chats(self, limit: int) -> list[tuple[int, int]]:
        """(chat, its current session) for the chats answered most recently, newest first.

        Asked of the open sessions (one per chat), each by its latest answered turn through the
        (session_id, id) index: a hot-swap's warm-up asks on every pass, and grouping the whole
        turns table took 0.15 s at 400k turns."""
        rows = self.database.query(
            "SELECT chat_id, session FROM (SELECT s.chat_id, s.id AS session, (SELECT MAX(t.id) FROM turns t "
            "WHERE t.session_id = s.id AND t.status = 'answered') AS last FROM sessions s WHERE s.ended_at IS NULL) "
            "WHERE last IS NOT NULL ORDER BY last DESC LIMIT ?", (limit,))
        return [(r["chat_id"], r["session"]) for r in rows]

    def context_start(self, session_id: int) -> int | None:
        """Where the last served context of this session began (the rolling window's anchor)."""
        return self.database.scalar(
            "SELECT context_start_turn_id FROM turns WHERE session_id = ? AND status = 'answered' "
            "ORDER BY id DESC LIMIT 1", (session_id,))

    def pending_turns(self) -> list[dict]:
        """Turns whose reply never landed (e.g. the process died mid-reply)."""
        return self.database.query("SELECT id, chat_id, user_id, user_message_id, user_text FROM turns WHERE status = 'pending' ORDER BY id")

    def undelivered_turns(self, *, since: str) -> list[dict]:
        """Telegram turns answered (in the store) since `since` whose reply never reached the chat:
        the process died while sending it. Delivery records the message ids, even an empty list."""
        return self.database.query(
            "SELECT id, chat_id, user_message_id, reply_text FROM turns WHERE status = 'answered' AND reply_message_ids IS NULL "
            "AND user_message_id IS NOT NULL AND answered_at >= ? ORDER BY id", (since,))

    def search_turns(self, text: str, *, limit: int = 50) -> list[dict]:
        """Turns whose message or reply contains `text` (case-insensitive for ASCII; `%` and `_` are
        literal), newest first, with their author's username and first name (the owner's web page)."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        return self.database.query(
            "SELECT t.id, t.chat_id, t.user_id, t.user_text, t.reply_text, t.status, t.generation_id, t.created_at, "
            "c.type AS chat_type, u.username, u.first_name FROM turns t JOIN chats c ON c.id = t.chat_id "
            "LEFT JOIN users u ON u.id = t.user_id "
            "WHERE t.user_text LIKE ? ESCAPE '\\' OR t.reply_text LIKE ? ESCAPE '\\' ORDER BY t.id DESC LIMIT ?",
            (pattern, pattern, limit))

    def is_turn_message(self, chat_id: int, message_id: int) -> bool:
        """Whether a chat's message `message_id` was stored as a turn (it was said to the bot). Read
        through the chat's sessions, so it looks at that chat's turns, not the whole table."""
        return self.database.scalar(
            "SELECT 1 FROM turns WHERE session_id IN (SELECT id FROM sessions WHERE chat_id = ?) "
            "AND chat_id = ? AND user_message_id = ? LIMIT 1", (chat_id, chat_id, message_id)) is not None
