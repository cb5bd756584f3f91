"""Inline buttons and their callback data.

Callback data is untrusted input: anyone can send any 64 bytes. It only names an action and
record ids; every press is then checked against the store (the turn exists, the button sits
on that turn's own message in that chat, and the presser is the person it answered).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

RATE_UP, RATE_DOWN, REGENERATE, CORRECT, KEEP = "up", "down", "regen", "fix", "keep"
_PATTERN = re.compile(r"^o1:(up|down|regen|fix|keep):(\d{1,12})(?::(\d{1,12}):([12]))?$")


@dataclass(frozen=True)
class Press:
    action: str
    turn_id: int
    alternative_id: int | None = None
    keep: int | None = None          # 1 = the first reply, 2 = the regenerated one


def encode(action: str, turn_id: int, alternative_id: int | None = None, keep: int | None = None) -> str:
    data = f"o1:{action}:{turn_id}"
    if alternative_id is not None:
        data += f":{alternative_id}:{keep}"
    return data


def decode(data: str | None) -> Press | None:
    """A Press, or None for anything this bot did not make."""
    if not data or len(data) > 64:
        return None
    m = _PATTERN.fullmatch(data)
    if not m:
        return None
    action, turn, alt, keep = m.groups()
    if action == KEEP and alt is None:
        return None
    if action != KEEP and alt is not None:
        return None
    return Press(action, int(turn), int(alt) if alt else None, int(keep) if keep else None)


def reply_keyboard(turn_id: int, rated: int | None = None) -> InlineKeyboardMarkup:
    up = "👍✓" if rated == 1 else "👍"
    down = "👎✓" if rated == -1 else "👎"
    return InlineKeyboardMarkup([[
        InlineKeyboardButton(up, callback_data=encode(RATE_UP, turn_id)),
        InlineKeyboardButton(down, callback_data=encode(RATE_DOWN, turn_id)),
        InlineKeyboardButton("🔁", callback_data=encode(REGENERATE, turn_id)),
        InlineKeyboardButton("✏️", callback_data=encode(CORRECT, turn_id)),
    ]])


def pick_keyboard(turn_id: int, alternative_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[
        InlineKeyboardButton("Keep the first", callback_data=encode(KEEP, turn_id, alternative_id, 1)),
        InlineKeyboardButton("Keep this one", callback_data=encode(KEEP, turn_id, alternative_id, 2)),
    ]])
