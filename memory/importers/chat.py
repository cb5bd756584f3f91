"""What every parser returns: plain text messages in file order, plus what it left out and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Message:
    """One text message as written; `chat` keeps the chats of a full-account export apart."""

    chat: str
    speaker: str
    at: datetime          # the chat's local clock, naive: only gaps between messages matter
    text: str


@dataclass
class Parsed:
    messages: list[Message] = field(default_factory=list)
    read: int = 0                                            # every message in the file, kept or not
    dropped: Counter = field(default_factory=Counter)       # reason → count (media, service, forwarded, …)
