"""Telegram handlers: each a small async method that turns an update into a call on the
conversation or the store, and back into messages. No SQL here, no model calls."""

from __future__ import annotations

import asyncio
import html
import logging
import re
import time
import traceback
from datetime import UTC, datetime, timedelta

from telegram import Message, Update
from telegram.constants import ChatAction, ChatType
from telegram.ext import ApplicationHandlerStop, ContextTypes

from bot import keyboards
from bot.commands import help_text
from bot.edits import too_old
from bot.retry import call_with_retry
from bot.streaming import StreamingReply
from config.settings import Settings
from engine.worker import Busy
from memory.store import Store
from serving.conversation import TERMINAL_CHAT_ID, Conversation, Outcome, Speaker
from serving.limits import ADMIT, NOTICE, ChatQueues, FloodLimit
from serving.status import format_status, status_report

log = logging.getLogger(__name__)

WELCOME = ("Hi! I'm a persona that learns from how people talk to me. Just write to me.\n"
           "Rate my replies with the buttons below them — that is how I get better.\n"
           "/help lists everything; /privacy says what I keep.")
NOT_ALLOWED = "Sorry — this bot is private, and you're not on its list of users. Ask its owner for access."
ADMIN_ONLY = "Sorry, that command is for the bot's admins."
NON_TEXT = "I can only read text for now — tell me in words? 🙂"
UNKNOWN_COMMAND = "I don't know that command — /help lists the ones I understand."
STALE_BUTTON = "That button belongs to a reply I can't act on anymore."
NOT_YOURS = "Only the person I was answering can use these buttons."
CORRECTION_PROMPT = "✏️ Send me the answer you'd have liked, as your next message. (/reset cancels.)"
RESEND = "Sorry — I was restarted while answering {}. Could you send it again?"
RESEND_MANY = "Sorry — I was restarted before answering your last {} messages ({}). Could you send them again?"
CORRECTION_THANKS = "Thanks — noted as a better answer. I'll learn from it. ✍️"
QUEUE_FULL = "I'm still answering your earlier messages — please send this one again once I've replied. 🙏"
FLOOD_NOTICE = ("That's a lot of messages at once — I've kept them, but I'll only answer new ones "
                "in a little while. 🙂")


