"""End to end over real HTTP: python-telegram-bot polling the local Telegram emulator.

The engine is the recording fake here (fast and exact); tests/test_real_model.py runs the
same path on the packaged GGUF.
"""

from __future__ import annotations

import pytest

from bot.buttons import ASK_REASON, NOT_YOURS, REASON_NOT_DOWN, REASON_NOTED
from bot.chat import CORRECTION_THANKS, NON_TEXT
from bot.commands import COMMANDS
from bot.gate import ADMIN_ONLY, NOT_ALLOWED
from bot.splitting import split_text
from config.settings import load_settings
from memory.store import Store
from tests.helpers.fakes import FakeEngine

pytestmark = pytest.mark.e2e
ADMIN, ANN, BOB, EVE = 4242, 1001, 1002, 6666


async def reply_to(user, text: str, timeout: float = 15):
    mid = await user.asend_text(text)
    msg = await user.await_for(lambda m: bool(m.callback_data) or "sorry" in (m.text or "").lower(),
                               after=mid, timeout=timeout)
    return mid, msg


async def test_message_gets_a_streamed_reply_with_four_buttons(emu, make_bot):
    async with make_bot(FakeEngine(["hello there, friend"])) as bot:
        ann = emu.client(ANN, "Ann")
        mid, msg = await reply_to(ann, "hi!")
        assert msg.text == "hello there, friend"
        assert msg.button_texts == ["👍", "👎", "🔁", "✏️"]
        turn = bot.store.turn(bot.store.latest_answered_turn(ANN))
        assert turn.user_text == "hi!" and turn.reply_text == "hello there, friend"
        assert turn.reply_message_ids == [msg.message_id]
        assert bot.engine.prompts[0][-1] == {"role": "user", "content": "hi!"}
        assert "typing" in ann.chat_actions()
        names = {c["command"] for c in emu.bot_commands()}
        assert {c.name for c in COMMANDS if not c.admin} <= names


async def test_thumbs_up_is_stored_once_and_can_change(emu, make_bot):
    async with make_bot() as bot:
        ann = emu.client(ANN, "Ann")
        _, msg = await reply_to(ann, "rate me")
        turn_id = bot.store.latest_answered_turn(ANN)
        await ann.apress(msg.callback_data[0], msg.message_id)
        await ann.await_for(lambda m: m.message_id == msg.message_id and "👍✓" in m.button_texts)
        assert bot.store.rating(turn_id, ANN) == 1
        await ann.apress(msg.callback_data[1], msg.message_id)
        await ann.await_for(lambda m: m.message_id == msg.message_id and "👎✓" in m.button_texts)
        assert bot.store.rating(turn_id, ANN) == -1
        assert bot.store.stats()["ratings_down"] == 1 and bot.store.stats()["ratings_up"] == 0


async def test_thumbs_down_offers_one_tap_on_why_and_stores_it_with_the_rating(emu, make_bot):
    async with make_bot() as bot:
        ann = emu.client(ANN, "Ann")
        _, msg = await reply_to(ann, "rate me down")
        turn_id = bot.store.latest_answered_turn(ANN)
        qid = await ann.apress(msg.callback_data[1], msg.message_id)
        menu = await ann.await_for(lambda m: m.message_id == msg.message_id and "too long" in m.button_texts)
        assert (await _answer(emu, qid))["text"] == ASK_REASON
        assert menu.button_texts == ["👍", "👎✓", "🔁", "✏️", "too long", "off-topic", "wrong", "rude",
                                     "not like you", "other"]
        qid = await ann.apress(menu.callback_data[menu.button_texts.index("not like you")], msg.message_id)
        await ann.await_for(lambda m: m.message_id == msg.message_id and m.button_texts == ["👍", "👎✓", "🔁", "✏️"])
        assert (await _answer(emu, qid))["text"] == REASON_NOTED.format("not like you")
        assert bot.store.rating(turn_id, ANN) == -1 and bot.store.rating_reasons(turn_id) == ["not like you"]
        # a stale reason button after the 👎 became a 👍 changes nothing
        await ann.apress(msg.callback_data[0], msg.message_id)
        await ann.await_for(lambda m: m.message_id == msg.message_id and "👍✓" in m.button_texts)
        qid = await ann.apress(menu.callback_data[menu.button_texts.index("rude")], msg.message_id, force=True)
        assert (await _answer(emu, qid))["text"] == REASON_NOT_DOWN
        assert bot.store.rating(turn_id, ANN) == 1 and bot.store.rating_reasons(turn_id) == []


