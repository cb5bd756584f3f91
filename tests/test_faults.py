"""Faults around the serving bot: killed mid-reply, stopped with SIGTERM, a flaky Bot API, and a
damaged model file. The kills run `ouro serve` as a real process against the local Telegram
emulator with the packaged model; the rest run the bot in this process (tests/test_e2e_telegram.py
pattern). The learning cycle's faults are in tests/test_faults_cycle.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from bot.app import build_application, running
from bot.streaming import CURSOR
from config.settings import load_settings
from core.errors import OuroError
from core.files import atomic_write_text
from lineage.generations import Lineage
from ouro.demo.emulator import Emulator
from serving.conversation import STOPPING
from serving.runtime import open_runtime
from tests.helpers.fakes import FakeEngine
from tests.helpers.lineages import damage_file, make_generation

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
ADMIN, ANN, BOB, CAROL = 4242, 1001, 1002, 1003
LONG = "Write a very long story about a dragon, at least 2000 words."   # a reply of many seconds (8-30 s seen)


# --- the bot as a real process --------------------------------------------------------------------
class Serve:
    """`ouro serve` against the emulator, in its own process (so it can really be killed)."""

    def __init__(self, emu: Emulator, data: Path, **settings) -> None:
        self.env = {**os.environ, "TELEGRAM_BOT_TOKEN": emu.token, "OURO_DATA_DIR": str(data),
                    "OURO_ADMIN_IDS": str(ADMIN), "OURO_CYCLE_SCHEDULE": "off", "OURO_TEMPERATURE": "0",
                    "OURO_STREAM_EDIT_INTERVAL_S": "0.2", "OURO_LOG_LEVEL": "INFO",
                    "OURO_STREAM_DRAFTS": "false",   # these faults are about a reply streamed by editing
                    **{f"OURO_{k.upper()}": str(v) for k, v in settings.items()}}
        self.args = [sys.executable, "-m", "ouro.cli", "serve", "--base-url", emu.api_url]
        self.log = data.parent / "serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Serve:
        with open(self.log, "ab") as log:   # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture
def serve(emu, tmp_path):
    emu.reset()
    started: list[Serve] = []

    def make(**settings) -> Serve:
        s = Serve(emu, tmp_path / "data", **settings)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def turn_rows(data: Path, user_id: int) -> list[dict]:
    """What the database holds, read from outside the bot (as after a crash)."""
    conn = sqlite3.connect(data / "ouro.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM turns WHERE user_id = ? ORDER BY id", (user_id,))]
    finally:
        conn.close()


def integrity(data: Path) -> str:
    conn = sqlite3.connect(data / "ouro.db")
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def wait_until(predicate, timeout: float, what: str, serve: Serve | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{serve.tail() if serve else ''}")


@pytest.mark.model
def test_sigkill_while_the_model_writes_then_restart_asks_to_resend(emu, serve, tmp_path):
    data = tmp_path / "data"
    bot = serve(reply_max_tokens=1500).start()
    wait_until(lambda: emu.calls("setMyCommands"), 120, "the bot to start", bot)
    # 'typing' stalls at Telegram (longer than the 30 s client timeout): it is cosmetic, so neither
    # storing the message nor the reply may wait for it
    emu.inject_fault("sendChatAction", None, delay_ms=90_000)
    ann = emu.client(ANN, "Ann")
    mid = ann.send_text(LONG)
    partial = ann.wait_for(lambda m: CURSOR.strip() in (m.text or ""), after=mid, timeout=20)
    # two more while the first is being answered: they wait in Ann's chat queue, already stored
    behind = ["and then?", "hello??"]
    for text in behind:
        ann.send_text(text)
    wait_until(lambda: len(turn_rows(data, ANN)) == 3, 20, "the waiting messages to be stored", bot)
    bot.proc.kill()                                              # SIGKILL while the reply streams in
    bot.proc.wait(10)

    rows = turn_rows(data, ANN)
    assert [r["user_text"] for r in rows] == [LONG, *behind]    # stored before the model ran, and while waiting
    assert [r["status"] for r in rows] == ["pending"] * 3, "the reply had finished before the kill; nothing tested"
    assert integrity(data) == "ok"

    serve(reply_max_tokens=1500).start()
    ask = ann.wait_for(lambda m: "send them again" in (m.text or ""), after=partial.message_id, timeout=120)
    assert LONG[:40] in ask.text and all(f"“{t}”" in ask.text for t in behind)   # one message naming each
    rows = turn_rows(data, ANN)
    assert [r["status"] for r in rows] == ["failed"] * 3 and rows[0]["reply_text"] == ask.text
    assert integrity(data) == "ok"


@pytest.mark.model
def test_sigkill_while_the_reply_is_being_sent_then_restart_delivers_it(emu, serve, tmp_path):
    data = tmp_path / "data"
    bot = serve(reply_max_tokens=24).start()
    emu.inject_fault("editMessageText", None, delay_ms=20_000, count=1000)   # Telegram stalls mid-delivery
    ann = emu.client(ANN, "Ann")
    mid = ann.send_text("hi! how are you today?")
    partial = ann.wait_for(lambda m: CURSOR.strip() in (m.text or ""), after=mid, timeout=120)
    answered = wait_until(lambda: [r for r in turn_rows(data, ANN) if r["status"] == "answered"], 60,
                          "the model to finish", bot)
    bot.proc.kill()                                              # written and stored, never fully shown
    bot.proc.wait(10)
    assert answered[0]["reply_message_ids"] is None and answered[0]["reply_text"]
    assert integrity(data) == "ok"

    emu.clear_faults()
    serve(reply_max_tokens=24).start()
    final = ann.wait_for(lambda m: bool(m.callback_data), after=partial.message_id, timeout=120)
    assert final.text == answered[0]["reply_text"]               # the stored answer, with its buttons
    rows = turn_rows(data, ANN)
    assert len(rows) == 1 and rows[0]["status"] == "answered"
    assert json.loads(rows[0]["reply_message_ids"]) == [final.message_id]
    assert integrity(data) == "ok"


@pytest.mark.model
def test_sigterm_cuts_off_replies_after_the_grace_and_exits_within_ten_seconds(emu, serve, tmp_path):
    data = tmp_path / "data"
    bot = serve(reply_max_tokens=1500, shutdown_grace_s=2).start()
    ann, bob = emu.client(ANN, "Ann"), emu.client(BOB, "Bob")
    mid = ann.send_text(LONG)
    ann.wait_for(lambda m: CURSOR.strip() in (m.text or ""), after=mid, timeout=120)
    bob_mid = bob.send_text("hello, are you there?")               # waits behind Ann's reply for the model
    ann.send_text("and after that, count backwards")              # waits in Ann's own chat queue
    wait_until(lambda: turn_rows(data, BOB) and len(turn_rows(data, ANN)) == 2, 30,
               "the waiting messages to be stored", bot)

    started = time.monotonic()
    bot.proc.send_signal(signal.SIGTERM)
    try:
        code = bot.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the bot did not exit within 10 s of SIGTERM\n{bot.tail()}")
    assert time.monotonic() - started < 10
    assert code == 0, bot.tail()

    for user, after, sent in ((ann, mid, 2), (bob, bob_mid, 1)):
        rows = turn_rows(data, user.user_id)
        assert len(rows) == sent and {r["status"] for r in rows} <= {"answered", "failed"}   # none left pending
        shown = [m.text for m in user.bot_messages() if m.message_id > after]
        assert not any(CURSOR.strip() in t for t in shown)                       # nothing left half-written
        for row in rows:                                                         # each told: its reply, or
            assert row["status"] == "answered" or row["reply_text"] == STOPPING  # to send it again
        assert Counter(shown)[STOPPING] == sum(r["status"] == "failed" for r in rows)
        assert all(r["reply_text"] in shown for r in rows)
    assert turn_rows(data, ANN)[0]["status"] == "failed"                         # 1500 tokens take > 2 s
    assert integrity(data) == "ok"
    conn = sqlite3.connect(data / "ouro.db")
    try:                                                                          # post_shutdown ran to the end
        assert conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'bot_stopped'").fetchone()[0] == 1
    finally:
        conn.close()


# --- a flaky Bot API ---------------------------------------------------------------------------
async def test_bot_api_timeouts_drops_429_and_5xx_are_retried_with_backoff_and_nothing_is_lost(emu, make_bot):
    words = " ".join(f"word{i}" for i in range(12))
    # long enough to stream on after the flood wait (an update refused by it is skipped, not retried)
    async with make_bot(FakeEngine([words, "still here"], delay_s=4.0), telegram_timeout_s=1.0,
                        stream_drafts=False) as bot:
        store = bot.store
        emu.inject_fault("getUpdates", None, drop=True, count=2)               # polling loses its connection
        emu.inject_fault("sendMessage", None, drop=True, count=1)              # the reply's first message, dropped
        emu.inject_fault("sendMessage", 429, retry_after=1, count=1)           # then flood control
        emu.inject_fault("editMessageText", None, delay_ms=1300, count=1)      # an edit times out (1 s client timeout)
        emu.inject_fault("editMessageText", 500, count=1)
        emu.inject_fault("editMessageReplyMarkup", 503, count=3)               # the buttons: three 5xx in a row
        carol = emu.client(CAROL, "Carol")
        mid = await carol.asend_text("are you still there?")
        final = await carol.await_for(lambda m: bool(m.callback_data), after=mid, timeout=60)
        assert final.text == words and final.button_texts == ["👍", "👎", "🔁", "✏️"]
        assert [m.message_id for m in await carol.abot_messages() if m.message_id > mid] == [final.message_id]
        turn = store.turn(store.latest_answered_turn(CAROL))
        assert turn.user_text == "are you still there?" and turn.reply_message_ids == [final.message_id]

        calls = [c for c in emu.calls() if str(c["params"].get("chat_id", CAROL)) == str(CAROL)]
        failed = {(c["method"].lower(), c["status"]) for c in calls if c["status"] != 200}
        assert {("getupdates", 0), ("sendmessage", 0), ("sendmessage", 429), ("editmessagetext", 500),
                ("editmessagereplymarkup", 503)} <= failed                      # every fault really happened
        markup = [c["time"] for c in calls if c["method"].lower() == "editmessagereplymarkup"]
        assert len(markup) == 4                                                 # three refused, then done
        gaps = [b - a for a, b in zip(markup, markup[1:], strict=False)]
        assert gaps[0] >= 0.45 and gaps[1] >= 0.95 and gaps[2] >= 1.95          # backoff: 0.5 s, 1 s, 2 s
        edits = [c for c in calls if c["method"].lower() == "editmessagetext"]
        assert edits[1]["status"] == 500 and edits[1]["params"]["text"] == edits[0]["params"]["text"], \
            "the slow edit was not given up (timeout) and sent again"
        assert store.events("error") == []                                      # no crash, nothing for admins

        mid = await carol.asend_text("and now?")                                # and it keeps going
        after = await carol.await_for(lambda m: bool(m.callback_data), after=mid, timeout=30)
        assert after.text == "still here"


# --- a damaged model file ------------------------------------------------------------------------
@pytest.fixture
def lineage3(tmp_path, tiny_models):
    """gen-0000 ← gen-0001 ← gen-0002 (active), all the tiny model, all good."""
    data = tmp_path / "data"
    shutil.copytree(tiny_models, data / "models")
    models = data / "models"
    gguf = (models / "gen-0000" / "model.gguf").read_bytes()
    make_generation(models, "gen-0001", "gen-0000", gguf)
    make_generation(models, "gen-0002", "gen-0001", gguf)
    Lineage(models).set_active("gen-0002")
    return data


@pytest.mark.model
@pytest.mark.parametrize("damage,expected", [
    ("active truncated", "gen-0001"),
    ("active replaced, SHA re-recorded", "gen-0001"),
    ("active and its parent truncated", "gen-0000"),
    ("pointer names no generation", "gen-0002"),
])
async def test_a_corrupt_active_gguf_is_never_loaded_the_bot_falls_back_and_tells_admins(emu, lineage3, damage,
                                                                                         expected):
    models = lineage3 / "models"
    if damage == "pointer names no generation":
        atomic_write_text(models / "ACTIVE", "gen-0009\n")
    else:
        damage_file(models / "gen-0002" / "model.gguf", rerecord="re-recorded" in damage)
        if "parent" in damage:
            damage_file(models / "gen-0001" / "model.gguf", rerecord=False)
    broken_before = {p: p.read_bytes() for p in models.glob("gen-*/model.gguf")}
    settings = load_settings(data_dir=lineage3, admin_ids=[ADMIN], cycle_schedule="off", n_ctx=512,
                             reply_max_tokens=16)
    rt = open_runtime(settings)
    try:
        lineage = Lineage(models)
        assert rt.worker.engine.generation_id == expected and lineage.active_id() == expected
        row = lineage.ledger()[-1]
        assert row["event"] == "fallback" and row["gen_folder"] == expected and row["actor"] == "system"
        broken = "gen-0009" if "pointer" in damage else "gen-0002"
        assert broken in row["reason"] and rt.store.events("fallback")
        assert len(rt.notices) == 1 and f"Started on {expected} instead of {broken}" in rt.notices[0]
        assert {p: p.read_bytes() for p in models.glob("gen-*/model.gguf")} == broken_before   # nothing deleted

        emu.reset()
        app = build_application(settings, rt.store, rt.conversation, token=emu.token, base_url=emu.api_url,
                                notices=rt.notices)
        async with running(app, poll_timeout=1):
            admin, ann = emu.client(ADMIN, "Boss"), emu.client(ANN, "Ann")
            told = await admin.await_for(lambda m: "Started on" in (m.text or ""), timeout=30)
            assert expected in told.text and broken in told.text
            mid = await ann.asend_text("hello")
            await ann.await_for(lambda m: bool(m.callback_data), after=mid, timeout=60)
            assert rt.store.turn(rt.store.latest_answered_turn(ANN)).generation_id == expected
    finally:
        rt.close()


@pytest.mark.model
def test_when_no_generation_passes_its_checks_the_start_fails_naming_each(lineage3):
    models = lineage3 / "models"
    for gen in ("gen-0000", "gen-0001", "gen-0002"):
        damage_file(models / gen / "model.gguf", rerecord=False)
    with pytest.raises(OuroError) as caught:
        open_runtime(load_settings(data_dir=lineage3, cycle_schedule="off"))
    text = str(caught.value)
    assert "no generation can be served" in text and all(g in text for g in ("gen-0000", "gen-0001", "gen-0002"))
    assert Lineage(models).active_id() == "gen-0002"                    # nothing moved when nothing is better
