"""Load: a small soak over the emulator with overload on purpose, and the bounds that keep it safe
(per-person flood limit, per-chat queue, worker backlog, rotated log file).

The soak driver is the one `ouro bench soak` runs (ouro/bench/soak.py), here with the fake
engine slowed down and a backlog of 2, so many messages meet a full backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import pytest

from bot import keyboards
from bot.buttons import REGEN_BUSY, REGEN_FLOOD
from bot.chat import FLOOD_NOTICE, NON_TEXT, QUEUE_FULL
from config.settings import load_settings
from engine.worker import Busy, InferenceWorker
from ouro import logs
from ouro.bench.soak import FIRST_USER, CallWatcher, Seen, SoakPlan, run_soak
from ouro.cli import build_parser
from serving.conversation import BUSY
from serving.limits import ADMIT, NOTICE, SILENT, ChatQueues, FloodLimit
from tests.helpers.fakes import FakeEngine, GatedEngine
from tests.helpers.offline_bot import offline_bot

ANN = 1001


# --- units ------------------------------------------------------------------------------------
def test_flood_limit_admits_then_tells_once_per_window_then_recovers():
    now = [0.0]
    flood = FloodLimit(3, 60.0, clock=lambda: now[0])
    assert [flood.check(ANN) for _ in range(3)] == [ADMIT] * 3
    assert flood.check(ANN) == NOTICE
    assert [flood.check(ANN) for _ in range(5)] == [SILENT] * 5
    assert flood.check(2002) == ADMIT                      # someone else is not affected
    now[0] = 59.0
    assert flood.check(ANN) == SILENT                       # still inside the window of the first three
    now[0] = 60.5
    assert flood.check(ANN) == ADMIT                        # the first three aged out
    now[0] = 200.0
    assert flood.check(3003) == ADMIT
    assert len(flood) == 1                                  # people quiet for a window are forgotten
    unlimited = FloodLimit(0, 60.0)
    assert {unlimited.check(ANN) for _ in range(500)} == {ADMIT} and len(unlimited) == 0


async def test_chat_queue_answers_in_order_and_refuses_past_its_bound():
    queues = ChatQueues(max_waiting=1)
    order: list[str] = []

    async def use(place, name: str) -> None:
        async with place:
            order.append(name)
            await asyncio.sleep(0.01)

    first, second = queues.join(7), queues.join(7)
    assert queues.join(7) is None                           # one answering + one waiting = full
    other = queues.join(8)
    assert other is not None                                # chats do not share a bound
    await asyncio.gather(use(first, "a"), use(second, "b"), use(other, "c"))
    assert order[:1] == ["a"] and order.index("a") < order.index("b")
    assert len(queues) == 0 and queues.peak_waiting == 1    # nothing left behind

    holder, waiter = queues.join(7), queues.join(7)
    async with holder:
        task = asyncio.create_task(use(waiter, "cancelled"))
        await asyncio.sleep(0.01)
        assert queues.waiting(7) == 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert queues.waiting(7) == 0                       # a cancelled waiter gives its place back
    assert len(queues) == 0 and "cancelled" not in order


async def test_worker_bounds_its_backlog_and_records_queue_wait():
    worker = InferenceWorker(FakeEngine(), max_backlog=1)
    try:
        slow = asyncio.create_task(worker.run(lambda engine: time.sleep(0.3)))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):
            await worker.run(lambda engine: "refused")
        assert await worker.run(lambda engine: "must run", bounded=False) == "must run"
        await slow
        stats = worker.wait_stats()
        assert stats["jobs"] == 2 and stats["max_s"] >= 0.1  # the second job waited for the slow one
        assert worker.peak_backlog == 2 and worker.backlog == 0
    finally:
        worker.close()


async def test_background_work_runs_when_idle_and_between_the_text_of_a_reply_without_stopping_it():
    """`InferenceWorker.background` (the hot-swap warm-up): pieces run whenever no reply waits, a
    reply that comes waits for one piece at most, and while a reply streams one piece runs between
    its pieces of text when the reply has had its share — its text never stops for two pieces."""
    worker = InferenceWorker(FakeEngine())
    order: list[str] = []
    count = {"n": 0}

    def piece(total: int, pause: float = 0.01):
        def run() -> bool:
            count["n"] += 1
            order.append("bg")
            time.sleep(pause)
            return count["n"] >= total
        return run

    def streaming(engine):
        text = worker.guard(lambda t: order.append(t))
        for i in range(20):
            time.sleep(0.01)
            text(f"t{i}")
        return "streamed"

    worker.background_share = 0.5
    try:
        await worker.background(piece(5))                      # idle: runs to the end at once
        assert order == ["bg"] * 5
        order.clear()
        count["n"] = 0
        work = asyncio.ensure_future(worker.background(piece(10_000)))
        while not order:
            await asyncio.sleep(0.001)
        order.append("reply asked")
        assert await worker.run(streaming) == "streamed"
        start = order.index("t0")
        assert order[order.index("reply asked"):start].count("bg") <= 1    # waited for the piece running then
        stream = order[start:order.index("t19") + 1]
        assert "bg" in order[:order.index("reply asked")]     # it ran before the reply came
        assert 6 <= stream.count("bg") <= 12            # half as much time as the reply (share 0.5): ~10 pieces
        assert "bg,bg" not in ",".join(stream)          # never two in a row: the text keeps coming
        assert not work.done()
        await asyncio.sleep(0.05)
        assert order[-1] == "bg"                        # and on, once the reply is done
        worker.close()                                  # what is left is given up, and its waiter told
        with pytest.raises(Busy):
            await asyncio.wait_for(work, 5)
    finally:
        worker.close()


async def test_a_failing_background_piece_reaches_its_caller():
    worker = InferenceWorker(FakeEngine())
    try:
        with pytest.raises(ZeroDivisionError):
            await worker.background(lambda: 1 / 0)
        assert await worker.run(lambda engine: "still serving") == "still serving"
    finally:
        worker.close()


def test_log_file_is_rotated_with_a_size_cap_and_private(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "LOG_FILE_MAX_BYTES", 2000)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    token = "123456789:" + "A" * 35
    try:
        logs.setup_logging("INFO", log_file=tmp_path / "log" / "ouro.log")
        for i in range(300):
            logging.getLogger("soak-test").info("line %d %s token=%s", i, "x" * 40, token)
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    files = sorted((tmp_path / "log").iterdir())
    assert [f.name for f in files] == ["ouro.log"] + [f"ouro.log.{i}" for i in range(1, logs.LOG_FILE_BACKUPS + 1)]
    assert all(f.stat().st_size <= 2000 for f in files)
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    text = files[0].read_text()
    assert "line 299" in text and token not in text and "<token>" in text


def test_cli_knows_the_soak_and_the_log_file():
    args = build_parser().parse_args(["bench", "soak", "--users", "3", "--messages", "2", "--json"])
    assert (args.what, args.users, args.messages, args.json) == ("soak", 3, 2, True)
    assert build_parser().parse_args(["serve", "--log-file", "x.log"]).log_file == Path("x.log")


def test_new_settings_are_documented_and_validated():
    s = load_settings()
    assert (s.chat_queue_max, s.flood_messages, s.flood_window_s) == (4, 30, 60.0)
    from config.settings import describe
    from core.errors import OuroError

    helps = {name: text for name, _, text in describe()}
    assert "limited" in helps["flood_messages"] and "busy" in helps["chat_queue_max"]
    with pytest.raises(OuroError, match="flood_window_s"):
        load_settings(flood_window_s=0)


# --- 🔁 and stickers meet the same bounds as text (offline Bot API) -------------------------------
def _regen_button(bot) -> tuple[int, str]:
    """The message of Ann's latest reply and its 🔁 callback data."""
    turn = bot.store.latest_answered_turn(ANN)
    return bot.store.turn(turn).reply_message_ids[-1], keyboards.reply_data(keyboards.REGENERATE, turn)


