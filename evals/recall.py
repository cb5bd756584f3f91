"""Recall (0–1): the child did not forget what its ancestors knew.

Items: every ancestor generation's held-out examples plus the fixed recall probes in
config/probes.toml, each ending with a reference reply. For each item we compute the mean
NLL per token of the reference reply under the child and under the parent (evals/scoring.py).
An item is *kept* when `nll_child <= nll_parent + tolerance` (default tolerance 0.10 nats per
token: a small, harmless shift). recall = kept items / all items. 1.0 when there are none.
"""

from __future__ import annotations

from evals.scoring import EvalModel


def recall_score(child: EvalModel, parent: EvalModel, items: list[list[dict]], *, tolerance: float = 0.10) -> dict:
    if not items:
        return {"score": 1.0, "items": 0, "kept": 0, "mean_nll_child": None, "mean_nll_parent": None}
    kept, nll_c, nll_p = 0, [], []
    for messages in items:
        c, p = child.reply_nll(messages), parent.reply_nll(messages)
        nll_c.append(c)
        nll_p.append(p)
        kept += c <= p + tolerance
    return {"score": round(kept / len(items), 4), "items": len(items), "kept": kept,
            "mean_nll_child": round(sum(nll_c) / len(nll_c), 4), "mean_nll_parent": round(sum(nll_p) / len(nll_p), 4)}
