"""Feedback on replies: 👍/👎 ratings (a 👎 may carry one reason), 🔁 alternatives and the pick
between two samples, ✏️ corrections.

What people say of a reply is what the next cycle learns from; picks and corrections are
stored as (chosen, rejected) preference pairs as they happen. A 👎's reason is one of a fixed
menu, never free text: it is shown to admins and needs no screening.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from core.files import now
from memory.db import Database

CORRECTION_WAIT_S = 1800.0   # a ✏️ is answered within this long, or its next message is a message again

# the reasons a 👎 may carry (one tap after 👎), by the key stored in ratings.reason
REASONS: dict[str, str] = {"long": "too long", "off": "off-topic", "wrong": "wrong", "rude": "rude",
                           "voice": "not like you", "other": "other"}


class FeedbackMixin:
    """Ratings, alternatives, preferences and corrections rows."""

    database: Database

    def rate(self, turn_id: int, user_id: int, value: int) -> str:
        """One rating per user per reply; returns 'new', 'changed' or 'same'. A change clears the reason."""
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
            conn.execute("UPDATE ratings SET value = ?, reason = NULL, updated_at = ? WHERE turn_id = ? AND user_id = ?",
                         (value, ts, turn_id, user_id))
            return "changed"

    def rating(self, turn_id: int, user_id: int) -> int | None:
        return self.database.scalar("SELECT value FROM ratings WHERE turn_id = ? AND user_id = ?", (turn_id, user_id))

    def give_reason(self, turn_id: int, user_id: int, reason: str) -> bool:
        """Why this person 👎'd this reply (a REASONS key); False when their rating is not a 👎 (any more)."""
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {', '.join(REASONS)}, not {reason!r}")
        with self.database.transaction() as conn:
            return conn.execute("UPDATE ratings SET reason = ? WHERE turn_id = ? AND user_id = ? AND value = -1",
                                (reason, turn_id, user_id)).rowcount > 0

    def rating_reasons(self, turn_id: int) -> list[str]:
        """The reasons given with this reply's 👎s, as people read them (REASONS' labels), oldest first."""
        rows = self.database.query("SELECT reason FROM ratings WHERE turn_id = ? AND value = -1 AND reason IS NOT NULL "
                                   "ORDER BY updated_at", (turn_id,))
        return [REASONS.get(r["reason"], r["reason"]) for r in rows]

    def add_alternative(self, turn_id: int, text: str, generation_id: str | None) -> int | None:
        """A 🔁 second take of `turn_id`; None when that turn is gone (forgotten while it was written,
        perhaps by another thread: the check and the insert are one statement)."""
        with self.database.transaction() as conn:
            cur = conn.execute("INSERT INTO alternatives (turn_id, text, generation_id, created_at) "
                               "SELECT id, ?, ?, ? FROM turns WHERE id = ?", (text, generation_id, now(), turn_id))
            return cur.lastrowid if cur.rowcount else None

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

        Returns the corrected turn's id, or None when no correction was awaited. A ✏️ left
        unanswered for `CORRECTION_WAIT_S` has lapsed: otherwise a message days later — a question
        to the bot, after the person forgot the ✏️ or answered it where the bot could not hear —
        would be taken as a better reply and trained as one, and never answered.
        """
        lapsed = (datetime.now(UTC) - timedelta(seconds=CORRECTION_WAIT_S)).isoformat(timespec="milliseconds")
        with self.database.transaction() as conn:
            row = conn.execute("SELECT turn_id, created_at FROM awaiting_corrections WHERE chat_id = ? AND user_id = ?",
                               (chat_id, user_id)).fetchone()
            if row is None:
                return None
            if row[1] < lapsed:
                conn.execute("DELETE FROM awaiting_corrections WHERE chat_id = ? AND user_id = ?", (chat_id, user_id))
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