async def test_regenerate_then_pick_is_a_preference(emu, make_bot):
    async with make_bot(FakeEngine(["take one", "take two"])) as bot:
        ann = emu.client(ANN, "Ann")
        _, msg = await reply_to(ann, "joke please")
        await ann.apress(msg.callback_data[2], msg.message_id)
        alt = await ann.await_for(lambda m: m.text == "take two" and len(m.callback_data) == 2,
                                  after=msg.message_id)
        assert alt.button_texts == ["Keep the first", "Keep this one"]
        await ann.apress(alt.callback_data[1], alt.message_id)
        await ann.await_for(lambda m: m.message_id == alt.message_id and not m.callback_data)
        pref = bot.store.database.one("SELECT chosen, rejected, source FROM preferences")
        assert pref == {"chosen": "take two", "rejected": "take one", "source": "regenerate"}
        # the same prompt was used for both samples
        assert bot.engine.prompts[0] == bot.engine.prompts[1]


async def test_correction_is_stored_and_not_sent_as_chat(emu, make_bot):
    async with make_bot(FakeEngine(["meh answer"])) as bot:
        ann = emu.client(ANN, "Ann")
        _, msg = await reply_to(ann, "what's 2+2?")
        await ann.apress(msg.callback_data[3], msg.message_id)
        prompt = await ann.await_for(lambda m: "✏️" in (m.text or ""), after=msg.message_id)
        mid = await ann.asend_text("It's 4, obviously!")
        await ann.await_for(lambda m: m.text == CORRECTION_THANKS, after=max(mid, prompt.message_id))
        assert bot.store.database.one("SELECT text FROM corrections") == {"text": "It's 4, obviously!"}
        assert bot.store.database.one("SELECT chosen, rejected FROM preferences") == {
            "chosen": "It's 4, obviously!", "rejected": "meh answer"}
        assert len(bot.engine.prompts) == 1


async def test_reset_starts_with_an_empty_context(emu, make_bot):
    async with make_bot() as bot:
        ann = emu.client(ANN, "Ann")
        await reply_to(ann, "remember the word banana")
        mid = await ann.asend_command("/reset")
        await ann.await_for(lambda m: "Fresh start" in (m.text or ""), after=mid)
        await reply_to(ann, "what was the word?")
        assert [m["role"] for m in bot.engine.prompts[-1]] == ["system", "user"]


async def test_disallowed_user_is_refused_politely_and_nothing_is_stored(emu, make_bot):
    async with make_bot(allowed_user_ids=[ANN]) as bot:
        eve = emu.client(EVE, "Eve")
        mid = await eve.asend_text("let me in")
        msg = await eve.await_for(lambda m: m.text is not None, after=mid)
        assert msg.text == NOT_ALLOWED
        assert bot.engine.prompts == []
        assert bot.store.stats()["turns"] == 0
        assert bot.store.events("user_refused")[0]["user_id"] == EVE


