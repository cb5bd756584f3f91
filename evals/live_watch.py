"""The live watch: does a newly promoted generation do worse with real people than its parent?

Offline evals can pass a child that people dislike. So after a promotion the bot keeps score:
over the child's first N rated replies (`watch_min_ratings`) its 👎 share — thumbs-down ÷
ratings — is compared with its parent's 👎 share over the parent's latest N rated replies.
If the child's share exceeds the parent's by more than `watch_margin` (absolute, 0–1), the
verdict is "worse" and the bot rolls back to the parent on its own. The margin keeps noise
from flipping generations back and forth: with N = 20 one unlucky 👎 moves the share by 0.05.

Verdicts: "waiting" (fewer than N ratings of the child yet), "no_baseline" (the parent has
fewer than `min(5, N)` rated replies: nothing to compare with, so the watch ends without
acting), "worse", or "ok". Deterministic for given ratings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Verdict:
    status: str
    child_id: str
    parent_id: str | None
    child_down_share: float | None
    parent_down_share: float | None
    child_n: int
    parent_n: int
    margin: float

    @property
    def decided(self) -> bool:
        return self.status in ("ok", "worse", "no_baseline")

    def reason(self) -> str:
        if self.status == "waiting":
            return f"{self.child_id}: {self.child_n} rated replies so far, judging after more"
        if self.status == "no_baseline":
            return f"{self.parent_id} has only {self.parent_n} rated replies; nothing to compare {self.child_id} with"
        cmp = "more than" if self.status == "worse" else "within"
        return (f"{self.child_id} got 👎 on {self.child_down_share:.0%} of its first {self.child_n} rated replies vs "
                f"{self.parent_down_share:.0%} for {self.parent_id} (last {self.parent_n}): {cmp} the "
                f"{self.margin:.0%} margin")

    def to_dict(self) -> dict:
        return {**asdict(self), "reason": self.reason()}


def down_share(values: list[int]) -> float | None:
    return sum(v < 0 for v in values) / len(values) if values else None


def judge(child_id: str, parent_id: str | None, child_values: list[int], parent_values: list[int], *,
          min_ratings: int, margin: float) -> Verdict:
    """`child_values`: the child's first ratings (+1/−1); `parent_values`: the parent's latest."""
    child_values = child_values[:min_ratings]
    parent_values = parent_values[-min_ratings:]
    c, p = down_share(child_values), down_share(parent_values)
    verdict = Verdict("waiting", child_id, parent_id, c, p, len(child_values), len(parent_values), margin)
    if len(child_values) < min_ratings:
        return verdict
    if parent_id is None or len(parent_values) < min(5, min_ratings):
        verdict.status = "no_baseline"
        return verdict
    verdict.status = "worse" if c - p > margin + 1e-12 else "ok"
    return verdict
