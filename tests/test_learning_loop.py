"""The loop inside the bot, piece by piece, with fake engines: schedule, hot-swap, live watch."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from config.schedule import parse_schedule
from config.settings import load_settings
from core.errors import OuroError
from core.files import atomic_write_text
from engine.worker import InferenceWorker
from evals.live_watch import judge
from lineage.generations import Lineage
from memory.store import Store
from serving.hotswap import HotSwapper
from serving.loop import LearningLoop
from tests.helpers.fakes import FakeEngine, word_count
from tests.helpers.lineages import Loader, make_generation, rate_replies
from trainer.scheduler import JOB_ID, CycleScheduler, scheduled_cycle


@pytest.fixture
def lineage_world(tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", watch_min_ratings=10, watch_margin=0.15,
                             cycle_schedule="off", new_account_window_s=0)   # each rater their own source
    models = settings.models_dir
    g0 = make_generation(models, "gen-0000", None, status="base")
    make_generation(models, "gen-0001", "gen-0000")
    Lineage(models).set_active("gen-0000")
    store = Store.open(settings.db_path)
    first = FakeEngine(generation_id="gen-0000")
    first.model_sha256 = g0.sha256
    worker = InferenceWorker(first)
    yield settings, store, worker, first
    worker.close()
    store.close()


# --- schedule -----------------------------------------------------------------------------------
def test_schedule_language():
    assert parse_schedule("off") is None
    assert "hour='3'" in str(parse_schedule("daily"))
    assert str(parse_schedule("every 6h")) == "interval[6:00:00]"
    assert str(parse_schedule("every 30m")) == "interval[0:30:00]"
    assert "day_of_week='1'" in str(parse_schedule("0 3 * * 1"))
    for bad in ("sometimes", "every 0h", "61 3 * * *", "every h"):
        with pytest.raises(ValueError):
            parse_schedule(bad)
    with pytest.raises(OuroError, match="cycle_schedule"):
        load_settings(cycle_schedule="now and then")


async def test_schedule_and_pause_survive_a_restart_and_a_missed_run_fires_once(tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", cycle_schedule="every 1h")
    fired: list[str] = []

    async def on_due(actor: str) -> None:
        fired.append(actor)

    s = CycleScheduler(settings, on_due)
    s.start()
    first_next = s.next_run()
    assert first_next is not None and not s.paused
    assert s.pause() and s.paused
    await s.shutdown()

    s = CycleScheduler(settings, on_due)      # "restart": the pause is remembered
    s.start()
    assert s.paused and s.next_run() is None
    assert s.resume() and not s.paused
    await s.shutdown()
    # while the bot is down, the run falls due (twice over): on start it runs once — not never, not twice
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    offline = AsyncIOScheduler(jobstores={"default": SQLAlchemyJobStore(
        url=f"sqlite:///{settings.data_dir / 'run' / 'schedule.sqlite'}")}, timezone="UTC")
    offline.start(paused=True)
    offline.modify_job(JOB_ID, next_run_time=datetime.now(UTC) - timedelta(hours=2, minutes=5))
    offline.shutdown(wait=False)
    s = CycleScheduler(settings, on_due)
    s.start()
    for _ in range(50):
        if fired:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)
    assert fired == ["scheduler"]
    assert s.next_run() > datetime.now(UTC)
    await s.shutdown()

    # changing the setting replaces the trigger; 'off' removes the job
    s = CycleScheduler(load_settings(data_dir=tmp_path / "data", cycle_schedule="every 2h"), on_due)
    s.start()
    assert str(s.scheduler.get_job(JOB_ID).trigger) == "interval[2:00:00]"
    await s.shutdown()
    s = CycleScheduler(load_settings(data_dir=tmp_path / "data", cycle_schedule="off"), on_due)
    s.start()
    assert not s.enabled and not s.pause()
    await s.shutdown()


async def test_the_persisted_job_without_a_bot_does_nothing(tmp_path):
    await scheduled_cycle(str(tmp_path / "nobody"))   # logs, does not raise


# --- hot-swap ------------------------------------------------------------------------------------
async def test_swap_waits_for_the_running_reply_then_closes_the_old_model(lineage_world):
    settings, store, worker, first = lineage_world
    loader = Loader()
    swapper = HotSwapper(worker, loader)
    slow = FakeEngine(["one two three four"], delay_s=0.6)
    worker.swap(slow)  # a slow model is serving
    slow.generation_id, slow.model_sha256 = first.generation_id, first.model_sha256
    started = threading.Event()

    def job(engine):
        started.set()
        return engine.generate([{"role": "user", "content": "hi"}], chat_key=1, sampling=None).text, engine

    reply = asyncio.ensure_future(worker.run(job))
    await asyncio.to_thread(started.wait, 5)
    result = await swapper.swap_to(Lineage(settings.models_dir).generation("gen-0001"))
    text, engine_used = await reply
    assert result.ok and text == "one two three four"
    assert engine_used is slow and slow.closed            # finished on the old model, which was then closed
    assert slow.states_saved == 0     # its chats' KV states are not written: no model of its SHA-256 loads them
    assert worker.engine is loader.engines[-1] and worker.engine.generation_id == "gen-0001"
    # the smoke test waited its turn on the inference thread behind the reply in flight; the swap
    # itself then took no time
    assert result.smoke_s > 0.1 and result.pause_s < 0.1
    again = await swapper.swap_to(Lineage(settings.models_dir).generation("gen-0001"))
    assert again.ok and again.reason == "already serving" and len(loader.engines) == 1


class PrefillingEngine(FakeEngine):
    """Reads conversations ahead like LlamaEngine.prefill: only what it has not read yet, per chat,
    at most `max_tokens` per call."""

    def __init__(self, step_s: float = 0.0, **kw) -> None:
        super().__init__(**kw)
        self.step_s = step_s
        self.read: dict[int, int] = {}
        self.calls: list[tuple[int, int]] = []
        self.threads: set[str] = set()
        self.batch_threads: list[int | None] = []
        self.prefills = 0
        self.generating = False
        self.failing = False

    def set_batch_threads(self, n):
        self.batch_threads.append(n)

    def unread(self, messages, *, chat_key):
        return max(0, word_count(messages) - self.read.get(chat_key, 0))

    def generate(self, messages, *, chat_key, sampling, on_text=None):
        self.generating = True
        try:
            out = super().generate(messages, chat_key=chat_key, sampling=sampling, on_text=on_text)
        finally:
            self.generating = False
        self.read[chat_key] = word_count(messages) + out.completion_tokens
        return out

    def prefill(self, messages, *, chat_key, max_tokens=None):
        if self.generating:   # as LlamaEngine: reading between a reply's tokens would corrupt it
            raise RuntimeError("prefill() while this model streams a reply")
        if self.failing:
            raise RuntimeError("the new model broke while reading")
        self.threads.add(threading.current_thread().name)
        self.prefills += 1
        have = self.read.get(chat_key, 0)
        new = min(word_count(messages) - have, max_tokens if max_tokens is not None else 10**9)
        self.read[chat_key] = have + new
        if chat_key != "__smoke__":   # the smoke test's prompt, read ahead of it
            self.calls.append((chat_key, new))
        time.sleep(self.step_s)
        return new


async def test_warm_up_reads_the_active_chats_in_steps_then_catches_up_with_what_they_said_meanwhile(lineage_world):
    settings, store, worker, first = lineage_world
    engines: list[PrefillingEngine] = []

    def load(gen):
        engines.append(PrefillingEngine(generation_id=gen.id))
        engines[-1].model_sha256 = gen.sha256
        return engines[-1]

    ann = [{"role": "user", "content": "hello there my friend"}, {"role": "assistant", "content": "hi Ann"}]
    later = ann + [{"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]
    plans = iter([[(1, ann)],                       # when the swap starts
                  [(2, ann[:1]), (1, later)],        # meanwhile Bob wrote, and Ann said more
                  [(2, ann[:1]), (1, later)]])       # nothing new: swap
    swapper = HotSwapper(worker, load, warm_tokens=1000, warm_step=4, nearly_read=16)
    tasks = []                                         # the swap's background tasks on the inference thread
    background = worker.background

    async def counted(piece):
        tasks.append(piece)
        return await background(piece)

    worker.background = counted
    result = await swapper.swap_to(Lineage(settings.models_dir).generation("gen-0001"), lambda: next(plans))
    del worker.background
    assert result.ok and worker.engine is engines[0] and result.warm_tokens == word_count(later) + word_count(ann[:1])
    assert engines[0].calls == [(1, 4), (1, 4), (1, 4), (1, 4), (1, 1),            # Ann's chat, in steps of 4
                                (2, 4), (2, 4), (2, 3), (1, 4), (1, 4), (1, 2),    # Bob whole, Ann only what is new
                                (2, 0), (1, 0)]                                    # nothing new: swap
    assert {name.startswith("inference") for name in engines[0].threads} == {True}  # on the inference thread
    # each piece read with one thread (steadier beside replies on a busy machine), the engine's
    # default restored after it for the replies in between
    assert engines[0].prefills > len(engines[0].calls)          # the smoke prompt's pieces too
    assert engines[0].batch_threads == [1, None] * engines[0].prefills
    # one background task per chat and pass, read piece by piece (the smoke prompt and the smoke
    # test, then Ann; Bob, Ann; Bob, Ann), not one per piece
    assert len(tasks) == 7

    tight = HotSwapper(worker, load, warm_tokens=word_count(ann) + 1, warm_step=64)   # the budget counts every pass
    result = await tight.swap_to(Lineage(settings.models_dir).generation("gen-0000"),
                                 lambda: [(3, ann), (4, ann), (5, ann)])
    assert result.ok and engines[1].calls == [(3, word_count(ann)), (4, 1)]


async def test_replies_are_answered_between_warm_up_steps(lineage_world):
    """The warm-up takes turns with replies on the one inference thread: a reply asked for while a
    long warm-up runs is answered within a step, not after the whole warm-up."""
    settings, store, worker, first = lineage_world
    new = PrefillingEngine(step_s=0.05, generation_id="gen-0001")
    new.model_sha256 = Lineage(settings.models_dir).generation("gen-0001").sha256
    long_chat = [{"role": "user", "content": "word " * 400}]             # 400+ tokens: 7 steps of 64
    swapper = HotSwapper(worker, lambda gen: new, warm_tokens=4096)
    swap = asyncio.create_task(swapper.swap_to(Lineage(settings.models_dir).generation("gen-0001"),
                                               lambda: [(1, long_chat)]))
    while not new.calls:
        await asyncio.sleep(0.005)
    asked = time.perf_counter()
    text = await worker.run(lambda engine: engine.generate([{"role": "user", "content": "hi"}], chat_key=2,
                                                           sampling=None).text)
    answered = time.perf_counter() - asked
    assert text == "echo: hi" and not swap.done()          # answered by the old model, mid-warm-up
    result = await swap
    assert result.ok and result.warm_tokens == word_count(long_chat) and len(new.calls) >= 7
    assert answered < 0.2 < result.warm_s                  # waited for one step at most, not the whole warm-up


async def test_the_warm_up_waits_for_a_reply_under_way_before_it_hands_the_rest_over(lineage_world):
    """A chat with a reply under way is not handed over yet: that reply is not in the plan, and the
    chat would read it again in its next reply. The passes wait for it (to `catch_up_s` at most)."""
    settings, store, worker, first = lineage_world
    gen = Lineage(settings.models_dir).generation("gen-0001")
    ann = [{"role": "user", "content": "hello there my friend"}, {"role": "assistant", "content": "hi Ann"}]
    later = ann + [{"role": "user", "content": "more"}, {"role": "assistant", "content": "ok then"}]
    plans = [[(1, ann, False)], [(1, ann, True)], [(1, ann, True)], [(1, later, False)], [(1, later, False)]]
    asked = []

    def plan():
        asked.append(1)
        return plans[min(len(asked), len(plans)) - 1]

    new = PrefillingEngine(generation_id="gen-0001")
    new.model_sha256 = gen.sha256
    result = await HotSwapper(worker, lambda g: new, warm_tokens=1000, warm_step=64).swap_to(gen, plan)
    assert result.ok and len(asked) == 5 and result.warm_tokens == word_count(later)
    assert new.calls == [(1, word_count(ann)), (1, 0), (1, 0), (1, word_count(later) - word_count(ann)), (1, 0)]

    stuck = PrefillingEngine(generation_id="gen-0000")       # a reply that never lands: to catch_up_s
    stuck.model_sha256 = Lineage(settings.models_dir).generation("gen-0000").sha256
    swapper = HotSwapper(worker, lambda g: stuck, warm_tokens=1000)
    swapper.catch_up_s = 0.5
    result = await swapper.swap_to(Lineage(settings.models_dir).generation("gen-0000"), lambda: [(1, ann, True)])
    assert result.ok and worker.engine is stuck and 0.5 <= result.warm_s < 3 and len(stuck.calls) > 2


def _reply(worker: InferenceWorker, chat: int, messages: list[dict]):
    """A reply job as Conversation.answer runs it: the worker picks the model for the chat."""

    def job(engine):
        chosen = worker.route(chat, messages)
        out = chosen.generate(messages, chat_key=chat, sampling=None, on_text=worker.guard(None))
        return out.text, chosen.generation_id

    return worker.run(job)


@pytest.fixture
def handover_world(lineage_world):
    """An old model that keeps chats' states (like LlamaEngine) serving Ann (1) and Cal (3), and a
    new one that reads slowly, so replies can be asked for while it reads."""
    settings, store, worker, first = lineage_world
    lineage = Lineage(settings.models_dir)
    old = PrefillingEngine(generation_id="gen-0000")
    old.model_sha256 = lineage.generation("gen-0000").sha256
    worker.swap(old).close()
    new = PrefillingEngine(step_s=0.03, generation_id="gen-0001", delay_s=0.2,
                           replies=["one two three four five six seven eight"] * 5)
    new.model_sha256 = lineage.generation("gen-0001").sha256
    ann = [{"role": "user", "content": "hello there my friend"}, {"role": "assistant", "content": "hi Ann"}]
    cal = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "many words"}]
    bob = [{"role": "user", "content": "word " * 200}]          # ~50 pieces of 4: over a second of reading
    old.read.update({1: word_count(ann), 3: word_count(cal)})
    return worker, old, new, lineage.generation("gen-0001"), ann, bob, cal


async def test_during_the_handover_a_chat_moves_to_the_new_model_once_it_has_read_it(handover_world):
    """The handover, chat by chat: Ann's chat, read by the new model, moves to it at her next reply
    (and the warm-up never reads it again); Cal's, which it has not read, stays on the old model
    until the swap ends. A piece never runs between the tokens of the new model's reply."""
    worker, old, new, gen, ann, bob, cal = handover_world
    passes = []

    def plan():
        passes.append(worker.moved())
        return [(1, ann), (2, bob)]

    swap = asyncio.create_task(HotSwapper(worker, lambda g: new, warm_tokens=4096, warm_step=4).swap_to(gen, plan))
    while not new.read.get(2):               # Ann read, Bob being read
        await asyncio.sleep(0.005)
    ann_next = ann + [{"role": "user", "content": "and now?"}]
    text, by = await _reply(worker, 1, ann_next)
    assert by == "gen-0001" and text.startswith("one two") and not swap.done()
    assert worker.moved() == {1}
    _, by = await _reply(worker, 3, cal + [{"role": "user", "content": "and me?"}])
    assert by == "gen-0000" and not swap.done()     # the new model would have to read all of Cal's chat
    result = await swap
    assert result.ok and result.moved == 1 and worker.engine is new and worker.incoming is None and old.closed
    assert len(passes) >= 2 and all(1 in moved for moved in passes[1:])
    assert sum(n for chat, n in new.calls if chat == 1) == word_count(ann)    # read once, before it moved
    assert sum(n for chat, n in new.calls if chat == 2) == word_count(bob)
    _, by = await _reply(worker, 3, cal + [{"role": "user", "content": "and me?"}])
    assert by == "gen-0001" and worker.moved() == frozenset()


