"""SillyTavern character cards: a persona, and the few example chats that come with it.

A card is JSON, or a PNG image whose tEXt (or zTXt, iTXt) chunk holds the JSON in base64:
keyword `ccv3` for Character Card V3, `chara` for V2 (or V1); a PNG with both is read from
`ccv3`. V3 and V2 nest the fields in "data" ({"spec": "chara_card_v3" | "chara_card_v2",
"data": {"name", "description", …}}); V1 has them at the top level and no "spec". SillyTavern
exports both (the character's "Export and Download" button), chub.ai's cards are PNGs.

What becomes what:
- The persona (system prompt), written to `persona_file` (<data_dir>/persona.md, which the
  settings prefer when persona_file is not set): the card's system_prompt, else "You are NAME.";
  then its description, "NAME's personality: …" and "Scenario: …" (SillyTavern's own layout).
  An existing, different persona file is never overwritten unless `replace_persona`.
- Training windows: each greeting (first_mes, alternate_greetings) as the reply to a neutral
  opener ("Hi!"), and each mes_example dialogue (blocks separated by <START>; a line
  "{{user}}: …" or "{{char}}: …" — or "NAME: …" — starts a message, other lines continue it)
  as one window per reply of the character, each ending on that reply, with the dialogue
  before it. A dialogue that opens with the character gets the same opener before it.
  Consecutive messages of one speaker are merged, as the chat importers do.
- Macros: {{char}} and <BOT> become the card's nickname (V3), else its name; {{user}} and
  <USER> become "the user" ("the user's") in the persona and "you" ("your") in the examples,
  capitalized at the start of a sentence; {{original}} is removed. Other {{macros}} stay as
  written and are named in the summary's warnings.
- Left out, by reason (counted per example): empty, too_long (a reply longer than the served
  reply budget, `reply_tokens`: the bot would cut it off, so the model must not learn it), and
  duplicate (the same window twice in the card). Also counted: dialogues without a reply of the
  character, and lines before a dialogue's first speaker tag. Not read at all: creator_notes,
  post_history_instructions, group_only_greetings (group chats), the character book (lorebook),
  extensions and assets; the summary lists the ones the card has.

Held out: a card has a handful of examples, not a chat history, so the pipeline's newest tenth
does not fit. With three or more dialogues, a tenth of them (at least one) is held out whole —
the last in the card whose messages appear in no other window (a greeting's "Hi!" is shared by
every greeting, so greetings always train); with fewer, everything trains and the live turns'
split feeds the generalization eval. No held-out window shares a message with a training one.

Examples are redacted (memory.redact) before they are stored, through the same
Store.add_import as the chat importers: the same card imported again adds nothing (its windows
are keyed by their sha256). The persona is the owner's configuration and is written as given.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from core.errors import OuroError
from core.files import atomic_write_text, ensure_private_dir
from memory import language
from memory.importers import limits
from memory.importers.pipeline import HELDOUT_FRACTION, TOKEN_METHOD, language_counts, language_line, tokens
from memory.redact import redact
from memory.store import Store

HINT = ("a SillyTavern character card: in SillyTavern, the character's \"Export and Download\" button → PNG or "
        "JSON; or a character's PNG card from chub.ai")
OPENER = "Hi!"                                  # what the user says before a greeting
USER_IN_PERSONA, USER_IN_EXAMPLES = ("the user", "the user{s}"), ("you", "your")   # {s}: the card's 's or ’s
MIN_DIALOGUES_FOR_HELDOUT = 3
SPECS = {"chara_card_v3": "3.0", "chara_card_v2": "2.0"}
USED = ("name", "nickname", "system_prompt", "description", "personality", "scenario", "first_mes",
        "alternate_greetings", "mes_example")
NOT_USED = ("creator_notes", "post_history_instructions", "group_only_greetings", "character_book", "extensions",
            "assets", "tags", "creator", "character_version", "source", "creation_date", "modification_date")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEYWORDS = ("ccv3", "chara")                # in order of preference

_CHAR = re.compile(r"\{\{\s*char\s*\}\}|<bot>", re.IGNORECASE)
_USER = re.compile(r"(?:\{\{\s*user\s*\}\}|<user>)(?P<s>['’]s\b)?", re.IGNORECASE)
_ORIGINAL = re.compile(r"\{\{\s*original\s*\}\}", re.IGNORECASE)
_MACRO = re.compile(r"\{\{\s*([^{}\s:]{1,40})[^{}]{0,200}\}\}")
_START = re.compile(r"<start>", re.IGNORECASE)


@dataclass(frozen=True)
class Card:
    spec: str               # chara_card_v3 | chara_card_v2 | chara_card_v1 (flat, no "spec")
    spec_version: str
    source: str             # "JSON" or "PNG chunk 'ccv3'"
    data: dict              # the fields: "data" of V2/V3, the document itself for V1
    sha256: str             # of the file

    @property
    def name(self) -> str:
        return self.data["name"].strip()

    @property
    def char(self) -> str:
        """What {{char}} stands for: the V3 nickname when there is one, else the name."""
        return text(self, "nickname").strip() or self.name


# --- reading ---------------------------------------------------------------------------------

def read_card(path: Path) -> Card:
    """The card in a PNG or JSON file, or an OuroError naming the file (and chunk, field) and why."""
    if path.is_dir():
        raise OuroError(f"{path}: a folder, not a character card", hint=HINT)
    try:
        if path.stat().st_size > limits.MAX_CARD_BYTES:
            raise _too_big(path)
        with path.open("rb") as f:
            raw = f.read(limits.MAX_CARD_BYTES + 1)
    except OSError as exc:
        raise OuroError(f"{path}: cannot read it: {exc.strerror}") from exc
    if len(raw) > limits.MAX_CARD_BYTES:
        raise _too_big(path)
    sha256 = hashlib.sha256(raw).hexdigest()
    if raw.startswith(PNG_SIGNATURE):
        keyword, payload = _png_card(raw, path)
        where = f"{path} (PNG chunk '{keyword}')"
        compact = "".join(payload.split())
        try:
            raw_json = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise OuroError(f"{where}: not base64 ({exc})", hint=HINT) from exc
        doc, source = _json(raw_json, where), f"PNG chunk '{keyword}'"
    elif raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"["):
        doc, source, where = _json(raw, str(path)), "JSON", str(path)
    else:
        raise OuroError(f"{path}: neither a PNG image nor JSON, so not a character card", hint=HINT)
    return _card(doc, where, source, sha256)


def _too_big(path: Path) -> OuroError:
    return OuroError(f"{path}: larger than {limits.MAX_CARD_BYTES >> 20} MiB, more than a character card holds",
                     hint=HINT)


def _png_card(raw: bytes, path: Path) -> tuple[str, str]:
    """(keyword, text) of the card's text chunk: ccv3 if there is one, else chara."""
    found: dict[str, tuple[bytes, bytes]] = {}           # keyword → its first chunk (type, body), read once chosen
    pos, first = len(PNG_SIGNATURE), True
    while pos < len(raw):
        if pos + 12 > len(raw):
            raise OuroError(f"{path}: byte {pos}: the PNG ends inside a chunk header (a truncated file)", hint=HINT)
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        end = pos + 12 + length
        if end > len(raw):
            raise OuroError(f"{path}: byte {pos}: chunk {kind!r} runs past the end of the PNG (a truncated file)",
                            hint=HINT)
        body = raw[pos + 8:end - 4]
        if zlib.crc32(kind + body) != struct.unpack(">I", raw[end - 4:end])[0]:
            raise OuroError(f"{path}: byte {pos}: chunk {kind!r} fails its CRC check (a damaged PNG)", hint=HINT)
        if first and kind != b"IHDR":
            raise OuroError(f"{path}: not a PNG image (its first chunk is {kind!r}, not IHDR)", hint=HINT)
        first = False
        if kind == b"IEND":
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword = body.split(b"\0", 1)[0].decode("latin-1").lower()
            if keyword in PNG_KEYWORDS and keyword not in found:
                found[keyword] = kind, body
        pos = end
    for keyword in PNG_KEYWORDS:
        if keyword in found:
            return keyword, _chunk_text(*found[keyword], f"{path} (PNG chunk '{keyword}')")
    raise OuroError(f"{path}: a PNG image without a character card in it (no 'chara' or 'ccv3' text chunk)",
                    hint=HINT + "; an image saved from a web page or edited elsewhere has lost it")