async def test_status_is_for_admins_only(emu, make_bot):
    async with make_bot() as bot:
        bob = emu.client(BOB, "Bob")
        mid = await bob.asend_command("/status")
        msg = await bob.await_for(lambda m: m.text is not None, after=mid)
        assert msg.text == ADMIN_ONLY
        assert bot.store.events("admin_refused")[0]["user_id"] == BOB
        admin = emu.client(ADMIN, "Boss")
        mid = await admin.asend_command("/status")
        msg = await admin.await_for(lambda m: m.text is not None, after=mid)
        assert "Active generation" in msg.text and "Queue depth" in msg.text and "SHA-256" in msg.text
        assert f"Runs on: {bot.engine.placement}" in msg.text          # where the served model's layers are


async def test_reply_longer_than_4096_is_split_with_buttons_on_the_last_part(emu, make_bot):
    long_reply = " ".join(f"word{i}" for i in range(1500))  # ~11k characters
    async with make_bot(FakeEngine([long_reply])) as bot:
        ann = emu.client(ANN, "Ann")
        mid = await ann.asend_text("tell me everything")
        last = await ann.await_for(lambda m: bool(m.callback_data), after=mid, timeout=20)
        parts = [m for m in await ann.abot_messages() if m.message_id > mid]
        assert len(parts) == len(split_text(long_reply, 4094)) and all(len(p.text) <= 4096 for p in parts)
        assert " ".join(p.text for p in parts).split() == long_reply.split()
        assert parts[-1].message_id == last.message_id and not parts[0].callback_data
        turn = bot.store.turn(bot.store.latest_answered_turn(ANN))
        assert turn.reply_message_ids == [p.message_id for p in parts]


async def test_buttons_of_someone_else_or_forged_data_change_nothing(emu, make_bot):
    async with make_bot() as bot:
        me = (await bot.app.bot.get_me()).username
        group = -5005
        ann = emu.client(ANN, "Ann", chat_id=group, chat_type="group")
        bob = emu.client(BOB, "Bob", chat_id=group, chat_type="group")
        mid = await ann.asend_text("chatting among ourselves")  # not addressed to the bot: ignored
        _, msg = await reply_to(ann, f"@{me} mine")
        assert bot.engine.prompts[0][-1]["content"] == "Ann: mine"  # mention stripped, author named (a group)
        assert msg.message_id > mid and len(bot.engine.prompts) == 1
        qid = await bob.apress(msg.callback_data[0], msg.message_id)
        assert (await _answer(emu, qid))["text"] == NOT_YOURS
        qid = await ann.apress("o1:up:999999", msg.message_id, force=True)
        assert "can't act" in (await _answer(emu, qid))["text"]
        qid = await ann.apress("rm -rf /", msg.message_id, force=True)
        assert "can't act" in (await _answer(emu, qid))["text"]
        assert bot.store.stats()["ratings_up"] == 0
        # a reply to the bot's message counts as addressing it
        mid = await bob.asend_text("and me?", reply_to=msg.message_id)
        await bob.await_for(lambda m: bool(m.callback_data), after=mid)
        assert len(bot.engine.prompts) == 2


async def _answer(emu, qid: str, timeout: float = 10):
    import asyncio
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for a in emu.callback_answers():
            if str(a.get("callback_query_id")) == str(qid) and a.get("answered"):
                return a["answer"]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no answer to callback {qid}")


async def test_stickers_and_unknown_commands_get_a_kind_reply(emu, make_bot):
    async with make_bot() as bot:
        ann = emu.client(ANN, "Ann")
        mid = ann.send_sticker("🐱")
        msg = await ann.await_for(lambda m: m.text is not None, after=mid)
        assert msg.text == NON_TEXT
        mid = await ann.asend_command("/frobnicate")
        msg = await ann.await_for(lambda m: m.text is not None, after=mid)
        assert "/help" in msg.text
        assert bot.engine.prompts == []


