"""Who may talk to the bot, and who may use its admin commands.

The allow-list gate runs before every other handler; people not on it, and non-admins trying
an admin command, get one polite refusal and an audit event — never a hint of what is behind.
A stranger is told (and recorded) once an hour, however much they send: a flood is not answered
message for message, nor does it grow the audit trail (a press on a button is always answered,
or their client spins).
"""

from __future__ import annotations

import logging

from telegram import Update
from telegram.constants import ChatType
from telegram.ext import ApplicationHandlerStop, ContextTypes

from bot.retry import call_with_retry
from config.settings import Settings
from memory.store import Store
from serving.limits import ADMIT, FloodLimit

log = logging.getLogger(__name__)

NOT_ALLOWED = "Sorry — this bot is private, and you're not on its list of users. Ask its owner for access."
ADMIN_ONLY = "Sorry, that command is for the bot's admins."
REFUSAL_WINDOW_S = 3600.0


class Gate:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.recorded = FloodLimit(1, REFUSAL_WINDOW_S)   # one audit event per stranger an hour
        self.told = FloodLimit(1, REFUSAL_WINDOW_S)       # one private refusal per stranger an hour

    async def check(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Runs before every other handler: people not on the allow-list get one polite refusal."""
        user = update.effective_user
        if user is None:   # channel posts, or a message whose sender Telegram left out: nobody to answer
            raise ApplicationHandlerStop
        if self.settings.may_chat(user.id):
            return
        if self.recorded.check(user.id) == ADMIT:
            self.store.log_event("user_refused", user_id=user.id,
                                 chat_id=update.effective_chat.id if update.effective_chat else None)
        try:
            if update.callback_query:
                await update.callback_query.answer(NOT_ALLOWED, show_alert=True)
            elif update.effective_message and update.effective_chat \
                    and update.effective_chat.type == ChatType.PRIVATE and self.told.check(user.id) == ADMIT:
                await call_with_retry(lambda: update.effective_message.reply_text(NOT_ALLOWED))
        except Exception:   # the refusal did not reach them; the update must still go no further
            log.info("could not tell refused user %s", user.id, exc_info=True)
        raise ApplicationHandlerStop

    async def refuse_admin(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Non-admins trying an admin command: refuse and keep a record."""
        msg = update.effective_message
        self.store.log_event("admin_refused", user_id=update.effective_user.id, chat_id=update.effective_chat.id,
                             detail=(msg.text or "")[:64])
        log.warning("refused admin command %r from user %s", (msg.text or "")[:32], update.effective_user.id)
        await msg.reply_text(ADMIN_ONLY)
