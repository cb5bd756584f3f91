"""End to end over the Telegram emulator: /review for admins, /privacy /optout /optin /forget for everyone.

The engine is the recording fake; the bot runs without the learning loop (review must work without it).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from bot.gate import ADMIN_ONLY
from bot.privacy import NOT_YOURS
from bot.review import ADMINS_ONLY, EDIT_PROMPT, EMPTY, GONE
from memory.export import reviewed_since
from tests.helpers.fakes import FakeEngine

pytestmark = pytest.mark.e2e
ADMIN, ANN, BOB = 4242, 1001, 1002


async def chat(user, text: str):
    mid = await user.asend_text(text)
    return await user.await_for(lambda m: bool(m.callback_data), after=mid, timeout=15)


async def command(user, text: str, predicate=lambda m: m.text is not None):
    mid = await user.asend_command(text)
    return await user.await_for(predicate, after=mid)


async def answer_of(emu, qid: str, timeout: float = 10) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for a in emu.callback_answers():
            if str(a.get("callback_query_id")) == str(qid) and a.get("answered"):
                return a["answer"]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no answer to callback {qid}")


def is_review(m) -> bool:
    return (m.text or "").startswith("Review · turn") and len(m.callback_data) == 4


async def test_admin_reviews_turns_one_by_one_and_the_verdicts_shape_the_next_cycle(emu, make_bot):
    async with make_bot(FakeEngine(["hello Ann", "a fine joke", "a rude answer", "Lyon"])) as bot:
        ann, bob, admin = emu.client(ANN, "Ann"), emu.client(BOB, "Bob"), emu.client(ADMIN, "Boss")
        await chat(ann, "hi")
        joke = await chat(ann, "tell me a joke")
        await chat(bob, "be rude")
        bobs = await chat(bob, "capital of France?")
        await ann.apress(joke.callback_data[0], joke.message_id)          # 👍: reviewed first
        await ann.await_for(lambda m: m.message_id == joke.message_id and "👍✓" in m.button_texts)
        assert (await command(bob, "/review")).text == ADMIN_ONLY

        first = await command(admin, "/review", is_review)
        assert first.button_texts == ["✅ Approve", "🚫 Reject", "✏️ Edit", "⏭ Skip"]
        assert "🤖 a fine joke" in first.text and "👍 1" in first.text and "👤 hi" in first.text  # with context
        assert "4 waiting" in first.text
        qid = await bob.apress(first.callback_data[0], bobs.message_id, force=True)   # not an admin
        assert (await answer_of(emu, qid))["text"] == ADMINS_ONLY
        assert bot.store.database.scalar("SELECT COUNT(*) FROM reviews") == 0

        await admin.apress(first.callback_data[0], first.message_id)                   # approve
        await admin.await_for(lambda m: m.message_id == first.message_id and "→ ✅ approved" in m.text)
        second = await admin.await_for(is_review, after=first.message_id)
        assert "🤖 hello Ann" in second.text
        await admin.apress(second.callback_data[3], second.message_id)                 # skip
        third = await admin.await_for(is_review, after=second.message_id)
        assert "🤖 a rude answer" in third.text
        await admin.apress(third.callback_data[1], third.message_id)                   # reject
        fourth = await admin.await_for(is_review, after=third.message_id)
        assert "🤖 Lyon" in fourth.text
        await admin.apress(fourth.callback_data[2], fourth.message_id)                 # edit
        prompt = await admin.await_for(lambda m: m.text == EDIT_PROMPT, after=fourth.message_id)
        mid = await admin.asend_text("Paris, of course.")
        await admin.await_for(lambda m: "Saved as the reply" in (m.text or ""), after=max(mid, prompt.message_id))
        last = await admin.await_for(lambda m: "skipped are left" in (m.text or ""), after=mid)
        assert last.text.startswith("Only the 1 turn")
        again = await command(admin, "/review", is_review)                             # the skipped one returns
        assert "🤖 hello Ann" in again.text
        qid = await admin.apress("o1:rv:ok:99999", again.message_id, force=True)       # forged: no such turn
        assert (await answer_of(emu, qid))["text"] == GONE

        verdicts = [r["verdict"] for r in bot.store.database.query("SELECT verdict FROM reviews ORDER BY turn_id")]
        assert verdicts == ["approved", "rejected", "edited"]
        assert len(bot.engine.prompts) == 4                              # the edit never reached the model
        delta = reviewed_since(bot.store, persona="P", since=None)
        assert sorted(e.messages[-1]["content"] for e in delta.examples) == ["Paris, of course.", "a fine joke"]
        assert [(p.chosen, p.rejected) for p in delta.pairs] == [("Paris, of course.", "Lyon")]
        rejected = bot.store.database.scalar("SELECT turn_id FROM reviews WHERE verdict = 'rejected'")
        assert rejected not in {e.turn_id for e in delta.examples} | {p.turn_id for p in delta.pairs}


async def test_review_says_when_there_is_nothing_to_review(emu, make_bot):
    async with make_bot():
        admin = emu.client(ADMIN, "Boss")
        msg = await command(admin, "/review")
        assert msg.text == EMPTY


async def test_privacy_shows_the_training_setting_and_optout_optin_change_it(emu, make_bot):
    async with make_bot(training_opt_out_default=False) as bot:
        ann = emu.client(ANN, "Ann")
        await chat(ann, "hello")
        msg = await command(ann, "/privacy")
        assert "may be used to train" in msg.text and "the default here" in msg.text and "1 messages" in msg.text
        await command(ann, "/optout")
        assert bot.store.training_opt_out(ANN) is True
        msg = await command(ann, "/privacy")
        assert "kept out of training (you chose /optout)" in msg.text
        await command(ann, "/optin")
        assert bot.store.training_opt_out(ANN) is False


async def test_forget_deletes_everything_after_confirmation_and_the_next_chat_starts_fresh(emu, make_bot):
    async with make_bot(FakeEngine(["nice to meet you, Ann", "so so"])) as bot:
        ann, bob = emu.client(ANN, "Ann"), emu.client(BOB, "Bob")
        await chat(ann, "my name is Ann, I live at 12 Zebra Street")
        reply = await chat(ann, "how am I?")
        await ann.apress(reply.callback_data[0], reply.message_id)
        await ann.await_for(lambda m: m.message_id == reply.message_id and "👍✓" in m.button_texts)
        await ann.apress(reply.callback_data[3], reply.message_id)
        prompt = await ann.await_for(lambda m: "✏️" in (m.text or ""), after=reply.message_id)
        mid = await ann.asend_text("Zebra-grand, thanks")
        await ann.await_for(lambda m: "noted as a better answer" in (m.text or ""), after=max(mid, prompt.message_id))
        bobs = await chat(bob, "hi, Bob here")
        assert "Zebra" in reviewed_since(bot.store, persona="P", since=None).to_jsonl()

        ask = await command(ann, "/forget", lambda m: len(m.callback_data) == 2)
        assert "2 messages" in ask.text and ask.button_texts == ["🗑 Yes, forget me", "Cancel"]
        qid = await bob.apress(ask.callback_data[0], bobs.message_id, force=True)     # not Bob's to press
        assert (await answer_of(emu, qid))["text"] == NOT_YOURS
        assert bot.store.user_data_counts(ANN)["messages"] == 2
        await ann.apress(ask.callback_data[0], ask.message_id)
        done = await ann.await_for(lambda m: m.message_id == ask.message_id and "Done" in (m.text or ""))
        assert "2 messages" in done.text and not done.callback_data

        cells = [str(v) for t in ("users", "chats", "sessions", "turns", "ratings", "corrections", "preferences",
                                  "alternatives", "awaiting_corrections", "events", "reviews", "tombstones")
                 for row in bot.store.database.query(f"SELECT * FROM {t}") for v in row.values()]
        assert not [c for c in cells if c == str(ANN) or "Zebra" in c or "Ann" in c]
        assert "Zebra" not in reviewed_since(bot.store, persona="P", since=None).to_jsonl()
        assert len(bot.store.tombstones()) == 1 and ANN in bot.engine.forgotten
        assert bot.store.user_data_counts(BOB)["messages"] == 1                     # Bob is untouched

        await chat(ann, "do you know me?")                                             # starts from nothing
        assert [m["role"] for m in bot.engine.prompts[-1]] == ["system", "user"]
        old = await ann.apress(reply.callback_data[0], reply.message_id, force=True)  # buttons of forgotten turns
        assert "can't act" in (await answer_of(emu, old))["text"]
