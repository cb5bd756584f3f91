"""An export's JSON files wherever the person points: the file itself, a folder, or the zip.

ChatGPT, Facebook and DiscordChatExporter hand over many JSON files, not one (a split
conversations list, a folder per Messenger thread, a file per Discord channel), usually in a
zip. `documents` finds the files a parser asks for by name and yields them decoded one at a
time, each read within limits.py's bounds and all of them together within MAX_EXPORT_BYTES,
so memory holds one file plus the messages kept so far, and nothing is unpacked to disk.
Errors name a file as the person finds it: its path, or "export.zip (inner/path.json)".
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.errors import OuroError
from memory.importers import limits


@dataclass(frozen=True)
class Document:
    name: str       # for errors: the file's path, or "the.zip (member)"
    member: str     # its path inside the folder or zip ("messages/inbox/bob_1/message_1.json"); a file's own name
    file: Path      # what holds it on disk: the file, or the zip
    data: object    # the decoded JSON


def documents(path: Path, wanted: re.Pattern[str], *, looking_for: str, what: str, hint: str,
              lines: bool = True, nested: bool = True) -> Iterator[Document]:
    """Each JSON file whose name fullmatches `wanted`, in natural order (message_2 before message_10).

    A file given directly is read whatever its name. `nested=False`: only the folder's (or the
    zip's) top level. `looking_for` and `what` word the errors ("conversations.json", "a ChatGPT export")."""
    if path.is_dir():
        found = sorted((p for p in (path.rglob("*") if nested else path.iterdir())
                        if wanted.fullmatch(p.name) and p.is_file()), key=lambda p: _natural(p.relative_to(path)))
        if not found:
            raise OuroError(f"{path}: no {looking_for} in this folder, so not {what}", hint=hint)
        total = 0
        for file in found:
            total = _count(path, total, file.stat().st_size, hint)
            yield Document(str(file), file.relative_to(path).as_posix(), file,
                           _load(lambda file=file: limits.read_file(file, hint=hint, lines=lines), file, what, hint))
    elif zipfile.is_zipfile(path):
        yield from _zip_documents(path, wanted, looking_for=looking_for, what=what, hint=hint, lines=lines,
                                  nested=nested)
    else:
        yield Document(str(path), path.name, path,
                       _load(lambda: limits.read_file(path, hint=hint, lines=lines), path, what, hint))


def _zip_documents(path: Path, wanted: re.Pattern[str], *, looking_for: str, what: str, hint: str, lines: bool,
                   nested: bool) -> Iterator[Document]:
    damaged = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError)
    try:
        z = zipfile.ZipFile(path)
    except damaged as exc:
        raise OuroError(f"{path}: a damaged zip ({exc})", hint=hint) from exc
    with z:
        members = sorted((i for i in z.infolist() if not i.is_dir() and wanted.fullmatch(PurePosixPath(i.filename).name)
                          and (nested or "/" not in i.filename)), key=lambda i: _natural(PurePosixPath(i.filename)))
        if not members:
            raise OuroError(f"{path}: no {looking_for} inside this zip, so not {what}", hint=hint)
        total = 0
        for info in members:
            name = f"{path} ({info.filename})"
            total = _count(path, total, info.file_size, hint)

            def read(info=info, name=name) -> bytearray:
                try:
                    with z.open(info) as f:          # inflated 1 MiB at a time, within limits.py's bounds
                        return limits.read_bounded(f, name, hint=hint, size=info.file_size, lines=lines)
                except damaged as exc:
                    raise OuroError(f"{name}: a damaged or encrypted zip entry ({exc})", hint=hint) from exc

            yield Document(name, info.filename, path, _load(read, name, what, hint))


def _count(path: Path, total: int, size: int, hint: str) -> int:
    total += size
    if total > limits.MAX_EXPORT_BYTES:
        raise OuroError(f"{path}: its files hold more than {limits.MAX_EXPORT_BYTES >> 20} MiB, more than a chat "
                        "export holds", hint=hint + "; for a very large account, import its parts one by one")
    return total


def _load(read: Callable[[], bytearray], name: Path | str, what: str, hint: str) -> object:
    """The JSON document in a file, or an OuroError naming the file (and the line and column)."""
    raw = read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise OuroError(f"{name}: byte {exc.start}: not UTF-8 text, so not {what}", hint=hint) from exc
    del raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise OuroError(f"{name}: line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})",
                        hint=hint) from exc
    except ValueError as exc:   # e.g. an integer of more digits than Python converts
        raise OuroError(f"{name}: not valid JSON ({exc})", hint=hint) from exc
    except RecursionError as exc:
        raise OuroError(f"{name}: nested deeper than {what} is, so not one", hint=hint) from exc


def _natural(path: PurePosixPath | Path) -> list:
    """Sort key: the numbers in a path compared as numbers (message_2.json before message_10.json)."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", path.as_posix()))]
