"""`ouro cycle` end to end on a tiny Llama built by the tests: seconds on CPU, no downloads."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest

from config.settings import load_settings
from core.errors import OuroError
from lineage.generations import LEDGER_COLUMNS, Lineage
from memory.store import Store
from tests.helpers.lineages import LENIENT, add_reviewed
from tests.helpers.tiny import build_tiny_base
from trainer.cycle import HALT_FILE, run_cycle

pytestmark = pytest.mark.model

@pytest.fixture(scope="module")
def base_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinybase")
    build_tiny_base(root / "models", tmp_path_factory.getbasetemp())
    return root / "models"


@pytest.fixture
def world(tmp_path, base_template):
    """A data folder whose models/ holds the tiny gen-0000, and a store with reviewed turns."""
    data = tmp_path / "data"
    shutil.copytree(base_template, data / "models")

    def make(**overrides):
        settings = load_settings(data_dir=data, **{**LENIENT, **overrides})
        return settings

    store = Store.open(data / "ouro.db")
    yield make, store
    store.close()


def ledger(settings) -> list[dict]:
    with open(settings.models_dir / "lineage_ledger.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_nothing_reviewed_is_a_recorded_skip(world):
    make, store = world
    settings = make()
    report = run_cycle(settings, store, progress=False)
    assert report.status == "skipped" and "nothing reviewed" in report.reasons[0]
    assert [g.id for g in Lineage(settings.models_dir).generations()] == ["gen-0000"]
    assert ledger(settings)[-1]["event"] == "skip"


def test_a_cycle_trains_converts_evaluates_records_and_promotes(world):
    make, store = world
    settings = make(kto_steps=4)   # KTO is off by default; on here so the stage is exercised
    add_reviewed(store, 10)
    for i in range(2):   # lone 👎s: undesirable KTO items beside the examples and pairs
        t = store.add_user_turn(chat_id=3000 + i, user_id=3000 + i, text=f"what is topic {i}?")
        store.complete_turn(t, reply_text="As an AI, I'd be happy to help.", generation_id="gen-0000",
                            prompt_tokens=10, completion_tokens=8, latency_s=0.1, ttft_s=0.01, context_start_turn_id=t)
        store.rate(t, 3000 + i, -1)
    report = run_cycle(settings, store, progress=False)
    assert report.status == "promoted", report.reasons
    assert "documents" not in report.stage_s and "documents" not in report.train   # no documents: SFT as ever
    # each stage's own peak memory (trainer/peak.py), the training parts' too, in the report and meta.json
    peaks = report.stage_peak_rss_mb
    assert {"export", "dequantize", "train", "convert", "eval"} <= set(peaks) and min(peaks.values()) > 0
    assert set(report.train["stage_peak_rss_mb"]) == {"load", "encode", "sft", "dpo", "kto", "merge", "save"}
    assert peaks["train"] >= max(report.train["stage_peak_rss_mb"].values())
    assert report.train["precision"] == "float32"
    lineage = Lineage(settings.models_dir)
    child = lineage.generation("gen-0001")
    assert child.meta["stage_peak_rss_mb"] == peaks
    assert lineage.active_id() == "gen-0001" and child.parent_id == "gen-0000"
    files = {p.name for p in child.folder.iterdir()}
    assert {"model.gguf", "meta.json", "evals.json", "hf", "data"} <= files
    assert not any(p.name.startswith(".") for p in settings.models_dir.iterdir() if p.is_dir())
    # the ledger: the design doc's columns first, a candidate row and a promotion
    with open(settings.models_dir / "lineage_ledger.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:12] == LEDGER_COLUMNS[:12]
    rows = ledger(settings)
    cand = [r for r in rows if r["event"] == "candidate"][0]
    assert (cand["GEN_ID"], cand["gen_folder"]) == ("1", "gen-0001") and cand["child_sha"] == child.sha256 and cand["gate"] == "passed"
    assert cand["parent_sha"] == lineage.generation("gen-0000").sha256
    import hashlib
    assert cand["data_delta_sha"] == hashlib.sha256((child.folder / "data" / "new.jsonl").read_bytes()).hexdigest()
    assert 0 < float(cand["loss_end"]) < 20 and 0 < float(cand["loss_start"]) < 20  # finite, recorded
    assert rows[-1]["event"] == "promote"
    evals = json.loads((child.folder / "evals.json").read_text())
    assert evals["child"]["gguf_agreement"]["correlation"] > 0.98
    assert report.train["trained_tensors_changed"] > 0 and report.train["dpo_steps"] > 0
    assert report.data["heldout"] >= 1 and report.data["new_pairs"] >= 1
    # KTO: the lone 👍s (none of a held-out turn) and both lone 👎s, in the report, the ledger and the data
    assert report.data["kto_undesirable"] == 2 and report.data["kto_desirable"] >= 1
    assert (report.train["kto_desirable"], report.train["kto_undesirable"]) == (
        report.data["kto_desirable"], report.data["kto_undesirable"]) and report.train["kto_steps"] > 0
    assert (cand["kto_desirable"], cand["kto_undesirable"]) == (str(report.data["kto_desirable"]), "2")
    assert len((child.folder / "data" / "kto.jsonl").read_text().splitlines()) == report.data["kto_desirable"] + 2
    assert store.generation("gen-0001")["status"] == "promoted"
    # the next cycle has nothing new: a skip, not a generation
    assert run_cycle(settings, store, progress=False).status == "skipped"


def test_a_truncated_candidate_is_refused_kept_on_disk_and_nothing_served_changes(world, monkeypatch):
    make, store = world
    settings = make()
    add_reviewed(store, 6)
    import trainer.convert as convert

    real_quantize = convert.quantize_gguf

    def truncating_quantize(src, dst, qtype="Q8_0"):
        real_quantize(src, dst, qtype)
        data = dst.read_bytes()
        dst.write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(convert, "quantize_gguf", truncating_quantize)
    report = run_cycle(settings, store, progress=False)
    assert report.status == "refused"
    assert any("candidate GGUF refused" in r and "truncated" in r for r in report.reasons), report.reasons
    lineage = Lineage(settings.models_dir)
    assert lineage.active_id() == "gen-0000"
    refused = lineage.generation("gen-0001")
    assert refused.meta["status"] == "refused" and refused.meta["reasons"] == report.reasons
    assert ledger(settings)[-1]["gate"] == "refused"
    assert store.generation("gen-0001")["status"] == "refused"


def test_a_crash_mid_training_leaves_nothing_visible_and_the_next_cycle_runs(world, monkeypatch):
    make, store = world
    settings = make()
    add_reviewed(store, 6)

    import trainer.finetune as finetune

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in training")

    monkeypatch.setattr(finetune, "train", boom)
    with pytest.raises(OuroError, match="failed during train"):
        run_cycle(settings, store, progress=False)
    lineage = Lineage(settings.models_dir)
    assert [g.id for g in lineage.generations()] == ["gen-0000"] and lineage.active_id() == "gen-0000"
    assert not list(settings.models_dir.glob(".gen-*"))
    assert ledger(settings)[-1]["event"] == "failed" and "simulated crash" in ledger(settings)[-1]["reason"]
    monkeypatch.undo()
    assert run_cycle(settings, store, progress=False).status == "promoted"


def test_a_killed_cycle_is_cleaned_up_and_recorded_by_the_next(world):
    make, store = world
    settings = make()
    dead = settings.models_dir / ".gen-0001.tmp-999999"
    dead.mkdir()
    (dead / "STAGE").write_text("999999 convert\n")
    (dead / "model-f16.gguf").write_bytes(b"half")
    run_cycle(settings, store, progress=False)
    assert not dead.exists()
    died = [r for r in ledger(settings) if r["event"] == "died"]
    assert died and "convert" in died[0]["reason"]


def test_two_cycles_never_run_at_once(world):
    make, store = world
    settings = make()
    from trainer.lock import CycleLock

    with CycleLock(settings.models_dir / ".cycle.lock"):
        with pytest.raises(OuroError, match=f"pid {os.getpid()}"):
            run_cycle(settings, store, progress=False)
    assert run_cycle(settings, store, progress=False).status == "skipped"  # the lock was released


def test_halted_training_is_skipped_until_forced(world):
    make, store = world
    settings = make()
    (settings.models_dir / HALT_FILE).write_text("stop rule: fix the data\n")
    assert run_cycle(settings, store, progress=False).reasons == ["stop rule: fix the data"]
    report = run_cycle(settings, store, progress=False, force=True)
    assert report.status == "skipped" and "nothing reviewed" in report.reasons[0]
    assert not (settings.models_dir / HALT_FILE).exists()


def test_full_precision_pruning_keeps_base_active_parent_and_the_newest(tmp_path):
    """Retention on a lineage of fake folders: only full-precision copies go, never GGUFs."""
    from core.files import atomic_write_text
    from trainer.cycle import prune_full_precision

    lineage = Lineage(tmp_path / "models")
    parent = None
    for i in range(6):
        folder = lineage.dir / f"gen-{i:04d}"
        (folder / "hf").mkdir(parents=True)
        (folder / "model.gguf").write_bytes(b"GGUF")
        status = "refused" if i == 4 else ("base" if i == 0 else "promoted")
        atomic_write_text(folder / "meta.json", json.dumps({"id": folder.name, "parent_id": parent,
                                                             "gguf_sha256": "x", "status": status}))
        if status != "refused":
            parent = folder.name
    lineage.set_active("gen-0005")  # parent gen-0003
    pruned = prune_full_precision(lineage, keep=1)
    assert sorted(pruned) == ["gen-0001", "gen-0002", "gen-0004"]
    kept = {g.id for g in lineage.generations() if (g.folder / "hf").exists()}
    assert kept == {"gen-0000", "gen-0003", "gen-0005"}
    assert all((g.folder / "model.gguf").exists() for g in lineage.generations())


def test_gguf_pruning_keeps_what_can_serve_again_and_a_pruned_generation_is_refused_by_name(tmp_path, store):
    """A daily cycle makes a model file a day: all but generation 0, the active one, its parent, the one
    it replaced, the newest and the `keep_gguf` that served most recently go, each with a note and a
    ledger row; promoting or rolling back to one is refused with the reason, and its meta, data and
    evals stay."""
    from lineage.promote import promote, rollback
    from tests.helpers.lineages import make_generation
    from trainer.cycle import prune_ggufs

    settings = load_settings(data_dir=tmp_path / "data", keep_gguf=2)
    lineage = Lineage(settings.models_dir)
    parent = None
    for i in range(9):   # 0 base; 3 and 6 refused candidates that never served; 8 the newest, refused
        status = "refused" if i in (3, 6, 8) else "promoted"
        make_generation(settings.models_dir, f"gen-{i:04d}", parent, status=status)
        if status == "promoted":
            promote(settings, store, f"gen-{i:04d}", actor="test", why="x")
            parent = f"gen-{i:04d}"
    rollback(settings, store, "gen-0004", actor="test")   # serves 4 (parent 2); 5 and 7 served before it
    (settings.models_dir / "gen-0001" / "evals.json").write_text("{}")
    assert prune_ggufs(lineage, 0) == []
    pruned = prune_ggufs(lineage, 2)
    assert pruned == ["gen-0001", "gen-0003", "gen-0005", "gen-0006"]   # kept: 0, 4 (active), 2 (its parent),
    assert prune_ggufs(lineage, 2) == []                    # 7 (replaced by it; with 4 the two that served last)
    left = {g.id for g in lineage.generations() if g.gguf.exists()}          # and 8 (the newest)
    assert left == {"gen-0000", "gen-0002", "gen-0004", "gen-0007", "gen-0008"}
    gone = lineage.generation("gen-0001")
    assert gone.meta["status"] == "promoted" and (gone.folder / "evals.json").exists()
    assert "keep_gguf" in gone.pruned["reason"] and gone.pruned["bytes"] > 0
    rows = [r for r in lineage.ledger() if r["event"] == "gguf_pruned"]
    assert [r["gen_folder"] for r in rows] == pruned and all("GB freed" in r["reason"] for r in rows)
    for target in ("gen-0001", "gen-0003"):
        with pytest.raises(OuroError, match="deleted on .* to bound disk use") as refused:
            rollback(settings, store, target, actor="test")
        assert "keep_gguf" in refused.value.hint
    assert lineage.active_id() == "gen-0004"
    from evals.report import generation_rows
    assert [r["id"] for r in generation_rows(lineage) if r["gguf_pruned"]] == pruned   # what /lineage shows
    from lineage.server_config import server_config
    listed = {m["model_alias"] for m in server_config(settings, lineage)["models"]}
    assert listed == left                       # an external llama-cpp-python server is offered only those
    # gen-0004, rolled back to long after it was made, is what the live watch goes back to once 7 serves
    assert promote(settings, store, "gen-0007", actor="test", why="still there")
    make_generation(settings.models_dir, "gen-0009", "gen-0007", status="refused")
    assert prune_ggufs(lineage, 1) == ["gen-0002", "gen-0008"]
    rollback(settings, store, "gen-0004", actor="live-watch", event="auto_rollback")
    assert lineage.active_id() == "gen-0004"
    from serving.notices import cycle_message
    from trainer.cycle_job import CycleOutcome
    told = cycle_message(CycleOutcome("refused", {"gen_id": "gen-0009", "parent_id": "gen-0007",
                                                  "pruned": ["gen-0002", "gen-0008"]}), None)
    assert "deleted the GGUFs of gen-0002, gen-0008" in told                          # the admins are told
