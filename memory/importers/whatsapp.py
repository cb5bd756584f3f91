"""WhatsApp's "Export chat" text file (without media), from Android or iOS, in the common locales.

Each message starts a line with its date and time; a line that does not is the next line of
a multi-line message. The layouts differ by platform and locale:

    Android  12/31/23, 21:05 - Name: text        31.12.23, 21:05 - Name: text
             12/31/23, 9:05 PM - Name: text      31/12/2023, 21:05 - Name: text
    iOS      [31/12/2023, 21:05:09] Name: text   [12/31/23, 9:05:09 PM] Name: text

iOS puts a narrow no-break space (U+202F) before AM/PM and a left-to-right mark (U+200E) in
front of its media and system notes, which it writes under the chat's name. Whether 01/02
means January 2nd or February 1st is decided once per file: a first number above 12 means
day first, a second one above 12 means month first, otherwise the reading under which time
runs forward more often wins (ties: day first). Left out, by reason: media (`<Media omitted>`,
`image omitted`, attached files), system lines (the encryption notice, joins, subject changes,
missed calls), deleted messages. A zip (iOS shares one) is read from the .txt inside it.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path

from core.errors import OuroError
from memory.importers.chat import Message, Parsed
from memory.importers.limits import read_bounded, read_file

HINT = ("in WhatsApp: open the chat → ⋮ (Android) or the contact's name (iOS) → Export chat → Without media; "
        "pass the .txt (or the .zip iOS makes)")
_START = re.compile(
    r"\[?(?P<date>\d{1,4}[./-]\d{1,2}[./-]\d{1,4})\.?,?\s+"
    r"(?P<time>\d{1,2}[:.]\d{2}(?:[:.]\d{2})?)"
    r"(?:\s*(?P<ampm>[AaPp]\.?\s?[Mm]\.?))?"
    r"(?:\]\s*|\s+[-–]\s+)(?P<rest>.*)")
_MARKS = "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"   # direction marks, BOM
_NO_MARKS = str.maketrans("", "", _MARKS)
_MEDIA = re.compile(
    r"^(?:<(?:Media omitted|Medien ausgelassen|Multimedia omitido|Médias omis|Media weggelaten|Mídia oculta|"
    r"Media omessi|Без медиафайлов)>|null|<attached: [^>]+>|.+ \(file attached\)|"
    r".*\b(?:image|video|audio|sticker|GIF|document|Contact card|video note) omitted)$", re.IGNORECASE)
_DELETED = re.compile(   # en, de, fr, es, pt, ru: the languages the evals cover (config/languages.py)
    r"^(?:This message was deleted|You deleted this message|Diese Nachricht wurde gelöscht|Du hast diese Nachricht "
    r"gelöscht|Ce message a été supprimé|Vous avez supprimé ce message|Se eliminó este mensaje|Eliminaste este "
    r"mensaje|Mensagem apagada|Esta mensagem foi apagada|Você apagou esta mensagem|(?:Данное|Это) сообщение удалено|"
    r"Вы удалили (?:данное|это) сообщение)\.?$", re.IGNORECASE)
_SYSTEM = re.compile(r"^(?:Messages and calls are end-to-end encrypted|Missed (?:voice|video) call|"
                     r"Your security code with)", re.IGNORECASE)
_EDITED = re.compile(r"\s*\u200e?<(?:This message was edited|Diese Nachricht wurde bearbeitet|Ce message a été "
                     r"modifié|Se editó este mensaje\.?|Mensagem editada|Сообщение изменено)>\s*$")


@dataclass
class _Record:
    line: int
    date: str
    time: str
    ampm: str | None
    rest: str

    @cached_property
    def parts(self) -> tuple[int, int, int, str]:
        """The date's three numbers as written, and how to read them: ymd, dmy or ambiguous (d/m or m/d)."""
        a, b, c = (int(x) for x in re.split(r"[./-]", self.date))
        style = "ymd" if re.match(r"\d{4}", self.date) else "dmy" if "." in self.date else "ambiguous"
        return a, b, c, style


def parse(path: Path) -> Parsed:
    records = _records(path, _read(path))
    day_first = _day_first(records)
    parsed = Parsed()
    if other := _chat_with(path.name):
        parsed.not_exporter.add(other)
    for r in records:
        at = _when(path, r, day_first)
        parsed.read += 1
        speaker, sep, text = r.rest.partition(": ")
        speaker = speaker.strip(_MARKS + "~ \u00a0\u202f")
        if not sep or '"' in speaker or "“" in speaker:  # "Ann changed the subject to "Re: x"" is no speaker
            parsed.dropped["system"] += 1
            continue
        reason = _drop_reason(text)
        if reason:
            parsed.dropped[reason] += 1
            continue
        text = _EDITED.sub("", text)
        text = text.translate(_NO_MARKS).strip()
        parsed.messages.append(Message(chat=path.name, speaker=speaker, at=at, text=text))
    return parsed


