"""Who may teach the persona, and how much of one generation one voice may fill.

Every training target has a contributor: the person whose ✏️ correction, 🔁 pick or 👍 made it
(an admin's review verdict makes the admin its contributor). Three tiers: admins, trusted people
(listed in settings, or earned: an admin approved enough of their contributions), everyone else.

`learn_from` says whose feedback trains on its own:
- `everyone`: every tier (an allow-listed bot's default: its owner chose who may talk to it; there
  "everyone" is who may still talk to it, so taking someone off the allow-list or revoking an API
  key sends what they left to /review);
- `trusted`: admins and trusted people; the rest waits in /review (an open bot's default);
- `reviewed`: admins only; everyone else's feedback waits in /review;
- `admins`: admins only; nobody else's feedback is even queued.
Waiting items are not lost: an admin's approval in /review makes them targets (as the admin's).

Caps: one source holds at most `max_share` of the items a generation trains on, but always up to
`min_items` (a lone teacher still teaches); the rest is deferred to the next generation, counted.
Admins are not capped. Untrusted accounts first seen within `new_account_window_s` of each other,
three or more of them, count as one source until an admin trusts them — a flood from fresh
accounts weighs what one stranger weighs.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

ADMIN, TRUSTED, OTHER = "admin", "trusted", "other"
TERMINAL_USER_ID = 0   # `ouro chat`: whoever runs it on the bot's machine (a member of any allow-listed bot)
MODES = ("admins", "reviewed", "trusted", "everyone")
T = TypeVar("T")


@dataclass(frozen=True)
class TrustPolicy:
    learn_from: str                       # one of MODES (settings' "auto" resolved by `resolve_mode`)
    admins: frozenset[int] = frozenset()
    trusted: frozenset[int] = frozenset()  # listed and earned
    known: frozenset[int] = frozenset()    # on the allow-list: the owner chose them, never "new accounts"
    members: frozenset[int] | None = None  # who "everyone" is: the allow-list and live API keys; None: anyone
    max_share: float = 0.5
    min_items: int = 8
    new_account_window_s: float = 3600.0
    weights: dict[str, float] = field(default_factory=lambda: {ADMIN: 3.0, TRUSTED: 2.0, OTHER: 1.0})

    def tier(self, user_id: int | None) -> str:
        if user_id is not None and user_id in self.admins:
            return ADMIN
        return TRUSTED if user_id is not None and user_id in self.trusted else OTHER

    def teaches_directly(self, user_id: int | None) -> bool:
        tier = self.tier(user_id)
        if self.learn_from == "everyone":
            return self.members is None or tier != OTHER or user_id in self.members
        if self.learn_from == "trusted":
            return tier in (ADMIN, TRUSTED)
        return tier == ADMIN

    def queues_for_review(self, user_id: int | None) -> bool:
        """Whether feedback that may not teach on its own waits for an admin (else it is ignored)."""
        return self.learn_from != "admins"

    def weight(self, user_id: int | None, *, approved: bool = False) -> float:
        """The loss weight of what `user_id` taught; an admin's approval vouches for it as an admin's."""
        return self.weights[ADMIN] if approved else self.weights[self.tier(user_id)]


def resolve_mode(learn_from: str, *, allow_list: bool) -> str:
    """`auto`: everyone on an allow-listed bot, admins and trusted people on an open one."""
    if learn_from == "auto":
        return "everyone" if allow_list else "trusted"
    if learn_from not in MODES:
        raise ValueError(f"learn_from must be auto or one of {', '.join(MODES)}, not {learn_from!r}")
    return learn_from


def sources(policy: TrustPolicy, first_seen: dict[int, str]) -> dict[int, str]:
    """Each contributor's source name for the caps: the person, or one shared name for a burst of
    new untrusted accounts (three or more first seen within `new_account_window_s` of each other;
    0 turns this off). People on the allow-list are never such a burst."""
    out = {uid: f"user:{uid}" for uid in first_seen}
    if policy.new_account_window_s <= 0:
        return out
    strangers = sorted((_time(ts), uid) for uid, ts in first_seen.items()
                       if policy.tier(uid) == OTHER and uid not in policy.known)
    burst: list[tuple[float, int]] = []

    def close(group: list[tuple[float, int]]) -> None:
        if len(group) >= 3:
            for _, uid in group:
                out[uid] = f"new-accounts:{group[0][1]}"

    for t, uid in strangers:
        if burst and t - burst[-1][0] > policy.new_account_window_s:
            close(burst)
            burst = []
        burst.append((t, uid))
    close(burst)
    return out


def cap(items: Sequence[T], contributor: Callable[[T], int | None], source_of: dict[int, str],
        policy: TrustPolicy) -> tuple[list[T], list[T]]:
    """(kept, deferred): no source keeps more than `max_share` of the items kept (admins' included),
    but every source keeps up to `min_items`; oldest first as given; admins are not capped."""
    per: Counter[str] = Counter()
    admins = 0
    for item in items:
        uid = contributor(item)
        if policy.tier(uid) == ADMIN:
            admins += 1
        else:
            per[source_of.get(uid, f"user:{uid}")] += 1
    limit = share_limit(list(per.values()), admins, policy.max_share, policy.min_items)
    taken: Counter[str] = Counter()
    kept, deferred = [], []
    for item in items:
        uid = contributor(item)
        if policy.tier(uid) == ADMIN:
            kept.append(item)
            continue
        src = source_of.get(uid, f"user:{uid}")
        if taken[src] < limit:
            taken[src] += 1
            kept.append(item)
        else:
            deferred.append(item)
    return kept, deferred


def share_limit(counts: Sequence[int], uncapped: int, max_share: float, min_items: int) -> int:
    """The most items one source may keep so that none holds more than `max_share` of all that is
    kept — a share of what trains, not of what was offered (a flood that offers 80 of 116 items
    would otherwise keep 58 of 94) — and never fewer than `min_items`."""
    for limit in range(max(counts, default=0), 0, -1):
        if limit <= max_share * (uncapped + sum(min(n, limit) for n in counts)) + 1e-9:
            return max(limit, min_items)
    return min_items


def shares(contributors: Sequence[int | None], source_of: dict[int, str]) -> dict:
    """How many people contributed and the largest single source's share (for the ledger and /evals)."""
    if not contributors:
        return {"contributors": 0, "largest_share": 0.0}
    per: defaultdict[str, int] = defaultdict(int)
    for uid in contributors:
        per[source_of.get(uid, f"user:{uid}")] += 1
    return {"contributors": len({uid for uid in contributors if uid is not None}),
            "largest_share": round(max(per.values()) / len(contributors), 3)}


def _time(ts: str) -> float:
    try:
        return datetime.fromisoformat(ts).timestamp()
    except (TypeError, ValueError):
        return 0.0


def earned_trust(store, approvals: int) -> set[int]:
    """People with at least `approvals` of their contributions (a ✏️, 👍 or lone 👎 on their own
    turn) approved by an admin in /review."""
    if approvals <= 0:
        return set()
    rows = store.database.query(
        "SELECT t.user_id, COUNT(*) AS n FROM reviews v JOIN turns t ON t.id = v.turn_id "
        "WHERE v.verdict = 'approved' AND (EXISTS (SELECT 1 FROM corrections c WHERE c.turn_id = t.id "
        "AND c.user_id = t.user_id) OR EXISTS (SELECT 1 FROM ratings r WHERE r.turn_id = t.id "
        "AND r.user_id = t.user_id AND (r.value > 0 OR NOT EXISTS (SELECT 1 FROM preferences p "
        "WHERE p.turn_id = t.id)))) GROUP BY t.user_id")
    return {r["user_id"] for r in rows if r["n"] >= approvals}


def chat_members(settings, store) -> frozenset[int] | None:
    """Who may talk to an allow-listed bot now: the allow-list and the people of live API keys (None on an
    open bot: anyone). Admins and trusted people are not needed here: their tier lets them teach."""
    if not settings.allowed_user_ids:
        return None
    return frozenset(settings.allowed_user_ids) | {key["user_id"] for key in store.api_keys()} | {TERMINAL_USER_ID}


def policy_for(settings, store) -> TrustPolicy:
    """The policy the settings and the store's review history give (settings: config.settings.Settings)."""
    return TrustPolicy(
        learn_from=resolve_mode(settings.learn_from, allow_list=bool(settings.allowed_user_ids)),
        admins=frozenset(settings.admin_ids),
        trusted=frozenset(settings.trusted_user_ids) | frozenset(earned_trust(store, settings.trust_after_approvals)),
        known=frozenset(settings.allowed_user_ids), members=chat_members(settings, store),
        max_share=settings.max_share_per_source, min_items=settings.min_items_per_source,
        new_account_window_s=settings.new_account_window_s,
        weights={ADMIN: settings.weight_admin, TRUSTED: settings.weight_trusted, OTHER: settings.weight_other})
