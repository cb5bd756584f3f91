"""Recall's per-token rule (evals/recall.py `retention`), which generalization's kept replies share:
a reply's first token — where a newly taught opening lands — is left out; forgetting the rest is not."""

from __future__ import annotations

import numpy as np
import pytest

from evals.recall import recall_score, retention

PARENT = np.array([-0.5, -1.0, -0.2, -0.3])          # "Good", " night", "!", end of turn


def test_a_new_opening_is_not_forgetting():
    child = PARENT.copy()
    child[0] = -9.0                                   # the child now opens otherwise
    assert retention(child, PARENT) == 1.0
    assert retention(child, PARENT, skip_first=0) == 0.75   # the old count: a quarter "forgotten"


def test_forgetting_after_the_first_token_counts():
    child = PARENT.copy()
    child[2] = PARENT[2] - 1.5                        # beyond the 1-nat tolerance
    assert retention(child, PARENT) == pytest.approx(2 / 3)
    child[2] = PARENT[2] - 0.9                        # within it
    assert retention(child, PARENT) == 1.0


def test_a_one_token_reply_is_judged_on_its_token():
    assert retention(np.array([-5.0]), np.array([-0.1])) == 0.0
    assert retention(np.array([-0.1]), np.array([-0.1])) == 1.0


class Scored:
    """An EvalModel stand-in that returns fixed reply log-probabilities (recall_score's arithmetic only;
    tests/test_real_cycle.py runs it through llama.cpp)."""

    def __init__(self, logps):
        self.logps = logps

    def reply_logprobs(self, messages):
        return self.logps[messages[-1]["content"]]


def test_recall_score_reports_both_counts():
    items = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": k}] for k in ("a", "b")]
    parent = Scored({"a": PARENT, "b": PARENT})
    child = Scored({"a": np.array([-9.0, -1.0, -0.2, -0.3]), "b": np.array([-9.0, -9.0, -0.2, -0.3])})
    out = recall_score(child, parent, items)
    assert out["score"] == pytest.approx((1.0 + 2 / 3) / 2, abs=1e-4)
    assert out["score_all_tokens"] == pytest.approx((0.75 + 0.5) / 2, abs=1e-4)
    assert out["worst_item_retention"] == pytest.approx(2 / 3, abs=1e-4)
