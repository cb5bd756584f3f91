"""The error sink: every unhandled error is logged and its traceback sent to the admins.

Users get a kind word at most, never exception text; the bot token is masked before anything
leaves the process. Handlers that catch a failure of their own report it here too.
"""

from __future__ import annotations

import html
import logging
import traceback

from telegram import Update
from telegram.constants import ChatType
from telegram.ext import ContextTypes

from bot.edits import too_old
from config.settings import Settings
from memory.store import Store

log = logging.getLogger(__name__)


class ErrorSink:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

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
