"""Parsed chat history → redacted training windows in the store: the cold start of design.md.

The steps, each for a reason:
1. Speakers → roles. The owner (`--me`) is the persona, so their messages are the assistant's;
   everyone else's are the user's. `--me` may name the owner several times (the names they go
   by across exports; on Discord also a nickname); the chat must show at least one of them.
   The owner's very short messages (under `min_chars` characters as seen, default 2: "k", a
   lone "?" or 👍) are left out as "short": they teach the persona nothing but to be curt.
2. Consecutive messages of one speaker less than 3 minutes apart are merged: people type one
   thought as several bubbles, and the model answers in one message.
3. A gap of 30 minutes or more starts a new conversation; no window reaches across it.
4. Rolling windows of 6–12 messages, stride 3, each ending on the owner's message: the shape
   of a served context (history, then the reply the loss is taken on, see trainer/dataset.py).
5. A 90/10 chronological split: the newest tenth of the windows is held out for the
   generalization eval. A training window that shares a message with a held-out one is
   dropped, or the eval would grade text the model trained on.
6. Each conversation's language (memory.language: its majority language, for French/English
   code-switching) is stored with each of its windows; the summary counts the windows per
   language and names the languages the evals and the redaction do not cover.
7. Personal data is redacted (memory.redact) before anything is stored; emoji stay as typed.
The windows are stored without the persona's system message: export adds the current one.

Tokens are an estimate (words, plus each other non-space symbol such as punctuation or an
emoji: the regex \\w+|[^\\w\\s]); the served model's tokenizer gives different counts, and the
cycle reports its exact ones when it trains.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from core.errors import OuroError
from memory import language
from memory.importers import chatgpt, discord, messenger, telegram, whatsapp
from memory.importers.chat import Message, Parsed
from memory.redact import redact
from memory.store import Store

MERGE_WITHIN = timedelta(minutes=3)
NEW_CONVERSATION_AFTER = timedelta(minutes=30)
WINDOW_MIN, WINDOW_MAX, STRIDE = 6, 12, 3
HELDOUT_FRACTION = 0.1
MIN_CHARS = 2
TOKEN_METHOD = r"estimate: words plus other non-space symbols (regex \w+|[^\w\s]), not the model's tokenizer"
PARSERS = {"telegram": telegram.parse, "whatsapp": whatsapp.parse, "chatgpt": chatgpt.parse,
           "messenger": messenger.parse, "discord": discord.parse}
_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass
class Turn:
    """One message after merging: a speaker's run of bubbles."""

    speaker: str
    role: str
    text: str
    start: datetime
    end: datetime
    rejected: tuple[str, ...] = ()   # replies regenerated in its place (ChatGPT); none once merged


@dataclass(frozen=True)
class Window:
    turns: tuple[Turn, ...]
    ids: frozenset[tuple[int, int]]      # (conversation, position) of each turn: to find overlaps
    language: str | None = None          # its conversation's (memory/language.py)

    @property
    def messages(self) -> list[dict]:
        return [{"role": t.role, "content": t.text} for t in self.turns]


def import_chat(store: Store, kind: str, path: Path | str, *, me: str | Sequence[str],
                min_chars: int = MIN_CHARS, consent_of: str | None = None) -> dict:
    """Parse, build the windows, store them in one transaction; return the summary.

    `me`: the persona's person's name, or several (each may also be comma-separated): the importer's
    own, unless `consent_of` names who agreed to someone else's messages becoming the persona."""
    path = Path(path)
    if kind not in PARSERS:
        raise OuroError(f"unknown import kind {kind!r}", hint="one of: " + ", ".join(PARSERS))
    names = owner_names(me)
    try:
        parsed = PARSERS[kind](path)
        file_sha256 = fingerprint(path, parsed)
    except OSError as exc:
        raise OuroError(f"{path}: cannot read it: {exc.strerror}") from exc
    consent = consent_record(parsed, names, consent_of, path)
    summary, examples, pairs = build(parsed, names, path, min_chars)
    return store.add_import(kind=kind, file=str(path.resolve()), file_sha256=file_sha256, owner=", ".join(names),
                            summary={"kind": kind, "file": str(path), **summary, "consent": consent},
                            examples=examples, pairs=pairs, consent=consent)


