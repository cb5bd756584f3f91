"""The conversation logic with a fake engine that records the exact prompt it got."""

from __future__ import annotations

import asyncio

import pytest

from config.settings import load_settings
from engine.worker import InferenceWorker
from memory.store import Store
from serving.conversation import BUSY, EMPTY, FAILED, TOO_LONG, Conversation, Speaker
from tests.helpers.fakes import FakeEngine, word_count

ANN = Speaker(chat_id=100, user_id=7, first_name="Ann")


async def test_prompt_is_persona_then_history_then_new_message(conversation, fake_engine, settings):
    fake_engine.replies.extend(["hello Ann", "blue, obviously"])
    first = await conversation.handle_text(ANN, "hi, I'm Ann")
    second = await conversation.handle_text(ANN, "favourite colour?")
    assert first.kind == second.kind == "answered" and second.text == "blue, obviously"
    assert fake_engine.prompts[-1] == [
        {"role": "system", "content": settings.persona()},
        {"role": "user", "content": "hi, I'm Ann"},
        {"role": "assistant", "content": "hello Ann"},
        {"role": "user", "content": "favourite colour?"},
    ]
    t = conversation.store.turn(second.turn_id)
    assert t.reply_text == "blue, obviously" and t.generation_id == "gen-0000"


async def test_context_is_rebuilt_from_sqlite_after_a_restart(settings, tmp_path):
    store = Store.open(settings.db_path)
    engine = FakeEngine(["one", "two"])
    worker = InferenceWorker(engine)
    conv = Conversation(settings, store, worker)
    await conv.handle_text(ANN, "first")
    await conv.handle_text(ANN, "second")
    worker.close()
    store.close()
    # a new process: new store, new engine, same database file
    store2 = Store.open(settings.db_path)
    engine2 = FakeEngine(["three"])
    worker2 = InferenceWorker(engine2)
    await Conversation(settings, store2, worker2).handle_text(ANN, "third")
    assert [m["content"] for m in engine2.prompts[0][1:]] == ["first", "one", "second", "two", "third"]
    worker2.close()
    store2.close()


async def test_trimming_at_the_budget_keeps_the_newest_turns(tmp_path):
    settings = load_settings(data_dir=tmp_path / "d", reply_max_tokens=50)
    store = Store.open(settings.db_path)
    engine = FakeEngine(n_ctx=300)
    conv = Conversation(settings, store, InferenceWorker(engine))
    for i in range(25):
        await conv.handle_text(ANN, f"message number {i} " + "pad " * 10)
    for prompt in engine.prompts:
        assert word_count(prompt) <= 300 - 50
        assert prompt[0]["role"] == "system"
    last = engine.prompts[-1]
    assert last[-1]["content"].startswith("message number 24")
    assert "message number 0 " not in " ".join(m["content"] for m in last)
    # the served window is recorded: training later sees exactly this context
    t = store.database.one("SELECT context_start_turn_id FROM turns ORDER BY id DESC LIMIT 1")
    assert t["context_start_turn_id"] > 1
    store.close()


async def test_reset_empties_the_context(conversation, fake_engine):
    await conversation.handle_text(ANN, "remember me")
    conversation.reset(ANN)
    await conversation.handle_text(ANN, "who am I?")
    assert [m["role"] for m in fake_engine.prompts[-1]] == ["system", "user"]


async def test_bad_input_is_stored_and_answered_kindly(conversation, fake_engine, settings):
    empty = await conversation.handle_text(ANN, "   ")
    long = await conversation.handle_text(ANN, "x" * (settings.max_input_chars + 1))
    assert (empty.kind, empty.text) == ("refused", EMPTY)
    assert (long.kind, long.text) == ("refused", TOO_LONG)
    assert fake_engine.prompts == []  # the model never saw either
    rows = conversation.store.database.query("SELECT status, length(user_text) AS n FROM turns ORDER BY id")
    assert rows == [{"status": "refused", "n": 3}, {"status": "refused", "n": settings.max_input_chars + 1}]


async def test_model_failure_keeps_the_turn_and_reports_the_error(settings, store):
    conv = Conversation(settings, store, InferenceWorker(FakeEngine(fail_with=RuntimeError("kaboom"))))
    out = await conv.handle_text(ANN, "hello?")
    assert out.kind == "failed" and out.text == FAILED and "kaboom" in str(out.error)
    assert "kaboom" not in out.text
    assert store.turn(out.turn_id).status == "failed" and store.turn(out.turn_id).user_text == "hello?"


