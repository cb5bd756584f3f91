"""Generalization (0–1): the child actually learned from the new data.

Items: the newest 20% of this generation's reviewed turns (a chronological hold-out the child was
trained on in no form, DPO pairs included). What "learned" means depends on what made the reply
the target:
- a reply people wrote or chose over the served one (✏️ correction, 🔁 pick, an admin's edit): the
  child must find it more likely than the parent does, `nll_child < nll_parent - margin`;
- a served reply people approved as it was (👍, an admin's approval): the parent wrote it, so the
  child learned it when it still says it — recall's per-token rule (evals/recall.py): at least
  `keep_share` of its tokens keep e^-tolerance of the parent's probability. A mean-NLL rule was
  tried first (at most 0.05 nats/token worse) and refused children that had learned exactly what
  people taught: a new opener moves one or two tokens of every approved reply without it by
  several nats, which swamps a mean over a 40-token reply (measured: docs/design-notes.md), the
  same reason recall is counted per token.
generalization = learned items / all items; each item's figures are in `per_item`. With no
held-out items the score is None and the gate treats it as "not measured" (it does not pass a
data-free generation by default).
"""

from __future__ import annotations

import numpy as np

from evals.scoring import EvalModel

KEPT_AS_SERVED = ("thumbs_up", "review")   # sources whose target is the reply the parent served


def generalization_score(child: EvalModel, parent: EvalModel, items: list[list[dict]], *,
                         sources: list[str] | None = None, margin: float = 0.0, tolerance: float = 1.0,
                         keep_share: float = 0.9) -> dict:
    if not items:
        return {"score": None, "items": 0, "improved": 0, "mean_nll_child": None, "mean_nll_parent": None}
    sources = sources if sources is not None else ["correction"] * len(items)
    improved, kept, per_item = 0, 0, []
    for messages, source in zip(items, sources, strict=True):
        c, p = child.reply_logprobs(messages), parent.reply_logprobs(messages)
        nll_c, nll_p = float(-np.mean(c)), float(-np.mean(p))
        retention = float(np.mean(c >= p - tolerance))
        if source in KEPT_AS_SERVED:
            learned = retention >= keep_share
            kept += learned
        else:
            learned = nll_c < nll_p - margin
            improved += learned
        per_item.append({"source": source, "learned": bool(learned), "nll_child": round(nll_c, 4),
                         "nll_parent": round(nll_p, 4), "retention": round(retention, 4), "tokens": int(len(c))})
    return {"score": round((improved + kept) / len(items), 4), "items": len(items), "improved": improved,
            "kept": kept, "kept_items": sum(s in KEPT_AS_SERVED for s in sources),
            "mean_nll_child": round(float(np.mean([x["nll_child"] for x in per_item])), 4),
            "mean_nll_parent": round(float(np.mean([x["nll_parent"] for x in per_item])), 4),
            "per_item": per_item}
