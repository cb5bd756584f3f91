"""What the next generation learns from: the reviewed turns since its parent, as examples.

Sources, per the design: a 👍'd reply is a supervised example with the very context it was
served with; a ✏️ correction is a supervised example (the user's better answer) and a
preference pair against the reply it corrected; a 🔁 pick is a preference pair. A lone rating —
👍 or 👎 on a turn nobody offered an alternative for (no ✏️, no 🔁) — is also an unpaired KTO item
(`Rated`): a 👎'd reply is undesirable (never an SFT target), a 👍'd one desirable. Admins'
verdicts (/review, `ouro review`): an approved turn is an example like a 👍 one — except a lone
👎, where approving agrees with the 👎 (as approving a ✏️ approves the correction): an undesirable
item; an edited turn is an example with the admin's reply and a pair against the served one
(whose 👍s no longer count); a rejected turn is never a target nor a pair nor a KTO item. A
self-refinement proposal an admin kept (memory/proposals.py) is a pair (the refined reply chosen,
the served one rejected) and, on a 👎'd turn, an example with the refined reply; its turn's 👎 is
then no longer lone.

A 👎 goes through the trust rules as every other item does (memory/trust.py: review mode, caps;
the contributor is the turn's author) and through the content screens (on the reply it would
teach away from). A 👍's desirable item follows its SFT example: it exists only if the example
survived the screens, trust rules, caps and budget, and has the example's weight. Windows imported from a chat history (memory/importers)
come in whole, the persona in front, with their own train/held-out split and outside the
rating budget (nobody rated them; the admin chose them); so do the preference pairs an import
found (a ChatGPT answer kept over one regenerated in its place). Everything passes PII redaction before it is
returned; exact duplicates are dropped; people who opted out are left out entirely (what they said in a
group too, from the context of the others' items).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from memory.proposals import kept_proposal_rows
from memory.redact import redact
from memory.screens import Screens, screen
from memory.speakers import as_read
from memory.store import Store
from memory.trust import TrustPolicy, cap, shares, sources


@dataclass
class Example:
    """Messages ending with the assistant's target reply."""

    messages: list[dict]
    source: str                  # thumbs_up | correction | review | review_edit | refine | import | probe
    created_at: str
    turn_id: int | None = None
    score: float = 0.0
    split: str | None = None     # an import's own 90/10 split (train | heldout); None: replay.holdout decides
    contributor: int | None = None   # whose feedback made it the target (memory/trust.py)
    approved: bool = False           # an admin's verdict (or import) made it: it teaches whoever wrote it
    weight: float = 1.0              # SFT loss weight: its contributor's tier (memory/trust.py)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


@dataclass
class Pair:
    prompt: list[dict]            # messages up to and including the user's message
    chosen: str
    rejected: str
    source: str                   # regenerate | correction | review_edit | import | refine (memory/proposals.py)
    created_at: str
    turn_id: int | None = None
    contributor: int | None = None
    approved: bool = False
    split: str | None = None      # an import's pair: "train" (its reply is in no held-out window); None: replay decides


@dataclass
class Rated:
    """A lone rating as an unpaired preference (KTO): the reply as served, and whether it was wanted."""

    prompt: list[dict]            # messages up to and including the user's message
    completion: str
    desirable: bool
    source: str                   # thumbs_up | thumbs_down | review (an admin agreed with a lone 👎)
    created_at: str
    turn_id: int | None = None
    contributor: int | None = None
    approved: bool = False
    weight: float = 1.0           # its contributor's tier (memory/trust.py)
    reason: str | None = None     # a 👎's reason (memory/feedback.py REASONS key), when one was given


@dataclass
class Delta:
    examples: list[Example] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    rated: list[Rated] = field(default_factory=list)     # lone 👍/👎: KTO items
    considered: int = 0
    dropped: dict = field(default_factory=dict)
    screened: dict = field(default_factory=dict)         # reason -> items kept out by the content screens
    screened_items: list = field(default_factory=list)   # {turn_id, contributor, reasons}: for the admins
    waiting: dict = field(default_factory=dict)          # contributor -> items waiting for an admin in /review
    deferred: list = field(default_factory=list)         # Examples, Pairs, Rated over a source's cap: next generation
    sources: dict = field(default_factory=dict)          # contributors, largest single share (memory/trust.py)

    def to_jsonl(self) -> str:
        rows = [{"kind": "sft", **asdict(e)} for e in self.examples] + [{"kind": "dpo", **asdict(p)} for p in self.pairs] \
            + [{"kind": "kto", **asdict(r)} for r in self.rated]
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
            elif kind == "kto":
                delta.rated.append(Rated(**row))
            else:
                delta.pairs.append(Pair(**row))
        return delta


