"""The admin review queue (/review, `ouro review`): which answered turn to check next, and the verdicts.

A verdict decides whether a turn may become training data; an 'edited' verdict carries the
reply the admin wrote instead. It reads turns back with their context, so it builds on turns.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

from core.files import now
from memory.api_keys import API_USER_BASE
from memory.feedback import REASONS
from memory.turns import Exchange, TurnsMixin

# The review queue's filters (the web page's menus): a fixed name → a fixed SQL condition on turn `t`;
# only these names reach SQL, so a filter value is never spliced into a query.
REVIEW_SOURCES = {
    "correction": "EXISTS (SELECT 1 FROM corrections c WHERE c.turn_id = t.id)",   # someone's ✏️ correction
    "pick": "t.picked_alternative_id IS NOT NULL",                                 # a 🔁 sample was kept
    "api": f"t.chat_id <= {API_USER_BASE}",                                        # through the /v1 API
    "chat": f"t.chat_id > {API_USER_BASE}",                                        # Telegram or `ouro chat`
}
REVIEW_RATINGS = {
    "up": "EXISTS (SELECT 1 FROM ratings r WHERE r.turn_id = t.id AND r.value > 0)",
    "down": "EXISTS (SELECT 1 FROM ratings r WHERE r.turn_id = t.id AND r.value < 0)",
    "none": "NOT EXISTS (SELECT 1 FROM ratings r WHERE r.turn_id = t.id)",
}


def _filters(source: str | None, rating: str | None) -> list[str]:
    """The SQL conditions of a source and a rating filter; an unknown name is a ValueError."""
    if source is not None and source not in REVIEW_SOURCES:
        raise ValueError(f"unknown review source {source!r}")
    if rating is not None and rating not in REVIEW_RATINGS:
        raise ValueError(f"unknown review rating {rating!r}")
    return ([REVIEW_SOURCES[source]] if source else []) + ([REVIEW_RATINGS[rating]] if rating else [])


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
    correction: str | None = None    # its author's ✏️ correction: what approving it teaches
    author: str = ""                 # who asked (and rated or corrected): @username, a name, or the id
    waiting_by: tuple = ()           # (who, how many of their 👍/👎/✏️ turns wait for review), most first
    reasons: tuple[str, ...] = ()    # why people 👎'd it, when they said (memory/feedback.py REASONS' labels)
    lone_down: bool = False          # rated below zero with no ✏️/🔁 alternative: approving agrees with the 👎


class ReviewQueueMixin(TurnsMixin):
    """Reviews rows and pending review edits."""

    def next_review(self, *, opt_out_by_default: bool, skip: Collection[int] = (),
                    context_turns: int = 3) -> ReviewItem | None:
        """The next answered turn without a verdict, or None.

        Order: ✏️-corrected and 👍'd turns first (what would train — or waits for an admin, from people
        the trust policy does not let teach on their own), then other rated ones (👎: candidates for an
        edit), then unrated; oldest first within each. Turns of people who keep their chats out of
        training are not queued; `skip` leaves turns out.
        """
        ids, remaining = self.review_queue(opt_out_by_default=opt_out_by_default, skip=skip, limit=1)
        if not ids:
            return None
        return self.review_item(ids[0], context_turns=context_turns, remaining=remaining)

    def review_queue(self, *, opt_out_by_default: bool, skip: Collection[int] = (), user_id: int | None = None,
                     source: str | None = None, rating: str | None = None, limit: int = 50,
                     offset: int = 0) -> tuple[list[int], int]:
        """The ids of the next `limit` turns waiting for review (after the first `offset`), in
        `next_review`'s order, and how many wait in all; `user_id`, `source` (REVIEW_SOURCES) and
        `rating` (REVIEW_RATINGS) narrow it (the web page's filters)."""
        queue, params = self._queue(opt_out_by_default, skip, user_id)
        where = "".join(f" AND {cond}" for cond in _filters(source, rating))
        rows = self.database.query(
            "SELECT t.id, (SELECT COALESCE(SUM(r.value), 0) FROM ratings r WHERE r.turn_id = t.id) AS score, "
            "(SELECT COUNT(*) FROM ratings r WHERE r.turn_id = t.id) AS n, "
            "EXISTS (SELECT 1 FROM corrections c WHERE c.turn_id = t.id) AS fixed " + queue + where
            + " ORDER BY CASE WHEN fixed OR score > 0 THEN 0 WHEN n > 0 THEN 1 ELSE 2 END, t.id LIMIT ? OFFSET ?",
            (*params, limit, max(0, offset)))
        total = self.database.scalar("SELECT COUNT(*) " + queue + where, params)
        return [r["id"] for r in rows], total

    def review_filter_counts(self, *, opt_out_by_default: bool, skip: Collection[int] = (),
                             user_id: int | None = None, source: str | None = None,
                             rating: str | None = None) -> dict[str, dict[str, int]]:
        """How many turns wait under each source and each rating, with the other filters applied:
        {"source": {"correction": n, …}, "rating": {"up": n, …}} (what the filter menus show)."""
        queue, params = self._queue(opt_out_by_default, skip, user_id)
        by_rating = " AND ".join(_filters(None, rating)) or "1"
        by_source = " AND ".join(_filters(source, None)) or "1"
        columns = [f"SUM(CASE WHEN ({cond}) AND {by_rating} THEN 1 ELSE 0 END) AS source_{name}"
                   for name, cond in REVIEW_SOURCES.items()]
        columns += [f"SUM(CASE WHEN ({cond}) AND {by_source} THEN 1 ELSE 0 END) AS rating_{name}"
                    for name, cond in REVIEW_RATINGS.items()]
        select = ", ".join(columns)
        row = self.database.one("SELECT " + select + " " + queue, params) or {}
        return {"source": {name: int(row.get(f"source_{name}") or 0) for name in REVIEW_SOURCES},
                "rating": {name: int(row.get(f"rating_{name}") or 0) for name in REVIEW_RATINGS}}

    @staticmethod
    def _queue(opt_out_by_default: bool, skip: Collection[int], user_id: int | None) -> tuple[str, tuple]:
        """The FROM … WHERE of the review queue (answered, no verdict, trainable, not skipped)."""
        queue = ("FROM turns t JOIN users u ON u.id = t.user_id WHERE t.status = 'answered' "
                 "AND COALESCE(u.training_opt_out, ?) = 0 AND NOT EXISTS (SELECT 1 FROM reviews v WHERE v.turn_id = t.id) "
                 "AND t.id NOT IN (SELECT value FROM json_each(?)) AND (? IS NULL OR t.user_id = ?)")
        return queue, (int(opt_out_by_default), json.dumps(sorted(skip)), user_id, user_id)

    def review_people(self, *, opt_out_by_default: bool) -> list[tuple[int, str, int]]:
        """(user id, name, turns waiting) of everyone with turns in the review queue, most first."""
        rows = self.database.query(
            "SELECT t.user_id, COUNT(*) AS n FROM turns t JOIN users u ON u.id = t.user_id "
            "WHERE t.status = 'answered' AND COALESCE(u.training_opt_out, ?) = 0 "
            "AND NOT EXISTS (SELECT 1 FROM reviews v WHERE v.turn_id = t.id) "
            "GROUP BY t.user_id ORDER BY n DESC, t.user_id LIMIT 200", (int(opt_out_by_default),))
        return [(r["user_id"], self.display_name(r["user_id"]), r["n"]) for r in rows]

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
        lone_down = sum(values) < 0 and not self.database.scalar(
            "SELECT EXISTS (SELECT 1 FROM corrections WHERE turn_id = ?) OR EXISTS (SELECT 1 FROM preferences "
            "WHERE turn_id = ?)", (turn_id, turn_id))
        correction = self.database.scalar(
            "SELECT text FROM corrections WHERE turn_id = ? AND user_id = ? ORDER BY id DESC LIMIT 1",
            (turn_id, row["user_id"]))
        return ReviewItem(
            correction=correction, author=self.display_name(row["user_id"]), waiting_by=self.waiting_by(),
            turn_id=turn_id, chat_type=row["chat_type"], user_text=row["user_text"], reply_text=row["reply"] or "",
            generation_id=row["generation_id"], created_at=row["created_at"],
            ups=values.count(1), downs=values.count(-1), lone_down=bool(lone_down),
            reasons=tuple(REASONS.get(r["reason"], r["reason"]) for r in self.database.query(
                "SELECT reason FROM ratings WHERE turn_id = ? AND value = -1 AND reason IS NOT NULL ORDER BY updated_at",
                (turn_id,))),
            corrected=bool(self.database.scalar("SELECT COUNT(*) FROM corrections WHERE turn_id = ?", (turn_id,))),
            verdict=self.review_verdict(turn_id),
            context=context[-context_turns:] if context_turns > 0 else [], remaining=remaining)

    def display_name(self, user_id: int) -> str:
        row = self.database.one("SELECT username, first_name FROM users WHERE id = ?", (user_id,))
        if row is None:
            return str(user_id)
        return f"@{row['username']}" if row["username"] else row["first_name"] or str(user_id)

    def waiting_by(self, limit: int = 5) -> tuple:
        """Whose ✏️ corrections and 👍/👎 wait for a verdict, and how many each: the queue's contributors."""
        rows = self.database.query(
            "SELECT t.user_id, COUNT(*) AS n FROM turns t WHERE t.status = 'answered' "
            "AND NOT EXISTS (SELECT 1 FROM reviews v WHERE v.turn_id = t.id) "
            "AND (EXISTS (SELECT 1 FROM corrections c WHERE c.turn_id = t.id AND c.user_id = t.user_id) "
            "OR EXISTS (SELECT 1 FROM ratings r WHERE r.turn_id = t.id AND r.user_id = t.user_id)) "
            "GROUP BY t.user_id ORDER BY n DESC, t.user_id LIMIT ?", (limit,))
        return tuple((self.display_name(r["user_id"]), r["n"]) for r in rows)

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