def _alternatives(bot) -> int:
    return bot.store.database.scalar("SELECT COUNT(*) FROM alternatives")


def _answered_with(bot, query_id: str) -> str | None:
    [answer] = bot.answer_to(query_id)
    return answer.get("text")


async def test_regenerate_takes_its_chats_turn_so_a_double_tap_runs_once(tmp_path):
    """🔁 holds the chat's place like a message: a second tap while it is written, or a tap while the
    chat's next message is being answered, is refused at once instead of starting another reply."""
    engine = GatedEngine()
    async with offline_bot(tmp_path / "data", engine=engine, stream_drafts=False) as bot:
        await bot.say(ANN, "hello")
        mid, regen = _regen_button(bot)
        engine.hold()
        first = asyncio.create_task(bot.press(ANN, ANN, mid, regen))
        await engine.wait_started()
        double = await bot.press(ANN, ANN, mid, regen)
        engine.release()
        await first
        assert _alternatives(bot) == 1 and _answered_with(bot, double) == REGEN_BUSY

        engine.hold()
        nxt = asyncio.create_task(bot.say(ANN, "and another thing"))
        await engine.wait_started()
        late = await bot.press(ANN, ANN, mid, regen)   # still the latest reply while the next one is written
        engine.release()
        await nxt
        assert _answered_with(bot, late) == REGEN_BUSY
        assert _alternatives(bot) == 1 and len(engine.prompts) == 3
        assert bot.errors == []


