"""What a generation learns from and how it is judged: the held-out split and generalization."""

from __future__ import annotations

import numpy as np

from evals.generalization import generalization_score
from memory.export import Delta, Example, Pair
from trainer.replay import holdout_with_sources


def ex(turn, text, source="correction"):
    return Example([{"role": "user", "content": f"q{turn}"}, {"role": "assistant", "content": text}], source,
                   f"2026-01-01T00:00:{turn:02d}", turn_id=turn)


def test_a_held_out_turn_leaves_training_whole_its_pair_too():
    examples = [ex(t, f"Ahoy! {t}") for t in range(1, 11)]
    pairs = [Pair([{"role": "user", "content": f"q{t}"}], f"Ahoy! {t}", f"{t}", "correction",
                  f"2026-01-01T00:00:{t:02d}", turn_id=t) for t in range(1, 11)]
    train, train_pairs, heldout, sources, rejected = holdout_with_sources(Delta(examples=examples, pairs=pairs), 0.2)
    held = {m[-1]["content"] for m in heldout}
    assert held == {"Ahoy! 9", "Ahoy! 10"} and len(heldout) == 2            # one item per turn, the newest
    assert sources == ["correction", "correction"]
    assert sorted(rejected) == ["10", "9"]       # the served replies the corrections replaced
    assert {e.turn_id for e in train} == {p.turn_id for p in train_pairs} == set(range(1, 9))   # no leak to DPO


class Scored:
    """Per-token log-probabilities of each reply, as EvalModel gives them."""

    def __init__(self, logprobs):
        self.logprobs = {k: np.array(v, dtype=float) for k, v in logprobs.items()}

    def reply_logprobs(self, messages):
        return self.logprobs[messages[-1]["content"]]


def test_generalization_asks_corrections_to_improve_and_approved_replies_to_be_kept():
    items = [[{"role": "assistant", "content": t}] for t in ("Ahoy! a", "Ahoy! b", "served c", "served d")]
    parent = Scored({"Ahoy! a": [-6.0] + [-1.0] * 19, "Ahoy! b": [-6.0] + [-1.0] * 19,
                     "served c": [-0.5] * 20, "served d": [-0.5] * 20})
    child = Scored({"Ahoy! a": [-0.5] + [-1.0] * 19,                # learned the opener, kept the rest
                    "Ahoy! b": [-0.5] + [-1.4] * 19,                # opener gained less than the rest lost
                    "served c": [-5.5] + [-0.5] * 19,               # one token moved (the new opener): kept
                    "served d": [-2.0] * 10 + [-0.5] * 10})         # half its tokens forgotten
    out = generalization_score(child, parent, items, sources=["correction", "correction", "thumbs_up", "thumbs_up"])
    assert [x["learned"] for x in out["per_item"]] == [True, False, True, False]
    assert out["score"] == 0.5 and out["improved"] == 1 and out["kept"] == 1
    # c is 0.25 nats/token worse on average, yet every token after its first (the new opener's place, which
    # recall's rule leaves out) is as likely as the parent made it; d kept 10 of those 19
    assert out["per_item"][2]["nll_child"] - out["per_item"][2]["nll_parent"] > 0.2
    assert out["per_item"][2]["retention"] == 1.0 and out["per_item"][3]["retention"] == round(10 / 19, 4)
    # without sources every item must improve (the old rule): the kept approved reply no longer counts
    assert generalization_score(child, parent, items)["score"] == 0.25


def test_a_correction_is_learned_when_the_child_prefers_it_over_the_reply_it_replaced():
    """A correction is the served reply behind a new opener: the child that learned the opener but
    drifted a little on the shared words is judged on the preference, not on the drift."""
    items = [[{"role": "assistant", "content": t}] for t in ("Ahoy! a", "Ahoy! b", "Ahoy! c")]
    body_p, body_c = [-1.0] * 19, [-1.1] * 19                       # the shared words drift by 0.1 nat
    parent = Scored({"Ahoy! a": [-6.0] + body_p, "a": body_p, "Ahoy! b": [-6.0] + body_p, "b": body_p,
                     "Ahoy! c": [-6.0] + body_p, "c": body_p})
    child = Scored({"Ahoy! a": [-1.0] + body_c, "a": body_c,        # learned the opener
                    "Ahoy! b": [-5.5] + body_c, "b": body_c,        # barely moved: not learned
                    "Ahoy! c": [-1.0] + [-3.0] * 19, "c": [-3.0] * 19})   # prefers it, but forgot the words
    rejected = ["a", "b", "c"]
    out = generalization_score(child, parent, items, sources=["correction"] * 3, rejected=rejected)
    assert [x["learned"] for x in out["per_item"]] == [True, False, False]
    assert out["per_item"][0]["preference_gain"] == 5.0 and out["per_item"][1]["preference_gain"] == 0.5
    # on a short reply mean NLL agrees (1.095 < 1.25); on a longer one the drift outweighs the opener
    long_p, long_c = [-1.0] * 99, [-1.1] * 99
    parent2 = Scored({"Ahoy! x": [-6.0] + long_p, "x": long_p})
    child2 = Scored({"Ahoy! x": [-1.0] + long_c, "x": long_c})
    one = [[{"role": "assistant", "content": "Ahoy! x"}]]
    assert generalization_score(child2, parent2, one)["score"] == 0.0          # mean NLL: 1.099 > 1.05
    assert generalization_score(child2, parent2, one, rejected=["x"])["score"] == 1.0


def test_a_correction_the_parent_already_preferred_is_learned_when_the_child_still_prefers_it():
    """Generation 2 of a style: the parent already prefers the held-out correction, so there is no nat
    left to gain; the child learned it when it still prefers it by preference_gain (counted as kept),
    and not when it lost that preference."""
    items = [[{"role": "assistant", "content": t}] for t in ("Ahoy! a", "Ahoy! b")]
    body = [-1.0] * 19
    parent = Scored({"Ahoy! a": [-0.5] + body, "a": [-3.0] + body, "Ahoy! b": [-0.5] + body, "b": [-3.0] + body})
    child = Scored({"Ahoy! a": [-0.4] + body, "a": [-3.2] + body,    # still prefers it (2.8 nats), gain 0.3
                    "Ahoy! b": [-2.0] + body, "b": [-2.5] + body})   # prefers it by 0.5 nat only: lost it
    out = generalization_score(child, parent, items, sources=["correction"] * 2, rejected=["a", "b"])
    assert [x["learned"] for x in out["per_item"]] == [True, False]
    assert out["per_item"][0]["parent_margin"] == 2.5 and out["per_item"][0]["child_margin"] == 2.8
    assert out["kept"] == 1 and out["improved"] == 0 and out["already_preferred"] == 2 and out["score"] == 0.5
