"""What every parser returns: plain text messages in time order within each chat, plus what it left out and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class Message:
    """One text message as written; `chat` keeps the chats of a full-account export apart."""

    chat: str
    speaker: str
    at: datetime          # the chat's local clock (or UTC), naive: only gaps between messages matter
    text: str
    aliases: tuple[str, ...] = ()   # other names the speaker goes by here (Discord's nickname): --me may match one
    rejected: tuple[str, ...] = ()  # replies regenerated in its place that the person moved away from (ChatGPT)


@dataclass
class Parsed:
    messages: list[Message] = field(default_factory=list)
    read: int = 0                                            # every message in the file, kept or not
    dropped: Counter = field(default_factory=Counter)       # reason → count (media, service, forwarded, …)
    files: list[Path] = field(default_factory=list)         # what was read when PATH is a folder: its fingerprint
    not_exporter: set[str] = field(default_factory=set)     # speakers the export shows are not its exporter