def _chunk_text(kind: bytes, body: bytes, where: str) -> str:
    """The text of a tEXt, zTXt or iTXt chunk (PNG spec 11.3.4)."""
    try:
        _, rest = body.split(b"\0", 1)
        if kind == b"tEXt":
            return rest.decode("latin-1")
        if kind == b"zTXt":
            return _inflate(rest[1:], where).decode("latin-1")
        compressed, rest = rest[0], rest[2:]                     # iTXt: flag, method, language\0, translated\0
        _, _, rest = rest.split(b"\0", 2)
        return (_inflate(rest, where) if compressed else rest).decode("utf-8")
    except (ValueError, IndexError) as exc:           # a missing separator, or not UTF-8
        raise OuroError(f"{where}: a malformed {kind.decode()} chunk ({exc})", hint=HINT) from exc


def _inflate(data: bytes, where: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limits.MAX_CARD_BYTES + 1)
    except zlib.error as exc:
        raise OuroError(f"{where}: its compressed text is damaged ({exc})", hint=HINT) from exc
    if len(out) > limits.MAX_CARD_BYTES or inflater.unconsumed_tail:
        raise OuroError(f"{where}: inflates to more than {limits.MAX_CARD_BYTES >> 20} MiB", hint=HINT)
    return out


def _json(raw: bytes, where: str) -> object:
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise OuroError(f"{where}: byte {exc.start}: not UTF-8 text, so not a character card", hint=HINT) from exc
    except json.JSONDecodeError as exc:
        raise OuroError(f"{where}: line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})",
                        hint=HINT) from exc
    except (ValueError, RecursionError) as exc:   # e.g. too many digits, or nested absurdly deep
        raise OuroError(f"{where}: not valid JSON ({type(exc).__name__})", hint=HINT) from exc


