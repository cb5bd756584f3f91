"""One short, real learning cycle on the packaged SmolLM2-135M model (marked `model`)."""

from __future__ import annotations

import json

import pytest

from config.settings import load_settings
from engine.protocol import Sampling
from lineage.generations import Lineage
from serving.runtime import load_engine, open_store, register_base
from tests.helpers.lineages import add_reviewed
from trainer.cycle import run_cycle

pytestmark = pytest.mark.model


def test_a_short_real_cycle_produces_a_servable_evaluated_generation(tmp_path):
    settings = load_settings(data_dir=tmp_path, learn_from="everyone", train_max_steps=3, train_epochs=1, train_batch=2, max_seq_len=256,
                             dpo_steps=1, eval_max_items=3, eval_reply_tokens=24, reply_max_tokens=48, replay_size=0)
    store = open_store(settings)
    try:
        register_base(settings, store)
        add_reviewed(store, 6)
        report = run_cycle(settings, store, progress=False)
    finally:
        store.close()
    assert report.status in ("promoted", "refused"), report
    lineage = Lineage(settings.models_dir)
    child = lineage.generation("gen-0001")
    assert child.meta["status"] == report.status and child.meta["parent_id"] == "gen-0000"
    assert (lineage.generation("gen-0000").folder / "hf" / "config.json").exists()  # dequantized base kept
    evals = json.loads((child.folder / "evals.json").read_text())
    assert evals["child"]["gguf_agreement"]["correlation"] > 0.98
    assert all(report.scores[k] is not None for k in ("recall", "generalization", "style_drift", "format"))
    assert report.parent_scores["style_drift"] is not None and report.parent_scores["format"] is not None
    assert 1 <= report.train["steps"] <= 3 and report.train["trained_tensors_changed"] > 0
    engine = load_engine(settings, child)   # the child is servable by llama.cpp
    try:
        reply = engine.generate([{"role": "user", "content": "hi!"}], chat_key=1,
                                sampling=Sampling(temperature=0.0, top_k=1, max_tokens=12))
        assert reply.completion_tokens > 0
    finally:
        engine.close()
    expected = "gen-0001" if report.status == "promoted" else "gen-0000"
    assert lineage.active_id() == expected
