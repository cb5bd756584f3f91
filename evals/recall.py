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

Why a reply's first token is left out (`skip_first`, session 15): a generation taught to open
its replies differently no longer gives the parent's first token — that is the lesson, not
forgetting, and on a short old reply it weighed like forgetting a quarter of it. Measured on a
refused "Oh my stars!" candidate (100% of its probe replies in the style): it lost the first
token of all 5 recall items and only 3 of their other 136 tokens; "Good night!" (4 tokens) kept
75% for the opener alone. Style drift, the tone probes and format watch how replies open.
`score_all_tokens` is the old figure, reported beside it.
"""

from __future__ import annotations

import numpy as np

from evals.scoring import EvalModel


def retention(child_logps: np.ndarray, parent_logps: np.ndarray, *, tolerance: float = 1.0,
              skip_first: int = 1) -> float:
    """Share of a reply's tokens the child still gives ≥ e^-tolerance of the parent's probability,
    leaving out its first `skip_first` tokens (all of them counted when the reply is no longer)."""
    known = child_logps >= parent_logps - tolerance
    body = known[skip_first:] if len(known) > skip_first else known
    return float(np.mean(body))


def recall_score(child: EvalModel, parent: EvalModel, items: list[list[dict]], *, tolerance: float = 1.0,
                 skip_first: int = 1) -> dict:
    if not items:
        return {"score": 1.0, "items": 0, "mean_nll_child": None, "mean_nll_parent": None}
    kept, kept_all, nll_c, nll_p = [], [], [], []
    for messages in items:
        c, p = child.reply_logprobs(messages), parent.reply_logprobs(messages)
        kept.append(retention(c, p, tolerance=tolerance, skip_first=skip_first))
        kept_all.append(retention(c, p, tolerance=tolerance, skip_first=0))
        nll_c.append(float(-np.mean(c)))
        nll_p.append(float(-np.mean(p)))
    return {"score": round(float(np.mean(kept)), 4), "items": len(items),
            "score_all_tokens": round(float(np.mean(kept_all)), 4),
            "worst_item_retention": round(min(kept), 4),
            "mean_nll_child": round(float(np.mean(nll_c)), 4), "mean_nll_parent": round(float(np.mean(nll_p)), 4)}