def _card(doc: object, where: str, source: str, sha256: str) -> Card:
    if not isinstance(doc, dict):
        raise OuroError(f"{where}: expected a JSON object, so not a character card", hint=HINT)
    spec = doc.get("spec")
    if spec is None:                                   # V1: the fields at the top level
        data, prefix, spec, version = doc, "", "chara_card_v1", "1.0"
    elif isinstance(spec, str) and spec in SPECS:
        data, prefix = doc.get("data"), "data."
        version = doc.get("spec_version") if isinstance(doc.get("spec_version"), str) else SPECS[spec]
        if not isinstance(data, dict):
            raise OuroError(f"{where}: {spec} without a 'data' object", hint=HINT)
    else:
        raise OuroError(f"{where}: 'spec' is {spec!r}, not a character card this reads "
                        "(chara_card_v3, chara_card_v2, or V1 without 'spec')", hint=HINT)
    if not isinstance(data.get("name"), str) or not data["name"].strip():
        raise OuroError(f"{where}: no '{prefix}name': a character card names its character", hint=HINT)
    for key in USED:
        value = data.get(key)
        if key == "alternate_greetings":
            if value is not None and not (isinstance(value, list) and all(isinstance(g, str) for g in value)):
                raise OuroError(f"{where}: '{prefix}{key}' is not a list of texts", hint=HINT)
        elif value is not None and not isinstance(value, str):
            raise OuroError(f"{where}: '{prefix}{key}' is not text", hint=HINT)
    return Card(spec, version, source, data, sha256)


def text(card: Card, key: str) -> str:
    """A text field, line endings made \\n; missing or null: ""."""
    value = card.data.get(key) or ""
    return value.replace("\r\n", "\n").replace("\r", "\n")


