"""Groups and forum topics, through the application as `ouro serve` builds it, over the offline Bot API
(tests/helpers/offline_bot.py): who the bot hears in a group, where its messages land, what it keeps."""

from __future__ import annotations

import asyncio
import json
import time

from bot import keyboards
from bot.chat import CORRECTION_THANKS
from bot.recovery import recover_interrupted
from tests.helpers.offline_bot import ANN, BOB, BOT, GROUP, OfflineBot, OfflineTelegram, offline_bot

MENTION = f"@{BOT['username']}"
TOPIC = 77


def edited(tg: OfflineTelegram, uid: int, chat: int, message_id: int, text: str, **extra) -> dict:
    """An edited_message update: message `message_id` now reads `text`."""
    update = tg.message(uid, chat, text, edit_date=int(time.time()), **extra)
    update["message"]["message_id"] = message_id
    update["edited_message"] = update.pop("message")
    return update


def reply_params(p: dict) -> dict | None:
    to = p.get("reply_parameters")
    return json.loads(to) if isinstance(to, str) else to


def markup(p: dict) -> dict | None:
    m = p.get("reply_markup")
    return json.loads(m) if isinstance(m, str) else m


async def answered_in_group(bot: OfflineBot, text: str, **extra) -> tuple[int, int]:
    """Ann asks the bot in the group: (her turn, the message carrying the buttons)."""
    await bot.send(bot.tg.message(ANN, GROUP, f"{MENTION} {text}", **extra))
    turn = bot.store.latest_answered_turn(GROUP)
    return turn, bot.store.turn(turn).reply_message_ids[-1]


# --- ✏️ in a group ---------------------------------------------------------------------------------
async def test_the_correction_prompt_in_a_group_asks_its_person_for_a_reply_and_the_reply_is_heard(tmp_path):
    """The prompt answers the pressed reply and forces a reply from the person who pressed (named in it,
    since a selective ForceReply reaches only the people a message mentions or answers): their answer
    then comes as a reply to the bot, which a group message must be for the bot to hear it."""
    async with offline_bot(tmp_path / "data", stream_drafts=False) as bot:
        turn, mid = await answered_in_group(bot, "what is 2+2?")
        await bot.press(ANN, GROUP, mid, keyboards.reply_data(keyboards.CORRECT, turn))
        prompt = bot.tg.sent("sendMessage", GROUP)[-1]
        assert "✏️" in prompt["text"] and "30 minutes" in prompt["text"]
        assert reply_params(prompt)["message_id"] == mid
        assert markup(prompt)["force_reply"] is True and markup(prompt)["selective"] is True
        assert "@u1001" in prompt["text"]                       # Ann, so the ForceReply is hers
        prompt_id = max(m for (c, m) in bot.tg.messages if c == GROUP)
        await bot.send(bot.tg.message(ANN, GROUP, "It is four.",
                                      reply_to_message=dict(bot.tg.messages[(GROUP, prompt_id)])))
        assert bot.store.database.query("SELECT turn_id, text FROM corrections") == [
            {"turn_id": turn, "text": "It is four."}]
        assert bot.tg.texts_to(GROUP)[-1] == CORRECTION_THANKS
        assert bot.errors == []


async def test_the_correction_prompt_names_someone_without_a_username_by_a_text_mention(tmp_path):
    async with offline_bot(tmp_path / "data", stream_drafts=False) as bot:
        update = bot.tg.message(ANN, GROUP, f"{MENTION} hi")
        del update["message"]["from"]["username"]
        await bot.send(update)
        turn = bot.store.latest_answered_turn(GROUP)
        mid = bot.store.turn(turn).reply_message_ids[-1]
        press = bot.tg.press(ANN, GROUP, mid, keyboards.reply_data(keyboards.CORRECT, turn))
        del press["callback_query"]["from"]["username"]
        await bot.send(press)
        prompt = bot.tg.sent("sendMessage", GROUP)[-1]
        entities = json.loads(prompt["entities"]) if isinstance(prompt["entities"], str) else prompt["entities"]
        assert [(e["type"], e["offset"], e["user"]["id"]) for e in entities] == [("text_mention", 0, ANN)]
        assert prompt["text"].startswith("Ann ")
        assert bot.errors == []