async def test_a_new_model_failing_during_the_handover_gives_every_chat_back_to_the_old(handover_world):
    worker, old, new, gen, ann, bob, cal = handover_world
    swap = asyncio.create_task(HotSwapper(worker, lambda g: new, warm_tokens=4096, warm_step=4)
                               .swap_to(gen, lambda: [(1, ann), (2, bob)]))
    while not new.read.get(2):
        await asyncio.sleep(0.005)
    _, by = await _reply(worker, 1, ann + [{"role": "user", "content": "and now?"}])
    assert by == "gen-0001"
    new.failing = True
    result = await swap
    assert not result.ok and "broke while reading" in result.reason and new.closed and not old.closed
    assert worker.engine is old and worker.incoming is None and worker.moved() == frozenset()
    _, by = await _reply(worker, 1, ann + [{"role": "user", "content": "still there?"}])
    assert by == "gen-0000"


async def test_forgetting_a_chat_during_the_handover_reaches_both_models_and_ends_its_warm_up(handover_world):
    worker, old, new, gen, ann, bob, cal = handover_world
    swap = asyncio.create_task(HotSwapper(worker, lambda g: new, warm_tokens=4096, warm_step=4)
                               .swap_to(gen, lambda: [(2, bob)]))
    while not new.read.get(2):               # Bob's chat is being read
        await asyncio.sleep(0.005)
    await worker.run(lambda engine: worker.forget([2]), bounded=False)
    assert old.forgotten == [2] and new.forgotten == ["__smoke__", 2]
    assert worker.moved() == {2} and worker.route(2, bob) is new   # it starts afresh on the new model
    assert worker.route(3, cal + [{"role": "user", "content": "x"}]) is old    # not read by the new one
    result = await swap
    assert result.ok and sum(n for chat, n in new.calls if chat == 2) < word_count(bob) / 2   # not read on