# --- macros ------------------------------------------------------------------------------------

def fill(value: str, char: str, user: tuple[str, str]) -> str:
    """SillyTavern's {{char}}/<BOT> and {{user}}/<USER> replaced; `user`: (its word, its possessive)."""
    value = _CHAR.sub(lambda m: char, _ORIGINAL.sub("", value))

    def person(m: re.Match) -> str:
        word = user[1].replace("{s}", m.group("s")) if m.group("s") else user[0]
        return word[:1].upper() + word[1:] if _sentence_starts(value[max(0, m.start() - 400):m.start()]) else word

    return _USER.sub(person, value)


def _sentence_starts(before: str) -> bool:
    """Whether a word after `before` (the text's last few hundred characters before it) starts a sentence:
    at the start, after . ! ? or a line break, or after a finished *action*, past opening quotes and marks."""
    rest = before.rstrip(" \t_\"'(“")
    if rest.endswith("*"):
        line = rest[rest.rfind("\n") + 1:]
        if line.count("*") % 2 == 0:                    # it closes an *action*
            return True
        rest = rest[:-1].rstrip(" \t_\"'(“")          # it opens one: look before it
    return not rest or rest[-1] in ".!?…\n"


def unknown_macros(values: list[str]) -> list[str]:
    """The names of the {{macros}} in `values` that `fill` leaves as they are."""
    return sorted({m.group(1).lower() for v in values for m in _MACRO.finditer(v)} - {"char", "user", "original"})


# --- building ----------------------------------------------------------------------------------

def persona_text(card: Card) -> str:
    """The system prompt the card describes: SillyTavern's layout, macros replaced."""
    def filled(key: str) -> str:
        return fill(text(card, key), card.char, USER_IN_PERSONA).strip()

    parts = [filled("system_prompt") or f"You are {card.char}.", filled("description")]
    if personality := filled("personality"):
        parts.append(f"{card.char}'s personality: {personality}")
    if scenario := filled("scenario"):
        parts.append(f"Scenario: {scenario}")
    return "\n\n".join(p for p in parts if p)


def dialogues(card: Card) -> tuple[list[list[dict]], Counter]:
    """mes_example → dialogues of {role, content} (macros replaced, redacted, one speaker's run merged);
    counts: empty replies, dialogues without a reply, untagged lines."""
    names = "|".join(re.escape(n) for n in dict.fromkeys([card.char, card.name]))
    tag = re.compile(r"[ \t]*(?:(?P<user>\{\{\s*user\s*\}\}|<user>)|\{\{\s*char\s*\}\}|<bot>|" + names
                     + r")[ \t]*:[ \t]?(?P<text>.*)", re.IGNORECASE)
    out, counts = [], Counter()
    for block in _START.split(text(card, "mes_example")):
        turns: list[tuple[str, list[str]]] = []
        for line in block.split("\n"):
            if m := tag.fullmatch(line):
                turns.append(("user" if m.group("user") else "assistant", [m.group("text")]))
            elif turns:
                turns[-1][1].append(line)
            elif line.strip():
                counts["untagged_lines"] += 1
        if not turns:
            continue
        messages: list[dict] = []
        for role, lines in turns:
            content = redact(fill("\n".join(lines), card.char, USER_IN_EXAMPLES).strip())
            if not content:
                counts["empty"] += role == "assistant"
            elif messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + content
            else:
                messages.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            counts["without_reply"] += 1
            continue
        if messages[0]["role"] == "assistant":
            messages.insert(0, {"role": "user", "content": OPENER})
        out.append(messages)
    return out, counts