async def test_regenerate_counts_against_the_flood_limit(tmp_path):
    async with offline_bot(tmp_path / "data", stream_drafts=False, flood_messages=2, flood_window_s=600) as bot:
        await bot.say(ANN, "hello")
        mid, regen = _regen_button(bot)
        await bot.press(ANN, ANN, mid, regen)          # the second of two admitted
        limited = await bot.press(ANN, ANN, mid, regen)
        assert _answered_with(bot, limited) == REGEN_FLOOD
        assert _alternatives(bot) == 1 and len(bot.engine.prompts) == 2
        assert bot.errors == []


STICKER = {"file_id": "s", "file_unique_id": "s", "type": "regular", "width": 1, "height": 1,
           "is_animated": False, "is_video": False}


async def test_stickers_count_against_the_flood_limit_and_are_all_kept(tmp_path):
    async with offline_bot(tmp_path / "data", stream_drafts=False, flood_messages=3, flood_window_s=600) as bot:
        for _ in range(10):
            await bot.send(bot.tg.message(ANN, ANN, None, sticker=STICKER))
        await bot.say(ANN, "and now in words")
        assert bot.tg.texts_to(ANN) == [NON_TEXT] * 3 + [FLOOD_NOTICE]   # one notice, then silence
        rows = bot.store.database.query("SELECT user_text, status FROM turns WHERE chat_id = ? ORDER BY id", (ANN,))
        assert [r["user_text"] for r in rows] == ["[sticker]"] * 10 + ["and now in words"]
        assert rows[-1]["status"] == "limited" and bot.engine.prompts == []


# --- over the emulator ------------------------------------------------------------------------
pytest_e2e = pytest.mark.e2e


async def _settled(store, chat_id: int, n: int, timeout: float = 20.0) -> list[dict]:
    """The chat's turns once `n` are stored and none is still pending."""
    end = time.monotonic() + timeout
    while True:
        rows = store.database.query("SELECT * FROM turns WHERE chat_id = ? ORDER BY id", (chat_id,))
        if len(rows) >= n and all(r["status"] != "pending" for r in rows) or time.monotonic() > end:
            return rows
        await asyncio.sleep(0.1)


async def _replies(user, n: int, timeout: float = 20.0) -> list:
    """The chat's bot messages once `n` replies carry their rating buttons."""
    end = time.monotonic() + timeout
    while True:
        messages = await user.abot_messages()
        if sum(len(m.callback_data) == 4 for m in messages) >= n or time.monotonic() > end:
            return messages
        await asyncio.sleep(0.1)


