"""The active pointer against what moves it meanwhile, and a cycle's remains after a crash.

A cycle decides to promote hours after it read which generation served; an admin's or the live
watch's rollback, a promotion by hand or a failed hot-swap can move the pointer in between. And a
cycle killed at any moment leaves a staging folder, a breadcrumb or a generation half recorded for
the next one to finish. The heavy stages (training, conversion, evals) are replaced by stand-ins
here: what is tested is the bookkeeping around them (tests/test_faults_cycle.py runs the real ones)."""

from __future__ import annotations

import errno
import json
import os
import types

import pytest

import trainer.cycle as cycle
from config.settings import load_settings
from core.errors import OuroError
from core.files import atomic_write_text
from engine.worker import InferenceWorker
from lineage.generations import Lineage
from lineage.promote import promote, rollback
from memory.store import Store
from serving.loop import LearningLoop
from tests.helpers.fakes import FakeEngine
from tests.helpers.lineages import LENIENT, Loader, add_reviewed, damage_file, make_generation, rate_replies

PASSING = {"recall": 0.95, "generalization": 0.9, "style_drift": 0.0, "format": 1.0, "contamination": 0.0,
           "refusal_style": 0.0}


@pytest.fixture
def world(tmp_path):
    """gen-0000 ← gen-0001 (serving), 12 reviewed turns waiting for a cycle."""
    settings = load_settings(data_dir=tmp_path / "data", **LENIENT, cycle_schedule="off", keep_full_precision=1)
    store = Store.open(settings.db_path)
    make_generation(settings.models_dir, "gen-0000", None, status="base")
    Lineage(settings.models_dir).set_active("gen-0000")
    make_generation(settings.models_dir, "gen-0001", "gen-0000")
    promote(settings, store, "gen-0001", actor="test", why="passed")
    add_reviewed(store, 12)
    yield settings, store
    store.close()


def stand_in_stages(monkeypatch, *, scores=PASSING, during_training=None):
    """Training, conversion and evals replaced: the child is a folder with `hf/` and a small GGUF,
    judged with `scores`; `during_training()` runs while it 'trains'."""
    monkeypatch.setattr(cycle, "check_precision", lambda settings: "float32")
    monkeypatch.setattr(cycle, "_refine", lambda *a, **k: {"made": 0})
    monkeypatch.setattr(cycle, "ensure_full_precision", lambda *a, **k: None)

    def train(settings, staging, parent, split, report, **k):
        if during_training:
            during_training()
        (staging / "hf").mkdir()
        (staging / "hf" / "config.json").write_text("{}")
        return types.SimpleNamespace(stage_peak_rss_mb={}, stage_peak_gpu_mb={}, trained_tensors_changed=3)

    monkeypatch.setattr(cycle, "_train", train)
    monkeypatch.setattr(cycle, "_convert", lambda settings, staging, parent, gen_id:
                        (staging / "model.gguf").write_bytes(gen_id.encode() * 50))
    monkeypatch.setattr(cycle, "_evaluate", lambda *a, **k: (
        {"child": {k2: {"score": v} for k2, v in scores.items()}, "parent": {}}, []))


def events(lineage: Lineage, gen_id: str) -> list[str]:
    return [r["event"] for r in lineage.ledger() if r["gen_folder"] == gen_id]


def test_a_rollback_while_the_cycle_trains_is_not_undone_by_its_promotion(world, monkeypatch):
    settings, store = world
    lineage = Lineage(settings.models_dir)
    stand_in_stages(monkeypatch, during_training=lambda: rollback(settings, store, None, actor="admin",
                                                                  why="gen-0001 is rude"))
    report = cycle.run_cycle(settings, store, actor="scheduler", progress=False)
    assert report.status == "held" and report.gen_id == "gen-0002"
    assert lineage.active_id() == "gen-0000"                       # the admin's rollback stands
    assert events(lineage, "gen-0002") == ["candidate", "held"]
    assert lineage.generation("gen-0002").meta["status"] == "held"   # never shown as served (lists, charts, fallback)
    assert any("gen-0000 was made active while it trained" in r for r in report.reasons)
    assert store.events("cycle_held")
    # the next cycle does not take it for one that died before promoting
    assert cycle.finish_interrupted(settings, lineage, store) is None
    assert lineage.active_id() == "gen-0000"
    # an admin can still serve it
    promote(settings, store, "gen-0002", actor="admin", why="after all")
    assert lineage.active_id() == "gen-0002"


def test_promote_with_an_expectation_moves_nothing_when_the_pointer_moved(world):
    settings, store = world
    lineage = Lineage(settings.models_dir)
    rows = len(lineage.ledger())
    assert promote(settings, store, "gen-0000", actor="x", why="y", expect="gen-0000") is False
    assert lineage.active_id() == "gen-0001" and len(lineage.ledger()) == rows
    assert promote(settings, store, "gen-0000", actor="x", why="y", expect="gen-0001") is True
    assert lineage.active_id() == "gen-0000"


