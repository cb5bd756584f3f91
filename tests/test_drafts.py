"""Private chats stream a reply as a native draft and then get one final message; groups stream by
editing; a server that refuses drafts costs one call, and the reply still arrives whole."""

from __future__ import annotations

import asyncio
import time

import pytest
from telegram.error import BadRequest, RetryAfter, TimedOut

from bot.drafts import DraftChats
from bot.streaming import GROUP_INTERVAL_S, StreamingReply
from tests.helpers.fakes import FakeEngine

ANN, BOB = 1001, 1002
GROUP = -5005
WORDS = " ".join(f"w{i}" for i in range(40))


# --- the fallback rules, without Telegram ------------------------------------------------------
class ScriptedBot:
    """Answers sendMessageDraft from a script of errors (then True); sends and edits always work."""

    def __init__(self, *draft_errors: Exception) -> None:
        self.draft_errors = list(draft_errors)
        self.calls: list[tuple[str, str]] = []

    async def send_message_draft(self, chat_id: int, draft_id: int, text: str, **kw) -> bool:
        self.calls.append(("draft", text))
        if self.draft_errors:
            raise self.draft_errors.pop(0)
        return True

    async def send_message(self, chat_id: int, text: str, **kw):
        self.calls.append(("send", text))
        return type("Sent", (), {"message_id": len(self.calls)})()

    async def edit_message_text(self, text: str, **kw):
        self.calls.append(("edit", text))


def test_a_refusal_is_remembered_for_a_while():
    now = [0.0]
    drafts = DraftChats(retry_after_s=60, clock=lambda: now[0])
    drafts.refused(ANN)
    assert not drafts.allowed(ANN) and drafts.allowed(BOB)
    now[0] = 61
    assert drafts.allowed(ANN)


@pytest.mark.parametrize("error", [TimedOut(), RetryAfter(0)])
async def test_a_timeout_or_flood_wait_skips_one_draft_update_and_keeps_drafts(error):
    bot, drafts = ScriptedBot(error), DraftChats()
    reply = StreamingReply(bot, ANN, drafts=drafts)
    reply.push("one")
    await reply._flush(streaming=True)
    reply.push(" two")
    await reply._flush(streaming=True)
    assert await reply.finish() == [3]
    assert bot.calls == [("draft", "one"), ("draft", "one two"), ("send", "one two")] and drafts.allowed(ANN)


async def test_a_refused_draft_falls_back_to_editing_at_once():
    bot, drafts = ScriptedBot(BadRequest("Bad Request: TEXTDRAFT_PEER_INVALID")), DraftChats()
    reply = StreamingReply(bot, ANN, drafts=drafts)
    reply.push("one")
    await reply._flush(streaming=True)
    reply.push(" two")
    await reply._flush(streaming=True)
    await reply.finish()
    assert bot.calls == [("draft", "one"), ("send", "one ▌"), ("edit", "one two ▌"), ("edit", "one two")]
    assert not drafts.allowed(ANN)
    assert StreamingReply(bot, ANN, drafts=drafts).drafts is None     # the chat's next reply edits too


class FloodedBot(ScriptedBot):
    """Its first edit is refused by flood control for `wait` seconds; records when each call came."""

    def __init__(self, wait: int) -> None:
        super().__init__()
        self.wait, self.times = wait, []

    async def send_message(self, chat_id: int, text: str, **kw):
        self.times.append(time.monotonic())
        return await super().send_message(chat_id, text, **kw)

    async def edit_message_text(self, text: str, **kw):
        self.times.append(time.monotonic())
        self.calls.append(("edit", text))
        if self.wait:
            wait, self.wait = self.wait, 0
            raise RetryAfter(wait)

    async def edit_message_reply_markup(self, **kw):
        self.calls.append(("buttons", ""))


def test_a_group_is_updated_at_most_twenty_times_a_minute():
    assert StreamingReply(ScriptedBot(), GROUP, interval=0.2).interval == GROUP_INTERVAL_S == 3.0
    assert StreamingReply(ScriptedBot(), ANN, interval=0.2).interval == 0.2


async def stream_one_two(bot: FloodedBot, reply: StreamingReply) -> None:
    """Stream "one" (a send), then " two" (the edit Telegram refuses), each once the last was tried."""
    for n, word in enumerate(("one", " two"), start=1):
        reply.push(word)
        while len(bot.calls) < n:
            await asyncio.sleep(0.01)


