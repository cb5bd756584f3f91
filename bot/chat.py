"""Messages: a text is stored, queued behind its chat's earlier ones and answered with a streamed
reply and its buttons; anything else (stickers, photos, voice…) is kept as a note and answered kindly.

The turn itself belongs to serving/conversation.py; this module only speaks Telegram: who wrote,
whether to the bot, the per-chat queue and flood bounds (serving/limits.py), and the reply's messages.
"""

from __future__ import annotations

import asyncio
import logging

from telegram import Bot, Message, Update
from telegram.constants import ChatAction
from telegram.ext import ContextTypes

from bot import keyboards
from bot.addressing import addressed_to_me, speaker, strip_mention, topic_of
from bot.drafts import DraftChats
from bot.errors import ErrorSink
from bot.retry import call_with_retry
from bot.streaming import StreamingReply
from config.settings import Settings
from serving.conversation import Conversation, Outcome, Speaker
from serving.limits import ADMIT, NOTICE, ChatQueues, FloodLimit

log = logging.getLogger(__name__)

NON_TEXT = "I can only read text for now — tell me in words? 🙂"
CORRECTION_THANKS = "Thanks — noted as a better answer. I'll learn from it. ✍️"
QUEUE_FULL = "I'm still answering your earlier messages — please send this one again once I've replied. 🙏"
FLOOD_NOTICE = ("That's a lot of messages at once — I've kept them, but I'll only answer new ones "
                "in a little while. 🙂")
NON_TEXT_KINDS = ("sticker", "photo", "voice", "video", "video_note", "audio", "document", "animation",
                  "location", "contact", "poll")


class ChatHandlers:
    def __init__(self, settings: Settings, conversation: Conversation, errors: ErrorSink, *,
                 chat_queues: ChatQueues, flood: FloodLimit, drafts: DraftChats | None = None) -> None:
        self.settings = settings
        self.conversation = conversation
        self.errors = errors
        self.drafts = drafts   # private chats stream as a draft, groups by editing (bot/drafts.py)
        self.chat_queues = chat_queues   # one reply at a time per chat, bounded
        self.flood = flood
        self._background: set[asyncio.Task] = set()   # fire-and-forget calls ('typing'), referenced until done

    async def text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A text message: store it, then answer it with a streamed reply and the four buttons."""
        msg = update.effective_message
        if not addressed_to_me(update, context):
            return
        text = strip_mention(msg.text or "", context)
        who = speaker(update)
        # stored first: a message waiting behind others (or past a bound) is in the database before
        # anything else happens to it, so a crash while it waits cannot lose it
        received = self.conversation.receive(who, text, message_id=msg.message_id)
        if received.kind != "pending":
            await self._show(msg, received)
            return
        verdict = self.flood.check(who.user_id)
        queue = self.chat_queues.join(who.chat_id) if verdict == ADMIT else None
        if queue is None:
            await self._not_answered(msg, received.turn_id, verdict)
            return
        async with queue:  # one reply at a time per chat keeps each context in order
            await self._reply(context, who, received.turn_id, msg)

    async def non_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Stickers, photos, voice, documents: kept as a note in the log, answered kindly — within the
        person's flood limit, like text, so a burst of stickers cannot make the bot flood back."""
        msg = update.effective_message
        if not addressed_to_me(update, context):
            return
        who = speaker(update)
        kind = next((k for k in NON_TEXT_KINDS if getattr(msg, k, None)), "other")
        verdict = self.flood.check(who.user_id)
        told = NON_TEXT if verdict == ADMIT else FLOOD_NOTICE if verdict == NOTICE else None
        self.conversation.refuse_non_text(who, kind, told, message_id=msg.message_id)
        if told is not None:
            await call_with_retry(lambda: msg.reply_text(told))

    async def _show(self, msg: Message, outcome: Outcome) -> None:
        """What a message settled without the model gets: thanks for a correction, or why not."""
        await call_with_retry(lambda: msg.reply_text(CORRECTION_THANKS if outcome.kind == "correction"
                                                     else outcome.text))

    async def _not_answered(self, msg: Message, turn_id: int, verdict: str) -> None:
        """Over a bound (serving/limits.py): kept, never shown to the model; the person told (once per
        flood window)."""
        if verdict == ADMIT:
            notice = QUEUE_FULL
            self.conversation.mark_busy(turn_id, notice)
        else:
            notice = FLOOD_NOTICE if verdict == NOTICE else None
            self.conversation.mark_limited(turn_id, notice)
        if notice is not None:
            await call_with_retry(lambda: msg.reply_text(notice))

    async def _reply(self, context: ContextTypes.DEFAULT_TYPE, who: Speaker, turn_id: int, msg: Message) -> None:
        # 'typing' is cosmetic: sent beside the reply (the message is already stored)
        typing = asyncio.create_task(self._typing(context.bot, who.chat_id, topic_of(msg)))
        self._background.add(typing)
        typing.add_done_callback(self._background.discard)
        async with StreamingReply.answering(context.bot, msg, interval=self.settings.stream_edit_interval_s,
                                            drafts=self.drafts) as stream:
            outcome = await self.conversation.answer(turn_id, on_text=stream.push)
            if outcome.kind == "gone":   # forgotten (/forget) meanwhile: what was written, if any, without buttons
                if outcome.text:
                    await stream.finish(outcome.text)
                return
            if outcome.kind != "answered":
                await stream.finish(outcome.text)
                if outcome.error is not None:
                    await self.errors.notify_admins(context, f"Reply to turn {outcome.turn_id} failed", outcome.error)
                return
            await self._deliver(stream, outcome.turn_id, outcome.text)

    async def _deliver(self, stream: StreamingReply, turn_id: int, text: str) -> None:
        """The reply, then its buttons. Should sending fail for good, the delivery is recorded as given
        up (with whatever did arrive), so the next start does not post it again, out of context."""
        try:
            await stream.finish(text, markup=keyboards.reply_keyboard(turn_id),
                                before_markup=lambda ids: self.conversation.delivered(turn_id, ids))
        except Exception:
            self.conversation.delivered(turn_id, stream.message_ids)
            raise

    @staticmethod
    async def _typing(bot: Bot, chat_id: int, topic: int | None) -> None:
        try:   # in a forum, shown in the topic being answered
            await bot.send_chat_action(chat_id, ChatAction.TYPING, message_thread_id=topic)
        except Exception:  # only cosmetic
            log.debug("send_chat_action failed", exc_info=True)