@pytest.mark.parametrize("problem", ["broken", "empty", "tampered"])
async def test_a_bad_new_model_never_serves_and_admins_are_told(lineage_world, problem):
    settings, store, worker, first = lineage_world
    loader = Loader(broken={"gen-0001"} if problem == "broken" else set(),
                    empty={"gen-0001"} if problem == "empty" else set())
    if problem == "tampered":
        (settings.models_dir / "gen-0001" / "model.gguf").write_bytes(b"not what was recorded")
    told: list[str] = []

    async def notify(text):
        told.append(text)

    loop = LearningLoop(settings, store, worker, notify=notify, load=loader)
    atomic_write_text(settings.models_dir / "ACTIVE", "gen-0001\n")   # e.g. `ouro promote` while the bot runs
    result = await loop.sync()
    assert result is not None and not result.ok
    assert worker.engine is first and not first.closed
    assert Lineage(settings.models_dir).active_id() == "gen-0000"      # the pointer follows what is served
    assert told and "gen-0001" in told[0] and "gen-0000" in told[0]
    assert store.events("swap_failed")
    if problem == "empty":
        assert loader.engines[0].closed                                  # the rejected model was freed
    assert await loop.sync() is None                                     # and is not retried in a loop


# --- live watch ------------------------------------------------------------------------------------
def test_watch_verdicts():
    up, down = 1, -1
    assert judge("c", "p", [up] * 5, [up] * 10, min_ratings=10, margin=0.15).status == "waiting"
    assert judge("c", "p", [up] * 10, [up] * 2, min_ratings=10, margin=0.15).status == "no_baseline"
    worse = judge("c", "p", [down] * 5 + [up] * 5, [down] * 2 + [up] * 8, min_ratings=10, margin=0.15)
    assert worse.status == "worse" and worse.child_down_share == 0.5 and worse.parent_down_share == 0.2
    within = judge("c", "p", [down] * 3 + [up] * 7, [down] * 2 + [up] * 8, min_ratings=10, margin=0.15)
    assert within.status == "ok"
    # only the first N of the child and the latest N of the parent count
    late = judge("c", "p", [up] * 10 + [down] * 30, [down] * 30 + [up] * 10, min_ratings=10, margin=0.15)
    assert late.status == "ok" and late.child_down_share == 0.0 and late.parent_down_share == 0.0


