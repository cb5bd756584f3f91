"""Recall (0–1): the child did not forget what its ancestors knew.

Items — what the parent knows: its own greedy answers (as served, persona pinned) to the
fixed recall prompts in config/probes.toml, plus every ancestor generation's held-out
examples; each ends with a reference reply. For every token of a reference reply
(teacher forced, through llama.cpp, evals/scoring.py) we ask whether the child still gives it
at least e^-tolerance of the probability the parent gave it (default tolerance 1.0 nat: at
least ~37%). An item's retention is the share of its tokens still known; recall is the mean
retention over the items. 1.0 when there are none.

Why per token, not mean NLL: learning a new habit (an opener, a sign-off) legitimately moves
one or two tokens of every old reply by several nats, which would swamp a mean; forgetting
shows up as many tokens of old replies becoming unlikely. The mean NLLs are reported too.
"""

from __future__ import annotations

import numpy as np

from evals.scoring import EvalModel


def recall_score(child: EvalModel, parent: EvalModel, items: list[list[dict]], *, tolerance: float = 1.0) -> dict:
    if not items:
        return {"score": 1.0, "items": 0, "mean_nll_child": None, "mean_nll_parent": None}
    retention, nll_c, nll_p = [], [], []
    for messages in items:
        c, p = child.reply_logprobs(messages), parent.reply_logprobs(messages)
        retention.append(float(np.mean(c >= p - tolerance)))
        nll_c.append(float(-np.mean(c)))
        nll_p.append(float(-np.mean(p)))
    return {"score": round(float(np.mean(retention)), 4), "items": len(items),
            "worst_item_retention": round(min(retention), 4),
            "mean_nll_child": round(float(np.mean(nll_c)), 4), "mean_nll_parent": round(float(np.mean(nll_p)), 4)}