@pytest.mark.parametrize("breadcrumb", ["", "garbage", "{pid}", "{pid} train"],
                         ids=["empty", "not-a-pid", "pid-only", "live-pid"])
def test_a_dead_cycles_staging_folder_never_blocks_the_next_cycle(world, breadcrumb):
    settings, store = world
    lineage = Lineage(settings.models_dir)
    staging = settings.models_dir / ".gen-0002.tmp-4242"
    (staging / "hf").mkdir(parents=True)
    # a breadcrumb cut short by a crash, or naming a pid alive now (after a reboot: any process, the bot too)
    (staging / "STAGE").write_text(breadcrumb.format(pid=os.getppid()))
    found = cycle.cleanup_stale(lineage, store)
    assert len(found) == 1 and not staging.exists()
    assert events(lineage, "gen-0002") == ["died"]
    assert ("'train'" in found[0]) == (breadcrumb == "{pid} train")


def test_refused_generations_do_not_keep_their_full_precision_weights(world, monkeypatch):
    settings, store = world
    lineage = Lineage(settings.models_dir)
    stand_in_stages(monkeypatch, scores={**PASSING, "recall": 0.0})
    monkeypatch.setattr(cycle, "_gate", lambda settings, report, chain, invariants: _refuse(report))
    for i in range(3):
        add_reviewed(store, 4, start=100 + 10 * i)
        assert cycle.run_cycle(settings, store, actor="test", progress=False).status == "refused"
    with_hf = sorted(g.id for g in lineage.generations() if (g.folder / "hf").exists())
    assert with_hf == ["gen-0004"]                  # the newest refused one only (an admin may still promote it)
    assert lineage.active_id() == "gen-0001"


def _refuse(report):
    report.status = "refused"
    return types.SimpleNamespace(passed=False, reasons=["recall 0.00 < 0.5"], to_dict=lambda: {"passed": False})


def _renamed_not_promoted(settings, store, *, candidate_row: bool):
    """gen-0002 as a cycle leaves it when killed after the rename: meta says it passed, ACTIVE still
    names its parent; `candidate_row`: killed after writing the ledger's candidate row."""
    lineage = Lineage(settings.models_dir)
    gen = make_generation(settings.models_dir, "gen-0002", "gen-0001")
    meta = {**gen.meta, "data_cutoff": "2026-12-07T00:00:00", "reasons": []}
    atomic_write_text(gen.folder / "meta.json", json.dumps(meta))
    if candidate_row:
        lineage.append_ledger({"gen_folder": "gen-0002", "event": "candidate", "gate": "passed",
                               "parent_id": "gen-0001"})
    return lineage


@pytest.mark.parametrize("candidate_row", [False, True], ids=["before-recording", "after-recording"])
def test_a_passed_generation_whose_cycle_died_before_promoting_is_promoted_by_the_next(world, candidate_row):
    settings, store = world
    for stage in ("train", "eval"):      # earlier attempts at the same id died before the rename
        Lineage(settings.models_dir).append_ledger({"gen_folder": "gen-0002", "event": "died",
                                                    "reason": f"died during stage '{stage}'"})
    lineage = _renamed_not_promoted(settings, store, candidate_row=candidate_row)
    assert cycle.finish_interrupted(settings, lineage, store) == "gen-0002"
    assert lineage.active_id() == "gen-0002"
    assert events(lineage, "gen-0002") == ["died", "died", "candidate", "promote"]
    assert cycle.finish_interrupted(settings, lineage, store) is None       # once


def test_a_held_generation_whose_cycle_died_before_recording_it_is_recorded_held(world):
    settings, store = world
    lineage = _renamed_not_promoted(settings, store, candidate_row=False)
    gen = lineage.generation("gen-0002")
    atomic_write_text(gen.folder / "meta.json", json.dumps({**gen.meta, "status": "held"}))
    assert cycle.finish_interrupted(settings, lineage, store) == "gen-0002"
    assert lineage.active_id() == "gen-0001" and events(lineage, "gen-0002") == ["candidate", "held"]
    assert lineage.ledger()[-2]["gate"] == "passed"


def test_a_dead_cycles_generation_is_not_promoted_over_a_rollback_nor_stops_later_cycles(world):
    settings, store = world
    lineage = _renamed_not_promoted(settings, store, candidate_row=True)
    rollback(settings, store, None, actor="admin", why="back")             # the parent no longer serves
    assert cycle.finish_interrupted(settings, lineage, store) == "gen-0002"
    assert lineage.active_id() == "gen-0000" and events(lineage, "gen-0002") == ["candidate", "held"]
    assert cycle.finish_interrupted(settings, lineage, store) is None

    # its GGUF damaged since: recorded as held with the reason, not raised at every later cycle
    promote(settings, store, "gen-0001", actor="admin", why="again")
    make_generation(settings.models_dir, "gen-0003", "gen-0001")
    gen3 = lineage.generation("gen-0003")
    atomic_write_text(gen3.folder / "meta.json", json.dumps({**gen3.meta, "data_cutoff": "2026-12-07T01:00:00"}))
    damage_file(gen3.gguf, rerecord=False)
    assert cycle.finish_interrupted(settings, lineage, store) == "gen-0003"
    assert lineage.active_id() == "gen-0001" and events(lineage, "gen-0003") == ["candidate", "held"]
    assert "SHA-256" in lineage.ledger()[-1]["reason"]


