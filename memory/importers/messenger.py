"""Facebook Messenger's JSON export (Download your information → Messages, format JSON).

Each thread is a folder, messages/inbox/<name>_<id>/ (archived, filtered and request threads
sit beside inbox), holding message_1.json, message_2.json, …: a long thread is cut into
several files, each written newest first. One file, a thread folder, the whole export folder
or its zip is read; each thread's messages, from all its files, are put in time order (a tie
keeps the file's order reversed, so it stays chronological). A file is {"participants":
[{"name"}], "messages": [{"sender_name", "timestamp_ms", "content", …}], "thread_path"}.

Facebook writes text as UTF-8 bytes escaped one by one as \\u00XX, so "café" arrives as
"cafÃ©" and an emoji as four odd characters. A string whose characters are all such bytes
and form UTF-8 is decoded again (s.encode("latin-1").decode("utf-8")); any other string
(already right, or plain Latin-1 text) is left as it is.

Left out, by reason: unsent, call, media (photos, videos, audio, GIFs, files, a sticker, with
or without words, as for Telegram), share (a link or post shared: mostly not the person's
words), reaction ("Reacted 😂 to your message" notes), system (someone joined or left, the
group was renamed: any type but Generic), empty. Times are milliseconds since 1970, read as
UTC. A message without sender_name (an account deleted since) is "Facebook user", as
Facebook itself shows it.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath

from core.errors import OuroError
from memory.importers import sources
from memory.importers.chat import Message, Parsed

HINT = ("on Facebook: Settings → Accounts Center → Your information and permissions → Download your information → "
        "Messages, format JSON; pass the .zip, its unpacked folder, a thread folder (messages/inbox/<name>/) or "
        "one message_1.json")
FILES = re.compile(r"message_\d+\.json")
MEDIA_KEYS = ("photos", "videos", "audio_files", "gifs", "files", "sticker")
_REACTION = re.compile(r"Reacted .{1,16} to your message")
_EPOCH = datetime(1970, 1, 1)


def fix_text(s: str) -> str:
    """Facebook's mojibake undone: "cafÃ©" → "café"; a string that is not mojibake comes back unchanged."""
    try:
        return s.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return s


def parse(path: Path) -> Parsed:
    parsed = Parsed()
    threads: dict[str, list[tuple[int, int, Message]]] = {}   # thread → (time, -file order, message)
    order = 0
    for doc in sources.documents(path, FILES, looking_for="message_1.json", what="a Messenger export", hint=HINT):
        parsed.files.append(doc.file)
        data = doc.data
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise OuroError(f"{doc.name}: not a Messenger thread (no \"messages\" list)", hint=HINT)
        thread = data.get("thread_path")
        if not isinstance(thread, str) or not thread:
            parent = PurePosixPath(doc.member).parent.as_posix()
            thread = parent if parent != "." else doc.file.parent.name
        kept = threads.setdefault(thread, [])
        names = [fix_text(p["name"]) for p in data.get("participants") or [] if isinstance(p, dict)
                 and isinstance(p.get("name"), str)]
        if len(names) == 2 and isinstance(data.get("title"), str) and fix_text(data["title"]) in names:
            parsed.not_exporter.add(fix_text(data["title"]))   # a one-to-one thread is named after the other person
        for i, m in enumerate(data["messages"]):
            at = f"{doc.name}: messages[{i}]"
            if not isinstance(m, dict):
                raise OuroError(f"{at}: expected a message object", hint=HINT)
            parsed.read += 1
            ms = m.get("timestamp_ms")
            if isinstance(ms, bool) or not isinstance(ms, int):
                raise OuroError(f"{at}: no 'timestamp_ms' (milliseconds since 1970)", hint=HINT)
            sender = m.get("sender_name", "Facebook user")
            if not isinstance(sender, str):
                raise OuroError(f"{at}: 'sender_name' is not a string", hint=HINT)
            content = m.get("content", "")
            if not isinstance(content, str):
                raise OuroError(f"{at}: 'content' is not a string", hint=HINT)
            text = fix_text(content).strip()
            reason = _drop_reason(m, text)
            if reason:
                parsed.dropped[reason] += 1
                continue
            order += 1
            kept.append((ms, -order, Message(chat=thread, speaker=fix_text(sender).strip(), at=_when(at, ms),
                                             text=text)))
    for kept in threads.values():
        parsed.messages.extend(m for _, _, m in sorted(kept, key=lambda k: k[:2]))
    return parsed


def _drop_reason(m: dict, text: str) -> str | None:
    """Why a message is not someone's own typed words, or None when it is."""
    if m.get("is_unsent"):
        return "unsent"
    if m.get("type") == "Call" or "call_duration" in m:
        return "call"
    if any(m.get(k) for k in MEDIA_KEYS):
        return "media"
    if m.get("type") == "Share" or m.get("share"):
        return "share"
    if m.get("type", "Generic") != "Generic":
        return "system"
    if not text:
        return "empty"
    if _REACTION.fullmatch(text):
        return "reaction"
    return None


def _when(at: str, ms: int) -> datetime:
    try:
        return _EPOCH + timedelta(milliseconds=ms)
    except OverflowError as exc:
        raise OuroError(f"{at}: 'timestamp_ms' {ms} is not a readable time", hint=HINT) from exc
