"""After a restart: close what a crash left open, and tell the people it concerned.

A turn left pending was never answered, so its author is asked to send it again (one message per
chat, naming each); a reply stored but cut off while being sent is sent now, with its buttons.
In a group both answer the person's own message, as the live reply would have: a reply lands in the
replied-to message's forum topic without naming it (the topic is not stored), and says whom it is for.
Runs once, in the application's start-up hook, before updates are handled.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from telegram import Bot

from bot import keyboards
from bot.streaming import StreamingReply
from memory.api_keys import is_api_user
from serving.conversation import TERMINAL_CHAT_ID, Conversation

log = logging.getLogger(__name__)

RESEND = "Sorry — I was restarted while answering {}. Could you send it again?"
RESEND_MANY = "Sorry — I was restarted before answering your last {} messages ({}). Could you send them again?"


async def recover_interrupted(conversation: Conversation, bot: Bot) -> None:
    """Turns left pending by a crash (being answered, or waiting their chat's turn): close them
    and ask their authors to resend — one message per chat (in a group, per person), naming each."""
    by_chat: dict[tuple[int, int], list[dict]] = {}
    for turn in conversation.interrupted_turns():
        by_chat.setdefault((turn["chat_id"], turn["user_id"] if turn["chat_id"] < 0 else 0), []).append(turn)
    for (chat_id, _author), turns in by_chat.items():
        snippets = ["“" + t["user_text"][:60] + ("…" if len(t["user_text"]) > 60 else "") + "”" for t in turns]
        text = RESEND.format(snippets[0]) if len(turns) == 1 else RESEND_MANY.format(len(turns), ", ".join(snippets))
        for turn in turns:
            conversation.mark_failed(turn["id"], text)
        if chat_id == TERMINAL_CHAT_ID or is_api_user(chat_id):  # no Telegram side to tell
            continue
        try:   # StreamingReply: the same reply parameters as the live answer would have had
            await StreamingReply(bot, chat_id, reply_to=_reply_to(chat_id, turns[-1]["user_message_id"])).finish(text)
        except Exception:
            log.warning("could not ask chat %s to resend", chat_id, exc_info=True)
    await deliver_interrupted(conversation, bot)


async def deliver_interrupted(conversation: Conversation, bot: Bot) -> None:
    """Replies written and stored but cut off while being sent (a crash mid-delivery): send them
    now, with their buttons. One attempt each; those of the last day only."""
    since = (datetime.now(UTC) - timedelta(days=1)).isoformat(timespec="milliseconds")
    for turn in conversation.undelivered_replies(since=since):
        if turn["chat_id"] == TERMINAL_CHAT_ID or is_api_user(turn["chat_id"]):
            continue
        stream = StreamingReply(bot, turn["chat_id"], reply_to=_reply_to(turn["chat_id"], turn["user_message_id"]))
        try:
            await stream.finish(turn["reply_text"], markup=keyboards.reply_keyboard(turn["id"]),
                                before_markup=lambda ids, t=turn["id"]: conversation.delivered(t, ids))
        except Exception:
            log.warning("could not deliver the stored reply of turn %s", turn["id"], exc_info=True)
            conversation.delivered(turn["id"], stream.message_ids)   # not retried at every start


def _reply_to(chat_id: int, message_id: int | None) -> int | None:
    """In a group, the person's message; in a private chat, nothing."""
    return None if chat_id > 0 else message_id
