"""Editing the message under a pressed button, which Telegram may refuse: cosmetic, so never an error.

Telegram will not edit a message the bot can no longer reach (deleted, or delivered as an
`InaccessibleMessage`), nor one the edit would not change (a double tap on a confirmation
button), and it will not take an answer to a button press it gave up on (one pressed while
the bot was down). None of these should undo what the press did, or reach admins as a crash.
"""

from __future__ import annotations

import logging

from telegram import CallbackQuery, Message
from telegram.error import BadRequest

log = logging.getLogger(__name__)


def too_old(error: BaseException | None) -> bool:
    """The press came too late to be answered (Telegram gives up after a few seconds)."""
    return isinstance(error, BadRequest) and "query is too old" in str(error).lower()


async def answer_pressed(query: CallbackQuery, text: str | None = None) -> None:
    """Answer a press whose action must go ahead even when Telegram no longer takes the answer."""
    try:
        await query.answer(text)
    except BadRequest as exc:
        if not too_old(exc):
            raise
        log.info("a button press came too late to be answered; acting on it anyway")


async def edit_pressed(query: CallbackQuery, text: str) -> bool:
    """Replace the pressed message's text (and drop its buttons); False when Telegram won't."""
    if not isinstance(query.message, Message):
        return False
    try:
        await query.edit_message_text(text)
    except BadRequest as exc:
        log.info("could not edit the pressed message: %s", exc)
        return False
    return True