# --- the loop in the bot ---------------------------------------------------------------------------
@pytest.fixture
def loop_world(world):
    settings, store = world
    engine = FakeEngine(generation_id="gen-0001")
    engine.model_sha256 = Lineage(settings.models_dir).generation("gen-0001").sha256
    worker = InferenceWorker(engine)
    told: list[str] = []

    async def notify(text):
        told.append(text)

    yield settings, store, worker, told, notify
    worker.close()


async def test_a_cycle_that_cannot_even_start_is_reported_to_admins(loop_world, monkeypatch):
    settings, store, worker, told, notify = loop_world
    loop = LearningLoop(settings, store, worker, notify=notify, load=Loader())

    async def no_space(actor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop.runner, "run", no_space)
    outcome = await loop.run_cycle("scheduler")
    assert outcome.status == "failed" and "the disk is full" in outcome.reasons[0]
    assert loop.last_outcome is outcome
    assert told and "failed" in told[0] and "disk is full" in told[0]


async def test_a_failed_swap_does_not_move_the_pointer_back_over_a_promotion_made_meanwhile(loop_world):
    settings, store, worker, told, notify = loop_world
    make_generation(settings.models_dir, "gen-0002", "gen-0001")
    make_generation(settings.models_dir, "gen-0003", "gen-0001")
    loader = Loader(broken={"gen-0002"})
    real_call = loader.__call__

    def load(gen):
        if gen.id == "gen-0002":    # while gen-0002 loads, someone promotes gen-0003 (`ouro promote`)
            promote(settings, store, "gen-0003", actor="cli", why="by hand")
        return real_call(gen)

    loop = LearningLoop(settings, store, worker, notify=notify, load=load)
    await loop.sync()                                                   # serving gen-0001 already
    promote(settings, store, "gen-0002", actor="cli", why="by hand")
    result = await loop.sync()
    assert result is not None and not result.ok
    lineage = Lineage(settings.models_dir)
    assert lineage.active_id() == "gen-0003"                            # not back on gen-0001
    assert all(r["event"] != "swap_failed" for r in lineage.ledger())
    assert "gen-0003" in told[-1]
    assert (await loop.sync()).ok and worker.engine.generation_id == "gen-0003"


async def test_a_failed_automatic_rollback_is_told_to_admins(loop_world):
    settings, store, worker, told, notify = loop_world
    settings = load_settings(**{**settings.model_dump(), "watch_min_ratings": 10})
    loop = LearningLoop(settings, store, worker, notify=notify, load=Loader())
    rate_replies(store, "gen-0000", [-1] * 2 + [1] * 8, 100)
    assert loop.watched() == ("gen-0001", "gen-0000")
    rate_replies(store, "gen-0001", [-1] * 8 + [1] * 2, 300)
    damage_file(Lineage(settings.models_dir).generation("gen-0000").gguf, rerecord=False)
    verdict = await loop.check_watch()
    assert verdict.status == "worse"
    assert Lineage(settings.models_dir).active_id() == "gen-0001"     # nothing else could be done
    assert any("automatic rollback failed" in t and "SHA-256" in t for t in told)
    assert store.events("auto_rollback_failed")
    assert await loop.check_watch() is None                            # said once, not every tick


def test_a_generation_whose_gguf_is_gone_is_refused_with_the_one_error_type(world):
    """Not a FileNotFoundError: the live watch's rollback and the next cycle's recovery catch OuroError."""
    settings, store = world
    Lineage(settings.models_dir).generation("gen-0000").gguf.unlink()
    with pytest.raises(OuroError, match="gen-0000's GGUF cannot be read"):
        rollback(settings, store, None, actor="admin", why="back")
    assert Lineage(settings.models_dir).active_id() == "gen-0001"


async def test_a_confirmed_promotion_is_not_made_over_a_move_since_it_was_asked(loop_world):
    """/promote and the web page confirm against the generation active when they asked; the move
    itself checks it again under the pointer lock, so a move in between is never overwritten."""
    settings, store, worker, told, notify = loop_world
    loop = LearningLoop(settings, store, worker, notify=notify, load=Loader())
    with pytest.raises(OuroError, match="changed to gen-0001"):
        await loop.promote("gen-0000", actor="admin", why="asked while gen-0000 served", expect="gen-0000")
    assert Lineage(settings.models_dir).active_id() == "gen-0001"
    await loop.promote("gen-0000", actor="admin", why="asked now", expect="gen-0001")
    assert Lineage(settings.models_dir).active_id() == "gen-0000"