def _clean(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": redact(m["content"])} for m in messages]


def served_context(store: Store, turn_id: int, persona: str, *, opt_out_by_default: bool = False,
                   policy: TrustPolicy | None = None, screens: Screens | None = None) -> list[dict]:
    """The conversation before this turn as it should have gone: persona, the window from its anchor,
    the question. Each earlier reply is the one people settled on (`_settled_reply`), so the later
    turns of a corrected chat learn in the voice they were taught, and every example of one chat is a
    prefix of the next (the trainer then reads the chat once: trainer.dataset.merge_conversations).
    In a group each message is read with its speaker's name, as serving read it (memory/speakers.py),
    and the turns of people who opted out are left out, as /forget leaves out the forgotten's."""
    db = store.database
    turn = db.one("SELECT * FROM turns WHERE id = ?", (turn_id,))
    start = turn["context_start_turn_id"] or turn["id"]
    rows = db.query(
        "SELECT t.user_id, t.user_text, t.speaker, t.created_at, t.reply_text, a.text AS picked, v.verdict, "
        "v.edited_text, (SELECT c.text FROM corrections c WHERE c.turn_id = t.id AND c.user_id = t.user_id "
        "ORDER BY c.id DESC LIMIT 1) AS correction FROM turns t LEFT JOIN users u ON u.id = t.user_id "
        "LEFT JOIN alternatives a ON a.id = t.picked_alternative_id LEFT JOIN reviews v ON v.turn_id = t.id "
        "WHERE t.session_id = ? AND t.status = 'answered' AND t.id >= ? AND t.id < ? "
        "AND COALESCE(u.training_opt_out, ?) = 0 ORDER BY t.id",
        (turn["session_id"], start, turn_id, int(opt_out_by_default)))
    messages = [{"role": "system", "content": persona}] if persona else []
    previous_at = None
    for r in rows:
        messages += [{"role": "user", "content": as_read(r["user_text"], r["speaker"], r["created_at"], previous_at)},
                     {"role": "assistant", "content": _settled_reply(r, policy, screens)}]
        previous_at = r["created_at"]
    messages.append({"role": "user", "content": as_read(turn["user_text"], turn["speaker"], turn["created_at"],
                                                        previous_at)})
    return messages


def _settled_reply(row: dict, policy: TrustPolicy | None, screens: Screens | None) -> str:
    """An earlier turn's reply as people settled it: an admin's edit (through the content screens), else its author's latest ✏️
    correction where it could be a target itself (the turn not rejected, its author teaching directly
    or an admin approving it, through the content screens: text kept out of training as a target must
    not come back in as context), else the 🔁 reply they kept, else the reply served (what /review shows)."""
    correction, verdict = row["correction"], row["verdict"]
    if verdict == "edited" and row["edited_text"] is not None:
        if screens is None or not screen(row["edited_text"], screens):   # screened as a target too
            return row["edited_text"]
        correction = None   # the admin's edit overruled it, screened or not
    if correction is not None and verdict != "rejected" \
            and (verdict == "approved" or policy is None or policy.teaches_directly(row["user_id"])) \
            and (screens is None or not screen(correction, screens)):
        return correction
    return row["picked"] if row["picked"] is not None else row["reply_text"]


def reviewed_since(store: Store, *, persona: str, since: str | None, until: str | None = None,
                   budget: int = 400, opt_out_by_default: bool = False, policy: TrustPolicy | None = None,
                   screens: Screens | None = None, carried: Delta | None = None) -> Delta:
    """Everything reviewed in (since, until]: examples and pairs, screened, redacted, deduplicated,
    within the trust policy's modes and caps, budgeted.

    `policy` None: everyone teaches, uncapped; `screens` None: no content screens (exports and tests
    of the plain rules). `carried`: the items the parent generation deferred over a cap; they compete
    again here, first in line."""
    db = store.database
    consent = "COALESCE(u.training_opt_out, ?) = 0"
    window = "(? IS NULL OR {col} > ?) AND (? IS NULL OR {col} <= ?)"
    params_window = (since, since, until, until)
    delta = Delta()

    def context(turn_id: int) -> list[dict]:
        return served_context(store, turn_id, persona, opt_out_by_default=opt_out_by_default, policy=policy,
                              screens=screens)

    # 👍 / 👎: one score per turn (sum of its ratings), reviewed when a rating changed in the window
    rated = db.query(
        "SELECT t.id, t.user_id, t.created_at, SUM(r.value) AS score, COALESCE(a.text, t.reply_text) AS reply, "
        "(SELECT r2.reason FROM ratings r2 WHERE r2.turn_id = t.id AND r2.value < 0 AND r2.reason IS NOT NULL "
        "ORDER BY r2.updated_at DESC LIMIT 1) AS reason "
        "FROM turns t JOIN ratings r ON r.turn_id = t.id JOIN users u ON u.id = t.user_id "
        "LEFT JOIN alternatives a ON a.id = t.picked_alternative_id "
        f"WHERE t.status = 'answered' AND {consent} GROUP BY t.id "
        f"HAVING {window.format(col='MAX(r.updated_at)')} ORDER BY t.id",
        (int(opt_out_by_default), *params_window))
    delta.considered += len(rated)
    positive = [r for r in rated if r["score"] > 0]
    delta.dropped["not_positive"] = len(rated) - len(positive)
    verdicts = _verdicts(store)   # /review: rejected turns are never targets; edited ones only with the admin's text
    delta.dropped["overruled"] = sum(verdicts.get(r["id"]) in ("rejected", "edited") for r in positive)
    positive = [r for r in positive if verdicts.get(r["id"]) not in ("rejected", "edited")]
    paired = _paired(store)   # turns someone offered an alternative for: their ratings are not lone
    unwanted = [Rated(prompt=context(r["id"]), completion=r["reply"], desirable=False,
                      source="thumbs_down", created_at=r["created_at"], turn_id=r["id"], contributor=r["user_id"],
                      reason=r["reason"])
                for r in rated if r["score"] < 0 and r["id"] not in paired and r["id"] not in verdicts]
    candidates = [Example(messages=context(r["id"]) + [{"role": "assistant", "content": r["reply"]}],
                          source="thumbs_up", created_at=r["created_at"], turn_id=r["id"], score=float(r["score"]),
                          contributor=r["user_id"], approved=verdicts.get(r["id"]) == "approved")
                  for r in positive]

    corrections = db.query(
        "SELECT c.turn_id, c.user_id, c.text, c.created_at, t.reply_text FROM corrections c "
        "JOIN turns t ON t.id = c.turn_id "
        f"JOIN users u ON u.id = c.user_id WHERE {consent} AND {window.format(col='c.created_at')} ORDER BY c.id",
        (int(opt_out_by_default), *params_window))
    delta.considered += len(corrections)
    for c in corrections:
        if verdicts.get(c["turn_id"]) in ("rejected", "approved"):   # approved: it comes with the verdict
            continue
        prompt = context(c["turn_id"])
        candidates.append(Example(messages=prompt + [{"role": "assistant", "content": c["text"]}], source="correction",
                                  created_at=c["created_at"], turn_id=c["turn_id"], score=2.0,
                                  contributor=c["user_id"]))

    picks = db.query(
        "SELECT p.turn_id, p.user_id, p.chosen, p.rejected, p.source, p.created_at FROM preferences p "
        f"JOIN users u ON u.id = p.user_id WHERE {consent} AND {window.format(col='p.created_at')} ORDER BY p.id",
        (int(opt_out_by_default), *params_window))
    pairs: list[Pair] = []
    for p in picks:
        if p["chosen"].strip() == p["rejected"].strip() or verdicts.get(p["turn_id"]) == "rejected":
            continue
        if p["source"] == "correction" and verdicts.get(p["turn_id"]) == "approved":   # comes with the verdict
            continue
        pairs.append(Pair(prompt=context(p["turn_id"]), chosen=p["chosen"],
                          rejected=p["rejected"], source=p["source"], created_at=p["created_at"],
                          turn_id=p["turn_id"], contributor=p["user_id"]))

    refined_examples, refined = _refinements(store, persona, context, since=since, until=until,
                                             opt_out_by_default=opt_out_by_default)
    delta.considered += len(refined)
    candidates += refined_examples
    pairs += refined

    reviewed, review_pairs, agreed = _admin_reviews(store, context, since=since, until=until,
                                                    opt_out_by_default=opt_out_by_default, paired=paired,
                                                    have={e.turn_id for e in candidates if e.source == "thumbs_up"})
    delta.considered += len(reviewed) + len(review_pairs) + len(agreed)
    candidates += reviewed
    pairs += review_pairs
    unwanted += agreed
    if carried is not None:
        candidates = carried.examples + candidates
        pairs = carried.pairs + pairs
        unwanted = carried.rated + unwanted

    if screens is not None:
        candidates, pairs, unwanted = _screen(delta, candidates, pairs, unwanted, screens)
    if policy is not None:
        candidates, pairs, unwanted = _trust(delta, store, candidates, pairs, unwanted, policy)

    if len(candidates) > budget:
        # more than the budget: keep the top quartile by rating (then at most `budget`)
        ranked = sorted(candidates, key=lambda e: (e.score * e.weight, e.created_at), reverse=True)   # tier weights
        keep = ranked[: min(budget, max(1, len(ranked) // 4))]
        delta.dropped["over_budget"] = len(candidates) - len(keep)
        candidates = keep
    system = [{"role": "system", "content": persona}] if persona else []
    imported = [Example(messages=system + r["messages"], source="import", created_at=r["created_at"], split=r["split"],
                        approved=True)
                for r in store.imported_examples(since=since, until=until)]
    pairs += [Pair(prompt=system + r["prompt"], chosen=r["chosen"], rejected=r["rejected"], source="import",
                   created_at=r["created_at"], approved=True, split="train")
              for r in store.imported_pairs(since=since, until=until)]
    seen: set[str] = set()
    for ex in sorted(candidates + imported, key=lambda e: (e.created_at, e.turn_id or 0)):
        _redact_item(ex)
        k = ex.key()
        if k in seen:
            delta.dropped["duplicate"] = delta.dropped.get("duplicate", 0) + 1
            continue
        seen.add(k)
        delta.examples.append(ex)
    for item in [*pairs, *unwanted, *delta.deferred]:   # deferred: written to deferred.jsonl, redacted alike
        _redact_item(item)
    delta.pairs += pairs
    wanted = [Rated(prompt=e.messages[:-1], completion=e.messages[-1]["content"], desirable=True, source="thumbs_up",
                    created_at=e.created_at, turn_id=e.turn_id, contributor=e.contributor, approved=e.approved,
                    weight=e.weight) for e in delta.examples if e.source == "thumbs_up" and e.turn_id not in paired]
    delta.rated = sorted(wanted + unwanted, key=lambda r: (r.created_at, r.turn_id or 0))
    return delta


def _redact_item(item: Example | Pair | Rated) -> None:
    """Every text of an item through PII redaction (idempotent, so carried items may pass again)."""
    if isinstance(item, Example):
        item.messages = _clean(item.messages)
    elif isinstance(item, Pair):
        item.prompt, item.chosen, item.rejected = _clean(item.prompt), redact(item.chosen), redact(item.rejected)
    else:
        item.prompt, item.completion = _clean(item.prompt), redact(item.completion)


def _paired(store: Store) -> set[int]:
    """Turns with an alternative (a ✏️ correction, a 🔁 pick, a kept self-refinement): a preference pair
    says more than a rating."""
    return {r["turn_id"] for r in store.database.query(
        "SELECT turn_id FROM corrections UNION SELECT turn_id FROM preferences UNION SELECT turn_id FROM proposals "
        "WHERE status IN ('kept', 'edited') AND turn_id IS NOT NULL")}


def _refinements(store: Store, persona: str, context: Callable[[int], list[dict]], *, since: str | None,
                 until: str | None, opt_out_by_default: bool) -> tuple[list[Example], list[Pair]]:
    """Self-refinement proposals kept (or edited) in (since, until] (memory/proposals.py): a pair each,
    the refined reply (or the admin's edit) chosen, the served one rejected — and, for a 👎'd turn, an
    example with that reply, as a ✏️ correction is both (so a cycle can learn from 👎s alone: training
    needs something to imitate). A 👎'd turn's prompt is its served context; a scenario's is the persona
    and its question (a pair only: it has no turn to hold out with). Kept by an admin in review: the
    admin teaches it (approved); kept without review (refine_admin_skip_review): the admin whose chat it
    was, under the trust rules like any of their feedback. Dropped ones are never read."""
    examples, pairs = [], []
    for r in kept_proposal_rows(store.database, since=since, until=until, opt_out_by_default=opt_out_by_default):
        chosen = r["edited_text"] if r["status"] == "edited" and r["edited_text"] else r["refined"]
        if chosen.strip() == r["served"].strip():
            continue
        prompt = context(r["turn_id"]) if r["turn_id"] is not None else \
            ([{"role": "system", "content": persona}] if persona else []) + [{"role": "user", "content": r["prompt"]}]
        who = {"created_at": r["decided_at"], "turn_id": r["turn_id"], "contributor": r["reviewer_id"],
               "approved": not r["auto"]}
        pairs.append(Pair(prompt=prompt, chosen=chosen, rejected=r["served"], source="refine", **who))
        if r["turn_id"] is not None:
            examples.append(Example(messages=prompt + [{"role": "assistant", "content": chosen}], source="refine",
                                    score=2.0, **who))
    return examples, pairs


def _screen(delta: Delta, examples: list[Example], pairs: list[Pair], unwanted: list[Rated],
            screens: Screens) -> tuple[list[Example], list[Pair], list[Rated]]:
    """Keep every target that passes the content screens (memory/screens.py); count the rest by reason
    and list them for the admins. Imports are the owner's own history and are not screened. A 👎'd
    reply is screened too, though it is taught away from: whatever a screen refuses never trains."""
    def passes(text: str, turn_id: int | None, contributor: int | None) -> bool:
        reasons = screen(text, screens)
        for reason in reasons:
            delta.screened[reason] = delta.screened.get(reason, 0) + 1
        if reasons:
            delta.screened_items.append({"turn_id": turn_id, "contributor": contributor, "reasons": reasons})
        return not reasons

    kept = [e for e in examples if passes(e.messages[-1]["content"], e.turn_id, e.contributor)]
    return (kept, [p for p in pairs if passes(p.chosen, p.turn_id, p.contributor)],
            [r for r in unwanted if passes(r.completion, r.turn_id, r.contributor)])


def _trust(delta: Delta, store: Store, examples: list[Example], pairs: list[Pair], unwanted: list[Rated],
           policy: TrustPolicy) -> tuple[list[Example], list[Pair], list[Rated]]:
    """Who may teach on their own (the rest waits for /review, or is ignored in the admins mode), then
    each source's cap (the excess is deferred to the next generation); records the contributors."""
    def direct(item) -> bool:
        if item.approved or policy.teaches_directly(item.contributor):
            return True
        if policy.queues_for_review(item.contributor):
            delta.waiting[item.contributor] = delta.waiting.get(item.contributor, 0) + 1
        else:
            delta.dropped["not_trusted"] = delta.dropped.get("not_trusted", 0) + 1
        return False

    examples, pairs = [e for e in examples if direct(e)], [p for p in pairs if direct(p)]
    unwanted = [r for r in unwanted if direct(r)]
    people = {i.contributor for i in [*examples, *pairs, *unwanted] if i.contributor is not None}
    first_seen = {r["id"]: r["created_at"] for r in store.database.query(
        "SELECT id, created_at FROM users WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(sorted(people)),))}
    source_of = sources(policy, first_seen)
    items = sorted([*examples, *pairs, *unwanted], key=lambda i: (i.created_at, i.turn_id or 0))
    capped = [i for i in items if not i.approved]
    kept, deferred = cap(capped, lambda i: i.contributor, source_of, policy)
    keep = {id(i) for i in kept} | {id(i) for i in items if i.approved}
    delta.deferred = deferred
    if deferred:
        delta.dropped["over_share"] = len(deferred)
    delta.sources = shares([i.contributor for i in kept], source_of)
    examples, unwanted = [e for e in examples if id(e) in keep], [r for r in unwanted if id(r) in keep]
    for item in [*examples, *unwanted]:
        item.weight = policy.weight(item.contributor, approved=item.approved)
    return examples, [p for p in pairs if id(p) in keep], unwanted


def _verdicts(store: Store) -> dict[int, str]:
    """Every admin verdict, whenever it was given: a rejection holds for good."""
    return {r["turn_id"]: r["verdict"] for r in store.database.query("SELECT turn_id, verdict FROM reviews")}


def _admin_reviews(store: Store, context: Callable[[int], list[dict]], *, since: str | None, until: str | None,
                   opt_out_by_default: bool, have: set, paired: set) -> tuple[list[Example], list[Pair], list[Rated]]:
    """Turns approved or edited by an admin in (since, until]: examples (and a pair per edit). Approving
    a turn its author corrected approves the correction: the correction is the target, and a pair.
    Approving a lone 👎 (no alternative, rated below zero) agrees with it: an undesirable item."""
    rows = store.database.query(
        "SELECT v.turn_id, v.verdict, v.edited_text, v.reviewer_id, t.created_at, "
        "(SELECT SUM(r.value) FROM ratings r WHERE r.turn_id = t.id) AS score, "
        "(SELECT r.reason FROM ratings r WHERE r.turn_id = t.id AND r.value < 0 AND r.reason IS NOT NULL "
        "ORDER BY r.updated_at DESC LIMIT 1) AS reason, "
        "COALESCE(a.text, t.reply_text) AS reply, (SELECT c.text FROM corrections c WHERE c.turn_id = t.id "
        "AND c.user_id = t.user_id ORDER BY c.id DESC LIMIT 1) AS correction "
        "FROM reviews v JOIN turns t ON t.id = v.turn_id JOIN users u ON u.id = t.user_id "
        "LEFT JOIN alternatives a ON a.id = t.picked_alternative_id "
        "WHERE v.verdict IN ('approved', 'edited') AND t.status = 'answered' "
        "AND COALESCE(u.training_opt_out, ?) = 0 "
        "AND (? IS NULL OR v.created_at > ?) AND (? IS NULL OR v.created_at <= ?) ORDER BY v.turn_id",
        (int(opt_out_by_default), since, since, until, until))
    examples, pairs, agreed = [], [], []
    for r in rows:
        if r["verdict"] == "approved" and (r["score"] or 0) < 0 and r["turn_id"] not in paired:
            agreed.append(Rated(prompt=context(r["turn_id"]), completion=r["reply"] or "",
                                desirable=False, source="review", created_at=r["created_at"], turn_id=r["turn_id"],
                                contributor=r["reviewer_id"], approved=True, reason=r["reason"]))
            continue
        corrected = r["verdict"] == "approved" and r["correction"] is not None
        if r["verdict"] == "approved" and r["turn_id"] in have and not corrected:   # already an example (👍)
            continue
        prompt = context(r["turn_id"])
        target = r["edited_text"] if r["verdict"] == "edited" else r["correction"] if corrected else r["reply"]
        examples.append(Example(messages=prompt + [{"role": "assistant", "content": target}],
                                source="review_edit" if r["verdict"] == "edited" else "correction" if corrected
                                else "review", created_at=r["created_at"], turn_id=r["turn_id"], score=2.0,
                                contributor=r["reviewer_id"], approved=True))
        if (r["verdict"] == "edited" or corrected) and (r["reply"] or "").strip() != target.strip():
            pairs.append(Pair(prompt=prompt, chosen=target, rejected=r["reply"] or "",
                              source="review_edit" if r["verdict"] == "edited" else "correction",
                              created_at=r["created_at"], turn_id=r["turn_id"], contributor=r["reviewer_id"],
                              approved=True))
    return examples, pairs, agreed


LIVE_SOURCES = ("thumbs_up", "correction", "review", "review_edit", "refine")   # examples made from a stored chat turn


def _same_people(store: Store, turn_id: int, messages: list[dict], opt_out_by_default: bool) -> bool:
    """Whether what people said up to this turn is still what the store gives now: someone's /forget or
    /optout in a group takes their messages out of the conversation, so an item that quoted them may not
    train. The replies in between may since have been corrected, which changes nothing about who may be
    trained on. Both sides redacted (redaction is idempotent), as an item may have been stored before it."""
    current = served_context(store, turn_id, "", opt_out_by_default=opt_out_by_default)
    return [m for m in _clean(messages) if m["role"] == "user"] == [m for m in _clean(current) if m["role"] == "user"]


def still_unwanted(store: Store, items: list[Rated], *, opt_out_by_default: bool) -> list[Rated]:
    """Deferred lone 👎s that may still train: the turn is still there (not /forget-ten), its author still
    consents, no admin rejected or edited it, it is still rated below zero and still has no alternative,
    and the people in its context are still there (`_same_people`)."""
    ids = sorted({r.turn_id for r in items if r.turn_id is not None})
    if not ids:
        return [r for r in items if r.turn_id is None]
    rows = store.database.query(
        "SELECT t.id FROM turns t JOIN users u ON u.id = t.user_id LEFT JOIN reviews v ON v.turn_id = t.id "
        "WHERE t.id IN (SELECT value FROM json_each(?)) AND COALESCE(u.training_opt_out, ?) = 0 "
        "AND COALESCE(v.verdict, '') NOT IN ('rejected', 'edited') "
        "AND (SELECT COALESCE(SUM(r.value), 0) FROM ratings r WHERE r.turn_id = t.id) < 0",
        (json.dumps(ids), int(opt_out_by_default)))
    alive = {r["id"] for r in rows} - _paired(store)
    return [r for r in items if r.turn_id is None
            or (r.turn_id in alive and _same_people(store, r.turn_id, r.prompt, opt_out_by_default))]


def still_paired(store: Store, pairs: list[Pair], *, opt_out_by_default: bool) -> list[Pair]:
    """Deferred preference pairs that may still train, by the rules fresh ones follow: the turn is still
    answered (not /forget-ten) and its author consents (not /optout-ed); a 🔁 or ✏️ pair's pick is still
    stored and its chooser consents, and no admin rejected the turn (nor approved it: an approved ✏️
    comes with the verdict); a kept refinement's turn was neither rejected nor edited; and the people in
    its context are still there (`_same_people`). A pair without a turn (a refinement's scenario) passes."""
    ids = json.dumps(sorted({p.turn_id for p in pairs if p.turn_id is not None}))
    verdicts = {r["id"]: r["verdict"] for r in store.database.query(
        "SELECT t.id, v.verdict FROM turns t JOIN users u ON u.id = t.user_id LEFT JOIN reviews v ON v.turn_id = t.id "
        "WHERE t.id IN (SELECT value FROM json_each(?)) AND t.status = 'answered' "
        "AND COALESCE(u.training_opt_out, ?) = 0", (ids, int(opt_out_by_default)))}
    chosen = {(r["turn_id"], r["user_id"]) for r in store.database.query(
        "SELECT p.turn_id, p.user_id FROM preferences p JOIN users u ON u.id = p.user_id "
        "WHERE p.turn_id IN (SELECT value FROM json_each(?)) AND COALESCE(u.training_opt_out, ?) = 0",
        (ids, int(opt_out_by_default)))}

    def keep(p: Pair) -> bool:
        if p.turn_id is None:
            return True
        if p.turn_id not in verdicts:
            return False
        verdict = verdicts[p.turn_id]
        if p.source == "refine":
            allowed = verdict not in ("rejected", "edited")
        else:
            allowed = (p.turn_id, p.contributor) in chosen and verdict != "rejected" \
                and not (p.source == "correction" and verdict == "approved")
        return allowed and _same_people(store, p.turn_id, p.prompt, opt_out_by_default)

    return [p for p in pairs if keep(p)]


def still_trainable(store: Store, examples: list[Example], *, opt_out_by_default: bool) -> list[Example]:
    """Ancestors' examples that may still be trained on (replay). One made from a chat turn needs the turn
    to exist (not /forget-ten), its author's consent now (not /optout-ed), no admin rejection (nor an
    edit, for the reply as served), and the people in its context still there (`_same_people`: in a
    group, someone else's /forget or /optout takes their messages out). The rest (imports, probes) pass."""
    ids = sorted({e.turn_id for e in examples if e.source in LIVE_SOURCES and e.turn_id is not None})
    rows = store.database.query(
        "SELECT t.id, v.verdict FROM turns t JOIN users u ON u.id = t.user_id LEFT JOIN reviews v ON v.turn_id = t.id "
        "WHERE t.id IN (SELECT value FROM json_each(?)) AND COALESCE(u.training_opt_out, ?) = 0",
        (json.dumps(ids), int(opt_out_by_default))) if ids else []
    allowed = {r["id"]: r["verdict"] for r in rows if r["verdict"] != "rejected"}

    def keep(e: Example) -> bool:
        if e.source not in LIVE_SOURCES:
            return True
        if e.turn_id not in allowed:
            return False
        if e.source == "thumbs_up" and allowed[e.turn_id] == "edited":
            return False
        return _same_people(store, e.turn_id, e.messages[:-1], opt_out_by_default)

    return [e for e in examples if keep(e)]
