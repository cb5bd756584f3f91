"""The buttons under a reply: 👍 👎 rate it, 🔁 writes a second take, ✏️ asks for a better answer,
and the pick between the reply and its second take. After a 👎 the keyboard offers one optional
tap on why (too long · off-topic · wrong · rude · not like you · other), stored with the rating;
the reasons go away once one is tapped or the rating changes.

Every press is checked against the stored turn — its chat, its author, the messages the buttons
sit on — because callback data comes from the client and may be stale, replayed or forged. A 🔁
is a reply like any other: it counts against its author's flood limit and takes its chat's place
(serving/limits.py), so taps cannot pile up replies for the model. A second take and the ✏️ prompt
go under the pressed reply, in its forum topic if it has one.
"""

from __future__ import annotations

import logging

from telegram import CallbackQuery, ForceReply, MessageEntity, ReplyParameters, Update, User
from telegram.constants import ChatType
from telegram.ext import ContextTypes

from bot import keyboards
from bot.addressing import topic_of
from bot.drafts import DraftChats
from bot.edits import answer_pressed
from bot.errors import ErrorSink
from bot.retry import call_with_retry
from bot.streaming import StreamingReply
from config.settings import Settings
from engine.worker import Busy
from memory.feedback import CORRECTION_WAIT_S, REASONS
from memory.store import TurnRef
from serving.conversation import Conversation
from serving.limits import ADMIT, ChatQueues, FloodLimit

log = logging.getLogger(__name__)

STALE_BUTTON = "That button belongs to a reply I can't act on anymore."
ASK_REASON = "Noted. If you like, tap why below."
REASON_NOTED = "Thanks — noted: {}."
REASON_NOT_DOWN = "That reason goes with a 👎, and this reply doesn't have yours anymore."
NOT_YOURS = "Only the person I was answering can use these buttons."
CORRECTION_PROMPT = (f"✏️ Reply with the answer you'd have liked, within {CORRECTION_WAIT_S / 60:.0f} minutes. "
                     "(/reset cancels.)")
CORRECTION_PLACEHOLDER = "The answer you'd have liked"
REGEN_BUSY = "I'm still answering here — tap 🔁 again once I'm done."
REGEN_FLOOD = "That's a lot at once — tap 🔁 again in a little while."