async def test_restart_mid_conversation_keeps_the_context(emu, make_bot):
    async with make_bot(FakeEngine(["nice to meet you, Ann"])):
        ann = emu.client(ANN, "Ann")
        await reply_to(ann, "my name is Ann")
    # a new process: new store, engine and application over the same database
    async with make_bot(FakeEngine(["you are Ann"])) as bot:
        ann = emu.client(ANN, "Ann")
        _, msg = await reply_to(ann, "what's my name?")
        assert msg.text == "you are Ann"
        contents = [m["content"] for m in bot.engine.prompts[0]]
        assert contents[1:] == ["my name is Ann", "nice to meet you, Ann", "what's my name?"]


async def test_a_reply_cut_off_by_a_crash_is_followed_up_after_restart(emu, make_bot, tmp_path):
    """The message was stored but the process died before answering: after restart the user
    is asked to resend, and the turn is closed (never left pending)."""
    settings = load_settings(data_dir=tmp_path / "data")
    store = Store.open(settings.db_path)
    turn_id = store.add_user_turn(chat_id=ANN, user_id=ANN, text="are you there?")
    store.close()
    async with make_bot() as bot:
        ann = emu.client(ANN, "Ann")
        msg = await ann.await_for(lambda m: "send it again" in (m.text or ""))
        assert "are you there?" in msg.text
        assert bot.store.turn(turn_id).status == "failed" and bot.store.pending_turns() == []


async def test_flood_control_and_server_errors_are_retried_and_nothing_is_lost(emu, make_bot):
    async with make_bot(FakeEngine(["survived the flood"])) as bot:
        emu.inject_fault("sendMessage", 429, retry_after=1, count=1)
        emu.inject_fault("editMessageText", 502, count=1)
        ann = emu.client(ANN, "Ann")
        _, msg = await reply_to(ann, "are you there?", timeout=30)
        assert msg.text == "survived the flood"
        assert bot.store.turn(bot.store.latest_answered_turn(ANN)).reply_message_ids == [msg.message_id]


async def test_a_slow_reply_streams_in_with_throttled_edits(emu, make_bot):
    """Edit-based streaming (groups; private chats with drafts off: tests/test_drafts.py has drafts)."""
    words = " ".join(f"w{i}" for i in range(40))
    async with make_bot(FakeEngine([words], delay_s=1.5), stream_drafts=False):
        ann = emu.client(ANN, "Ann")
        mid = await ann.asend_text("go slowly")
        final = await ann.await_for(lambda m: bool(m.callback_data), after=mid, timeout=20)
        assert final.text == words
        assert 2 <= final.edit_count <= 10  # ~1.5 s at one edit per 0.2 s, not one edit per word (40)
        calls = emu.calls("editMessageText")
        assert len(calls) + 1 == final.edit_count  # text edits, then one edit that adds the buttons


async def test_edited_messages_are_ignored(emu, make_bot):
    async with make_bot() as bot:
        ann = emu.client(ANN, "Ann")
        mid, msg = await reply_to(ann, "first version")
        ann.edit_text(mid, "second version")
        mid2, _ = await reply_to(ann, "next")
        assert [p[-1]["content"] for p in bot.engine.prompts] == ["first version", "next"]
        kept = bot.store.database.query("SELECT detail FROM events WHERE kind = 'edited_message'")
        assert len(kept) == 1 and "second version" in kept[0]["detail"]   # kept, never trained


async def test_a_model_failure_shows_users_a_kind_word_and_admins_the_traceback(emu, make_bot):
    async with make_bot(FakeEngine(fail_with=RuntimeError("kaboom in llama"))) as bot:
        ann, admin = emu.client(ANN, "Ann"), emu.client(ADMIN, "Boss")
        mid = await ann.asend_text("hello?")
        msg = await ann.await_for(lambda m: m.text is not None and "▌" not in m.text, after=mid)
        assert "went wrong" in msg.text and "kaboom" not in msg.text and "Traceback" not in msg.text
        alert = await admin.await_for(lambda m: "Traceback" in (m.text or ""))
        assert "kaboom in llama" in alert.text and emu.token not in alert.text
        assert bot.store.turn(bot.store.stats()["turns"]).status == "failed"
