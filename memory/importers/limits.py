"""Reading an export file with bounds, so a wrong or hostile file fails fast in little memory.

Chat exports are big but regular: Telegram Desktop writes its JSON one value per line, WhatsApp
one message per line, and a message is at most a few thousand characters (Telegram: 4096,
WhatsApp: 65536). So a file is read 1 MiB at a time and refused, naming the file and the line,
as soon as it passes MAX_FILE_BYTES or a line passes MAX_LINE_BYTES — a 50 MB single line or
a zip that inflates to gigabytes costs about 2 MiB to refuse. Real exports stay far below both
limits; for a bigger account, export the chats one by one.

ChatGPT writes conversations.json as one line of JSON, so its reader passes lines=False and
only the size is bounded. An export of many files (a folder or a zip: sources.py) may hold
MAX_EXPORT_BYTES in all; they are read one at a time, so memory holds one file at most.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from core.errors import OuroError

MAX_FILE_BYTES = 256 << 20
MAX_LINE_BYTES = 1 << 20
MAX_EXPORT_BYTES = 1 << 30     # all the files of one folder or zip export together
_CHUNK = 1 << 20          # never more than MAX_LINE_BYTES: see read_bounded


def read_bounded(stream: BinaryIO, name: Path | str, *, hint: str, size: int = 0, lines: bool = True) -> bytearray:
    """All of `stream`, or an OuroError naming `name` once it is too big or has too long a line.

    `size`: what the file (or zip entry) says it holds, refused before reading when too big; what
    is read is counted anyway, since a zip entry's stated size can lie. `lines=False`: no bound
    on a line (a format written as one line of JSON)."""
    data = bytearray()
    line, run = 1, 0          # the current line's number and its length so far
    while size <= MAX_FILE_BYTES and (chunk := stream.read(_CHUNK)):
        size = len(data) + len(chunk)
        if size > MAX_FILE_BYTES:
            break
        first = chunk.find(b"\n")
        if first < 0:
            run += len(chunk)
        elif run + first > MAX_LINE_BYTES:
            run += first
        else:   # lines that start and end inside one chunk are shorter than a chunk, so within the limit
            line += chunk.count(b"\n")
            run = len(chunk) - chunk.rfind(b"\n") - 1
        if lines and run > MAX_LINE_BYTES:
            raise OuroError(f"{name}: line {line}: longer than {MAX_LINE_BYTES >> 20} MiB, more than any message "
                            "of a chat export", hint=hint)
        data += chunk
    if size > MAX_FILE_BYTES:
        raise OuroError(f"{name}: larger than {MAX_FILE_BYTES >> 20} MiB, more than a chat export holds",
                        hint=hint + "; for a very large account, export the chats one by one")
    return data


def read_file(path: Path, *, hint: str, lines: bool = True) -> bytearray:
    with path.open("rb") as f:
        return read_bounded(f, path, hint=hint, size=path.stat().st_size, lines=lines)


# A character card (card.py) is one JSON document, or a PNG image carrying it: real ones, pictures
# included, are a few MiB. Its JSON, also when it is zlib-compressed inside the PNG, is held to the same.
MAX_CARD_BYTES = 32 << 20
