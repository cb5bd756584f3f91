"""Faults around the learning cycle: its process killed at every stage, the bot and a cycle writing
SQLite at once, a disk that fills up during conversion, and a damaged GGUF meeting the hot-swap.
Tiny model (tests/helpers/tiny.py), real training and real processes; serving is a recording fake except
in the hot-swap test, which loads real GGUFs."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from config.settings import load_settings
from core.errors import OuroError
from core.files import atomic_write_text, sha256_file
from engine.protocol import Sampling
from engine.worker import InferenceWorker
from lineage.generations import Lineage
from memory.store import Store
from serving.loop import LearningLoop
from serving.runtime import open_runtime
from tests.helpers.beds import fake_served_bot
from tests.helpers.fakes import FakeEngine
from tests.helpers.fault_helpers import paused_cycle_command
from tests.helpers.lineages import LENIENT, Loader, add_reviewed, damage_file, make_generation
from trainer.cycle import run_cycle
from trainer.cycle_job import CHILD_COMMAND, read_cycle_status

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parent.parent
STAGES = ["export", "train", "convert", "eval", "record", "promote"]   # record: before the rename; promote: after


def hello(worker: InferenceWorker):
    return worker.run(lambda e: e.generate([{"role": "user", "content": "still there?"}], chat_key=1,
                                           sampling=Sampling(temperature=0.0, max_tokens=8)).text)


async def test_a_cycle_killed_at_every_stage_changes_nothing_served_and_the_next_one_succeeds(
        tmp_path, tiny_models, monkeypatch):
    bed = fake_served_bot(tmp_path, tiny_models, reviewed=8, with_pairs=False)
    data, lineage, store, serving, worker, told, notify = (bed.data, bed.lineage, bed.store, bed.serving,
                                                           bed.worker, bed.told, bed.notify)
    base_sha = sha256_file(lineage.active().gguf)

    # kept short: 8 runs, each in a fresh process (DPO has its own test in tests/test_cycle.py)
    settings = load_settings(data_dir=data, **{**LENIENT, "dpo_steps": 0, "train_max_steps": 2}, cycle_schedule="off")
    loop = LearningLoop(settings, store, worker, notify=notify, load=Loader())
    try:
        for stage in STAGES:
            loop.runner.command = paused_cycle_command(stage)   # the cycle process waits at the start of `stage`
            task = asyncio.create_task(loop.run_cycle("test"))
            for _ in range(3000):
                info = read_cycle_status(settings)
                if info and info["stage"] == stage:
                    break
                if task.done():
                    pytest.fail(f"the cycle ended before stage {stage}: {task.result()}")
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the cycle never reached stage {stage}")
            # niced, in our session (Linux gives each session's autogroup an equal CPU share whatever
            # the nice value) but its own process group, which the kill takes whole
            pid = loop.runner.proc.pid
            assert os.getsid(pid) == os.getsid(0) and os.getpgid(pid) == pid
            assert os.getpriority(os.PRIO_PROCESS, pid) >= settings.cycle_nice
            assert loop.runner.kill()                   # SIGKILL, inside the stage
            outcome = await asyncio.wait_for(task, 60)
            assert outcome.status == "killed", (stage, outcome)
            # serving untouched: same generation, same file, same engine, still answering
            assert worker.engine is serving and not serving.closed, stage
            assert await hello(worker) == "echo: still there?"
            assert lineage.active_id() == "gen-0000" and sha256_file(lineage.active().gguf) == base_sha, stage
            visible = [g.id for g in lineage.generations()]
            if stage != "promote":                      # no half-made generation is visible
                assert visible == ["gen-0000"], (stage, visible)
                assert all(p.name.startswith(".") for p in data.joinpath("models").glob("*gen-0001*")), stage
            else:                                       # renamed into place (complete), not yet recorded
                child = lineage.generation("gen-0001")
                assert visible == ["gen-0000", "gen-0001"] and sha256_file(child.gguf) == child.sha256
                assert "candidate" not in [r["event"] for r in lineage.ledger() if r["gen_folder"] == "gen-0001"]
            assert "stopped" in told[-1] and "nothing served changed" in told[-1]

        loop.runner.command = CHILD_COMMAND
        add_reviewed(store, 6, start=100, with_pairs=False)   # something new for the next generation
        outcome = await asyncio.wait_for(loop.run_cycle("test"), 600)
        assert outcome.status == "promoted", outcome.reasons
        # the generation the 'promote'-stage kill left unrecorded was finished by this cycle
        assert [g.id for g in lineage.generations()] == ["gen-0000", "gen-0001", "gen-0002"]
        assert lineage.active_id() == "gen-0002" and worker.engine.generation_id == "gen-0002"
        rows = lineage.ledger()
        gen1 = [r["event"] for r in rows if r["gen_folder"] == "gen-0001"]
        assert "candidate" in gen1 and "promote" in gen1
        assert store.generation("gen-0001")["status"] == "promoted"
        died = " ".join(r["reason"] for r in rows if r["event"] == "died")
        for stage in ("train", "convert", "eval", "record"):   # each death found and recorded
            assert f"stage '{stage}'" in died, (stage, died)
        assert not list(data.joinpath("models").glob(".gen-*"))       # no staging folder left behind
    finally:
        await loop.stop()
        bed.close()


def test_the_bot_and_a_cycle_writing_sqlite_at_once_lose_nothing(tmp_path):
    db = tmp_path / "data" / "ouro.db"
    store = Store.open(db)
    add_reviewed(store, 20, with_pairs=False)            # something for the cycle's export to read
    seconds = 15.0
    cycle = subprocess.Popen([sys.executable, "-m", "tests.helpers.fault_helpers", "cycle-writer", str(db), str(seconds)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[BaseException] = []
    written: dict[str, int] = {}

    def chat(name: str, base: int) -> None:
        """What the bot does per message: store it, store the reply, a rating, an audit event."""
        n = 0
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                uid = base + n % 50
                t = store.add_user_turn(chat_id=uid, user_id=uid, text=f"{name} message {n}", user_message_id=n)
                store.complete_turn(t, reply_text=f"reply {n}", generation_id="gen-0000", prompt_tokens=5,
                                    completion_tokens=3, latency_s=0.01, ttft_s=0.01, context_start_turn_id=t)
                store.rate(t, uid, 1 if n % 2 else -1)
                store.log_event("bot_progress", user_id=uid, detail={"n": n})
                n += 1
        except BaseException as exc:
            errors.append(exc)
        written[name] = n

    threads = [threading.Thread(target=chat, args=(name, base)) for name, base in (("a", 10_000), ("b", 20_000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    out, err = cycle.communicate(timeout=60)
    try:
        assert not errors, errors
        report = json.loads(out.strip().splitlines()[-1])
        assert "error" not in report, report                 # e.g. "database is locked" would show here
        assert report["events"] > 100 and report["exports"] > 5 and sum(written.values()) > 200, (report, written)
        stats = store.stats()
        assert stats["turns"] == 20 + sum(written.values()) and stats["turns_answered"] == stats["turns"]
        assert stats["ratings_up"] + stats["ratings_down"] == 20 + sum(written.values())
        assert len(store.events("bot_progress", limit=10**6)) == sum(written.values())
        assert len(store.events("cycle_progress", limit=10**6)) == report["events"]
        assert store.database.scalar("SELECT COUNT(*) FROM generations") == report["generations"]
    finally:
        store.close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


async def test_a_full_disk_during_conversion_fails_the_cycle_clearly_and_serving_goes_on(tmp_path, tiny_models,
                                                                                          monkeypatch):
    import gguf

    data = tmp_path / "data"
    shutil.copytree(tiny_models, data / "models")
    store = Store.open(data / "ouro.db")
    add_reviewed(store, 6)
    settings = load_settings(data_dir=data, **LENIENT)
    partial: list[tuple[Path, int]] = []
    real_write = gguf.GGUFWriter.write_tensor_data

    def write_until_full(self, tensor, *args, **kwargs):
        """The disk fills up after a few tensors: the write fails as the OS would make it fail."""
        if len(partial) == 0 and getattr(self, "_written", 0) >= 3:
            out = self.fout[0]
            out.flush()
            partial.append((Path(out.name), os.path.getsize(out.name)))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), out.name)
        self._written = getattr(self, "_written", 0) + 1
        return real_write(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_until_full)
    serving = FakeEngine(generation_id="gen-0000")
    worker = InferenceWorker(serving)
    try:
        cycle = asyncio.create_task(asyncio.to_thread(run_cycle, settings, store, progress=False))
        replies = 0
        while not cycle.done():                          # the bot keeps answering while the cycle runs
            assert await hello(worker) == "echo: still there?"
            replies += 1
            await asyncio.sleep(0.1)
        with pytest.raises(OuroError) as caught:
            await cycle
        message = str(caught.value)
        assert "failed during convert" in message and "disk full" in message
        assert "partial files were removed" in message and "nothing served changed" in message
        assert replies > 0 and worker.engine is serving and not serving.closed
        # the partial file existed when the disk filled, and is gone with the whole staging folder
        assert partial and partial[0][1] > 0 and not partial[0][0].exists()
        models = data / "models"
        assert not list(models.glob(".*gen-*")) and [g.id for g in Lineage(models).generations()] == ["gen-0000"]
        assert Lineage(models).active_id() == "gen-0000"
        row = Lineage(models).ledger()[-1]
        assert row["event"] == "failed" and "disk full" in row["reason"]
        assert json.loads(store.events("cycle_failed")[0]["detail"])["stage"] == "convert"
    finally:
        worker.close()
        store.close()


@pytest.mark.parametrize("rerecord", [False, True], ids=["sha-mismatch", "sha-rerecorded"])
async def test_a_truncated_gguf_over_a_promoted_generation_is_refused_by_the_hot_swap(tmp_path, tiny_models,
                                                                                      rerecord):
    data = tmp_path / "data"
    shutil.copytree(tiny_models, data / "models")
    models = data / "models"
    make_generation(models, "gen-0001", "gen-0000", (models / "gen-0000" / "model.gguf").read_bytes())
    settings = load_settings(data_dir=data, cycle_schedule="off", n_ctx=512, reply_max_tokens=16)
    rt = open_runtime(settings)                                  # real llama.cpp engines from here on
    told: list[str] = []

    async def notify(text: str) -> None:
        told.append(text)

    loop = LearningLoop(settings, rt.store, rt.worker, notify=notify)
    try:
        assert (await loop.promote("gen-0001", actor="test", why="good")).ok       # promoted and served
        assert (await loop.rollback(None, actor="test", why="back"))[2].ok          # then rolled back
        assert rt.worker.engine.generation_id == "gen-0000"
        damage_file(models / "gen-0001" / "model.gguf", rerecord=rerecord)          # not served: not mapped
        atomic_write_text(models / "ACTIVE", "gen-0001\n")                         # e.g. edited by hand
        result = await loop.sync()
        assert result is not None and not result.ok
        if rerecord:                                                                # only the GGUF check can tell
            assert "truncated" in result.reason and "SHA-256" not in result.reason, result.reason
        else:
            assert "SHA-256" in result.reason, result.reason
        assert rt.worker.engine.generation_id == "gen-0000"                        # the last good one serves
        assert Lineage(models).active_id() == "gen-0000" and Lineage(models).ledger()[-1]["event"] == "swap_failed"
        assert told and "gen-0001" in told[-1] and "gen-0000" in told[-1]          # admins told why
        reply = await hello(rt.worker)
        assert isinstance(reply, str)                                              # and it still answers
        assert await loop.sync() is None                                           # not retried in a loop
    finally:
        await loop.stop()
        rt.close()