class ButtonHandlers:
    def __init__(self, settings: Settings, conversation: Conversation, errors: ErrorSink, *,
                 chat_queues: ChatQueues, flood: FloodLimit, drafts: DraftChats | None = None) -> None:
        self.settings = settings
        self.conversation = conversation
        self.errors = errors
        self.chat_queues = chat_queues   # shared with bot/chat.py: a 🔁 takes its chat's place like a message
        self.flood = flood               # and counts against its author's flood limit like one
        self.drafts = drafts   # private chats stream a second take as a draft (bot/drafts.py)

    async def press(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """👍 👎 🔁 ✏️ and the pick after 🔁 — each press checked against the store."""
        query = update.callback_query
        press = keyboards.reply_press(query.data)
        message = query.message
        if press is None or message is None:
            await query.answer(STALE_BUTTON)
            return
        turn = self.conversation.turn(press.turn_id)
        if turn is None or turn.chat_id != message.chat.id:
            await query.answer(STALE_BUTTON)
            return
        if query.from_user.id != turn.user_id:
            await query.answer(NOT_YOURS)
            return
        if press.action == keyboards.KEEP:
            await self._keep(query, turn, press)
            return
        if message.message_id not in turn.reply_message_ids or turn.status != "answered":
            await query.answer(STALE_BUTTON)
            return
        if press.action in (keyboards.RATE_UP, keyboards.RATE_DOWN):
            value = 1 if press.action == keyboards.RATE_UP else -1
            result = self.conversation.rate(turn.id, query.from_user.id, value)
            ask = value == -1 and result != "same"
            await answer_pressed(query, ASK_REASON if ask else {"new": "Thanks for rating!", "changed": "Rating changed.",
                                                                "same": "Already noted."}[result])
            if result != "same":
                await self._markup(query, keyboards.reply_keyboard(turn.id, rated=value, ask_reason=ask))
        elif press.action == keyboards.REASON:
            if not self.conversation.give_reason(turn.id, query.from_user.id, press.reason):
                await query.answer(REASON_NOT_DOWN)
                return
            await answer_pressed(query, REASON_NOTED.format(REASONS[press.reason]))
            await self._markup(query, keyboards.reply_keyboard(turn.id, rated=-1))
        elif press.action == keyboards.CORRECT:
            self.conversation.ask_for_correction(turn.chat_id, query.from_user.id, turn.id)
            await answer_pressed(query)   # late (Telegram gave up on it): the prompt must still go out
            await self._prompt_correction(query, context, turn)
        elif press.action == keyboards.REGENERATE:
            await self._regenerate(query, context, turn)

    @staticmethod
    async def _markup(query: CallbackQuery, markup) -> None:
        """Show the rating on the keyboard; only cosmetic, the rating is stored already."""
        try:
            await query.edit_message_reply_markup(markup)
        except Exception:
            log.debug("could not mark the rating on the keyboard", exc_info=True)

    @staticmethod
    async def _prompt_correction(query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, turn: TurnRef) -> None:
        """Ask for the better answer under the pressed reply, in its topic, with a ForceReply. In a group
        the bot hears only messages that mention or answer it, so the answer must come as a reply; and
        a selective ForceReply opens the reply field only for the people a message names or answers
        (here the bot itself), so the prompt names the person who pressed."""
        message = query.message
        private = message.chat.type == ChatType.PRIVATE
        text, entities = (CORRECTION_PROMPT, None) if private else _naming(query.from_user, CORRECTION_PROMPT)
        await call_with_retry(lambda: context.bot.send_message(
            turn.chat_id, text, entities=entities, message_thread_id=topic_of(message),
            reply_parameters=ReplyParameters(message.message_id, allow_sending_without_reply=True),
            reply_markup=ForceReply(selective=not private, input_field_placeholder=CORRECTION_PLACEHOLDER)))

    async def _regenerate(self, query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, turn: TurnRef) -> None:
        """🔁 on the latest reply, alone in its chat: a double tap, or a tap while the chat's next message
        is answered (the take would be out of date), is refused at once rather than queued."""
        if not self.conversation.is_latest_reply(turn.chat_id, turn.id):
            await query.answer("I can only redo my latest reply.")
            return
        if self.flood.check(query.from_user.id) != ADMIT:
            await query.answer(REGEN_FLOOD)
            return
        place = self.chat_queues.join(turn.chat_id, alone=True)
        if place is None:
            await query.answer(REGEN_BUSY)
            return
        async with place:
            await answer_pressed(query, "Trying again…")
            await self._second_take(query, context, turn)

    async def _second_take(self, query: CallbackQuery, context: ContextTypes.DEFAULT_TYPE, turn: TurnRef) -> None:
        """Streamed like a reply; in a group it answers the pressed reply, in a forum in that topic."""
        async with StreamingReply.answering(context.bot, query.message, interval=self.settings.stream_edit_interval_s,
                                            drafts=self.drafts) as stream:
            try:
                alt_id, text = await self.conversation.regenerate(turn.id, on_text=stream.push)
            except Busy:
                await stream.finish("I'm answering a lot of people right now — try 🔁 again in a minute.")
                return
            except Exception as exc:
                await stream.finish("I couldn't come up with another take just now, sorry.")
                await self.errors.notify_admins(context, f"Regenerating turn {turn.id} failed", exc)
                return
            if alt_id is None:   # forgotten (/forget) meanwhile: what was written, if any, without buttons
                if text:
                    await stream.finish(text)
                return
            await stream.finish(text, markup=keyboards.pick_keyboard(turn.id, alt_id),
                                before_markup=lambda ids: self.conversation.alternative_delivered(alt_id, ids))

    async def _keep(self, query: CallbackQuery, turn: TurnRef, press: keyboards.Press) -> None:
        alt = self.conversation.alternative(press.alternative_id)
        if alt is None or alt["turn_id"] != turn.id or query.message.message_id not in alt["message_ids"]:
            await query.answer(STALE_BUTTON)
            return
        recorded = self.conversation.keep(turn.id, alt["id"], query.from_user.id, keep_alternative=press.keep == 2)
        if not recorded:
            await query.answer("You already picked one — thanks!")
            return
        await query.answer("Thanks — I'll remember which one you liked.")
        try:
            await query.edit_message_reply_markup(None)
        except Exception:
            log.debug("could not remove the pick keyboard", exc_info=True)


def _naming(user: User, text: str) -> tuple[str, list[MessageEntity] | None]:
    """`text` opening with the person's name: their @username, or else their first name linked to
    them (a text mention; its length counted in UTF-16 units, as Telegram counts)."""
    if user.username:
        return f"@{user.username} {text}", None
    name = user.first_name
    length = len(name.encode("utf-16-le")) // 2
    return f"{name} {text}", [MessageEntity(MessageEntity.TEXT_MENTION, 0, length, user=user)]
