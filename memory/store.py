"""The store: every read and write of conversations, feedback, lineage and audit events.

Nothing else in the project writes SQL for these tables. The user's message is written
(`add_user_turn`) before the model sees it, and the reply with all its metadata lands in a
single transaction (`complete_turn`), so a crash in between leaves a visible pending turn,
never a half-recorded one.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from core.files import now
from memory.db import Database
from memory.migrations import migrate


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


@dataclass(frozen=True)
class ReviewItem:
    """An answered turn as an admin reviews it: the exchange, a little context, what people said of it."""

    turn_id: int
    chat_type: str
    user_text: str
    reply_text: str                  # the reply the user kept (the 🔁 sample if they picked it)
    generation_id: str | None
    created_at: str
    ups: int
    downs: int
    corrected: bool
    verdict: str | None
    context: list[Exchange]          # the exchanges before it in its served context, oldest first
    remaining: int = 0               # turns waiting for review, this one included


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

    def recent_chats(self, limit: int) -> list[tuple[int, int]]:
        """(chat, its current session) for the chats answered most recently, newest first."""
        rows = self.database.query(
            "SELECT t.chat_id, MAX(t.id) AS last FROM turns t JOIN sessions s ON s.id = t.session_id "
            "WHERE t.status = 'answered' AND s.ended_at IS NULL GROUP BY t.chat_id ORDER BY last DESC LIMIT ?",
            (limit,))
        out = []
        for r in rows:
            session = self.current_session(r["chat_id"])
            if session is not None:
                out.append((r["chat_id"], session))
        return out

    def context_start(self, session_id: int) -> int | None:
        """Where the last served context of this session began (the rolling window's anchor)."""
        return self.database.scalar(
            "SELECT context_start_turn_id FROM turns WHERE session_id = ? AND status = 'answered' "
            "ORDER BY id DESC LIMIT 1", (session_id,))

    def pending_turns(self) -> list[dict]:
        """Turns whose reply never landed (e.g. the process died mid-reply)."""
        return self.database.query("SELECT id, chat_id, user_id, user_text FROM turns WHERE status = 'pending'")

    def undelivered_turns(self, *, since: str) -> list[dict]:
        """Telegram turns answered (in the store) since `since` whose reply never reached the chat:
        the process died while sending it. Delivery records the message ids, even an empty list."""
        return self.database.query(
            "SELECT id, chat_id, reply_text FROM turns WHERE status = 'answered' AND reply_message_ids IS NULL "
            "AND user_message_id IS NOT NULL AND answered_at >= ? ORDER BY id", (since,))

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

    # --- admin review (/review, `ouro review`) --------------------------------------------
    def next_review(self, *, opt_out_by_default: bool, skip: Collection[int] = (),
                    context_turns: int = 3) -> ReviewItem | None:
        """The next answered turn without a verdict, or None.

        Order: 👍'd turns first (the next cycle trains on them, so a check matters most), then other
        rated ones (👎: candidates for an edit), then unrated; oldest first within each. Turns of
        people who keep their chats out of training are not queued; `skip` leaves turns out.
        """
        queue = ("FROM turns t JOIN users u ON u.id = t.user_id WHERE t.status = 'answered' "
                 "AND COALESCE(u.training_opt_out, ?) = 0 AND NOT EXISTS (SELECT 1 FROM reviews v WHERE v.turn_id = t.id) "
                 "AND t.id NOT IN (SELECT value FROM json_each(?))")
        params = (int(opt_out_by_default), json.dumps(sorted(skip)))
        row = self.database.one(
            "SELECT t.id, (SELECT COALESCE(SUM(r.value), 0) FROM ratings r WHERE r.turn_id = t.id) AS score, "
            "(SELECT COUNT(*) FROM ratings r WHERE r.turn_id = t.id) AS n " + queue
            + " ORDER BY CASE WHEN score > 0 THEN 0 WHEN n > 0 THEN 1 ELSE 2 END, t.id LIMIT 1", params)
        if row is None:
            return None
        remaining = self.database.scalar("SELECT COUNT(*) " + queue, params)
        return self.review_item(row["id"], context_turns=context_turns, remaining=remaining)

    def review_item(self, turn_id: int, *, context_turns: int = 3, remaining: int = 0) -> ReviewItem | None:
        """An answered turn with its context and feedback; None for anything else."""
        row = self.database.one(
            "SELECT t.*, COALESCE(a.text, t.reply_text) AS reply, c.type AS chat_type FROM turns t "
            "JOIN chats c ON c.id = t.chat_id LEFT JOIN alternatives a ON a.id = t.picked_alternative_id "
            "WHERE t.id = ?", (turn_id,))
        if row is None or row["status"] != "answered":
            return None
        values = [r["value"] for r in self.database.query("SELECT value FROM ratings WHERE turn_id = ?", (turn_id,))]
        start = row["context_start_turn_id"] or turn_id
        context = [e for e in self.history(row["session_id"], before_turn_id=turn_id) if e.turn_id >= start]
        return ReviewItem(
            turn_id=turn_id, chat_type=row["chat_type"], user_text=row["user_text"], reply_text=row["reply"] or "",
            generation_id=row["generation_id"], created_at=row["created_at"],
            ups=values.count(1), downs=values.count(-1),
            corrected=bool(self.database.scalar("SELECT COUNT(*) FROM corrections WHERE turn_id = ?", (turn_id,))),
            verdict=self.review_verdict(turn_id),
            context=context[-context_turns:] if context_turns > 0 else [], remaining=remaining)

    def review_verdict(self, turn_id: int) -> str | None:
        return self.database.scalar("SELECT verdict FROM reviews WHERE turn_id = ?", (turn_id,))

    def record_review(self, turn_id: int, reviewer_id: int, verdict: str, edited_text: str | None = None) -> bool:
        """An admin's verdict on an answered turn. The first verdict stands: False if it had one (or is gone)."""
        if verdict not in ("approved", "rejected", "edited"):
            raise ValueError(f"unknown verdict {verdict!r}")
        if (verdict == "edited") != bool(edited_text and edited_text.strip()):
            raise ValueError("an edited verdict needs the edited text, and only it does")
        with self.database.transaction() as conn:
            status = conn.execute("SELECT status FROM turns WHERE id = ?", (turn_id,)).fetchone()
            if status is None or status[0] != "answered":
                return False
            return conn.execute(
                "INSERT INTO reviews (turn_id, reviewer_id, verdict, edited_text, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(turn_id) DO NOTHING",
                (turn_id, reviewer_id, verdict, edited_text.strip() if edited_text else None, now())).rowcount > 0

    def await_review_edit(self, chat_id: int, reviewer_id: int, turn_id: int) -> None:
        with self.database.transaction() as conn:
            conn.execute("INSERT INTO awaiting_review_edits (chat_id, reviewer_id, turn_id, created_at) "
                         "VALUES (?, ?, ?, ?) ON CONFLICT(chat_id, reviewer_id) DO UPDATE SET "
                         "turn_id = excluded.turn_id, created_at = excluded.created_at",
                         (chat_id, reviewer_id, turn_id, now()))

    def awaiting_review_edit(self, chat_id: int, reviewer_id: int) -> int | None:
        return self.database.scalar("SELECT turn_id FROM awaiting_review_edits WHERE chat_id = ? AND reviewer_id = ?",
                                    (chat_id, reviewer_id))

    def cancel_review_edit(self, chat_id: int, reviewer_id: int) -> bool:
        with self.database.transaction() as conn:
            return conn.execute("DELETE FROM awaiting_review_edits WHERE chat_id = ? AND reviewer_id = ?",
                                (chat_id, reviewer_id)).rowcount > 0

    def take_review_edit(self, chat_id: int, reviewer_id: int, text: str) -> int | None:
        """If this admin owes an edit in this chat, record `text` as the turn's reply ('edited').

        Returns the turn's id, or None when no edit was awaited or the turn got a verdict meanwhile.
        """
        with self.database.transaction() as conn:
            turn_id = self.awaiting_review_edit(chat_id, reviewer_id)
            if turn_id is None:
                return None
            conn.execute("DELETE FROM awaiting_review_edits WHERE chat_id = ? AND reviewer_id = ?",
                         (chat_id, reviewer_id))
            return turn_id if text.strip() and self.record_review(turn_id, reviewer_id, "edited", text) else None

    # --- privacy (/optout, /optin, /forget) ----------------------------------------------
    def set_training_opt_out(self, user_id: int, opt_out: bool, *, username: str | None = None,
                             first_name: str | None = None) -> None:
        """Whether this person's chats are kept out of training (the person need not have chatted yet)."""
        ts = now()
        with self.database.transaction() as conn:
            conn.execute(
                "INSERT INTO users (id, username, first_name, created_at, last_seen, training_opt_out) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "training_opt_out = excluded.training_opt_out, last_seen = excluded.last_seen",
                (user_id, username, first_name, ts, ts, int(opt_out)))

    def training_opt_out(self, user_id: int) -> bool | None:
        """True/False as the person chose; None when they never chose (the settings' default applies)."""
        value = self.database.scalar("SELECT training_opt_out FROM users WHERE id = ?", (user_id,))
        return None if value is None else bool(value)

    def user_data_counts(self, user_id: int) -> dict:
        """How much is stored about this person: their messages, ratings, corrections, picks."""
        q = self.database.scalar
        return {
            "messages": q("SELECT COUNT(*) FROM turns WHERE user_id = ?", (user_id,)),
            "ratings": q("SELECT COUNT(*) FROM ratings WHERE user_id = ?", (user_id,)),
            "corrections": q("SELECT COUNT(*) FROM corrections WHERE user_id = ?", (user_id,)),
            "picks": q("SELECT COUNT(*) FROM preferences WHERE user_id = ? AND source = 'regenerate'", (user_id,)),
        }

    def forget_user(self, user_id: int) -> tuple[dict, list[int]]:
        """Delete everything stored about this person, in one transaction; leave a tombstone without content.

        Gone: their turns (with the replies, alternatives, ratings, picks, corrections, reviews and
        pending corrections attached to them), their own ratings, picks and corrections anywhere,
        their private chat and its sessions, their audit events and their user row. Verdicts they
        gave as an admin stay, unsigned. Deleted pages are zeroed (secure_delete) and the WAL is
        checkpointed, so the text does not linger in the file. Returns (rows deleted per table, the
        chats they spoke in — whose cached model state the caller should drop).
        """
        mine = "SELECT id FROM turns WHERE user_id = ?"
        counts: dict[str, int] = {}
        with self.database.lock:
            self.database.conn.execute("PRAGMA secure_delete = ON")
            try:
                with self.database.transaction() as conn:
                    def delete(table: str, where: str, params: tuple) -> None:
                        n = conn.execute(f"DELETE FROM {table} WHERE {where}", params).rowcount
                        counts[table] = counts.get(table, 0) + n

                    chats = [r[0] for r in conn.execute("SELECT DISTINCT chat_id FROM turns WHERE user_id = ?",
                                                        (user_id,))]
                    private = conn.execute("SELECT 1 FROM chats WHERE id = ? AND type = 'private'",
                                           (user_id,)).fetchone() is not None
                    delete("reviews", f"turn_id IN ({mine})", (user_id,))
                    conn.execute("UPDATE reviews SET reviewer_id = NULL WHERE reviewer_id = ?", (user_id,))
                    delete("awaiting_review_edits", f"turn_id IN ({mine}) OR reviewer_id = ?", (user_id, user_id))
                    delete("awaiting_corrections", f"turn_id IN ({mine}) OR user_id = ?", (user_id, user_id))
                    for table in ("corrections", "preferences", "ratings"):
                        delete(table, f"turn_id IN ({mine}) OR user_id = ?", (user_id, user_id))
                    delete("alternatives", f"turn_id IN ({mine})", (user_id,))
                    delete("turns", "user_id = ?", (user_id,))
                    # their private chat (its id is theirs) goes; groups keep their other members' turns
                    delete("sessions", "? AND chat_id = ? AND NOT EXISTS (SELECT 1 FROM turns t WHERE "
                                       "t.session_id = sessions.id)", (private, user_id))
                    delete("chats", "? AND id = ? AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.chat_id = chats.id)",
                           (private, user_id))
                    delete("events", "user_id = ? OR (? AND chat_id = ?)", (user_id, private, user_id))
                    delete("users", "id = ?", (user_id,))
                    if any(counts.values()):  # a tombstone says that it happened, and nothing about whom
                        ts = now()
                        conn.execute("INSERT INTO tombstones (forgotten_at, counts) VALUES (?, ?)",
                                     (ts, json.dumps(counts)))
                        conn.execute("INSERT INTO events (at, kind, detail) VALUES (?, 'forgotten', ?)",
                                     (ts, json.dumps(counts)))
                self.database.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self.database.conn.execute("PRAGMA secure_delete = OFF")
        return counts, chats

    def tombstones(self) -> list[dict]:
        rows = self.database.query("SELECT * FROM tombstones ORDER BY id")
        return [{**r, "counts": json.loads(r["counts"])} for r in rows]

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

    # --- chat-history imports -------------------------------------------------------------
    def add_import(self, *, kind: str, file: str, file_sha256: str, owner: str, summary: dict,
                   examples: list[dict]) -> dict:
        """Record one import and its windows in a single transaction: all of it lands, or none of it.

        `examples` are {"messages", "split", "ended_at", "sha256"}; a window already stored (same
        sha256, e.g. the same export imported again) is skipped and counted. Returns `summary`
        completed with import_id, new_examples and already_present.
        """
        ts = now()
        with self.database.transaction() as conn:
            import_id = conn.execute(
                "INSERT INTO imports (kind, file, file_sha256, owner, created_at, summary) VALUES (?, ?, ?, ?, ?, '{}')",
                (kind, file, file_sha256, owner, ts)).lastrowid
            new = 0
            for ex in examples:
                new += conn.execute(
                    "INSERT INTO imported_examples (import_id, messages, split, ended_at, created_at, sha256) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(sha256) DO NOTHING",
                    (import_id, json.dumps(ex["messages"], ensure_ascii=False), ex["split"], ex.get("ended_at"),
                     ts, ex["sha256"])).rowcount
            summary = {**summary, "import_id": import_id, "new_examples": new,
                       "already_present": len(examples) - new}
            conn.execute("UPDATE imports SET summary = ? WHERE id = ?",
                         (json.dumps(summary, ensure_ascii=False), import_id))
            self.log_event("import", detail={"import_id": import_id, "kind": kind, "new_examples": new})
        return summary

    def imported_examples(self, *, since: str | None, until: str | None) -> list[dict]:
        """Imported windows stored in (since, until], oldest first: {messages, split, created_at, ended_at}."""
        rows = self.database.query(
            "SELECT messages, split, created_at, ended_at FROM imported_examples "
            "WHERE (? IS NULL OR created_at > ?) AND (? IS NULL OR created_at <= ?) ORDER BY created_at, id",
            (since, since, until, until))
        return [{**r, "messages": json.loads(r["messages"])} for r in rows]

    def imports(self) -> list[dict]:
        rows = self.database.query("SELECT * FROM imports ORDER BY id")
        return [{**r, "summary": json.loads(r["summary"])} for r in rows]

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