def build(card: Card, *, reply_tokens: int) -> tuple[str, dict, list[dict]]:
    """(persona, summary, examples for Store.add_import) — everything but the writing."""
    persona = persona_text(card)
    dropped: Counter = Counter()
    seen: set[str] = set()
    greetings = [text(card, "first_mes")] * bool(text(card, "first_mes").strip()) \
        + [g.replace("\r\n", "\n").replace("\r", "\n") for g in card.data.get("alternate_greetings") or []]
    candidates: list[tuple[int | None, list[dict]]] = []     # (dialogue number or None for a greeting, window)
    for greeting in greetings:
        content = redact(fill(greeting, card.char, USER_IN_EXAMPLES).strip())
        if not content:
            dropped["empty"] += 1
        else:
            candidates.append((None, [{"role": "user", "content": OPENER}, {"role": "assistant", "content": content}]))
    found, counts = dialogues(card)
    dropped["empty"] += counts["empty"]
    for number, messages in enumerate(found):
        candidates += [(number, messages[:i + 1]) for i, m in enumerate(messages) if m["role"] == "assistant"]
    windows: list[tuple[int | None, list[dict], str]] = []
    for number, window in candidates:
        sha = _sha(window)
        if tokens(window[-1]["content"]) > reply_tokens:
            dropped["too_long"] += 1
        elif sha in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(sha)
            windows.append((number, window, sha))
    held = _held_out(windows)
    lang = language.majority([persona] + [m["content"] for _, w, _ in windows for m in w])   # one card, one voice
    examples = [{"messages": w, "split": "heldout" if n in held else "train", "ended_at": None, "sha256": sha,
                 "language": lang} for n, w, sha in windows]
    macros = unknown_macros([text(card, k) for k in ("system_prompt", "description", "personality", "scenario",
                                                     "mes_example")] + greetings)
    warnings = [f"macros left as written (SillyTavern fills them in, this import does not): "
                f"{', '.join('{{' + m + '}}' for m in macros)}"] if macros else []
    if not examples:
        warnings.append("no greeting or example dialogue to train on: only the persona was imported")
    summary = {
        "name": card.name, "spec": card.spec, "spec_version": card.spec_version, "source": card.source,
        "fields": [k for k in USED if _given(card.data.get(k))],
        "not_used": [k for k in NOT_USED if _given(card.data.get(k))],
        "persona_chars": len(persona), "persona_tokens_estimate": tokens(persona),
        "greetings": len(greetings), "dialogues": len(found) + counts["without_reply"],
        "dialogues_without_reply": counts["without_reply"], "untagged_lines": counts["untagged_lines"],
        "examples_read": len(candidates) + dropped["empty"], "examples_kept": len(examples),
        "dropped": {k: v for k, v in sorted(dropped.items()) if v}, "reply_tokens": reply_tokens,
        "windows": len(examples), "windows_train": len(examples) - sum(e["split"] == "heldout" for e in examples),
        "windows_heldout": sum(e["split"] == "heldout" for e in examples),
        "tokens_estimate": {"windows": sum(tokens(m["content"]) for e in examples for m in e["messages"])},
        "token_method": TOKEN_METHOD, "warnings": warnings,
        "languages": language_counts(examples), "languages_not_covered": language.not_covered([lang]),
    }
    return persona, summary, examples


def _given(value: object) -> bool:
    """Whether a field holds something: not missing, blank, or an empty list or object."""
    return bool(value.strip() if isinstance(value, str) else value)


def _sha(messages: list[dict]) -> str:
    """As the chat pipeline keys its windows, so the store's dedup is one across imports."""
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def _key(content: str) -> str:
    return " ".join(content.split()).casefold()


def _held_out(windows: list[tuple[int | None, list[dict], str]]) -> set[int]:
    """The dialogues held out: see the module's docstring."""
    numbers = sorted({n for n, _, _ in windows if n is not None})
    if len(numbers) < MIN_DIALOGUES_FOR_HELDOUT:
        return set()
    wanted = max(1, round(len(numbers) * HELDOUT_FRACTION))
    held: set[int] = set()
    for number in reversed(numbers):
        mine = {_key(m["content"]) for n, w, _ in windows if n == number for m in w}
        others = {_key(m["content"]) for n, w, _ in windows if n != number for m in w}
        if not mine & others:
            held.add(number)
            if len(held) == wanted:
                break
    return held


# --- importing ---------------------------------------------------------------------------------