# The name WhatsApp gives the file of a chat with one person, by the phone's language: the other person
# is not the exporter (pipeline.py's consent rule).
_CHAT_WITH = re.compile(r"(?:WhatsApp Chat with|WhatsApp-Chat mit|Discussion WhatsApp avec|Chat de WhatsApp con|"
                        r"Conversa do WhatsApp com|Чат WhatsApp с|WhatsApp Chat -) (?P<name>.+?)(?: \(\d+\))?\.(?:txt|zip)")


def _chat_with(filename: str) -> str | None:
    m = _CHAT_WITH.fullmatch(filename)
    return m["name"].strip() if m else None


def _read(path: Path) -> str:
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = sorted((n for n in z.namelist() if n.endswith(".txt")), key=lambda n: n != "_chat.txt")
                if not names:
                    raise OuroError(f"{path}: a zip without a .txt chat inside", hint=HINT)
                with z.open(names[0]) as f:   # inflated 1 MiB at a time, within limits.py's bounds
                    raw = read_bounded(f, f"{path} ({names[0]})", hint=HINT, size=z.getinfo(names[0]).file_size)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
            raise OuroError(f"{path}: a damaged or encrypted zip ({exc})", hint=HINT) from exc
    else:
        raw = read_file(path, hint=HINT)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise OuroError(f"{path}: line {line}: not UTF-8 text, so not a WhatsApp chat export", hint=HINT) from exc


def _records(path: Path, text: str) -> list[_Record]:
    """Lines → messages: a line that starts with a date and time opens one, any other continues it."""
    records: list[_Record] = []
    number = 1
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        m = _START.fullmatch(line.lstrip(_MARKS))
        if m:
            records.append(_Record(number, m["date"], m["time"], m["ampm"], m["rest"]))
        elif records:
            records[-1].rest += "\n" + line
        elif line.strip(_MARKS + " \t"):
            break            # text before any message: this is not a WhatsApp export
    if not records:
        raise OuroError(f"{path}: line {number if text.strip() else 1}: not a WhatsApp message line "
                        "(expected e.g. '31/12/2023, 21:05 - Name: text' or '[31/12/2023, 21:05:09] Name: text')",
                        hint=HINT)
    return records


def _day_first(records: list[_Record]) -> bool:
    """How to read a/b/y dates in this file (see the module docstring)."""
    pairs = [(a, b) for a, b, _, style in (r.parts for r in records) if style == "ambiguous"]
    if any(a > 12 for a, _ in pairs):
        return True
    if any(b > 12 for _, b in pairs):
        return False

    def backwards(day_first: bool) -> int:
        count, previous = 0, None
        for r in records:
            try:
                t = _datetime(r, day_first)
            except ValueError:
                continue                    # reported with its line number when the file is read for real
            count += previous is not None and t < previous
            previous = t
        return count

    return backwards(True) <= backwards(False) if pairs else True


def _datetime(r: _Record, day_first: bool) -> datetime:
    a, b, c, style = r.parts
    if style == "ymd":
        year, month, day = a, b, c
    elif style == "dmy" or day_first:
        day, month, year = a, b, c
    else:
        month, day, year = a, b, c
    hour, minute, *sec = (int(x) for x in re.split(r"[:.]", r.time))
    if r.ampm:
        if not 1 <= hour <= 12:
            raise ValueError(f"hour {hour} with {r.ampm}")
        hour = hour % 12 + (12 if r.ampm.lower().startswith("p") else 0)
    return datetime(year + 2000 if year < 100 else year, month, day, hour, minute, sec[0] if sec else 0)


def _when(path: Path, r: _Record, day_first: bool) -> datetime:
    try:
        return _datetime(r, day_first)
    except ValueError as exc:
        raise OuroError(f"{path}: line {r.line}: unreadable date or time {r.date} {r.time} ({exc})", hint=HINT) from exc


def _drop_reason(text: str) -> str | None:
    """media, deleted, system or empty for what nobody typed; None for a real message."""
    bare = text.translate(_NO_MARKS).strip()
    if not bare:
        return "empty"
    if _MEDIA.match(bare.split("\n", 1)[0]):          # Android puts a caption on the next line
        return "media"
    if _DELETED.match(bare):
        return "deleted"
    if _SYSTEM.match(bare) or text.startswith("\u200e"):   # iOS marks its own notes with U+200E
        return "system"
    return None
