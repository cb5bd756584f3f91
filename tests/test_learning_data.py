"""What a generation learns from and how it is judged: the held-out split and generalization."""

from __future__ import annotations

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
    train, train_pairs, heldout, sources = holdout_with_sources(Delta(examples=examples, pairs=pairs), 0.2)
    held = {m[-1]["content"] for m in heldout}
    assert held == {"Ahoy! 9", "Ahoy! 10"} and len(heldout) == 2            # one item per turn, the newest
    assert sources == ["correction", "correction"]
    assert {e.turn_id for e in train} == {p.turn_id for p in train_pairs} == set(range(1, 9))   # no leak to DPO


class Scored:
    def __init__(self, nll):
        self.nll = nll

    def reply_nll(self, messages):
        return self.nll[messages[-1]["content"]]


def test_generalization_asks_corrections_to_improve_and_approved_replies_to_be_kept():
    items = [[{"role": "assistant", "content": t}] for t in ("Ahoy! a", "Ahoy! b", "served c", "served d")]
    parent = Scored({"Ahoy! a": 3.0, "Ahoy! b": 3.0, "served c": 1.0, "served d": 1.0})
    child = Scored({"Ahoy! a": 2.0, "Ahoy! b": 2.5, "served c": 1.04, "served d": 1.5})
    out = generalization_score(child, parent, items, sources=["correction", "correction", "thumbs_up", "thumbs_up"])
    assert out["score"] == 0.75 and out["improved"] == 2 and out["kept"] == 1     # d got much less likely
    # without sources every item must improve (the old rule): the kept approved reply no longer counts
    assert generalization_score(child, parent, items)["score"] == 0.5
