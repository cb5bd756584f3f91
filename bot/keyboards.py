"""Every inline keyboard the bot shows, and the one codec of their callback data.

Callback data is untrusted input: anyone can send any 64 bytes. Each family of buttons has one
grammar here (`o1:<family>:<fields>`); data that does not fullmatch it decodes to None. Decoded
data only names an action and record ids: every press is then checked against the store (the
turn exists, the button sits on that turn's own message in that chat, the presser may press it).

    o1:<up|down|regen|fix>:<turn>            a reply's rating, regenerate and correct buttons
    o1:why:<turn>:<reason>                   why the person 👎'd it (memory/feedback.py REASONS)
    o1:keep:<turn>:<alternative>:<1|2>       which of two replies the person keeps
    o1:adm:<promote|rollback|cancel>:<gen>:<gen active when asked>
    o1:rv:<ok|no|ed|sk>:<turn>               a review verdict
    o1:rf:<keep|edit|drop|skip>:<proposal>   a self-refinement proposal's verdict (memory/proposals.py)
    o1:fg:<yes|no>:<user>                    the /forget confirmation
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from memory.feedback import REASONS

MAX_DATA = 64   # Telegram's limit on callback data, in bytes
RATE_UP, RATE_DOWN, REGENERATE, CORRECT, KEEP, REASON = "up", "down", "regen", "fix", "keep", "why"
_ID, _GEN = r"(\d{1,12})", r"(gen-\d{4,8})"

# family -> (the prefix a CallbackQueryHandler routes on, the whole grammar)
FAMILIES = {
    "reply": (r"^o1:(?:up|down|regen|fix|keep|why):",
              re.compile(rf"o1:(up|down|regen|fix):{_ID}|o1:(keep):{_ID}:{_ID}:([12])"
                         rf"|o1:(why):{_ID}:({'|'.join(REASONS)})")),
    "admin": (r"^o1:adm:", re.compile(rf"o1:adm:(promote|rollback|cancel):{_GEN}:{_GEN}")),
    "review": (r"^o1:rv:", re.compile(rf"o1:rv:(ok|no|ed|sk):{_ID}")),
    "forget": (r"^o1:fg:", re.compile(rf"o1:fg:(yes|no):{_ID}")),
    "proposal": (r"^o1:rf:", re.compile(rf"o1:rf:(keep|edit|drop|skip):{_ID}")),
}
REPLY_PATTERN, ADMIN_PATTERN, REVIEW_PATTERN, FORGET_PATTERN, PROPOSAL_PATTERN = (FAMILIES[f][0] for f in FAMILIES)
_PREFIX = {"reply": "o1", "admin": "o1:adm", "review": "o1:rv", "forget": "o1:fg", "proposal": "o1:rf"}


def encode(family: str, *fields: object) -> str:
    data = ":".join([_PREFIX[family], *(str(f) for f in fields)])
    if decode(family, data) is None:
        raise ValueError(f"not valid {family} callback data: {data!r}")
    return data


def decode(family: str, data: str | None) -> tuple[str, ...] | None:
    """The fields of `data` if it is this family's, else None (anything this bot did not make)."""
    if not data or len(data.encode("utf-8")) > MAX_DATA:
        return None
    m = FAMILIES[family][1].fullmatch(data)
    return None if m is None else tuple(g for g in m.groups() if g is not None)


# --- a reply's buttons -------------------------------------------------------------------------
@dataclass(frozen=True)
class Press:
    action: str
    turn_id: int
    alternative_id: int | None = None
    keep: int | None = None          # 1 = the first reply, 2 = the regenerated one
    reason: str | None = None        # why: a REASONS key


def reply_data(action: str, turn_id: int, alternative_id: int | None = None, keep: int | None = None) -> str:
    return encode("reply", action, turn_id, *(() if alternative_id is None else (alternative_id, keep)))


def reply_press(data: str | None) -> Press | None:
    fields = decode("reply", data)
    if fields is None:
        return None
    action, turn, *rest = fields
    if action == REASON:
        return Press(action, int(turn), reason=rest[0])
    return Press(action, int(turn), *(int(x) for x in rest))


def reply_keyboard(turn_id: int, rated: int | None = None, *, ask_reason: bool = False) -> InlineKeyboardMarkup:
    """👍 👎 🔁 ✏️ — and, right after a 👎 (`ask_reason`), one optional tap on why, in two rows below."""
    up = "👍✓" if rated == 1 else "👍"
    down = "👎✓" if rated == -1 else "👎"
    rows = [[
        InlineKeyboardButton(up, callback_data=reply_data(RATE_UP, turn_id)),
        InlineKeyboardButton(down, callback_data=reply_data(RATE_DOWN, turn_id)),
        InlineKeyboardButton("🔁", callback_data=reply_data(REGENERATE, turn_id)),
        InlineKeyboardButton("✏️", callback_data=reply_data(CORRECT, turn_id)),
    ]]
    if ask_reason:
        reasons = [InlineKeyboardButton(label, callback_data=encode("reply", REASON, turn_id, key))
                   for key, label in REASONS.items()]
        rows += [reasons[:3], reasons[3:]]
    return InlineKeyboardMarkup(rows)


def pick_keyboard(turn_id: int, alternative_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[
        InlineKeyboardButton("Keep the first", callback_data=reply_data(KEEP, turn_id, alternative_id, 1)),
        InlineKeyboardButton("Keep this one", callback_data=reply_data(KEEP, turn_id, alternative_id, 2)),
    ]])


# --- admins, review, privacy -------------------------------------------------------------------
def confirm_keyboard(action: str, gen_id: str, active: str) -> InlineKeyboardMarkup:
    """/promote and /rollback: the button carries the generation active when it was asked, so a stale
    button cannot move the pointer after someone else did."""
    return InlineKeyboardMarkup([[
        InlineKeyboardButton(f"Yes, {action} to {gen_id}", callback_data=encode("admin", action, gen_id, active)),
        InlineKeyboardButton("Cancel", callback_data=encode("admin", "cancel", gen_id, active)),
    ]])


def review_keyboard(turn_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[
        InlineKeyboardButton("✅ Approve", callback_data=encode("review", "ok", turn_id)),
        InlineKeyboardButton("🚫 Reject", callback_data=encode("review", "no", turn_id)),
        InlineKeyboardButton("✏️ Edit", callback_data=encode("review", "ed", turn_id)),
        InlineKeyboardButton("⏭ Skip", callback_data=encode("review", "sk", turn_id)),
    ]])


def proposal_keyboard(proposal_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[
        InlineKeyboardButton("✅ Keep as a pair", callback_data=encode("proposal", "keep", proposal_id)),
        InlineKeyboardButton("✏️ Edit then keep", callback_data=encode("proposal", "edit", proposal_id)),
    ], [
        InlineKeyboardButton("🚫 Drop", callback_data=encode("proposal", "drop", proposal_id)),
        InlineKeyboardButton("⏭ Skip", callback_data=encode("proposal", "skip", proposal_id)),
    ]])


def forget_keyboard(user_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[
        InlineKeyboardButton("🗑 Yes, forget me", callback_data=encode("forget", "yes", user_id)),
        InlineKeyboardButton("Cancel", callback_data=encode("forget", "no", user_id)),
    ]])
