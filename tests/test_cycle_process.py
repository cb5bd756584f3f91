"""The cycle as its own process, started by the bot's loop: a kill mid-training changes nothing
served, and the next scheduled cycle runs normally (tiny model, real training, real processes)."""

from __future__ import annotations

import asyncio

import pytest

from config.settings import load_settings
from serving.loop import LearningLoop
from tests.helpers.beds import fake_served_bot
from tests.helpers.lineages import LENIENT, Loader
from trainer.cycle_job import read_cycle_status
from trainer.scheduler import scheduled_cycle

pytestmark = pytest.mark.model


async def test_a_killed_cycle_process_leaves_serving_untouched_and_the_next_scheduled_cycle_runs(tmp_path,
                                                                                                tiny_models):
    bed = fake_served_bot(tmp_path, tiny_models, reviewed=12)
    data, lineage, store, serving, worker, told, notify = (bed.data, bed.lineage, bed.store, bed.serving,
                                                           bed.worker, bed.told, bed.notify)
    slow = load_settings(data_dir=data, **{**LENIENT, "train_epochs": 100}, cycle_schedule="off")
    loop = LearningLoop(slow, store, worker, notify=notify, load=Loader())
    try:
        task = asyncio.create_task(loop.run_cycle("test"))
        for _ in range(1200):
            info = read_cycle_status(slow)
            if info and info["stage"] == "train" and info.get("step", 0) > 0:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the cycle process never reached training")
        assert loop.start_cycle("someone else") is False          # one cycle at a time
        assert loop.runner.kill()
        outcome = await asyncio.wait_for(task, 60)
        assert outcome.status == "killed"
        assert lineage.active_id() == "gen-0000" and [g.id for g in lineage.generations()] == ["gen-0000"]
        assert worker.engine is serving and not serving.closed
        reply = await worker.run(lambda e: e.generate([{"role": "user", "content": "still there?"}], chat_key=1,
                                                      sampling=None).text)
        assert reply == "echo: still there?"
        assert "stopped" in told[-1] and "nothing served changed" in told[-1]
        assert store.events("cycle_killed")
    finally:
        await loop.stop()

    # the next run of the schedule: the persisted job calls into the bot's loop
    fast = load_settings(data_dir=data, **LENIENT, cycle_schedule="every 6h")
    loop = LearningLoop(fast, store, worker, notify=notify, load=Loader())
    await loop.start()
    # `ouro interview` in another process writes the constitution draft after the bot started:
    # the bot's next cycle process trains with it, not with the persona file found at the bot's start
    interviewed = "## Who I am\nI'm Ouro, as the interview wrote me."
    load_settings(data_dir=data).write_persona(interviewed)
    try:
        await asyncio.wait_for(scheduled_cycle(str(data.resolve())), 600)
        assert loop.last_outcome.status == "promoted", loop.last_outcome
        assert lineage.active_id() == "gen-0001" and worker.engine.generation_id == "gen-0001"
        assert (lineage.generation("gen-0001").folder / "constitution.md").read_text(encoding="utf-8") == interviewed
        assert serving.closed                                    # the old model was let go after the swap
        events = [r["event"] for r in lineage.ledger()]
        assert "died" in events                                  # the killed run was found and recorded
        assert "promoted" in told[-1] and "/evals gen-0001" in told[-1]
    finally:
        await loop.stop()
        bed.close()
