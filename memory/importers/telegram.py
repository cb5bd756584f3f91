"""Telegram Desktop's JSON export: one chat ("Export chat history") or the whole account.

A single chat is {"name", "type", "id", "messages": [...]}; the full-account export ("Export
Telegram data") nests its chats under {"chats": {"list": [...]}}. A message's `text` is a
string or a list of parts (plain strings and {"type", "text"} entities: links, bold, mentions…),
flattened here to plain text. Left out, by reason: service messages (joins, calls, pins),
media (photos, stickers, voice notes, files, polls, locations: their words are not the
persona's text), forwarded messages and inline-bot results (someone else's words), and chats
without a dialogue (channels, Saved Messages, bots). A personal chat carries the other person's
name: they are not the exporter (pipeline.py's consent rule). Errors name the file and the JSON line
and column, or the path inside the document (e.g. chats.list[2].messages[17]).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from core.errors import OuroError
from memory.importers.chat import Message, Parsed
from memory.importers.limits import read_file

HINT = ("export it from Telegram Desktop as JSON: a chat's ⋮ menu → Export chat history, or "
        "Settings → Advanced → Export Telegram data (format: Machine-readable JSON); pass result.json")
SKIPPED_CHAT_TYPES = ("saved_messages", "public_channel", "private_channel", "bot_chat")   # a tuple: "type" may be any JSON
MEDIA_KEYS = ("photo", "file", "media_type", "sticker_emoji", "poll", "contact_information",
              "location_information", "place_name", "game_title", "invoice_information")


def parse(path: Path) -> Parsed:
    raw = read_file(path, hint=HINT)   # bounded: size and line length (memory/importers/limits.py)
    try:
        text = raw.decode("utf-8-sig")
        del raw
        data = json.loads(text)
    except UnicodeDecodeError as exc:
        raise OuroError(f"{path}: byte {exc.start}: not UTF-8 text, so not a Telegram JSON export", hint=HINT) from exc
    except json.JSONDecodeError as exc:
        raise OuroError(f"{path}: line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})",
                        hint=HINT) from exc
    except ValueError as exc:   # e.g. an integer of more digits than Python converts
        raise OuroError(f"{path}: not valid JSON ({exc})", hint=HINT) from exc
    except RecursionError as exc:
        raise OuroError(f"{path}: nested deeper than any Telegram export, so not one", hint=HINT) from exc
    parsed = Parsed()
    for where, chat in _chats(path, data):
        _parse_chat(path, where, chat, parsed)
    return parsed


def _chats(path: Path, data) -> list[tuple[str, dict]]:
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        return [("", data)]
    chats = data.get("chats") if isinstance(data, dict) else None
    if isinstance(chats, dict) and isinstance(chats.get("list"), list):
        out = []
        for i, chat in enumerate(chats["list"]):
            if not isinstance(chat, dict):
                raise OuroError(f"{path}: chats.list[{i}]: expected a chat object", hint=HINT)
            out.append((f"chats.list[{i}].", chat))
        return out
    raise OuroError(f"{path}: not a Telegram Desktop export (no \"messages\" list and no \"chats\": {{\"list\"}})",
                    hint=HINT)


def _parse_chat(path: Path, where: str, chat: dict, parsed: Parsed) -> None:
    messages = chat.get("messages", [])
    if not isinstance(messages, list):
        raise OuroError(f"{path}: {where}messages: expected a list", hint=HINT)
    chat_key = str(chat.get("id", where or "chat"))
    skip_chat = chat.get("type") in SKIPPED_CHAT_TYPES
    if chat.get("type") == "personal_chat" and isinstance(chat.get("name"), str):
        parsed.not_exporter.add(chat["name"])     # a one-to-one chat is named after the other person
    for i, m in enumerate(messages):
        at = f"{path}: {where}messages[{i}]"
        if not isinstance(m, dict):
            raise OuroError(f"{at}: expected a message object", hint=HINT)
        if "id" in m:
            at += f" (id {m['id']})"
        parsed.read += 1
        reason = "skipped_chat" if skip_chat else _drop_reason(m)
        if reason:
            parsed.dropped[reason] += 1
            continue
        text = _text(m.get("text"), at).strip()
        if not text:
            parsed.dropped["empty"] += 1
            continue
        speaker = m.get("from") or m.get("from_id") or "Deleted Account"
        parsed.messages.append(Message(chat=chat_key, speaker=str(speaker), at=_date(m, at), text=text))


def _drop_reason(m: dict) -> str | None:
    """Why a message is not the owner's or a partner's own typed words, or None when it is."""
    if m.get("type") == "service":
        return "service"
    if m.get("type") != "message":
        return "other"
    if "forwarded_from" in m:
        return "forwarded"
    if "via_bot" in m:
        return "via_bot"
    if any(k in m for k in MEDIA_KEYS):
        return "media"
    return None


def _text(value, at: str) -> str:
    """A string, or a list of strings and {"type", "text"} entity parts, as plain text."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise OuroError(f"{at}: text: a part is neither a string nor an entity with \"text\"", hint=HINT)
        return "".join(parts)
    raise OuroError(f"{at}: text: expected a string or a list of parts", hint=HINT)


def _date(m: dict, at: str) -> datetime:
    try:
        if isinstance(m.get("date"), str):
            return datetime.fromisoformat(m["date"]).replace(tzinfo=None)
        return datetime.fromtimestamp(int(m["date_unixtime"]))
    except (KeyError, TypeError, ValueError, OverflowError, OSError) as exc:
        raise OuroError(f"{at}: missing or unreadable \"date\" ({m.get('date')!r})", hint=HINT) from exc
