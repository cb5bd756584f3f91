"""Generalization (0–1): the child actually learned from the new data.

Items: the newest 20% of this generation's reviewed turns (a chronological hold-out the child was
trained on in no form, DPO pairs included). What "learned" means depends on what made the reply
the target:
- a reply people wrote or chose over the served one (✏️ correction, 🔁 pick, an admin's edit): the
  child must find it more likely than the parent does, `nll_child < nll_parent - margin`;
- a served reply people approved as it was (👍, an admin's approval): the parent wrote it, so the
  child learned it when it keeps it — at most `keep_margin` nats per token less likely. (Counting
  these as "must improve" made mixed data unpassable: a child that learned the corrections' new
  opener finds every approved reply without it a little less likely, and 1 of 4 such items held out
  capped the score at 0.75.)
generalization = learned items / all items. With no held-out items the score is None and the gate
treats it as "not measured" (it does not pass a data-free generation by default).
"""

from __future__ import annotations

from evals.scoring import EvalModel

KEPT_AS_SERVED = ("thumbs_up", "review")   # sources whose target is the reply the parent served


def generalization_score(child: EvalModel, parent: EvalModel, items: list[list[dict]], *,
                         sources: list[str] | None = None, margin: float = 0.0, keep_margin: float = 0.05) -> dict:
    if not items:
        return {"score": None, "items": 0, "improved": 0, "mean_nll_child": None, "mean_nll_parent": None}
    sources = sources if sources is not None else ["correction"] * len(items)
    improved, kept, nll_c, nll_p = 0, 0, [], []
    for messages, source in zip(items, sources, strict=True):
        c, p = child.reply_nll(messages), parent.reply_nll(messages)
        nll_c.append(c)
        nll_p.append(p)
        if source in KEPT_AS_SERVED:
            kept += c <= p + keep_margin
        else:
            improved += c < p - margin
    return {"score": round((improved + kept) / len(items), 4), "items": len(items), "improved": improved,
            "kept": kept, "kept_items": sum(s in KEPT_AS_SERVED for s in sources),
            "mean_nll_child": round(sum(nll_c) / len(nll_c), 4), "mean_nll_parent": round(sum(nll_p) / len(nll_p), 4)}
