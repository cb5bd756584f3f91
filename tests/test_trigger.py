"""The data-driven trigger beside the clock: a cycle starts at N new trainable items and not before;
a scheduled run on a thin delta is skipped and says so. Real loop, scheduler and store; the cycle
process itself is replaced by a recorder (its own tests are test_cycle_process.py), the clock by a
number the test moves."""

from __future__ import annotations

import asyncio
import json

import pytest

from config.settings import load_settings
from core.files import atomic_write_text, now
from engine.worker import InferenceWorker
from lineage.generations import Lineage
from memory.store import Store
from serving.loop import TRIGGER_ACTOR, TRIGGER_BACKOFF_S, LearningLoop
from tests.helpers.fakes import FakeEngine
from tests.helpers.lineages import LENIENT, Loader, add_reviewed, make_generation
from trainer.cycle_job import CycleOutcome
from trainer.scheduler import scheduled_cycle
from trainer.trigger import waiting_items

N, CHECK_S = 4, 60


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def world(tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", **LENIENT, cycle_schedule="every 6h", cycle_min_items=N,
                             cycle_check_s=CHECK_S)
    make_generation(settings.models_dir, "gen-0000", None, status="base")
    Lineage(settings.models_dir).set_active("gen-0000")
    store = Store.open(settings.db_path)
    worker = InferenceWorker(FakeEngine(generation_id="gen-0000"))
    told: list[str] = []

    async def notify(text: str) -> None:
        told.append(text)

    clock = Clock()
    loop = LearningLoop(settings, store, worker, notify=notify, load=Loader(), tick_s=3600, clock=clock)
    runs: list[str] = []
    outcome = {"status": "promoted"}

    async def fake_run(actor: str) -> CycleOutcome:   # the cycle process, recorded
        runs.append(actor)
        return CycleOutcome(outcome["status"], {"status": outcome["status"], "reasons": []})

    loop.runner.run = fake_run
    yield settings, store, loop, clock, runs, told, outcome
    worker.close()
    store.close()


async def settle(loop: LearningLoop) -> None:
    for _ in range(50):
        if not loop.busy:
            return
        await asyncio.sleep(0.01)


def trained_until_now(settings, gen_id: str, parent: str, status: str) -> None:
    """A generation a cycle made, trained on everything stored until now."""
    gen = make_generation(settings.models_dir, gen_id, parent, status=status)
    meta = {**gen.meta, "data_cutoff": now()}
    atomic_write_text(gen.folder / "meta.json", json.dumps(meta))


async def test_the_trigger_fires_at_n_and_not_before(world):
    settings, store, loop, clock, runs, told, outcome = world
    add_reviewed(store, N - 1, with_pairs=False)
    assert not await loop.check_trigger()
    assert loop.waiting.items == N - 1 and runs == []
    assert "3 of 4 new trainable items waiting" in loop.describe_trigger()

    add_reviewed(store, 1, start=N - 1, with_pairs=False)          # the N-th item arrives…
    assert not await loop.check_trigger()                          # …but is only counted every cycle_check_s
    assert runs == [] and loop.waiting.items == N - 1
    clock.t += CHECK_S
    assert await loop.check_trigger()
    await settle(loop)
    assert runs == [TRIGGER_ACTOR] and loop.waiting.items == N
    assert store.events("cycle_triggered")[0]["detail"]

    # that cycle's generation trained on them: nothing is new any more, nothing fires
    trained_until_now(settings, "gen-0001", "gen-0000", status="promoted")
    clock.t += CHECK_S
    assert not await loop.check_trigger()
    assert loop.waiting.items == 0 and runs == [TRIGGER_ACTOR]


async def test_a_refused_generation_counts_as_trained_and_a_failed_trigger_backs_off(world):
    settings, store, loop, clock, runs, told, outcome = world
    add_reviewed(store, N, with_pairs=False)
    trained_until_now(settings, "gen-0001", "gen-0000", status="refused")   # the gate refused it; gen-0000 serves
    assert waiting_items(settings, store).items == 0                        # else it would retrain the same, forever

    add_reviewed(store, N, start=N, with_pairs=False)
    outcome["status"] = "failed"
    assert await loop.check_trigger()
    await settle(loop)
    assert runs == [TRIGGER_ACTOR]
    clock.t += CHECK_S                                       # a failed triggered cycle is not retried every check
    assert not await loop.check_trigger()
    clock.t += TRIGGER_BACKOFF_S
    assert await loop.check_trigger()
    await settle(loop)
    assert runs == [TRIGGER_ACTOR, TRIGGER_ACTOR]


async def test_a_scheduled_run_on_a_thin_delta_is_skipped_and_says_so(world):
    settings, store, loop, clock, runs, told, outcome = world
    add_reviewed(store, 2, with_pairs=False)
    await loop.start()                                       # the real APScheduler with its persisted job
    try:
        await scheduled_cycle(str(settings.data_dir.resolve()))
        assert runs == [] and loop.last_outcome.status == "skipped"
        assert "thin delta: only 2 new trainable items waiting (cycle_min_items is 4)" in told[-1]
        skipped = store.events("cycle_skipped")
        assert len(skipped) == 1 and "thin delta" in skipped[0]["detail"]
        await scheduled_cycle(str(settings.data_dir.resolve()))   # the same count again: logged, not re-announced
        assert len(store.events("cycle_skipped")) == 2 and len(told) == 1

        add_reviewed(store, 2, start=2, with_pairs=False)
        await scheduled_cycle(str(settings.data_dir.resolve()))   # N waiting: the clock's run goes ahead
        assert runs == ["scheduler"]
        assert loop.scheduler.pause()                            # /pause also stops the data trigger
        clock.t += CHECK_S
        assert not await loop.check_trigger() and runs == ["scheduler"]
    finally:
        await loop.stop()


def test_items_waiting_for_review_or_screened_out_do_not_count(tmp_path, store):
    """Counted through the cycle's export: a stranger's 👍 waiting for /review is not trainable yet."""
    settings = load_settings(data_dir=tmp_path, **{**LENIENT, "learn_from": "trusted"}, cycle_min_items=N,
                             trusted_user_ids=[1000])
    make_generation(settings.models_dir, "gen-0000", None, status="base")
    Lineage(settings.models_dir).set_active("gen-0000")
    add_reviewed(store, 3, with_pairs=False)                 # users 1000, 1001, 1002: only 1000 is trusted
    assert waiting_items(settings, store).items == 1
    assert waiting_items(load_settings(data_dir=tmp_path, **LENIENT), store).items == 3