@pytest_e2e
async def test_small_soak_under_overload_stores_everything_and_answers_everyone(emu, make_bot):
    # every reply to a lone message gets a press (🔁 or a rating): under overload few replies may come,
    # and at rate_p 0.6 a slow run once pressed no rating at all (rating_presses 0)
    plan = SoakPlan(users=8, messages=5, think_s=0.2, rate_p=0.8, regen_p=0.2, outcome_timeout_s=30)
    async with make_bot(FakeEngine(delay_s=0.2), max_backlog=3) as bot:
        result = await run_soak(emu, bot.app, plan)
        busy_rows = bot.store.database.query(
            "SELECT status, reply_text FROM turns WHERE chat_id >= ? AND status = 'busy'", (FIRST_USER,))
    assert result["sent"] == 40 and result["stored"] == 40 and result["lost"] == 0 and result["extra_turns"] == 0
    assert result["unreplied"] == 0 and result["failed"] == 0 and result["pending"] == 0
    assert result["unhandled_errors"] == 0, result["errors_sample"]
    assert result["busy"] > 0 and result["replied"] > 0             # overload did happen, and was survived
    assert result["replied"] + result["busy"] + result["limited"] == 40
    assert result["presses_unrecorded"] == 0 and result["rating_presses"] > 0, result
    assert result["peak_backlog"] <= 3 and result["model_jobs"] >= result["replied"]
    assert result["reply_p50_s"] is not None and result["queue_wait_p95_s"] is not None
    assert len(busy_rows) == result["busy"] and all(r["reply_text"] in (BUSY, QUEUE_FULL) for r in busy_rows)
    assert result["ok"]


@pytest_e2e
async def test_a_flood_is_stored_as_limited_with_one_notice(emu, make_bot):
    async with make_bot(FakeEngine(delay_s=0.3), flood_messages=2, flood_window_s=600) as bot:
        ann = emu.client(ANN, "Ann")
        for i in range(6):
            await ann.asend_text(f"message {i}")
        rows = await _settled(bot.store, ANN, 6)
        messages = await _replies(ann, 2)
    assert len(rows) == 6                                           # nothing lost
    assert sorted(r["status"] for r in rows) == ["answered"] * 2 + ["limited"] * 4
    assert sum(r["reply_text"] == FLOOD_NOTICE for r in rows) == 1  # told once per window, not per message
    assert sum(m.text == FLOOD_NOTICE for m in messages) == 1
    assert sum(len(m.callback_data) == 4 for m in messages) == 2
    # limited messages never reach the model, not even as context of the answered ones
    answered = {r["user_text"] for r in rows if r["status"] == "answered"}
    assert len(bot.engine.prompts) == 2 and {p[-1]["content"] for p in bot.engine.prompts} == answered
    limited = {r["user_text"] for r in rows if r["status"] == "limited"}
    assert not limited & {m["content"] for p in bot.engine.prompts for m in p}


@pytest_e2e
async def test_a_full_chat_queue_answers_busy_and_stores_it(emu, make_bot):
    async with make_bot(FakeEngine(delay_s=1.5), chat_queue_max=1) as bot:
        ann = emu.client(ANN, "Ann")
        for i in range(4):
            await ann.asend_text(f"quick {i}")
        rows = await _settled(bot.store, ANN, 4)
        messages = await _replies(ann, 2)
        peak = bot.app.bot_data["handlers"].chat_queues.peak_waiting
    assert len(rows) == 4
    assert sorted(r["status"] for r in rows) == ["answered"] * 2 + ["busy"] * 2
    assert all(r["reply_text"] == QUEUE_FULL for r in rows if r["status"] == "busy")
    assert sum(m.text == QUEUE_FULL for m in messages) == 2
    assert peak == 1 and len(bot.engine.prompts) == 2


def test_the_soak_counts_a_refused_regenerate_told_on_the_button():
    """A refused 🔁 is answered on the button (not in the chat): the soak must see it as refused, not
    wait out its timeout and count the press as unrecorded — whether the answer comes before or after
    it names the press."""

    watcher = CallWatcher(emu=None)

    def answered(press: str, text: str) -> dict:
        return {"status": 200, "method": "answerCallbackQuery", "time": 1.0,
                "params": {"callback_query_id": press, "text": text}}

    watcher.watch_press("7", 1001)
    assert watcher._refused_press(answered("7", REGEN_BUSY)) == (1001, Seen("regen_busy", 1.0))
    assert watcher._refused_press(answered("8", REGEN_FLOOD)) is None          # not named yet: kept
    watcher.watch_press("8", 1002)
    assert watcher.queue(1002).get_nowait().kind == "regen_busy"
    watcher.watch_press("9", 1003)
    assert watcher._refused_press(answered("9", "Trying again…")) is None     # not a refusal
