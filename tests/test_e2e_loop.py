"""The loop closed inside the running bot, over HTTP to the Telegram emulator, with real llama.cpp:
chat → 👍 → /train → a promoted generation answers → /rollback → the parent answers again;
and replies keep flowing through ten hot-swaps."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from bot.app import build_application, running
from bot.gate import ADMIN_ONLY
from config.settings import load_settings
from core.files import atomic_write_text, now, sha256_file
from lineage.generations import Lineage, packaged_base_gguf
from serving.runtime import open_runtime
from tests.helpers.lineages import LENIENT

pytestmark = [pytest.mark.e2e, pytest.mark.model]
ADMIN, ANN, EVE = 4242, 1001, 6666


async def reply_to(user, text: str, timeout: float = 30):
    mid = await user.asend_text(text)
    return await user.await_for(lambda m: bool(m.callback_data) or "sorry" in (m.text or "").lower(),
                                after=mid, timeout=timeout)


async def command(user, text: str, predicate, timeout: float = 20):
    name, _, args = text.partition(" ")
    mid = await user.asend_command(name, args)
    return await user.await_for(lambda m: m.text is not None and predicate(m), after=mid, timeout=timeout)


def latest_generation(store, chat_id: int) -> str:
    return store.turn(store.latest_answered_turn(chat_id)).generation_id


async def test_train_promote_and_rollback_from_the_chat(emu, tmp_path, tiny_models):
    emu.reset()
    data = tmp_path / "data"
    shutil.copytree(tiny_models, data / "models")
    settings = load_settings(data_dir=data, admin_ids=[ADMIN], stream_edit_interval_s=0.2, cycle_schedule="off",
                             reply_max_tokens=12, n_ctx=1024, **LENIENT)
    rt = open_runtime(settings)
    app = build_application(settings, rt.store, rt.conversation, token=emu.token, base_url=emu.api_url,
                            learning=True)
    try:
        async with running(app, poll_timeout=1):
            ann, eve, admin = emu.client(ANN, "Ann"), emu.client(EVE, "Eve"), emu.client(ADMIN, "Boss")
            for i in range(8):
                msg = await reply_to(ann, f"tell me about topic {i}")
                await ann.apress(msg.callback_data[0], msg.message_id)
                await ann.await_for(lambda m, mid=msg.message_id: m.message_id == mid and "👍✓" in m.button_texts)
            assert latest_generation(rt.store, ANN) == "gen-0000"

            refused = await command(eve, "/rollback", lambda m: True)
            assert refused.text == ADMIN_ONLY
            assert rt.store.events("admin_refused")[0]["user_id"] == EVE

            started = await command(admin, "/train", lambda m: "cycle" in m.text)
            assert "started" in started.text
            busy = await command(admin, "/train", lambda m: "already running" in m.text or "stage" in m.text)
            assert "already running" in busy.text
            status = await command(admin, "/status", lambda m: "Cycle:" in m.text)
            assert "cycle running" in status.text and "Training: scheduled training is off" in status.text
            done = await admin.await_for(lambda m: "promoted" in (m.text or "") or "refused" in (m.text or "")
                                         or "failed" in (m.text or ""), after=started.message_id, timeout=600)
            assert "gen-0001 promoted and now serving" in done.text, done.text
            assert "/evals gen-0001" in done.text and "recall" in done.text

            await reply_to(ann, "and now?")
            assert latest_generation(rt.store, ANN) == "gen-0001"

            table = await command(admin, "/generations", lambda m: "gen" in m.text)
            assert "*0001" in table.text.replace(" ", "") and "0000" in table.text
            evals = await command(admin, "/evals gen-0001", lambda m: "recall" in m.text)
            assert "vs its parent gen-0000: passed" in evals.text
            mid = await admin.asend_command("/lineage")
            chart = await admin.await_for(lambda m: m.kind == "photo", after=mid, timeout=30)
            assert "active gen-0001" in (chart.caption or "")

            ask = await command(admin, "/rollback too chatty", lambda m: bool(m.callback_data))
            assert "gen-0001 to gen-0000" in ask.text
            # a non-admin forging the confirmation (on a message in her own chat) is refused and logged
            await eve.apress(ask.callback_data[0], refused.message_id, force=True)
            for _ in range(50):
                if len(rt.store.events("admin_refused")) == 2:
                    break
                await asyncio.sleep(0.1)
            assert len(rt.store.events("admin_refused")) == 2
            assert Lineage(settings.models_dir).active_id() == "gen-0001"
            await admin.apress(ask.callback_data[0], ask.message_id)
            done = await admin.await_for(lambda m: m.message_id == ask.message_id and "Rolled back" in (m.text or ""),
                                         timeout=30)
            assert "Now serving gen-0000" in done.text
            await reply_to(ann, "and now, again?")
            assert latest_generation(rt.store, ANN) == "gen-0000"
            last = Lineage(settings.models_dir).ledger()[-1]
            assert last["event"] == "rollback" and last["actor"] == f"Boss ({ADMIN})"
            assert "too chatty" in last["reason"]
    finally:
        rt.close()


def copy_generation(models, gen_id: str, parent: str, source) -> None:
    folder = models / gen_id
    folder.mkdir()
    shutil.copyfile(source, folder / "model.gguf")
    meta = {"id": gen_id, "parent_id": parent, "gguf": "model.gguf", "created_at": now("seconds"),
            "gguf_sha256": sha256_file(folder / "model.gguf"), "status": "promoted"}
    atomic_write_text(folder / "meta.json", json.dumps(meta))


async def test_replies_keep_flowing_through_ten_hot_swaps(emu, tmp_path):
    emu.reset()
    settings = load_settings(data_dir=tmp_path / "data", admin_ids=[ADMIN], stream_edit_interval_s=0.2,
                             cycle_schedule="off", reply_max_tokens=16, temperature=0.0, swap_warm_tokens=256,
                             flood_messages=10_000)   # three fast chatters; flood control is not what is tested
    rt = open_runtime(settings)   # registers the packaged SmolLM2 as gen-0000
    copy_generation(settings.models_dir, "gen-0001", "gen-0000", packaged_base_gguf())
    app = build_application(settings, rt.store, rt.conversation, token=emu.token, base_url=emu.api_url,
                            learning=True)
    loop = app.bot_data["learning"]
    users = [emu.client(2000 + i, f"User{i}") for i in range(3)]
    try:
        async with running(app, poll_timeout=1):
            stop = asyncio.Event()
            sent: list[int] = []

            async def chatter(user) -> None:
                n = 0
                while not stop.is_set():
                    if n and n % 6 == 0:
                        # a fresh conversation now and then, as people do: without it three chats
                        # talking non-stop grow ~1500-token histories that each swap's new model must
                        # re-read (the warm-up here is kept to 256 tokens for speed) — minutes of
                        # reading on a slow CI machine, which is not what this test is about
                        rid = await user.asend_command("/reset")
                        await user.await_for(lambda m: "Fresh start" in (m.text or ""), after=rid, timeout=60)
                    mid = await user.asend_text(f"message {n} from {user.user_id}")
                    # a finished reply carries the four buttons; an apology or a lost update never does
                    msg = await user.await_for(lambda m: bool(m.callback_data), after=mid, timeout=60)
                    assert len(msg.callback_data) == 4
                    sent.append(user.user_id)
                    n += 1

            tasks = [asyncio.create_task(chatter(u)) for u in users]
            served = []
            for i in range(10):
                target = "gen-0001" if i % 2 == 0 else "gen-0000"
                result = await loop.promote(target, actor="test", why=f"swap {i}")
                assert result is not None and result.ok, result
                served.append(rt.worker.engine.generation_id)
                await asyncio.sleep(0.3)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
        assert served == ["gen-0001", "gen-0000"] * 5
        assert loop.swapper.swaps == 10
        turns = rt.store.database.query("SELECT status, generation_id FROM turns")
        assert len(turns) == len(sent) and len(sent) >= 10
        assert {t["status"] for t in turns} == {"answered"}                 # nothing failed, nothing lost
        assert {t["generation_id"] for t in turns} == {"gen-0000", "gen-0001"}
        assert len(rt.store.events("hot_swap")) == 10
    finally:
        rt.close()
