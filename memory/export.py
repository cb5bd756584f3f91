"""What the next generation learns from: the reviewed turns since its parent, as examples.

Sources, per the design: a 👍'd reply is a supervised example with the very context it was
served with; a ✏️ correction is a supervised example (the user's better answer) and a
preference pair against the reply it corrected; a 🔁 pick is a preference pair. A 👎 reply
without an alternative never becomes a target. Everything passes PII redaction before it is
returned; exact duplicates are dropped; people who opted out are left out entirely.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from memory.redact import redact
from memory.store import Store


@dataclass
class Example:
    """Messages ending with the assistant's target reply."""

    messages: list[dict]
    source: str                  # thumbs_up | correction | import | probe
    created_at: str
    turn_id: int | None = None
    score: float = 0.0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


@dataclass
class Pair:
    prompt: list[dict]            # messages up to and including the user's message
    chosen: str
    rejected: str
    source: str                   # regenerate | correction
    created_at: str
    turn_id: int | None = None


@dataclass
class Delta:
    examples: list[Example] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    considered: int = 0
    dropped: dict = field(default_factory=dict)

    def to_jsonl(self) -> str:
        rows = [{"kind": "sft", **asdict(e)} for e in self.examples] + [{"kind": "dpo", **asdict(p)} for p in self.pairs]
        return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)

    @classmethod
    def from_jsonl(cls, text: str) -> Delta:
        delta = cls()
        for line in text.splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            kind = row.pop("kind")
            if kind == "sft":
                delta.examples.append(Example(**row))
            else:
                delta.pairs.append(Pair(**row))
        return delta


def _clean(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": redact(m["content"])} for m in messages]


def served_context(store: Store, turn_id: int, persona: str) -> list[dict]:
    """The messages the model saw for this turn: persona, the window from its anchor, the question."""
    db = store.database
    turn = db.one("SELECT * FROM turns WHERE id = ?", (turn_id,))
    start = turn["context_start_turn_id"] or turn["id"]
    rows = db.query(
        "SELECT t.user_text, COALESCE(a.text, t.reply_text) AS reply FROM turns t "
        "LEFT JOIN alternatives a ON a.id = t.picked_alternative_id "
        "WHERE t.session_id = ? AND t.status = 'answered' AND t.id >= ? AND t.id < ? ORDER BY t.id",
        (turn["session_id"], start, turn_id))
    messages = [{"role": "system", "content": persona}] if persona else []
    for r in rows:
        messages += [{"role": "user", "content": r["user_text"]}, {"role": "assistant", "content": r["reply"]}]
    messages.append({"role": "user", "content": turn["user_text"]})
    return messages


def reviewed_since(store: Store, *, persona: str, since: str | None, until: str | None = None,
                   budget: int = 400, opt_out_by_default: bool = False) -> Delta:
    """Everything reviewed in (since, until]: examples and pairs, redacted, deduplicated, budgeted."""
    db = store.database
    consent = "COALESCE(u.training_opt_out, ?) = 0"
    window = "(? IS NULL OR {col} > ?) AND (? IS NULL OR {col} <= ?)"
    params_window = (since, since, until, until)
    delta = Delta()

    # 👍 / 👎: one score per turn (sum of its ratings), reviewed when a rating changed in the window
    rated = db.query(
        "SELECT t.id, t.created_at, SUM(r.value) AS score, COALESCE(a.text, t.reply_text) AS reply FROM turns t "
        "JOIN ratings r ON r.turn_id = t.id JOIN users u ON u.id = t.user_id "
        "LEFT JOIN alternatives a ON a.id = t.picked_alternative_id "
        f"WHERE t.status = 'answered' AND {consent} GROUP BY t.id "
        f"HAVING {window.format(col='MAX(r.updated_at)')} ORDER BY t.id",
        (int(opt_out_by_default), *params_window))
    delta.considered += len(rated)
    positive = [r for r in rated if r["score"] > 0]
    delta.dropped["not_positive"] = len(rated) - len(positive)
    candidates = [Example(messages=served_context(store, r["id"], persona) + [{"role": "assistant", "content": r["reply"]}],
                          source="thumbs_up", created_at=r["created_at"], turn_id=r["id"], score=float(r["score"]))
                  for r in positive]

    corrections = db.query(
        "SELECT c.turn_id, c.text, c.created_at, t.reply_text FROM corrections c JOIN turns t ON t.id = c.turn_id "
        f"JOIN users u ON u.id = c.user_id WHERE {consent} AND {window.format(col='c.created_at')} ORDER BY c.id",
        (int(opt_out_by_default), *params_window))
    delta.considered += len(corrections)
    for c in corrections:
        prompt = served_context(store, c["turn_id"], persona)
        candidates.append(Example(messages=prompt + [{"role": "assistant", "content": c["text"]}], source="correction",
                                  created_at=c["created_at"], turn_id=c["turn_id"], score=2.0))

    picks = db.query(
        "SELECT p.turn_id, p.chosen, p.rejected, p.source, p.created_at FROM preferences p "
        f"JOIN users u ON u.id = p.user_id WHERE {consent} AND {window.format(col='p.created_at')} ORDER BY p.id",
        (int(opt_out_by_default), *params_window))
    for p in picks:
        if p["chosen"].strip() == p["rejected"].strip():
            continue
        delta.pairs.append(Pair(prompt=_clean(served_context(store, p["turn_id"], persona)), chosen=redact(p["chosen"]),
                                rejected=redact(p["rejected"]), source=p["source"], created_at=p["created_at"],
                                turn_id=p["turn_id"]))

    if len(candidates) > budget:
        # more than the budget: keep the top quartile by rating (then at most `budget`)
        ranked = sorted(candidates, key=lambda e: (e.score, e.created_at), reverse=True)
        keep = ranked[: min(budget, max(1, len(ranked) // 4))]
        delta.dropped["over_budget"] = len(candidates) - len(keep)
        candidates = keep
    seen: set[str] = set()
    for ex in sorted(candidates, key=lambda e: (e.created_at, e.turn_id or 0)):
        ex.messages = _clean(ex.messages)
        k = ex.key()
        if k in seen:
            delta.dropped["duplicate"] = delta.dropped.get("duplicate", 0) + 1
            continue
        seen.add(k)
        delta.examples.append(ex)
    return delta
