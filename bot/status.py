"""/status for admins: the live figures of this process, the training schedule, the cycle in progress.

The figures come from an injected `runtime_info` (bot/handlers.py), the same ones the heartbeat
writes for `ouro status`, so the chat and the shell report alike.
"""

from __future__ import annotations

from collections.abc import Callable

from telegram import Update
from telegram.ext import ContextTypes

from config.settings import Settings
from memory.store import Store
from serving.status import format_status, status_report


class StatusCommand:
    def __init__(self, settings: Settings, store: Store, runtime_info: Callable[[], dict]) -> None:
        self.settings = settings
        self.store = store
        self.runtime_info = runtime_info

    async def status(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Admins: the live figures, the training schedule and the cycle in progress."""
        report = status_report(self.settings, self.store, self.runtime_info())
        await update.effective_message.reply_text(format_status(report))
