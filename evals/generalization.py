"""Generalization (0–1): the child actually learned from the new data.

Items: the newest 20% of this generation's new data (a chronological hold-out the child was
not trained on). An item *improved* when the child finds its reference reply more likely
than the parent does: `nll_child < nll_parent - margin` (margin default 0.0 nats per token).
generalization = improved items / all items. With no held-out items the score is None and
the gate treats it as "not measured" (it does not pass a data-free generation by default).
"""

from __future__ import annotations

from evals.scoring import EvalModel


def generalization_score(child: EvalModel, parent: EvalModel, items: list[list[dict]], *,
                         margin: float = 0.0) -> dict:
    if not items:
        return {"score": None, "items": 0, "improved": 0, "mean_nll_child": None, "mean_nll_parent": None}
    improved, nll_c, nll_p = 0, [], []
    for messages in items:
        c, p = child.reply_nll(messages), parent.reply_nll(messages)
        nll_c.append(c)
        nll_p.append(p)
        improved += c < p - margin
    return {"score": round(improved / len(items), 4), "items": len(items), "improved": improved,
            "mean_nll_child": round(sum(nll_c) / len(nll_c), 4), "mean_nll_parent": round(sum(nll_p) / len(nll_p), 4)}