def import_card(store: Store, path: Path | str, *, persona_file: Path, reply_tokens: int,
                replace_persona: bool = False, context_tokens: int | None = None) -> dict:
    """Read the card, store its windows in one transaction, then write the persona; return the summary.

    Nothing is stored or written when the card cannot be read, or when `persona_file` holds a
    different persona and `replace_persona` is not set. `context_tokens` (n_ctx): a persona
    taking over half of it is warned about."""
    path = Path(path)
    card = read_card(path)
    persona, summary, examples = build(card, reply_tokens=reply_tokens)
    try:
        existing = persona_file.read_text(encoding="utf-8") if persona_file.exists() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise OuroError(f"cannot read the persona file {persona_file} ({exc}): nothing was imported") from exc
    if existing is None:
        written = "created"
    elif existing.strip() == persona:
        written = "unchanged"
    elif replace_persona:
        written = "replaced"
    else:
        raise OuroError(f"{persona_file} already holds a different persona ({len(existing.strip())} characters): "
                        "nothing was imported",
                        hint="--replace-persona overwrites it with the card's (copy it first to keep it), or import "
                             "the card into another --data-dir")
    if context_tokens and summary["persona_tokens_estimate"] > context_tokens // 2:
        summary["warnings"].append(f"the persona is ~{summary['persona_tokens_estimate']} tokens, over half the "
                                   f"{context_tokens}-token context it is pinned in: shorten it in {persona_file}")
    summary = store.add_import(kind="card", file=str(path.resolve()), file_sha256=card.sha256, owner=card.name,
                               summary={"kind": "card", "file": str(path), **summary,
                                        "persona_file": str(persona_file), "persona_written": written},
                               examples=examples)
    if written != "unchanged":
        try:
            ensure_private_dir(persona_file.parent)
            atomic_write_text(persona_file, persona + "\n", mode=0o600)
        except OSError as exc:
            raise OuroError(f"import #{summary['import_id']} stored the card's {summary['new_examples']} new "
                            f"examples, but the persona could not be written to {persona_file}: {exc.strerror}",
                            hint="fix that and run the same import again: no example is stored twice") from exc
    return summary


def format_summary(s: dict) -> str:
    """The summary for a person; `ouro import card --json` prints the dict itself."""
    dropped = ", ".join(f"{reason} {n}" for reason, n in s["dropped"].items()) or "none"
    lines = [
        f"imported character card {s['name']!r} from {s['file']} ({s['spec']} {s['spec_version']}, "
        f"{s['source']}) (import #{s['import_id']})",
        f"  fields     {', '.join(s['fields'])}" + (f"; not used: {', '.join(s['not_used'])}" if s["not_used"] else ""),
        f"  persona    {s['persona_chars']} characters (~{s['persona_tokens_estimate']} tokens), {s['persona_written']}: "
        f"{s['persona_file']}",
        f"  read       {_n(s['greetings'], 'greeting')}, {_n(s['dialogues'], 'example dialogue')}; left out: "
        f"{_n(s['dialogues_without_reply'], 'dialogue')} without a reply of {s['name']}, "
        f"{_n(s['untagged_lines'], 'line')} before a dialogue's first speaker tag",
        f"  examples   {s['examples_read']} read, {s['examples_kept']} kept; left out: {dropped}"
        + (f" (too_long: a reply over ~{s['reply_tokens']} tokens, the served reply budget)"
           if "too_long" in s["dropped"] else ""),
        f"  windows    {s['windows']}: {s['windows_train']} train, {s['windows_heldout']} held out",
        f"  stored     {s['new_examples']} new, {s['already_present']} already there",
        f"  tokens     ~{s['tokens_estimate']['windows']} in the windows (estimated: words and symbols, not the "
        "model's tokenizer)",
    ]
    if "languages" in s:
        lines.append(language_line(s))
    lines += [f"warning: {w}" for w in s["warnings"]]
    if s["new_examples"]:
        lines.append("next: `ouro cycle` trains the next generation on them")
    return "\n".join(lines)


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