class Handlers:
    def __init__(self, settings: Settings, store: Store, conversation: Conversation, started_at: float) -> None:
        self.settings = settings
        self.store = store
        self.conversation = conversation
        self.started_at = started_at
        self.chat_queues = ChatQueues(settings.chat_queue_max)   # one reply at a time per chat, bounded
        self.flood = FloodLimit(settings.flood_messages, settings.flood_window_s)
        self.admin = None   # bot.admin.AdminHandlers when the learning loop runs in this process
        self._background: set[asyncio.Task] = set()   # fire-and-forget calls ('typing'), referenced until done

    # --- gates ----------------------------------------------------------------------------
    async def gate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Runs before every other handler: people not on the allow-list get one polite refusal."""
        user = update.effective_user
        if user is None:   # channel posts, or a message whose sender Telegram left out: nobody to answer
            raise ApplicationHandlerStop
        if self.settings.may_chat(user.id):
            return
        self.store.log_event("user_refused", user_id=user.id,
                             chat_id=update.effective_chat.id if update.effective_chat else None)
        try:
            if update.callback_query:
                await update.callback_query.answer(NOT_ALLOWED, show_alert=True)
            elif update.effective_message and update.effective_chat and update.effective_chat.type == ChatType.PRIVATE:
                await call_with_retry(lambda: update.effective_message.reply_text(NOT_ALLOWED))
        except Exception:   # the refusal did not reach them; the update must still go no further
            log.info("could not tell refused user %s", user.id, exc_info=True)
        raise ApplicationHandlerStop

    # --- commands -------------------------------------------------------------------------
    async def start(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Greet and explain the buttons."""
        await update.effective_message.reply_text(WELCOME)

    async def help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """List every command with its description."""
        await update.effective_message.reply_text(help_text(is_admin=self.settings.is_admin(update.effective_user.id)))

    async def reset(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Start a new session: the rolling context begins empty."""
        self.conversation.reset(_speaker(update))
        await update.effective_message.reply_text("Fresh start — I've set our earlier conversation aside. 🌱")

    async def status(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Admins: the live figures, the training schedule and the cycle in progress."""
        report = status_report(self.settings, self.store, self.runtime_info())
        await update.effective_message.reply_text(format_status(report))

    def admin_command(self, name: str):
        """The handler of an admin command: ours (/status) or the lineage ones in bot/admin.py."""
        if name == "status":
            return self.status
        if self.admin is not None:
            return getattr(self.admin, name)

        async def unavailable(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            await update.effective_message.reply_text(
                "The learning loop does not run in this process (ouro serve runs it).")

        return unavailable

    async def refuse_admin(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Non-admins trying an admin command: refuse and keep a record."""
        msg = update.effective_message
        self.store.log_event("admin_refused", user_id=update.effective_user.id, chat_id=update.effective_chat.id,
                             detail=(msg.text or "")[:64])
        log.warning("refused admin command %r from user %s", (msg.text or "")[:32], update.effective_user.id)
        await msg.reply_text(ADMIN_ONLY)

    async def unknown_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Anything that looks like a command but is not one."""
        if self._addressed_to_me(update, context):
            await update.effective_message.reply_text(UNKNOWN_COMMAND)

    # --- messages -------------------------------------------------------------------------
    async def text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A text message: store it, then answer it with a streamed reply and the four buttons."""
        msg = update.effective_message
        if not self._addressed_to_me(update, context):
            return
        text = self._strip_mention(msg.text or "", context)
        who = _speaker(update)
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
            await self._reply(update, context, who, received.turn_id, msg)

    async def _show(self, msg: Message, outcome: Outcome) -> None:
        """What a message settled without the model gets: thanks for a correction, or why not."""
        await call_with_retry(lambda: msg.reply_text(CORRECTION_THANKS if outcome.kind == "correction"
                                                     else outcome.text))

    async def _not_answered(self, msg: Message, turn_id: int, verdict: str) -> None:
        """Over a bound (serving/limits.py): kept, never shown to the model; the person told (once per
        flood window)."""
        if verdict == ADMIT:
            status, notice = "busy", QUEUE_FULL
        else:
            status, notice = "limited", FLOOD_NOTICE if verdict == NOTICE else None
        self.store.mark_turn(turn_id, status, notice)
        if notice is not None:
            await call_with_retry(lambda: msg.reply_text(notice))

    async def _reply(self, update: Update, context: ContextTypes.DEFAULT_TYPE, who: Speaker, turn_id: int,
                     msg: Message) -> None:
        stream = StreamingReply(context.bot, who.chat_id, reply_to=msg.message_id if who.chat_type != "private" else None,
                                interval=self.settings.stream_edit_interval_s)
        # 'typing' is cosmetic: sent beside the reply (the message is already stored)
        typing = asyncio.create_task(self._typing(context.bot, who.chat_id))
        self._background.add(typing)
        typing.add_done_callback(self._background.discard)
        stream.start()
        outcome = await self.conversation.answer(turn_id, on_text=stream.push)
        if outcome.kind != "answered":
            await stream.finish(outcome.text)
            if outcome.error is not None:
                await self.notify_admins(context, f"Reply to turn {outcome.turn_id} failed", outcome.error)
            return
        await stream.finish(outcome.text, markup=keyboards.reply_keyboard(outcome.turn_id),
                            before_markup=lambda ids: self.store.set_reply_message_ids(outcome.turn_id, ids))

    @staticmethod
    async def _typing(bot, chat_id: int) -> None:
        try:
            await bot.send_chat_action(chat_id, ChatAction.TYPING)
        except Exception:  # only cosmetic
            log.debug("send_chat_action failed", exc_info=True)

    async def non_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Stickers, photos, voice, documents: kept as a note in the log, answered kindly."""
        msg = update.effective_message
        if not self._addressed_to_me(update, context):
            return
        kind = next((k for k in ("sticker", "photo", "voice", "video", "video_note", "audio", "document",
                                 "animation", "location", "contact", "poll") if getattr(msg, k, None)), "other")
        who = _speaker(update)
        turn_id = self.store.add_user_turn(chat_id=who.chat_id, user_id=who.user_id, text=f"[{kind}]",
                                           user_message_id=msg.message_id, chat_type=who.chat_type,
                                           username=who.username, first_name=who.first_name, status="pending")
        self.store.mark_turn(turn_id, "refused", NON_TEXT)
        await call_with_retry(lambda: msg.reply_text(NON_TEXT))

    # --- buttons --------------------------------------------------------------------------
    async def button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """👍 👎 🔁 ✏️ and the pick after 🔁 — each press checked against the store."""
        query = update.callback_query
        press = keyboards.reply_press(query.data)
        message = query.message
        if press is None or message is None:
            await query.answer(STALE_BUTTON)
            return
        turn = self.store.turn(press.turn_id)
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
            result = self.store.rate(turn.id, query.from_user.id, value)
            await query.answer({"new": "Thanks for rating!", "changed": "Rating changed.",
                                "same": "Already noted."}[result])
            if result != "same":
                try:
                    await query.edit_message_reply_markup(keyboards.reply_keyboard(turn.id, rated=value))
                except Exception:
                    log.debug("could not mark the rating on the keyboard", exc_info=True)
        elif press.action == keyboards.CORRECT:
            self.store.await_correction(turn.chat_id, query.from_user.id, turn.id)
            await query.answer()
            await call_with_retry(lambda: context.bot.send_message(turn.chat_id, CORRECTION_PROMPT))
        elif press.action == keyboards.REGENERATE:
            await self._regenerate(query, context, turn)

    async def _regenerate(self, query, context: ContextTypes.DEFAULT_TYPE, turn) -> None:
        if self.store.latest_answered_turn(turn.chat_id) != turn.id:
            await query.answer("I can only redo my latest reply.")
            return
        await query.answer("Trying again…")
        stream = StreamingReply(context.bot, turn.chat_id, interval=self.settings.stream_edit_interval_s)
        stream.start()
        try:
            alt_id, text = await self.conversation.regenerate(turn.id, on_text=stream.push)
        except Busy:
            await stream.finish("I'm answering a lot of people right now — try 🔁 again in a minute.")
            return
        except Exception as exc:
            await stream.finish("I couldn't come up with another take just now, sorry.")
            await self.notify_admins(context, f"Regenerating turn {turn.id} failed", exc)
            return
        await stream.finish(text, markup=keyboards.pick_keyboard(turn.id, alt_id),
                            before_markup=lambda ids: self.store.set_alternative_message_ids(alt_id, ids))

    async def _keep(self, query, turn, press: keyboards.Press) -> None:
        alt = self.store.alternative(press.alternative_id)
        if alt is None or alt["turn_id"] != turn.id or query.message.message_id not in alt["message_ids"]:
            await query.answer(STALE_BUTTON)
            return
        recorded = self.store.pick(turn.id, alt["id"], query.from_user.id, keep_alternative=press.keep == 2)
        if not recorded:
            await query.answer("You already picked one — thanks!")
            return
        await query.answer("Thanks — I'll remember which one you liked.")
        try:
            await query.edit_message_reply_markup(None)
        except Exception:
            log.debug("could not remove the pick keyboard", exc_info=True)

    async def recover_interrupted(self, bot) -> None:
        """Turns left pending by a crash (being answered, or waiting their chat's turn): close them
        and ask their authors to resend — one message per chat, naming each."""
        by_chat: dict[int, list[dict]] = {}
        for turn in self.store.pending_turns():
            by_chat.setdefault(turn["chat_id"], []).append(turn)
        for chat_id, turns in by_chat.items():
            snippets = ["“" + t["user_text"][:60] + ("…" if len(t["user_text"]) > 60 else "") + "”" for t in turns]
            text = RESEND.format(snippets[0]) if len(turns) == 1 else RESEND_MANY.format(len(turns), ", ".join(snippets))
            for turn in turns:
                self.store.mark_turn(turn["id"], "failed", text)
            if chat_id == TERMINAL_CHAT_ID:  # no Telegram side to tell
                continue
            try:
                await call_with_retry(lambda c=chat_id, m=text: bot.send_message(c, m), attempts=2)
            except Exception:
                log.warning("could not ask chat %s to resend", chat_id, exc_info=True)
        await self.deliver_interrupted(bot)

    async def deliver_interrupted(self, bot) -> None:
        """Replies written and stored but cut off while being sent (a crash mid-delivery): send them
        now, with their buttons. One attempt each; those of the last day only."""
        since = (datetime.now(UTC) - timedelta(days=1)).isoformat(timespec="milliseconds")
        for turn in self.store.undelivered_turns(since=since):
            if turn["chat_id"] == TERMINAL_CHAT_ID:
                continue
            stream = StreamingReply(bot, turn["chat_id"])
            try:
                await stream.finish(turn["reply_text"], markup=keyboards.reply_keyboard(turn["id"]),
                                    before_markup=lambda ids, t=turn["id"]: self.store.set_reply_message_ids(t, ids))
            except Exception:
                log.warning("could not deliver the stored reply of turn %s", turn["id"], exc_info=True)
                self.store.set_reply_message_ids(turn["id"], stream.message_ids)   # not retried at every start

    # --- errors ---------------------------------------------------------------------------
    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log every unhandled error; admins get the traceback, users a kind word at most."""
        if too_old(context.error):   # a press Telegram gave up on (e.g. made while the bot was down)
            log.info("a button press came too late to be answered: %s", context.error)
            return
        log.error("unhandled error while handling an update", exc_info=context.error)
        if isinstance(update, Update) and update.effective_message and update.effective_chat \
                and update.effective_chat.type == ChatType.PRIVATE:
            try:
                await update.effective_message.reply_text("Sorry, something went wrong on my side. Please try again.")
            except Exception:
                log.debug("could not apologise", exc_info=True)
        if context.error is not None:
            await self.notify_admins(context, "Unhandled error", context.error)

    async def notify_admins(self, context: ContextTypes.DEFAULT_TYPE, title: str, error: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        brief = repr(error)
        token = context.bot.token
        if token:
            tb, brief = tb.replace(token, "<token>"), brief.replace(token, "<token>")
        text = f"<b>{html.escape(title)}</b>\n<pre>{html.escape(tb[-3500:])}</pre>"
        self.store.log_event("error", detail={"title": title, "error": brief[:500]})
        for admin in self.settings.admin_ids:
            try:
                await context.bot.send_message(admin, text, parse_mode="HTML")
            except Exception:
                log.warning("could not send the traceback to admin %s", admin)

    # --- helpers --------------------------------------------------------------------------
    def runtime_info(self) -> dict:
        engine = self.conversation.worker.engine
        info = {"started_at": self.started_at, "queue_depth": self.conversation.worker.backlog,
                "generation_id": engine.generation_id, "model_file": str(engine.model_path),
                "updated": time.time()}
        if self.admin is not None:
            info.update(self.admin.loop_info())
        return info

    def _addressed_to_me(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> bool:
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

    @staticmethod
    def _strip_mention(text: str, context: ContextTypes.DEFAULT_TYPE) -> str:
        me = context.bot.username
        if not me:
            return text
        return re.sub(rf"@{re.escape(me)}\b", "", text, flags=re.IGNORECASE).strip() or text


def _speaker(update: Update) -> Speaker:
    chat, user = update.effective_chat, update.effective_user
    return Speaker(chat_id=chat.id, user_id=user.id, chat_type=chat.type, chat_title=chat.title,
                   username=user.username, first_name=user.first_name)