async def test_a_flood_wait_skips_the_updates_and_only_the_final_text_waits_it_out():
    """Before, the refused edit was retried (stale) every 30 s at most while the reply waited behind
    it; a wait longer than that ended with the text cut off, its cursor showing, and no buttons."""
    bot = FloodedBot(wait=1)
    async with StreamingReply(bot, ANN, interval=0.05) as reply:
        await stream_one_two(bot, reply)
        for word in (" three", " four"):   # within the flood wait: no update is tried
            reply.push(word)
            await asyncio.sleep(0.1)
    refused_at = bot.times[1]
    ids = await reply.finish(markup="buttons")
    assert bot.calls == [("send", "one ▌"), ("edit", "one two ▌"), ("edit", "one two three four"), ("buttons", "")]
    assert bot.times[2] - refused_at >= 0.95 and ids == [1]


async def test_a_wait_the_final_text_cannot_use_is_not_slept_off():
    """A draft's flood wait (another method) and one longer than the final call would wait anyway are
    no reason to hold the chat: the final text goes at once (and, refused, is given up at once)."""
    bot = ScriptedBot(RetryAfter(90))
    reply = StreamingReply(bot, ANN, drafts=DraftChats())
    reply.push("one")
    await reply._flush(streaming=True)
    started = time.monotonic()
    assert await reply.finish() == [2] and time.monotonic() - started < 5
    long = FloodedBot(wait=400)
    async with StreamingReply(long, ANN, interval=0.01) as streaming:
        await stream_one_two(long, streaming)
    started = time.monotonic()
    await streaming.finish()
    assert time.monotonic() - started < 5 and long.calls[-1] == ("edit", "one two")


async def test_buttons_already_shown_when_their_call_is_retried_are_no_error():
    """The keyboard's edit timed out after Telegram applied it; the retry is told "not modified"."""
    class Applied(ScriptedBot):
        async def edit_message_reply_markup(self, **kw):
            raise BadRequest("Message is not modified: specified new message content and reply markup are "
                             "exactly the same as a current content and reply markup of the message")

    reply = StreamingReply(Applied(), ANN)
    assert await reply.finish("done", markup="buttons") == [1]


# --- over the emulator -------------------------------------------------------------------------
@pytest.mark.e2e
async def test_a_private_chat_gets_drafts_then_one_final_message_with_the_buttons(emu, make_bot):
    async with make_bot(FakeEngine([WORDS], delay_s=1.5)) as bot:
        ann = emu.client(ANN, "Ann")
        mid = await ann.asend_text("go slowly")
        final = await ann.await_for(lambda m: bool(m.callback_data), after=mid, timeout=20)
        assert final.text == WORDS and final.button_texts == ["👍", "👎", "🔁", "✏️"]
        assert [m.message_id for m in await ann.abot_messages() if m.message_id > mid] == [final.message_id]
        assert final.edit_count == 1                                     # only the buttons were added
        drafts = emu.drafts(ANN)
        assert 2 <= len(drafts) <= 10                                    # ~1.5 s at one update per 0.2 s
        assert all(WORDS.startswith(d["text"]) for d in drafts) and len({d["draft_id"] for d in drafts}) == 1
        assert emu.calls("editMessageText") == []
        assert bot.store.turn(bot.store.latest_answered_turn(ANN)).reply_message_ids == [final.message_id]


@pytest.mark.e2e
async def test_a_group_streams_by_editing(emu, make_bot):
    async with make_bot(FakeEngine([WORDS], delay_s=1.5)) as bot:
        me = (await bot.app.bot.get_me()).username
        ann = emu.client(ANN, "Ann", chat_id=GROUP, chat_type="group")
        mid = await ann.asend_text(f"@{me} go slowly")
        final = await ann.await_for(lambda m: bool(m.callback_data), after=mid, timeout=20)
        assert final.text == WORDS and final.edit_count >= 2
        assert emu.calls("sendMessageDraft") == [] and len(emu.calls("editMessageText")) >= 1


@pytest.mark.e2e
async def test_a_server_that_refuses_drafts_gets_edits_and_the_whole_reply(emu, make_bot):
    async with make_bot(FakeEngine([WORDS, "and again"], delay_s=1.5)) as bot:
        emu.inject_fault("sendMessageDraft", 404, description="Not Found: method not found", count=100)
        ann = emu.client(ANN, "Ann")
        mid = await ann.asend_text("go slowly")
        final = await ann.await_for(lambda m: bool(m.callback_data), after=mid, timeout=20)
        assert final.text == WORDS and final.edit_count >= 2               # streamed by editing instead
        assert [m.message_id for m in await ann.abot_messages() if m.message_id > mid] == [final.message_id]
        assert bot.store.turn(bot.store.latest_answered_turn(ANN)).reply_message_ids == [final.message_id]
        mid = await ann.asend_text("once more")
        again = await ann.await_for(lambda m: bool(m.callback_data), after=mid, timeout=20)
        assert again.text == "and again"
        assert len(emu.calls("sendMessageDraft")) == 1 and emu.drafts(ANN) == []   # tried once, remembered
        emu.clear_faults()
