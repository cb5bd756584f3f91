"""Discord channels as DiscordChatExporter writes them in its JSON format (one channel per file).

Discord has no export of its own for messages; DiscordChatExporter (github.com/Tyrrrz/
DiscordChatExporter, format "JSON") writes {"guild", "channel": {"id", "name", …}, "messages":
[{"id", "type", "timestamp", "content", "author": {"id", "name", "nickname", "isBot"},
"attachments", "embeds", "stickers"}]}, oldest first. One file, or a folder (or zip) of them
at its top level, is read; each channel is its own chat.

The speaker is the author's user name, and the nickname the exporter wrote (server nickname or
display name) is an alias, so --me may give either. Bots stay in as other speakers: what they
post is part of what the owner answered. Kept: Default and Reply messages (a reply is an
ordinary message that quotes another). Left out, by reason: call, system (joins, pins, boosts,
thread and channel events, slash-command notes: every other type), media (an attachment or a
sticker, with or without words, as for Telegram), empty (e.g. only an embed). Timestamps are
ISO 8601 with the exporting machine's UTC offset; they are read as UTC, so a daylight-saving
change inside a channel neither reorders nor splits it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from core.errors import OuroError
from memory.importers import sources
from memory.importers.chat import Message, Parsed

HINT = ("export the channel or DM with DiscordChatExporter (github.com/Tyrrrz/DiscordChatExporter), "
        "format JSON; pass the .json file, or a folder or zip of them")
FILES = re.compile(r"[^/]+\.json")
KEPT_TYPES = ("Default", "Reply")


def parse(path: Path) -> Parsed:
    parsed = Parsed()
    channels: dict[str, list[Message]] = {}       # a channel exported in parts has one id across its files
    for doc in sources.documents(path, FILES, looking_for=".json file", what="a DiscordChatExporter export",
                                 hint=HINT, nested=False):
        parsed.files.append(doc.file)
        data = doc.data
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise OuroError(f"{doc.name}: not a DiscordChatExporter JSON export (no \"messages\" list)", hint=HINT)
        channel = data.get("channel") if isinstance(data.get("channel"), dict) else {}
        chat = str(channel.get("id") or doc.member)
        kept = channels.setdefault(chat, [])
        for i, m in enumerate(data["messages"]):
            at = f"{doc.name}: messages[{i}]"
            if not isinstance(m, dict):
                raise OuroError(f"{at}: expected a message object", hint=HINT)
            if isinstance(m.get("id"), str | int) and not isinstance(m.get("id"), bool):
                at += f" (id {m['id']})"
            parsed.read += 1
            author = m.get("author")
            if not isinstance(author, dict) or not isinstance(author.get("name"), str):
                raise OuroError(f"{at}: no 'author' with a 'name'", hint=HINT)
            content = m.get("content", "")
            if not isinstance(content, str):
                raise OuroError(f"{at}: 'content' is not a string", hint=HINT)
            when = _when(at, m.get("timestamp"))
            reason = _drop_reason(m, content.strip())
            if reason:
                parsed.dropped[reason] += 1
                continue
            nickname = author.get("nickname")
            aliases = (nickname,) if isinstance(nickname, str) and nickname and nickname != author["name"] else ()
            kept.append(Message(chat=chat, speaker=author["name"], at=when, text=content.strip(), aliases=aliases))
    for kept in channels.values():
        parsed.messages.extend(sorted(kept, key=lambda m: m.at))   # stable: the files' order breaks ties
    return parsed


def _drop_reason(m: dict, text: str) -> str | None:
    kind = m.get("type", "Default")
    if kind == "Call":
        return "call"
    if kind not in KEPT_TYPES:
        return "system"
    if m.get("attachments") or m.get("stickers"):
        return "media"
    if not text:
        return "empty"
    return None


def _when(at: str, value) -> datetime:
    """ISO 8601 → naive UTC (a time without an offset is taken as written)."""
    try:
        t = datetime.fromisoformat(value)
        return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t
    except (TypeError, ValueError, OverflowError) as exc:
        raise OuroError(f"{at}: missing or unreadable 'timestamp' ({value!r})", hint=HINT) from exc
