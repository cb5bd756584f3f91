"""Who said what in a group, and how much later: a group turn's user message as the model reads it.

In a private chat the model talks with one person, so a message goes in as it was written. In a
group several people talk to the bot in one context; without names it would answer Bob with what
Ann said. So a group turn carries a speaker label, fixed when the message is stored (a later
rename changes nothing already said), and its message is read as "Ann: …", preceded by
"[5 hours later]" when the group was quiet for more than `GAP_NOTE_AFTER_H` hours. Both stay
inside the user message: chat templates that refuse a system message mid-conversation still work.

Serving (serving/context.py) and training (memory/export.served_context) both render with
`as_read`, so a generation is trained on exactly the text it was served. That is also why the
gap threshold is a constant here and not a setting: changing it would change what old turns read.
"""

from __future__ import annotations

import unicodedata
from datetime import datetime

GROUP_CHATS = ("group", "supergroup")
MAX_NAME = 32
GAP_NOTE_AFTER_H = 3
# A label that reads like a role would have the model take a person's words for its own or the system's.
ROLE_WORDS = {"system", "user", "assistant", "model", "tool", "bot", "developer", "function", "human"}
_KEPT_PUNCTUATION = set(".-_'")


def clean_name(name: str | None) -> str:
    """A name reduced to letters, digits, marks, emoji, spaces and . - _ ': no newlines, no control or
    invisible characters, nothing a chat template uses to mark turns (<|…|>, [INST], ###, …), at most
    MAX_NAME characters."""
    kept = []
    for ch in unicodedata.normalize("NFKC", name or ""):
        kind = unicodedata.category(ch)
        if kind[0] in "LMN" or kind == "So" or ch in _KEPT_PUNCTUATION:
            kept.append(ch)
        elif kind[0] == "Z" or ch in "\t\n\r":
            kept.append(" ")
    text = " ".join("".join(kept).split()).strip(".-_' ")
    return text[:MAX_NAME].rstrip(".-_' ")


def speaker_label(first_name: str | None, username: str | None, user_id: int) -> str:
    """The name a group's messages are read under: the first name, else the username, else a stable
    stand-in ("User 0042" from the id) — never empty, never a role word."""
    for candidate in (first_name, username):
        name = clean_name(candidate)
        if name and name.casefold() not in ROLE_WORDS:
            return name
    return f"User {abs(user_id) % 10_000:04d}"


def label_for(chat_type: str, first_name: str | None, username: str | None, user_id: int) -> str | None:
    """The label stored with a turn: groups only (None in private chats, whose text stays as written)."""
    return speaker_label(first_name, username, user_id) if chat_type in GROUP_CHATS else None


def gap_note(previous_at: str | None, at: str | None) -> str:
    """"[5 hours later] " when more than GAP_NOTE_AFTER_H hours passed between two stored times, else ""."""
    if not previous_at or not at:
        return ""
    hours = (datetime.fromisoformat(at) - datetime.fromisoformat(previous_at)).total_seconds() / 3600
    if hours <= GAP_NOTE_AFTER_H:
        return ""
    if hours < 48:
        return f"[{int(hours)} hours later] "
    return f"[{int(hours // 24)} days later] "


def as_read(text: str, speaker: str | None, at: str | None, previous_at: str | None) -> str:
    """A user message as the model reads it. `speaker` None (a private chat, or a turn stored before
    groups were named) leaves the text as written; `previous_at` is when the turn before it in the
    same context was written (None for the first one)."""
    if speaker is None:
        return text
    return f"{gap_note(previous_at, at)}{speaker}: {text}"