def consent_record(parsed: Parsed, names: list[str], consent_of: str | None, path: Path) -> dict:
    """Whose messages the persona learns to write, and on whose say (stored with the import).

    The rule: an import teaches the persona the voice of the person who runs it, and an export is
    theirs (they downloaded it from their own account). `--me` (and a ChatGPT export, either side)
    is that person's own word about their own messages. Anyone else's messages need their
    agreement, named with `consent_of` (who agreed: the person, or who may speak for them). Where
    an export shows who it was shared with — the other person of a one-to-one Telegram,
    WhatsApp or Messenger chat — `--me` naming that person is refused: they did not export it."""
    if consent_of is not None and not consent_of.strip():
        raise OuroError("--consent-of is empty", hint="name who agreed that these messages become the persona")
    if consent_of is None:
        others = {_key(name) for name in parsed.not_exporter}
        clash = next((name for name in names if _key(name) in others), None)
        if clash:
            raise OuroError(f"{path}: {clash!r} is the person this chat was with, not the one who exported it",
                            hint=f"--me names you. To make {clash}'s messages the persona, they must agree: "
                                 f"--persona-of {clash!r} --consent-of \"WHO agreed\" (recorded with the import)")
    return {"persona_of": names, "own": consent_of is None, "consent_of": consent_of.strip() if consent_of else None}


def fingerprint(path: Path, parsed: Parsed) -> str:
    """SHA-256 of the export file; of a folder, over the names and contents of the files read in it."""
    if not path.is_dir():
        with path.open("rb") as f:   # streamed: parsing bounded the file, hashing need not hold it
            return hashlib.file_digest(f, "sha256").hexdigest()
    digest = hashlib.sha256()
    for file in sorted(set(parsed.files)):
        with file.open("rb") as f:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def build(parsed: Parsed, me: str | Sequence[str], path: Path,
          min_chars: int = MIN_CHARS) -> tuple[dict, list[dict], list[dict]]:
    """(summary, examples and preference pairs for Store.add_import) — everything but the writing."""
    names = owner_names(me)
    owners, matched = owner_keys(parsed, names, path)
    messages, dropped = [], Counter(parsed.dropped)
    for m in parsed.messages:
        if is_owner(m, owners) and visible_length(m.text) < min_chars:
            dropped["short"] += 1
        else:
            messages.append(m)
    conversations = merge_and_split(messages, owners)
    languages = [language.majority(t.text for t in conversation) for conversation in conversations]
    for conversation in conversations:
        for turn in conversation:
            turn.text = redact(turn.text)
    windows = [w for n, conversation in enumerate(conversations)
               for w in rolling_windows(conversation, n, languages[n])]
    train, heldout, overlapping = split(windows)
    pairs, pairs_left_out = preference_pairs(parsed, messages, owners, conversations, languages, heldout)
    examples = [{"messages": w.messages, "split": name, "ended_at": w.turns[-1].end.isoformat(),
                 "language": w.language,
                 "sha256": hashlib.sha256(json.dumps(w.messages, ensure_ascii=False, sort_keys=True)
                                          .encode()).hexdigest()}
                for name, part in (("train", train), ("heldout", heldout)) for w in part]
    with_window = {n for w in windows for n, _ in w.ids}
    summary = {
        "owner": ", ".join(names), "owner_speakers": matched, "min_chars": min_chars,
        "messages_read": parsed.read, "messages_kept": len(messages), "dropped": dict(sorted(dropped.items())),
        "merged_messages": sum(len(c) for c in conversations), "conversations": len(conversations),
        "conversations_without_window": len(conversations) - len(with_window),
        "windows": len(train) + len(heldout), "windows_train": len(train), "windows_heldout": len(heldout),
        "windows_dropped_overlap": overlapping,
        "tokens_estimate": {"messages": sum(tokens(t.text) for c in conversations for t in c),
                            "windows": sum(tokens(m["content"]) for e in examples for m in e["messages"])},
        "token_method": TOKEN_METHOD,
        "preference_pairs": len(pairs), "preference_pairs_left_out": pairs_left_out,
        "languages": language_counts(examples),
        "conversation_languages": dict(sorted(Counter(lang or "unknown" for lang in languages).items())),
    }
    summary["languages_not_covered"] = language.not_covered(summary["languages"])
    return summary, examples, pairs


