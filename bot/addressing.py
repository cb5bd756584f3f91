"""Reading an update: who wrote it, whether it was meant for the bot, and in which forum topic.

In a group the bot answers only when mentioned or replied to; the mention is taken out of what
the model reads. Shared by the chat, the buttons and the user commands, so all read an update alike.
"""

from __future__ import annotations

import re

from telegram import Update
from telegram.constants import ChatType
from telegram.ext import ContextTypes

from serving.conversation import Speaker


def speaker(update: Update) -> Speaker:
    chat, user = update.effective_chat, update.effective_user
    return Speaker(chat_id=chat.id, user_id=user.id, chat_type=chat.type, chat_title=chat.title,
                   username=user.username, first_name=user.first_name)


def topic_of(message: object) -> int | None:
    """The forum topic a message is in, for the bot's messages about it to land there too (the
    General topic otherwise). A reply chain in an ordinary group also has a thread id, but it is no
    topic: Telegram would refuse a send naming it."""
    if not getattr(message, "is_topic_message", False):   # an InaccessibleMessage has no such field
        return None
    return message.message_thread_id


def addressed_to_me(update: Update, context: ContextTypes.DEFAULT_TYPE) -> bool:
    """Private chats: always. Groups: only when mentioned, or when replying to me."""
    chat, msg = update.effective_chat, update.effective_message
    if chat is None or msg is None:
        return False
    if chat.type == ChatType.PRIVATE:
        return True
    mention = _mention(context)
    if mention is not None and mention.search(msg.text or msg.caption or ""):
        return True
    reply = msg.reply_to_message
    return bool(reply and reply.from_user and reply.from_user.id == context.bot.id)


def strip_mention(text: str, context: ContextTypes.DEFAULT_TYPE) -> str:
    mention = _mention(context)
    if mention is None:
        return text
    return mention.sub("", text).strip() or text


def _mention(context: ContextTypes.DEFAULT_TYPE) -> re.Pattern | None:
    """@me as a whole username: `@me_fan` and `@meta` are other people (usernames are letters, digits
    and `_`). What follows may be anything else — `/help@me` addresses me too."""
    me = context.bot.username
    return re.compile(rf"@{re.escape(me)}(?!\w)", re.IGNORECASE) if me else None
