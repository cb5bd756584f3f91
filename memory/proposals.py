"""Self-refinement proposals: a generation's critique of a reply and the reply it should have given.

The commonest feedback is a bare 👎; a generation that reads its constitution can say what was wrong
and write better (chain of hindsight, trainer/refine.py). What it writes is a proposal, never a
target by itself: an admin keeps it (a preference pair, refined = chosen, served = rejected), edits
then keeps it, or drops it (/review, `ouro review`). The first decision stands. Which 👎'd turns may
be refined follows the rules of every target: an answered turn, rated below zero, nobody offered an
alternative (no ✏️, no 🔁), no admin rejected or edited it, and its author lets their chats train.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

from core.files import now
from memory.db import Database
from memory.feedback import REASONS

STATUSES = ("pending", "kept", "edited", "dropped")
# a lone 👎 a proposal may be written for (`t`: turns, `u`: its author)
_LONE_DOWN = (
    "t.status = 'answered' AND COALESCE(u.training_opt_out, ?) = 0 "
    "AND (SELECT COALESCE(SUM(r.value), 0) FROM ratings r WHERE r.turn_id = t.id) < 0 "
    "AND NOT EXISTS (SELECT 1 FROM corrections c WHERE c.turn_id = t.id) "
    "AND NOT EXISTS (SELECT 1 FROM preferences p WHERE p.turn_id = t.id) "
    "AND NOT EXISTS (SELECT 1 FROM reviews v WHERE v.turn_id = t.id AND v.verdict IN ('rejected', 'edited'))")


@dataclass(frozen=True)
class Proposal:
    """A proposal as an admin reviews it."""

    id: int
    kind: str                        # thumbs_down | scenario
    turn_id: int | None
    question: str                    # what the person (or the scenario) said
    served: str                      # the reply as served
    critique: str
    refined: str
    reasons: tuple[str, ...]         # the 👎 reasons it was written from, as people read them
    generation_id: str | None
    status: str
    created_at: str
    edited_text: str | None = None
    auto: bool = False
    remaining: int = 0               # pending proposals, this one included


@dataclass(frozen=True)
class LoneDown:
    """A 👎'd turn waiting for a proposal."""

    turn_id: int
    user_id: int
    user_text: str
    reply: str
    reasons: tuple[str, ...]         # REASONS keys, oldest first