def preference_pairs(parsed: Parsed, kept: list[Message], owners: Collection[str], conversations: list[list[Turn]],
                     languages: list[str | None], heldout: list[Window]) -> tuple[list[dict], dict[str, int]]:
    """(pairs for Store.add_import, tries that made none by reason): a persona's reply kept over the replies
    regenerated in its place (ChatGPT) is a DPO pair, prompt = the conversation before it (up to
    WINDOW_MAX − 1 messages, as a window would show it). Left out: tries of the other side (not the
    persona's: `--persona user` learns your side, and ChatGPT regenerated its own), of a message left
    out as short or merged with the next, of a reply a held-out window grades (a pair would train
    on it), with nobody before it, or the same text as the reply kept."""
    left: Counter = Counter()
    held = frozenset().union(*(w.ids for w in heldout))

    def tries(items) -> int:
        return sum(len(m.rejected) for m in items)

    left["not_the_persona"] = tries(m for m in parsed.messages if not is_owner(m, owners))
    left["short"] = tries(m for m in parsed.messages if is_owner(m, owners)) - tries(m for m in kept if is_owner(m, owners))
    left["merged"] = tries(m for m in kept if is_owner(m, owners)) - tries(t for c in conversations for t in c
                                                                          if t.role == "assistant")
    pairs = []
    for n, conversation in enumerate(conversations):
        for i, turn in enumerate(conversation):
            if not turn.rejected or turn.role != "assistant":
                continue
            prompt = [{"role": t.role, "content": t.text} for t in conversation[max(0, i - WINDOW_MAX + 1):i]]
            for rejected in map(redact, turn.rejected):
                reason = ("heldout" if (n, i) in held else "no_prompt" if not any(m["role"] == "user" for m in prompt)
                          else "same_text" if rejected.strip() == turn.text.strip() else None)
                if reason:
                    left[reason] += 1
                    continue
                body = {"prompt": prompt, "chosen": turn.text, "rejected": rejected}
                pairs.append({**body, "language": languages[n], "ended_at": turn.end.isoformat(),
                              "sha256": hashlib.sha256(json.dumps(body, ensure_ascii=False, sort_keys=True)
                                                       .encode()).hexdigest()})
    return pairs, {reason: n for reason, n in sorted(left.items()) if n}


def language_counts(examples: list[dict]) -> dict[str, int]:
    """{language (or "unknown"): windows}, most first."""
    counts = Counter(e.get("language") or "unknown" for e in examples)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def owner_names(me: str | Sequence[str]) -> list[str]:
    """The owner's names as given: each --me, split at commas, blanks and repeats dropped."""
    names: list[str] = []
    for given in [me] if isinstance(me, str) else me:
        for name in given.split(","):
            if name.strip() and _key(name) not in map(_key, names):
                names.append(name.strip())
    if not names:
        raise OuroError("no owner name given", hint="--me NAME: your name as the export writes it (repeat --me, "
                                                    "or separate names with commas, for each name you go by)")
    return names


def owner_keys(parsed: Parsed, names: list[str], path: Path) -> tuple[frozenset[str], list[str]]:
    """(the owner's names as compared: case and outer spaces ignored; the speakers they matched).

    An error lists who was seen, when none of the names wrote here."""
    seen = Counter(m.speaker for m in parsed.messages)
    if not seen:
        raise OuroError(f"{path}: no text messages to import ({parsed.read} read, all left out: "
                        f"{dict(parsed.dropped) or 'none'})")
    keys = frozenset(map(_key, names))
    matched = sorted({m.speaker for m in parsed.messages if is_owner(m, keys)})
    if not matched:
        aliases = {m.speaker: m.aliases for m in parsed.messages}
        listing = ", ".join(f"{name}{' aka ' + ', '.join(aliases[name]) if aliases[name] else ''} ({n})"
                            for name, n in seen.most_common(20))
        raise OuroError(f"{path}: nobody named {' or '.join(map(repr, names))} wrote in this chat",
                        hint=f"--me must be one of the speakers seen (messages): {listing}")
    return keys, matched


def _key(name: str) -> str:
    return name.strip().casefold()


def is_owner(m: Message, owners: Collection[str]) -> bool:
    """Whether the speaker (or one of their aliases) is one of `owners`, names as compared (_key)."""
    return _key(m.speaker) in owners or any(_key(a) in owners for a in m.aliases)


def visible_length(text: str) -> int:
    """Characters as a reader counts them: not spaces, combining marks, variation selectors, joiners or skin tones."""
    return sum(1 for c in text if not c.isspace() and unicodedata.category(c) not in ("Mn", "Me", "Cf")
               and not "\U0001f3fb" <= c <= "\U0001f3ff")


def merge_and_split(messages: list[Message], owner: str | Collection[str]) -> list[list[Turn]]:
    """Roles, merged runs (< 3 min apart) and conversations (split at gaps ≥ 30 min), per chat.

    `owner`: the owner's name, or their names; their messages become the assistant's."""
    owners = frozenset(map(_key, [owner] if isinstance(owner, str) else owner))
    by_chat: dict[str, list[Message]] = {}
    for m in messages:
        by_chat.setdefault(m.chat, []).append(m)
    conversations: list[list[Turn]] = []
    for chat in by_chat.values():
        current: list[Turn] = []
        for m in chat:
            last = current[-1] if current else None
            if last and m.at - last.end >= NEW_CONVERSATION_AFTER:
                conversations.append(current)
                current, last = [], None
            role = "assistant" if is_owner(m, owners) else "user"
            same = last and (last.speaker == m.speaker or last.role == role == "assistant")   # one owner, many names
            if same and m.at - last.end <= MERGE_WITHIN:
                last.text += "\n" + m.text
                last.end = max(last.end, m.at)
                last.rejected = ()            # the tries were in place of one bubble, not of the merged message
            else:
                current.append(Turn(m.speaker, role, m.text, m.at, m.at, m.rejected))
        if current:
            conversations.append(current)
    return conversations