async def test_the_correction_prompt_in_a_private_chat_needs_no_name(tmp_path):
    async with offline_bot(tmp_path / "data", stream_drafts=False) as bot:
        await bot.say(ANN, "hello")
        turn = bot.store.latest_answered_turn(ANN)
        mid = bot.store.turn(turn).reply_message_ids[-1]
        await bot.press(ANN, ANN, mid, keyboards.reply_data(keyboards.CORRECT, turn))
        prompt = bot.tg.sent("sendMessage", ANN)[-1]
        assert prompt["text"].startswith("✏️") and "entities" not in prompt
        assert reply_params(prompt)["message_id"] == mid and markup(prompt)["force_reply"] is True
        await bot.say(ANN, "hi there!")                          # any next message counts in private
        assert bot.store.database.scalar("SELECT text FROM corrections") == "hi there!"


# --- forum topics ------------------------------------------------------------------------------------
async def test_in_a_forum_topic_the_reply_the_second_take_and_the_correction_prompt_stay_in_the_topic(tmp_path):
    async with offline_bot(tmp_path / "data", stream_drafts=False) as bot:
        turn, mid = await answered_in_group(bot, "hi from a topic", message_thread_id=TOPIC, is_topic_message=True)
        await bot.press(ANN, GROUP, mid, keyboards.reply_data(keyboards.REGENERATE, turn))
        await bot.press(ANN, GROUP, mid, keyboards.reply_data(keyboards.CORRECT, turn))
        sent = bot.tg.sent("sendMessage", GROUP)
        assert len(sent) == 3                                    # the reply, the second take, the prompt
        assert [p.get("message_thread_id") for p in sent] == [TOPIC] * 3
        assert [reply_params(p)["message_id"] for p in sent[1:]] == [mid, mid]
        assert bot.store.database.scalar("SELECT COUNT(*) FROM alternatives") == 1
        assert bot.errors == []


async def test_outside_topics_no_thread_is_named(tmp_path):
    """A reply thread in an ordinary group is no forum topic: naming it would make Telegram refuse the send."""
    async with offline_bot(tmp_path / "data", stream_drafts=False) as bot:
        turn, mid = await answered_in_group(bot, "hi", message_thread_id=12345)   # in a chain of replies
        await bot.press(ANN, GROUP, mid, keyboards.reply_data(keyboards.REGENERATE, turn))
        assert [p.get("message_thread_id") for p in bot.tg.sent("sendMessage", GROUP)] == [None, None]


async def test_typing_shows_in_the_topic_being_answered(tmp_path):
    async with offline_bot(tmp_path / "data", stream_drafts=False) as bot:
        await answered_in_group(bot, "hi from a topic", message_thread_id=TOPIC, is_topic_message=True)
        await asyncio.sleep(0.05)   # 'typing' is sent beside the reply, on its own task
        assert [p.get("message_thread_id") for p in bot.tg.sent("sendChatAction", GROUP)] == [TOPIC]


