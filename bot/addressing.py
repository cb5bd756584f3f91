"""Reading an update: who wrote it, and whether it was meant for the bot.

In a group the bot answers only when mentioned or replied to; the mention is taken out of what
the model reads. Shared by the chat and the user commands, so both read an update alike.
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


def addressed_to_me(update: Update, context: ContextTypes.DEFAULT_TYPE) -> bool:
    """Private chats: always. Groups: only when mentioned, or when replying to me."""
    chat, msg = update.effective_chat, update.effective_message
    if chat is None or msg is None:
        return False
    if chat.type == ChatType.PRIVATE:
        return True
    me = context.bot.username or ""
    text = msg.text or msg.caption or ""
    if me and f"@{me}".lower() in text.lower():
        return True
    reply = msg.reply_to_message
    return bool(reply and reply.from_user and reply.from_user.id == context.bot.id)


def strip_mention(text: str, context: ContextTypes.DEFAULT_TYPE) -> str:
    me = context.bot.username
    if not me:
        return text
    return re.sub(rf"@{re.escape(me)}\b", "", text, flags=re.IGNORECASE).strip() or text
