"""The worker with `parallel = N`: up to N jobs at once, started in submission order, bounded as
with one; swapping the model waits for every running job and holds new ones back."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine.worker import Busy, InferenceWorker
from tests.helpers.fakes import FakeEngine


class Probe:
    """Jobs that record when they start and how many run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[int] = []
        self.finished: list[int] = []
        self.running = 0
        self.most = 0

    def job(self, n: int, seconds: float = 0.15):
        def run(engine):
            with self.lock:
                self.started.append(n)
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(seconds)
            with self.lock:
                self.running -= 1
                self.finished.append(n)
            return n, engine
        return run


async def test_jobs_run_n_at_once_and_start_in_submission_order():
    worker = InferenceWorker(FakeEngine(), parallel=3)
    probe = Probe()
    try:
        futures = []
        for n in range(9):
            futures.append(asyncio.ensure_future(worker.run(probe.job(n))))
            await asyncio.sleep(0.01)      # submitted one after another
        results = await asyncio.gather(*futures)
        assert [n for n, _ in results] == list(range(9))
        assert probe.most == 3                     # never more than the slots, and really three at once
        assert probe.started == list(range(9))     # FIFO: nobody overtakes a job submitted before it
        assert worker.backlog == 0
    finally:
        worker.close()


async def test_the_backlog_bound_holds_with_several_job_threads():
    worker = InferenceWorker(FakeEngine(), max_backlog=4, parallel=2)
    probe = Probe()
    try:
        running = [asyncio.ensure_future(worker.run(probe.job(n, 0.3))) for n in range(4)]
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):
            await worker.run(probe.job(99))
        await asyncio.gather(*running)
        assert 99 not in probe.started and probe.most == 2
    finally:
        worker.close()


async def test_a_swap_waits_for_every_running_job_and_later_jobs_get_the_new_model():
    old, new = FakeEngine(), FakeEngine()
    worker = InferenceWorker(old, parallel=3)
    probe = Probe()
    try:
        running = [asyncio.ensure_future(worker.run(probe.job(n, 1.0))) for n in range(3)]
        while probe.running < 3:          # all three under way before the swap is asked for
            await asyncio.sleep(0.005)
        def swap():
            old_engine = worker.swap(new)
            return old_engine, sorted(probe.finished)[:3]

        swapped = asyncio.ensure_future(asyncio.to_thread(swap))
        await asyncio.sleep(0.05)
        later = asyncio.ensure_future(worker.run(probe.job(3, 0.0)))
        returned, finished = await swapped
        assert returned is old and finished == [0, 1, 2]   # all three finished before the swap
        assert all(engine is old for _, engine in await asyncio.gather(*running))
        assert (await later)[1] is new
    finally:
        worker.close()


def test_parallel_must_be_at_least_one():
    with pytest.raises(ValueError, match="at least 1"):
        InferenceWorker(FakeEngine(), parallel=0)


def test_max_parallel_defaults_by_cores_and_is_validated(monkeypatch):
    from config.settings import load_settings
    from core.errors import OuroError

    for cores, slots in ((1, 4), (2, 8), (16, 8)):
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert load_settings().parallel_slots == slots
    assert load_settings(max_parallel=1).parallel_slots == 1
    with pytest.raises(OuroError, match="max_parallel"):
        load_settings(max_parallel=0)


async def test_background_work_waits_for_a_reply_under_way_on_another_job_thread_or_runs_between_its_text():
    """With several job threads, a placeholder running background pieces back to back beside a reply
    took the model from it as often as the reply had it (the hot-swap's warm-up on the incoming
    model against the serving model's replies). A reply under way holds background work off, except
    for the pieces it lets in between its own text (`background_share`)."""
    worker = InferenceWorker(FakeEngine(), parallel=2)
    spans: dict[str, list[float]] = {}
    ran: list[float] = []

    def quiet_reply(engine):                 # writes no text until it is done
        spans["quiet"] = [time.perf_counter()]
        time.sleep(0.5)
        spans["quiet"].append(time.perf_counter())

    def streaming_reply(engine):
        on_text = worker.guard(None)
        spans["streaming"] = [time.perf_counter()]
        for _ in range(6):
            time.sleep(0.05)
            on_text("word ")
        spans["streaming"].append(time.perf_counter())

    def piece() -> bool:
        ran.append(time.perf_counter())
        time.sleep(0.01)
        return len(ran) >= 3

    try:
        reply = asyncio.ensure_future(worker.run(quiet_reply))
        while "quiet" not in spans:
            await asyncio.sleep(0.005)
        await asyncio.gather(reply, worker.background(piece))
        assert len(ran) == 3 and min(ran) >= spans["quiet"][1]     # none beside the running reply
        ran.clear()
        reply = asyncio.ensure_future(worker.run(streaming_reply))
        while "streaming" not in spans:
            await asyncio.sleep(0.005)
        await asyncio.gather(reply, worker.background(piece))
        start, end = spans["streaming"]
        assert len(ran) == 3 and all(start < t < end for t in ran)  # taken between its pieces of text
    finally:
        worker.close()
