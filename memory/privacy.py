"""Privacy (/optout, /optin, /forget): whether a person's chats train the model, and forgetting them.

Forgetting deletes everything about a person in one transaction and leaves only a tombstone
that counts what went, so the text does not linger in the database file.
"""

from __future__ import annotations

import json

from core.files import now
from memory.db import Database


class PrivacyMixin:
    """Training opt-outs, per-person counts, forgetting and its tombstones."""

    database: Database

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

    def people(self, limit: int = 500, *, user_id: int | None = None) -> list[dict]:
        """Everyone the store knows, most recently seen first: what is stored about each (turns,
        ratings and corrections they gave, first and last seen) and their training opt-out (None:
        never chose, the settings' default applies). The owner's web page lists them; `user_id`: that one."""
        return self.database.query(
            "SELECT u.id AS user_id, u.username, u.first_name, u.training_opt_out, "
            "(SELECT COUNT(*) FROM turns t WHERE t.user_id = u.id) AS messages, "
            "(SELECT COUNT(*) FROM ratings r WHERE r.user_id = u.id) AS ratings, "
            "(SELECT COUNT(*) FROM corrections c WHERE c.user_id = u.id) AS corrections, "
            "COALESCE((SELECT MIN(t.created_at) FROM turns t WHERE t.user_id = u.id), u.created_at) AS first_seen, "
            "MAX(u.last_seen, COALESCE((SELECT MAX(t.created_at) FROM turns t WHERE t.user_id = u.id), '')) "
            "AS last_seen FROM users u WHERE (? IS NULL OR u.id = ?) ORDER BY last_seen DESC, u.id LIMIT ?",
            (user_id, user_id, limit))

    def opt_out_chosen_by_person(self, user_id: int) -> bool:
        """Whether this person's last training choice was their own (/optout, /optin), not made for
        them by an admin (whose events carry `"by"` in their detail)."""
        row = self.database.one(
            "SELECT detail FROM events WHERE user_id = ? AND kind IN ('training_opt_out', 'training_opt_in') "
            "ORDER BY id DESC LIMIT 1", (user_id,))
        if row is None:
            return False
        try:
            detail = json.loads(row["detail"]) if row["detail"] else {}
        except ValueError:
            detail = {}
        return not (isinstance(detail, dict) and detail.get("by"))

    def forget_user(self, user_id: int) -> tuple[dict, list[int]]:
        """Delete everything stored about this person, in one transaction; leave a tombstone without content.

        Gone: their turns (with the replies, alternatives, ratings, picks, corrections, reviews and
        pending corrections and self-refinement proposals attached to them), their own ratings, picks and corrections anywhere,
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
                    theirs = f"SELECT id FROM proposals WHERE turn_id IN ({mine})"
                    delete("awaiting_proposal_edits", f"proposal_id IN ({theirs}) OR reviewer_id = ?", (user_id, user_id))
                    delete("proposals", f"turn_id IN ({mine})", (user_id,))
                    conn.execute("UPDATE proposals SET reviewer_id = NULL WHERE reviewer_id = ?", (user_id,))
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