def rolling_windows(conversation: list[Turn], number: int, lang: str | None = None) -> list[Window]:
    """Every STRIDE-th start, up to WINDOW_MAX turns, cut back to end on the owner; kept at ≥ WINDOW_MIN
    turns with someone else in it."""
    out = []
    for start in range(0, max(len(conversation) - WINDOW_MIN + 1, 0), STRIDE):
        end = min(start + WINDOW_MAX, len(conversation))
        while end > start and conversation[end - 1].role != "assistant":
            end -= 1
        turns = tuple(conversation[start:end])
        if len(turns) >= WINDOW_MIN and any(t.role == "user" for t in turns):
            out.append(Window(turns, frozenset((number, i) for i in range(start, end)), lang))
    return out


def split(windows: list[Window]) -> tuple[list[Window], list[Window], int]:
    """(train, held out, training windows dropped for sharing a message with a held-out one)."""
    ordered = sorted(windows, key=lambda w: w.turns[-1].end)
    n_held = max(1, round(len(ordered) * HELDOUT_FRACTION)) if len(ordered) >= 2 else 0
    cut = len(ordered) - n_held
    heldout = ordered[cut:]
    held_ids = frozenset().union(*(w.ids for w in heldout))
    train = [w for w in ordered[:cut] if not w.ids & held_ids]
    return train, heldout, cut - len(train)


def consent_line(kind: str, c: dict) -> str:
    """Whose voice the persona learns, as recorded with the import."""
    if kind == "chatgpt":
        side = "ChatGPT's answers" if c["persona_of"] == ["assistant"] else "the account holder's own messages"
        whose = "the importer's own account" if c["own"] else f"someone else's account, with the consent of {c['consent_of']}"
        return f"  consent    the persona learns {side}, from {whose}"
    names = " / ".join(c["persona_of"])
    if c["own"]:
        return f"  consent    the persona learns {names}'s messages: the importer's own (--me)"
    return f"  consent    the persona learns {names}'s messages, not the importer's: with the consent of {c['consent_of']}"


def language_line(s: dict) -> str:
    """The windows per language, and the languages the evals and the redaction were not written for."""
    counts = ", ".join(f"{lang} {n}" for lang, n in s["languages"].items()) or "none"
    missing = s.get("languages_not_covered") or {}
    note = ("; NOT covered: " + "; ".join(f"{lang} (no {', '.join(checks)})" for lang, checks in missing.items())
            if missing else "; all covered by the style-drift and format evals and the redaction" if s["languages"]
            else "")
    return f"  languages  windows by conversation language: {counts}{note}"


def format_summary(s: dict) -> str:
    """The summary for a person; `ouro import --json` prints the dict itself."""
    dropped = ", ".join(f"{reason} {n}" for reason, n in s["dropped"].items()) or "none"
    given = {_key(name) for name in s["owner"].split(",")}
    written_as = [name for name in s.get("owner_speakers", []) if _key(name) not in given]   # e.g. via a nickname
    lines = [
        f"imported {s['kind']} export {s['file']} as {s['owner']!r}"
        + (f" (written as {', '.join(written_as)})" if written_as else "") + f" (import #{s['import_id']})",
        f"  messages   {s['messages_read']} read, {s['messages_kept']} kept; left out: {dropped}",
        f"  merged     {s['merged_messages']} messages in {s['conversations']} conversations "
        f"({s['conversations_without_window']} too short for a window)",
        f"  windows    {s['windows']}: {s['windows_train']} train, {s['windows_heldout']} held out "
        f"({s['windows_dropped_overlap']} training windows dropped: they overlap held-out ones)",
        f"  stored     {s['new_examples']} new, {s['already_present']} already there",
        f"  tokens     ~{s['tokens_estimate']['messages']} in the messages, ~{s['tokens_estimate']['windows']} "
        "in the windows (estimated: words and symbols, not the model's tokenizer)",
    ]
    if s.get("consent"):
        lines.append(consent_line(s["kind"], s["consent"]))
    if s.get("preference_pairs") or s.get("preference_pairs_left_out"):
        left = ", ".join(f"{reason} {n}" for reason, n in s["preference_pairs_left_out"].items()) or "none"
        lines.append(f"  pairs      {s['preference_pairs']} preference pairs (a kept answer over one regenerated in "
                     f"its place), {s.get('new_pairs', 0)} new; tries left out: {left}")
    if "languages" in s:
        lines.append(language_line(s))
    if s["new_examples"]:
        lines.append("next: `ouro cycle` trains the next generation on them")
    elif not s["windows"]:
        lines.append(f"note: no window of {WINDOW_MIN}+ messages ending on {s['owner']}'s message; nothing to train on")
    return "\n".join(lines)