class ProposalsMixin:
    """Proposals rows and pending proposal edits."""

    database: Database

    def refine_candidates(self, *, limit: int, opt_out_by_default: bool) -> list[LoneDown]:
        """Lone 👎'd turns without a proposal yet, newest first (the generation that failed them is
        likeliest the one that writes now)."""
        if limit <= 0:
            return []
        rows = self.database.query(
            "SELECT t.id, t.user_id, t.user_text, t.reply_text FROM turns t JOIN users u ON u.id = t.user_id "
            f"WHERE {_LONE_DOWN} AND NOT EXISTS (SELECT 1 FROM proposals x WHERE x.turn_id = t.id) "
            "ORDER BY t.id DESC LIMIT ?", (int(opt_out_by_default), limit))
        out = []
        for r in rows:
            reasons = tuple(x["reason"] for x in self.database.query(
                "SELECT reason FROM ratings WHERE turn_id = ? AND value = -1 AND reason IS NOT NULL "
                "ORDER BY updated_at", (r["id"],)))
            out.append(LoneDown(r["id"], r["user_id"], r["user_text"], r["reply_text"] or "", reasons))
        return out

    def proposed_scenarios(self) -> set[str]:
        """The scenario questions proposals were already written for."""
        return {r["prompt"] for r in self.database.query("SELECT prompt FROM proposals WHERE kind = 'scenario'")}

    def add_proposal(self, kind: str, *, served: str, critique: str, refined: str, generation_id: str | None,
                     turn_id: int | None = None, prompt: str | None = None, reasons: Collection[str] = (),
                     kept_by: int | None = None) -> int | None:
        """Store a proposal (pending; or kept at once, signed by `kept_by`, when review is skipped).
        None when that turn has one already."""
        if kind not in ("thumbs_down", "scenario") or (kind == "scenario") != (turn_id is None):
            raise ValueError("a thumbs_down proposal needs its turn, a scenario one its prompt and no turn")
        ts = now()
        with self.database.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO proposals (kind, turn_id, prompt, served, critique, refined, reasons, generation_id, "
                "status, reviewer_id, auto, created_at, decided_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (kind, turn_id, prompt, served, critique, refined, json.dumps(list(reasons)), generation_id,
                 "pending" if kept_by is None else "kept", kept_by, int(kept_by is not None), ts,
                 None if kept_by is None else ts))
            return cur.lastrowid if cur.rowcount else None

    def proposal(self, proposal_id: int, *, remaining: int = 0) -> Proposal | None:
        row = self.database.one(
            "SELECT x.*, COALESCE(x.prompt, t.user_text) AS question FROM proposals x "
            "LEFT JOIN turns t ON t.id = x.turn_id WHERE x.id = ?", (proposal_id,))
        if row is None:
            return None
        return Proposal(id=row["id"], kind=row["kind"], turn_id=row["turn_id"], question=row["question"] or "",
                        served=row["served"], critique=row["critique"], refined=row["refined"],
                        reasons=tuple(REASONS.get(k, k) for k in json.loads(row["reasons"] or "[]")),
                        generation_id=row["generation_id"], status=row["status"], created_at=row["created_at"],
                        edited_text=row["edited_text"], auto=bool(row["auto"]), remaining=remaining)

    def next_proposal(self, *, opt_out_by_default: bool, skip: Collection[int] = ()) -> Proposal | None:
        """The oldest pending proposal whose turn (if any) its author still lets train, or None."""
        queue = ("FROM proposals x LEFT JOIN turns t ON t.id = x.turn_id LEFT JOIN users u ON u.id = t.user_id "
                 "WHERE x.status = 'pending' AND x.id NOT IN (SELECT value FROM json_each(?)) "
                 "AND (x.turn_id IS NULL OR COALESCE(u.training_opt_out, ?) = 0)")
        params = (json.dumps(sorted(skip)), int(opt_out_by_default))
        first = self.database.scalar("SELECT x.id " + queue + " ORDER BY x.id LIMIT 1", params)
        if first is None:
            return None
        return self.proposal(first, remaining=self.database.scalar("SELECT COUNT(*) " + queue, params))

    def pending_proposals(self, *, opt_out_by_default: bool, limit: int = 20) -> list[Proposal]:
        """The oldest pending proposals, as next_proposal picks them one by one (the web page lists a page)."""
        ids = self.database.query(
            "SELECT x.id FROM proposals x LEFT JOIN turns t ON t.id = x.turn_id LEFT JOIN users u ON u.id = t.user_id "
            "WHERE x.status = 'pending' AND (x.turn_id IS NULL OR COALESCE(u.training_opt_out, ?) = 0) "
            "ORDER BY x.id LIMIT ?", (int(opt_out_by_default), limit))
        return [p for p in (self.proposal(r["id"]) for r in ids) if p is not None]

    def decide_proposal(self, proposal_id: int, reviewer_id: int, verdict: str, edited_text: str | None = None) -> bool:
        """An admin's decision on a pending proposal: kept, edited (with the admin's reply) or dropped.
        The first decision stands: False if it had one (or is gone)."""
        if verdict not in ("kept", "edited", "dropped"):
            raise ValueError(f"unknown proposal verdict {verdict!r}")
        if (verdict == "edited") != bool(edited_text and edited_text.strip()):
            raise ValueError("an edited proposal needs the edited text, and only it does")
        with self.database.transaction() as conn:
            return conn.execute(
                "UPDATE proposals SET status = ?, edited_text = ?, reviewer_id = ?, decided_at = ? "
                "WHERE id = ? AND status = 'pending'",
                (verdict, edited_text.strip() if edited_text else None, reviewer_id, now(), proposal_id)).rowcount > 0

    def proposal_counts(self, *, since: str | None = None, until: str | None = None) -> dict[str, int]:
        """Proposals made in (since, until] and those decided in it, by status; plus all pending now."""
        made = self.database.scalar(
            "SELECT COUNT(*) FROM proposals WHERE (? IS NULL OR created_at > ?) AND (? IS NULL OR created_at <= ?)",
            (since, since, until, until))
        rows = self.database.query(
            "SELECT status, COUNT(*) AS n FROM proposals WHERE decided_at IS NOT NULL "
            "AND (? IS NULL OR decided_at > ?) AND (? IS NULL OR decided_at <= ?) GROUP BY status",
            (since, since, until, until))
        decided = {r["status"]: r["n"] for r in rows}
        return {"made": made, "kept": decided.get("kept", 0) + decided.get("edited", 0),
                "edited": decided.get("edited", 0), "dropped": decided.get("dropped", 0),
                "pending": self.database.scalar("SELECT COUNT(*) FROM proposals WHERE status = 'pending'")}

    # --- ✏️ on a proposal: the admin's next message in that chat is the reply ---------------------
    def await_proposal_edit(self, chat_id: int, reviewer_id: int, proposal_id: int) -> None:
        with self.database.transaction() as conn:
            conn.execute("INSERT INTO awaiting_proposal_edits (chat_id, reviewer_id, proposal_id, created_at) "
                         "VALUES (?, ?, ?, ?) ON CONFLICT(chat_id, reviewer_id) DO UPDATE SET "
                         "proposal_id = excluded.proposal_id, created_at = excluded.created_at",
                         (chat_id, reviewer_id, proposal_id, now()))

    def awaiting_proposal_edit(self, chat_id: int, reviewer_id: int) -> int | None:
        return self.database.scalar("SELECT proposal_id FROM awaiting_proposal_edits WHERE chat_id = ? "
                                    "AND reviewer_id = ?", (chat_id, reviewer_id))

    def cancel_proposal_edit(self, chat_id: int, reviewer_id: int) -> bool:
        with self.database.transaction() as conn:
            return conn.execute("DELETE FROM awaiting_proposal_edits WHERE chat_id = ? AND reviewer_id = ?",
                                (chat_id, reviewer_id)).rowcount > 0

    def take_proposal_edit(self, chat_id: int, reviewer_id: int, text: str) -> int | None:
        """If this admin owes a proposal's edit here, keep the proposal with `text` ('edited').
        Returns the proposal's id, or None when none was awaited or it was decided meanwhile."""
        with self.database.transaction() as conn:
            proposal_id = self.awaiting_proposal_edit(chat_id, reviewer_id)
            if proposal_id is None:
                return None
            conn.execute("DELETE FROM awaiting_proposal_edits WHERE chat_id = ? AND reviewer_id = ?",
                         (chat_id, reviewer_id))
            ok = text.strip() and self.decide_proposal(proposal_id, reviewer_id, "edited", text)
            return proposal_id if ok else None


def kept_proposal_rows(database: Database, *, since: str | None, until: str | None,
                       opt_out_by_default: bool) -> list[dict]:
    """Kept and edited proposals decided in (since, until] that may still train (memory/export.py): a
    turn's must still be answered, no admin rejected or edited it, its author still consenting."""
    return database.query(
        "SELECT x.* FROM proposals x LEFT JOIN turns t ON t.id = x.turn_id LEFT JOIN users u ON u.id = t.user_id "
        "WHERE x.status IN ('kept', 'edited') AND (? IS NULL OR x.decided_at > ?) AND (? IS NULL OR x.decided_at <= ?) "
        "AND (x.turn_id IS NULL OR (t.status = 'answered' AND COALESCE(u.training_opt_out, ?) = 0 "
        "AND NOT EXISTS (SELECT 1 FROM reviews v WHERE v.turn_id = t.id AND v.verdict IN ('rejected', 'edited')))) "
        "ORDER BY x.decided_at, x.id", (since, since, until, until, int(opt_out_by_default)))
