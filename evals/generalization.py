"""Generalization (0–1): the child actually learned from the new data.

Items: the newest 20% of this generation's reviewed turns (a chronological hold-out the child was
trained on in no form, DPO pairs included). What "learned" means depends on what made the reply
the target:
- a reply people wrote or chose over the served one (✏️ correction, 🔁 pick, an admin's edit): what
  they taught is "this rather than that", so when the replaced reply is known the child must
  prefer the correction over it by at least `preference_gain` nats more than the parent did
  (sequence log-probabilities, as a DPO reward margin on held-out pairs), and not find the
  correction itself more than `nll_slack` nats/token less likely. Where the parent already
  preferred the correction by `preference_gain` (a generation 2 taught more of a style its parent
  learned) there is no nat left to gain: the child learned it when it still prefers it by as
  much (counted with the kept items). Without that, a child of a parent that had learned the
  style was refused at generalization 0.2 while 79% of its probe replies were in the style. Without the replaced reply:
  `nll_child < nll_parent - margin`. The mean-NLL rule alone was tried first and refused children
  that had learned the correction: a correction is mostly the served reply's words behind a new
  opener, and their drift (recall's business) outweighed the opener the child did learn
  (measured: docs/design-notes.md);
- a served reply people approved as it was (👍, an admin's approval): the parent wrote it, so the
  child learned it when it still says it — recall's per-token rule (evals/recall.py `retention`,
  the reply's first token left out as there): at least `keep_share` of its tokens keep e^-tolerance
  of the parent's probability. A mean-NLL rule was
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

from evals.recall import retention as token_retention
from evals.scoring import EvalModel

KEPT_AS_SERVED = ("thumbs_up", "review")   # sources whose target is the reply the parent served


def generalization_score(child: EvalModel, parent: EvalModel, items: list[list[dict]], *,
                         sources: list[str] | None = None, rejected: list[str | None] | None = None,
                         margin: float = 0.0, tolerance: float = 1.0, keep_share: float = 0.9,
                         preference_gain: float = 1.0, nll_slack: float = 0.1) -> dict:
    if not items:
        return {"score": None, "items": 0, "improved": 0, "mean_nll_child": None, "mean_nll_parent": None}
    sources = sources if sources is not None else ["correction"] * len(items)
    rejected = rejected if rejected is not None else [None] * len(items)
    improved, kept, known, per_item = 0, 0, 0, []
    for messages, source, replaced in zip(items, sources, rejected, strict=True):
        c, p = child.reply_logprobs(messages), parent.reply_logprobs(messages)
        nll_c, nll_p = float(-np.mean(c)), float(-np.mean(p))
        retention = token_retention(c, p, tolerance=tolerance)
        row: dict = {"source": source}
        if source in KEPT_AS_SERVED:
            learned = retention >= keep_share
            kept += learned
        elif replaced is not None:
            other = messages[:-1] + [{"role": "assistant", "content": replaced}]
            child_margin = float(np.sum(c)) - float(np.sum(child.reply_logprobs(other)))
            parent_margin = float(np.sum(p)) - float(np.sum(parent.reply_logprobs(other)))
            gain = child_margin - parent_margin
            if parent_margin >= preference_gain:      # the parent already preferred it: keep preferring it
                learned = child_margin >= preference_gain and nll_c <= nll_p + nll_slack
                kept += learned
                known += 1
            else:
                learned = gain >= preference_gain and nll_c <= nll_p + nll_slack
                improved += learned
            row.update(preference_gain=round(gain, 3), child_margin=round(child_margin, 3),
                       parent_margin=round(parent_margin, 3))
        else:
            learned = nll_c < nll_p - margin
            improved += learned
        per_item.append({**row, "learned": bool(learned), "nll_child": round(nll_c, 4),
                         "nll_parent": round(nll_p, 4), "retention": round(retention, 4), "tokens": int(len(c))})
    return {"score": round((improved + kept) / len(items), 4), "items": len(items), "improved": improved,
            "kept": kept, "kept_items": sum(s in KEPT_AS_SERVED for s in sources) + known, "already_preferred": known,
            "mean_nll_child": round(float(np.mean([x["nll_child"] for x in per_item])), 4),
            "mean_nll_parent": round(float(np.mean([x["nll_parent"] for x in per_item])), 4),
            "per_item": per_item}
