"""The commands everyone has: /start, /help, /reset, and a word for commands that don't exist.

Privacy commands have their own module (bot/privacy.py); admin ones are bot/status.py and bot/admin.py.
"""

from __future__ import annotations

from telegram import Update
from telegram.ext import ContextTypes

from bot.addressing import addressed_to_me, speaker
from bot.commands import help_text
from config.settings import Settings
from serving.conversation import Conversation

WELCOME = ("Hi! I'm a persona that learns from how people talk to me. Just write to me.\n"
           "Rate my replies with the buttons below them — that is how I get better.\n"
           "/help lists everything; /privacy says what I keep.")
UNKNOWN_COMMAND = "I don't know that command — /help lists the ones I understand."


class UserCommands:
    def __init__(self, settings: Settings, conversation: Conversation) -> None:
        self.settings = settings
        self.conversation = conversation

    async def start(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Greet and explain the buttons."""
        await update.effective_message.reply_text(WELCOME)

    async def help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """List every command with its description."""
        await update.effective_message.reply_text(help_text(is_admin=self.settings.is_admin(update.effective_user.id)))

    async def reset(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Start a new session: the rolling context begins empty."""
        self.conversation.reset(speaker(update))
        await update.effective_message.reply_text("Fresh start — I've set our earlier conversation aside. 🌱")

    async def unknown(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Anything that looks like a command but is not one."""
        if addressed_to_me(update, context):
            await update.effective_message.reply_text(UNKNOWN_COMMAND)