def test_generation_ratings_are_per_generation_and_ordered(lineage_world):
    _, store, _, _ = lineage_world
    rate_replies(store, "gen-0000", [1, -1, 1], 100)
    rate_replies(store, "gen-0001", [-1, -1], 200)
    assert store.generation_ratings("gen-0000", limit=10) == [1, -1, 1]
    assert store.generation_ratings("gen-0000", limit=2) == [1, -1]
    assert store.generation_ratings("gen-0000", limit=2, newest=True) == [-1, 1]
    assert store.generation_ratings("gen-0001", limit=10) == [-1, -1]


@pytest.mark.parametrize("child_downs,fires", [(6, True), (3, False)])
async def test_the_live_watch_rolls_back_a_clearly_worse_generation(lineage_world, child_downs, fires):
    settings, store, worker, first = lineage_world
    told: list[str] = []

    async def notify(text):
        told.append(text)

    loop = LearningLoop(settings, store, worker, notify=notify, load=Loader())
    rate_replies(store, "gen-0000", [-1] * 2 + [1] * 8, 100)             # parent: 20% 👎
    await loop.promote("gen-0001", actor="test", why="passed the gate")
    assert worker.engine.generation_id == "gen-0001"
    assert loop.watched() == ("gen-0001", "gen-0000")
    rate_replies(store, "gen-0001", [-1] * child_downs + [1] * (9 - child_downs), 300)
    assert (await loop.check_watch()).status == "waiting"                 # 9 of 10 ratings so far
    rate_replies(store, "gen-0001", [1], 400)
    verdict = await loop.check_watch()
    lineage = Lineage(settings.models_dir)
    ledger = lineage.ledger()
    if fires:
        assert verdict.status == "worse"
        assert lineage.active_id() == "gen-0000" and worker.engine.generation_id == "gen-0000"
        assert ledger[-1]["event"] == "auto_rollback" and "live watch" in ledger[-1]["reason"]
        assert ledger[-1]["actor"] == "live-watch" and "60%" in ledger[-1]["reason"]
        assert any("Automatic rollback" in t for t in told)
    else:
        assert verdict.status == "ok"
        assert lineage.active_id() == "gen-0001" and worker.engine.generation_id == "gen-0001"
        assert all(r["event"] != "auto_rollback" for r in ledger)
    assert loop.watched() is None and await loop.check_watch() is None   # judged once
    assert (settings.models_dir / "gen-0001" / "model.gguf").exists()     # rollback deletes nothing


