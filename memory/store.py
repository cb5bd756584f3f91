"""The store: every read and write of conversations, feedback, lineage and audit events.

Nothing else in the project writes SQL for these tables. The user's message is written
(`add_user_turn`) before the model sees it, and the reply with all its metadata lands in a
single transaction (`complete_turn`), so a crash in between leaves a visible pending turn,
never a half-recorded one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from memory.db import Database
from memory.migrations import migrate, now


@dataclass(frozen=True)
class Exchange:
    """One answered turn as the model will see it again: what the user said, what it replied."""

    turn_id: int
    user_text: str
    reply_text: str


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


class Store:
    def __init__(self, database: Database) -> None:
        self.database = database

    @classmethod
    def open(cls, path: Path | str) -> Store:
        database = Database(path)
        with database.lock:
            migrate(database.conn)
        return cls(database)

    def close(self) -> None:
        self.database.close()

    # --- people and sessions ------------------------------------------------------------
    def _touch(self, conn, chat_id: int, chat_type: str, title: str | None,
               user_id: int, username: str | None, first_name: str | None) -> None:
        ts = now()
        conn.execute(
            "INSERT INTO users (id, username, first_name, created_at, last_seen) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET username=excluded.username, first_name=excluded.first_name, "
            "last_seen=excluded.last_seen", (user_id, username, first_name, ts, ts))
        conn.execute(
            "INSERT INTO chats (id, type, title, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET type=excluded.type, title=excluded.title",
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

    # --- turns --------------------------------------------------------------------------
    def add_user_turn(self, *, chat_id: int, user_id: int, text: str, user_message_id: int | None = None,
                      chat_type: str = "private", chat_title: str | None = None,
                      username: str | None = None, first_name: str | None = None,
                      status: str = "pending") -> int:
        """Store what the user said, before anything else happens to it."""
        with self.database.transaction() as conn:
            self._touch(conn, chat_id, chat_type, chat_title, user_id, username, first_name)
            session_id = self._open_session(conn, chat_id)
            return conn.execute(
                "INSERT INTO turns (session_id, chat_id, user_id, user_message_id, user_text, created_at, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (session_id, chat_id, user_id, user_message_id, text, now(), status)).lastrowid

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
                       generation_id=row["generation_id"], context_start_turn_id=row["context_start_turn_id"])

    def latest_answered_turn(self, chat_id: int) -> int | None:
        session_id = self.current_session(chat_id)
        if session_id is None:
            return None
        return self.database.scalar(
            "SELECT id FROM turns WHERE session_id = ? AND status = 'answered' ORDER BY id DESC LIMIT 1",
            (session_id,))

    def history(self, session_id: int, *, before_turn_id: int | None = None) -> list[Exchange]:
        """Answered turns of a session, oldest first, with the 🔁 sample the user kept if any."""
        rows = self.database.query(
            "SELECT t.id, t.user_text, COALESCE(a.text, t.reply_text) AS reply FROM turns t "
            "LEFT JOIN alternatives a ON a.id = t.picked_alternative_id "
            "WHERE t.session_id = ? AND t.status = 'answered' AND (? IS NULL OR t.id < ?) ORDER BY t.id",
            (session_id, before_turn_id, before_turn_id))
        return [Exchange(r["id"], r["user_text"], r["reply"]) for r in rows]

    def context_start(self, session_id: int) -> int | None:
        """Where the last served context of this session began (the rolling window's anchor)."""
        return self.database.scalar(
            "SELECT context_start_turn_id FROM turns WHERE session_id = ? AND status = 'answered' "
            "ORDER BY id DESC LIMIT 1", (session_id,))

    def pending_turns(self) -> list[dict]:
        """Turns whose reply never landed (e.g. the process died mid-reply)."""
        return self.database.query("SELECT id, chat_id, user_id, user_text FROM turns WHERE status = 'pending'")

    # --- feedback -----------------------------------------------------------------------
    def rate(self, turn_id: int, user_id: int, value: int) -> str:
        """One rating per user per reply; returns 'new', 'changed' or 'same'."""
        if value not in (-1, 1):
            raise ValueError("rating must be -1 or +1")
        with self.database.transaction() as conn:
            row = conn.execute("SELECT value FROM ratings WHERE turn_id = ? AND user_id = ?",
                               (turn_id, user_id)).fetchone()
            ts = now()
            if row is None:
                conn.execute("INSERT INTO ratings (turn_id, user_id, value, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?)", (turn_id, user_id, value, ts, ts))
                return "new"
            if row[0] == value:
                return "same"
            conn.execute("UPDATE ratings SET value = ?, updated_at = ? WHERE turn_id = ? AND user_id = ?",
                         (value, ts, turn_id, user_id))
            return "changed"

    def rating(self, turn_id: int, user_id: int) -> int | None:
        return self.database.scalar("SELECT value FROM ratings WHERE turn_id = ? AND user_id = ?", (turn_id, user_id))

    def add_alternative(self, turn_id: int, text: str, generation_id: str | None) -> int:
        with self.database.transaction() as conn:
            return conn.execute("INSERT INTO alternatives (turn_id, text, generation_id, created_at) "
                                "VALUES (?, ?, ?, ?)", (turn_id, text, generation_id, now())).lastrowid

    def set_alternative_message_ids(self, alternative_id: int, message_ids: list[int]) -> None:
        with self.database.transaction() as conn:
            conn.execute("UPDATE alternatives SET message_ids = ? WHERE id = ?",
                         (json.dumps(message_ids), alternative_id))

    def alternative(self, alternative_id: int) -> dict | None:
        row = self.database.one("SELECT * FROM alternatives WHERE id = ?", (alternative_id,))
        if row:
            row["message_ids"] = json.loads(row["message_ids"] or "[]")
        return row

    def pick(self, turn_id: int, alternative_id: int, user_id: int, *, keep_alternative: bool) -> bool:
        """Record which of the two samples the user kept, as a (chosen, rejected) pair.

        Returns False when this pair was already decided (a replayed button press).
        """
        with self.database.transaction() as conn:
            done = conn.execute("SELECT 1 FROM preferences WHERE turn_id = ? AND user_id = ? AND source = 'regenerate'",
                                (turn_id, user_id)).fetchone()
            if done:
                return False
            original = conn.execute("SELECT reply_text FROM turns WHERE id = ?", (turn_id,)).fetchone()[0]
            alt = conn.execute("SELECT text FROM alternatives WHERE id = ? AND turn_id = ?",
                               (alternative_id, turn_id)).fetchone()[0]
            chosen, rejected = (alt, original) if keep_alternative else (original, alt)
            conn.execute("INSERT INTO preferences (turn_id, user_id, chosen, rejected, source, created_at) "
                         "VALUES (?, ?, ?, ?, 'regenerate', ?)", (turn_id, user_id, chosen, rejected, now()))
            conn.execute("UPDATE turns SET picked_alternative_id = ? WHERE id = ?",
                         (alternative_id if keep_alternative else None, turn_id))
            return True

    def await_correction(self, chat_id: int, user_id: int, turn_id: int) -> None:
        with self.database.transaction() as conn:
            conn.execute("INSERT INTO awaiting_corrections (chat_id, user_id, turn_id, created_at) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(chat_id, user_id) DO UPDATE SET turn_id = excluded.turn_id, "
                         "created_at = excluded.created_at", (chat_id, user_id, turn_id, now()))

    def cancel_correction(self, chat_id: int, user_id: int) -> bool:
        with self.database.transaction() as conn:
            return conn.execute("DELETE FROM awaiting_corrections WHERE chat_id = ? AND user_id = ?",
                                (chat_id, user_id)).rowcount > 0

    def take_correction(self, chat_id: int, user_id: int, text: str) -> int | None:
        """If this user owes a correction in this chat, store `text` as it (and as a preference pair).

        Returns the corrected turn's id, or None when no correction was awaited.
        """
        with self.database.transaction() as conn:
            row = conn.execute("SELECT turn_id FROM awaiting_corrections WHERE chat_id = ? AND user_id = ?",
                               (chat_id, user_id)).fetchone()
            if row is None:
                return None
            turn_id = row[0]
            reply = conn.execute("SELECT reply_text FROM turns WHERE id = ?", (turn_id,)).fetchone()[0]
            ts = now()
            conn.execute("INSERT INTO corrections (turn_id, user_id, text, created_at) VALUES (?, ?, ?, ?)",
                         (turn_id, user_id, text, ts))
            conn.execute("INSERT INTO preferences (turn_id, user_id, chosen, rejected, source, created_at) "
                         "VALUES (?, ?, ?, ?, 'correction', ?)", (turn_id, user_id, text, reply or "", ts))
            conn.execute("DELETE FROM awaiting_corrections WHERE chat_id = ? AND user_id = ?", (chat_id, user_id))
            return turn_id

    # --- generations and audit ----------------------------------------------------------
    def upsert_generation(self, *, gen_id: str, parent_id: str | None, gguf_path: str, gguf_sha256: str,
                          status: str, meta: dict | None = None) -> None:
        with self.database.transaction() as conn:
            conn.execute(
                "INSERT INTO generations (id, parent_id, gguf_path, gguf_sha256, status, created_at, meta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET status = excluded.status, "
                "meta = excluded.meta", (gen_id, parent_id, gguf_path, gguf_sha256, status, now(),
                                         json.dumps(meta or {})))

    def generation(self, gen_id: str) -> dict | None:
        return self.database.one("SELECT * FROM generations WHERE id = ?", (gen_id,))

    def log_event(self, kind: str, *, user_id: int | None = None, chat_id: int | None = None,
                  detail: str | dict | None = None) -> None:
        if isinstance(detail, dict):
            detail = json.dumps(detail, ensure_ascii=False)
        with self.database.transaction() as conn:
            conn.execute("INSERT INTO events (at, kind, user_id, chat_id, detail) VALUES (?, ?, ?, ?, ?)",
                         (now(), kind, user_id, chat_id, detail))

    def events(self, kind: str | None = None, limit: int = 50) -> list[dict]:
        return self.database.query(
            "SELECT * FROM events WHERE (? IS NULL OR kind = ?) ORDER BY id DESC LIMIT ?", (kind, kind, limit))

    def generation_ratings(self, gen_id: str, *, limit: int, newest: bool = False) -> list[int]:
        """Ratings (+1/−1) of the replies `gen_id` wrote, one per turn, in the order they were first given.

        `newest` takes the latest `limit` instead of the first. A turn rated by several people
        (groups) counts by the sign of its ratings' sum; a tie counts as neither.
        """
        order = "DESC" if newest else "ASC"
        rows = self.database.query(
            "SELECT SUM(r.value) AS v, MIN(r.created_at) AS first_at FROM ratings r JOIN turns t ON t.id = r.turn_id "
            f"WHERE t.generation_id = ? GROUP BY r.turn_id HAVING v != 0 ORDER BY first_at {order}, r.turn_id {order} "
            "LIMIT ?", (gen_id, limit))
        values = [1 if r["v"] > 0 else -1 for r in rows]
        return values[::-1] if newest else values

    def last_event(self, kinds: tuple[str, ...]) -> dict | None:
        marks = ",".join("?" * len(kinds))
        return self.database.one(f"SELECT * FROM events WHERE kind IN ({marks}) ORDER BY id DESC LIMIT 1", kinds)

    # --- figures ------------------------------------------------------------------------
    def stats(self) -> dict:
        q = self.database.scalar
        recent = self.database.query(
            "SELECT completion_tokens, latency_s, ttft_s FROM turns WHERE status = 'answered' "
            "AND completion_tokens > 0 AND latency_s > 0 ORDER BY id DESC LIMIT 20")
        gen_time = sum(max(r["latency_s"] - (r["ttft_s"] or 0.0), 1e-6) for r in recent)
        return {
            "chats": q("SELECT COUNT(*) FROM chats"),
            "users": q("SELECT COUNT(*) FROM users"),
            "turns": q("SELECT COUNT(*) FROM turns"),
            "turns_answered": q("SELECT COUNT(*) FROM turns WHERE status = 'answered'"),
            "turns_pending": q("SELECT COUNT(*) FROM turns WHERE status = 'pending'"),
            "ratings_up": q("SELECT COUNT(*) FROM ratings WHERE value = 1"),
            "ratings_down": q("SELECT COUNT(*) FROM ratings WHERE value = -1"),
            "preferences": q("SELECT COUNT(*) FROM preferences"),
            "corrections": q("SELECT COUNT(*) FROM corrections"),
            "recent_tokens_per_s": round(sum(r["completion_tokens"] for r in recent) / gen_time, 1) if recent else None,
        }