async def test_correction_is_not_sent_to_the_model(conversation, fake_engine):
    out = await conversation.handle_text(ANN, "say something")
    conversation.store.await_correction(ANN.chat_id, ANN.user_id, out.turn_id)
    corr = await conversation.handle_text(ANN, "a much better answer")
    assert corr.kind == "correction" and corr.turn_id == out.turn_id
    assert len(fake_engine.prompts) == 1


async def test_two_chats_at_once_are_both_answered_in_order(settings, store):
    engine = FakeEngine(["for ann", "for bob"], delay_s=0.05)
    conv = Conversation(settings, store, InferenceWorker(engine))
    bob = Speaker(chat_id=200, user_id=8)
    a, b = await asyncio.gather(conv.handle_text(ANN, "from ann"), conv.handle_text(bob, "from bob"))
    assert (a.text, b.text) == ("for ann", "for bob")
    assert engine.chat_keys == [100, 200]


async def test_the_warm_up_plan_marks_a_chat_whose_reply_is_under_way(settings, store):
    """The hot-swap's read-ahead must know a chat's newest words are not in the plan yet."""
    conv = Conversation(settings, store, InferenceWorker(FakeEngine(["first", "second"], delay_s=0.3)))
    await conv.handle_text(ANN, "hello")
    assert [(chat, busy) for chat, _, busy in conv.warmup_plan(4)] == [(ANN.chat_id, False)]
    task = asyncio.create_task(conv.handle_text(ANN, "again"))
    await asyncio.sleep(0.1)
    (chat, messages, busy), = conv.warmup_plan(4)
    assert busy and messages[-1]["content"] == "first"      # the reply under way is not in it yet
    await task
    (chat, messages, busy), = conv.warmup_plan(4)
    assert not busy and [m["content"] for m in messages[-2:]] == ["again", "second"]
    conv.worker.close()


async def test_backlog_bound_gives_busy_and_stores_the_turn(settings, store):
    engine = FakeEngine(delay_s=0.2)
    conv = Conversation(settings, store, InferenceWorker(engine, max_backlog=1))
    results = await asyncio.gather(*(conv.handle_text(Speaker(chat_id=300 + i, user_id=9), f"m{i}") for i in range(3)))
    kinds = sorted(r.kind for r in results)
    assert kinds == ["answered", "busy", "busy"]
    busy = [r for r in results if r.kind == "busy"]
    assert all(r.text == BUSY and store.turn(r.turn_id).status == "busy" for r in busy)


async def test_regenerate_uses_the_same_context_and_stores_an_alternative(conversation, fake_engine):
    fake_engine.replies.extend(["first take", "second take"])
    out = await conversation.handle_text(ANN, "tell me a joke")
    alt_id, text = await conversation.regenerate(out.turn_id)
    assert text == "second take"
    assert fake_engine.prompts[0] == fake_engine.prompts[1]
    assert conversation.store.alternative(alt_id)["turn_id"] == out.turn_id


async def test_regenerate_refuses_unanswered_turn(conversation):
    out = await conversation.handle_text(ANN, "  ")
    with pytest.raises(ValueError):
        await conversation.regenerate(out.turn_id)


async def test_a_turn_forgotten_while_it_waited_ends_quietly(conversation, fake_engine):
    """/forget confirmed while the message waited its chat's turn: nothing left to answer."""
    received = conversation.receive(ANN, "are you there?")
    conversation.store.forget_user(ANN.user_id)
    out = await conversation.answer(received.turn_id)
    assert out.kind == "gone" and out.error is None and fake_engine.prompts == []


async def test_a_second_take_on_a_turn_forgotten_meanwhile_is_dropped(settings, store):
    """/forget confirmed while 🔁 was being written: the take is not stored, and that is no error."""

    class ForgetsMidway(FakeEngine):
        def generate(self, messages, **kwargs):
            completion = super().generate(messages, **kwargs)
            if len(self.prompts) == 2:
                store.forget_user(ANN.user_id)
            return completion

    worker = InferenceWorker(ForgetsMidway(), max_backlog=4)
    try:
        conv = Conversation(settings, store, worker)
        out = await conv.handle_text(ANN, "tell me a joke")
        alt_id, text = await conv.regenerate(out.turn_id)
        assert alt_id is None and text == "echo: tell me a joke"   # written, not kept
        assert store.database.scalar("SELECT COUNT(*) FROM alternatives") == 0
        assert await conv.regenerate(out.turn_id) == (None, "")    # and one asked for once it is gone
    finally:
        worker.close()