@pytest.mark.parametrize("who", ["one stranger", "a burst of new accounts", "a stranger's 👍", "an admin"])
async def test_one_voice_cannot_decide_the_live_watch_alone(lineage_world, who):
    """A stranger's run of 👎 or 👍 (or a flood of fresh accounts, which the caps count as one source)
    decides at most `watch_margin` of the ratings the watch judges — here 1 of 10 — so it cannot move
    the 👎 share past the margin by itself, either way; an admin is not capped."""
    settings, store, worker, _ = lineage_world
    settings = load_settings(**{**settings.model_dump(), "admin_ids": [77], "new_account_window_s": 3600.0})
    loop = LearningLoop(settings, store, worker, load=Loader())
    for i in range(10):       # parent: 10% 👎 from ten people who came a day apart
        rate_replies(store, "gen-0000", [-1 if i == 0 else 1], 100 + i)
        first_seen(store, 100 + i, f"2026-11-{10 + i}T00:00:00")
    await loop.promote("gen-0001", actor="test", why="passed the gate")
    flood = 1 if who == "a stranger's 👍" else -1
    rate_replies(store, "gen-0001", [flood] * 10, 300,
                 user_id={"one stranger": 300, "a stranger's 👍": 300, "an admin": 77}.get(who))   # None: each new
    child, parent = loop.watch_ratings("gen-0001", "gen-0000")
    assert len(parent) == 10
    verdict = await loop.check_watch()
    if who == "an admin":
        assert child == [-1] * 10 and verdict.status == "worse"
        assert Lineage(settings.models_dir).active_id() == "gen-0000"
        return
    assert child == [flood] and verdict.status == "waiting"          # 1 of the 10 the watch needs
    others = [1] * 9 if flood < 0 else [-1] * 4 + [1] * 5             # nine people who came a month apart
    rate_replies(store, "gen-0001", others, 400)
    for i in range(9):
        first_seen(store, 400 + i, f"2026-{i + 1:02d}-10T00:00:00")
    verdict = await loop.check_watch()
    if flood < 0:   # the others like it: 1 capped 👎 + 9 👍 against the parent's 10% — no rollback
        assert verdict.status == "ok" and verdict.child_down_share == 0.1
        assert Lineage(settings.models_dir).active_id() == "gen-0001"
    else:           # the others do not: the stranger's 👍 flood shields it no more than one 👍
        assert verdict.status == "worse" and verdict.child_down_share == 0.4
        assert Lineage(settings.models_dir).active_id() == "gen-0000"


async def test_a_stranger_rating_hundreds_of_replies_first_does_not_keep_the_watch_waiting(lineage_world):
    settings, store, worker, _ = lineage_world
    loop = LearningLoop(settings, store, worker, load=Loader())
    rate_replies(store, "gen-0000", [-1] + [1] * 9, 100)
    await loop.promote("gen-0001", actor="test", why="passed the gate")
    rate_replies(store, "gen-0001", [1] * 300, 1000, user_id=999)    # more than a page of rated turns
    rate_replies(store, "gen-0001", [-1] * 9, 2000)
    child, _ = loop.watch_ratings("gen-0001", "gen-0000")
    assert child == [1] + [-1] * 9
    assert (await loop.check_watch()).status == "worse"


def first_seen(store: Store, user_id: int, at: str) -> None:
    with store.database.transaction() as conn:
        conn.execute("UPDATE users SET created_at = ? WHERE id = ?", (at, user_id))