async def test_after_a_restart_the_resend_notice_and_a_stored_reply_answer_the_persons_message(tmp_path):
    """In a group (or a forum topic, which a reply lands in without naming it) what a restart has to say
    answers the message it concerns; in a private chat it is a plain message."""
    async with offline_bot(tmp_path / "data", stream_drafts=False) as bot:
        conversation = bot.app.bot_data["handlers"].conversation
        store = bot.store
        lost = store.add_user_turn(chat_id=GROUP, user_id=ANN, text="are you there?", user_message_id=41,
                                   chat_type="supergroup")
        bobs = store.add_user_turn(chat_id=GROUP, user_id=BOB, text="me too?", user_message_id=40,
                                   chat_type="supergroup")   # another person's: a notice of his own
        cut = store.add_user_turn(chat_id=GROUP, user_id=BOB, text="tell me a joke", user_message_id=42,
                                  chat_type="supergroup")
        store.complete_turn(cut, reply_text="A joke, stored but never sent.", generation_id="gen-0000",
                            prompt_tokens=1, completion_tokens=1, latency_s=0.1, ttft_s=0.1,
                            context_start_turn_id=cut)
        private = store.add_user_turn(chat_id=ANN, user_id=ANN, text="hello?", user_message_id=43)
        await recover_interrupted(conversation, bot.app.bot)
        to_group = bot.tg.sent("sendMessage", GROUP)
        assert [(reply_params(p) or {}).get("message_id") for p in to_group] == [41, 40, 42]
        assert "are you there?" in to_group[0]["text"] and "me too?" not in to_group[0]["text"]
        assert "me too?" in to_group[1]["text"] and to_group[2]["text"] == "A joke, stored but never sent."
        assert all(reply_params(p)["allow_sending_without_reply"] for p in to_group)
        assert [reply_params(p) for p in bot.tg.sent("sendMessage", ANN)] == [None]
        assert {store.turn(t).status for t in (lost, bobs, private)} == {"failed"}
        assert store.turn(cut).reply_message_ids == [max(m for (c, m) in bot.tg.messages if c == GROUP)]


# --- edits ---------------------------------------------------------------------------------------------
async def test_edits_of_group_chatter_never_addressed_to_the_bot_are_not_kept(tmp_path):
    async with offline_bot(tmp_path / "data", stream_drafts=False) as bot:
        chatter = bot.tg.message(BOB, GROUP, "see you at 8")
        await bot.send(chatter)
        await bot.send(edited(bot.tg, BOB, GROUP, chatter["message"]["message_id"], "my phone is 555-0101"))
        asked = bot.tg.message(ANN, GROUP, f"{MENTION} whats up")
        await bot.send(asked)
        await bot.send(edited(bot.tg, ANN, GROUP, asked["message"]["message_id"], f"{MENTION} what's up?"))
        await bot.send(edited(bot.tg, ANN, ANN, 4, "private edits are kept"))
        kept = [json.loads(e["detail"])["text"] for e in
                bot.store.database.query("SELECT detail FROM events WHERE kind = 'edited_message' ORDER BY id")]
        assert kept == [f"{MENTION} what's up?", "private edits are kept"]
        assert bot.errors == []


async def test_a_message_edited_into_a_command_runs_nothing(tmp_path):
    async with offline_bot(tmp_path / "data", stream_drafts=False) as bot:
        said = bot.tg.message(ANN, ANN, "hello")
        await bot.send(said)
        session = bot.store.current_session(ANN)
        sent_before = len(bot.tg.sent("sendMessage", ANN))
        await bot.send(edited(bot.tg, ANN, ANN, said["message"]["message_id"], "/reset",
                              entities=[{"type": "bot_command", "offset": 0, "length": 6}]))
        assert bot.store.current_session(ANN) == session
        assert len(bot.tg.sent("sendMessage", ANN)) == sent_before
        await bot.command(ANN, "reset")                           # a new /reset still resets
        assert bot.store.current_session(ANN) != session


# --- addressing ----------------------------------------------------------------------------------------
async def test_only_the_bots_own_username_addresses_it(tmp_path):
    async with offline_bot(tmp_path / "data", stream_drafts=False) as bot:
        await bot.say(BOB, f"{MENTION}ty are you coming tonight?", chat=GROUP)
        await bot.say(BOB, f"{MENTION}_fan club meets at 8", chat=GROUP)
        assert bot.store.database.query("SELECT user_text FROM turns") == []
        await bot.say(BOB, f"hey {MENTION.upper()}, how are you?", chat=GROUP)
        assert bot.store.database.query("SELECT user_text FROM turns") == [{"user_text": "hey , how are you?"}]
        await bot.command(BOB, "nope", chat=GROUP)                # /nope@bot: still pointed to /help
        assert "/help" in bot.tg.texts_to(GROUP)[-1]
        assert bot.errors == []
