"""ChatGPT's data export (Settings → Data controls → Export data): each conversation's kept branch.

The export is a zip holding conversations.json, a JSON list of conversations (written as one
line, so only its size is bounded); newer exports split the list into conversations-000.json,
conversations-001.json, …. One of those files, the unpacked folder or the zip is read.

A conversation is a tree, not a list: {"mapping": {node id: {"message", "parent", "children"}},
"current_node"}. Regenerating an answer or editing a prompt adds a sibling branch, and
current_node is the last message of the branch the person kept, so that branch is the
conversation: walked from current_node up through `parent` to the root, then reversed. The
messages on the other branches are counted as regenerated_branch and left out of the windows.
An answer regenerated beside the kept one (another child of the prompt, or of a node between
the prompt and the kept answer) is the first visible answer down that branch; it rides along
with the kept answer (Message.rejected) and the pipeline makes the pair: the person moved on
from it and kept the other, the design's "regenerated reply the user picked". An edited prompt
is a sibling of the prompt, not of an answer, and makes no pair.

Kept: "user" and "assistant" messages of content type text (or multimodal_text without an
attachment), their string parts joined; the speakers are named "user" and "assistant", and
`--persona` picks which one the persona is. Left out, by reason: system (system prompts), tool
(tool output, and the assistant's own calls to a tool), hidden (custom instructions and other
messages the app does not show), media (a part that is an image, audio or a file: the words
are about something the model would not see), not_text (code run by a tool, reasoning
summaries, …), empty, and duplicate (a conversation already read from another file).

Times are unix seconds, read as UTC. A message without one (create_time null) takes the
latest time before it in its conversation, else the conversation's create_time, and a time
running backwards is held at the latest one, so time never runs backwards within a
conversation. Each conversation is its own chat to the pipeline (keyed by its id), so no
window spans two of them. Citation markers that the app renders as links (【3†source】, and
U+E200…U+E201 spans) are removed from the text.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

from core.errors import OuroError
from memory.importers import sources
from memory.importers.chat import Message, Parsed

HINT = ("in ChatGPT: Settings → Data controls → Export data; pass the .zip from the e-mail, its unpacked folder, "
        "or conversations.json (conversations-000.json, … in newer exports)")
FILES = re.compile(r"conversations(?:-\d+)?\.json")
SPEAKERS = ("user", "assistant")
TEXT_TYPES = ("text", "multimodal_text")
_CITATION = re.compile(r"【[^【】\n]{0,80}†[^【】\n]{0,80}】|\ue200[^\ue200\ue201]{0,400}\ue201")
_EPOCH = datetime(1970, 1, 1)


def parse(path: Path) -> Parsed:
    parsed = Parsed()
    seen: set[str] = set()
    for doc in sources.documents(path, FILES, looking_for="conversations.json or conversations-000.json",
                                 what="a ChatGPT export", hint=HINT, lines=False):
        parsed.files.append(doc.file)
        if not isinstance(doc.data, list):
            raise OuroError(f"{doc.name}: not a ChatGPT export (expected a list of conversations)", hint=HINT)
        for number, conversation in enumerate(doc.data, start=1):
            _conversation(doc.name, number, conversation, parsed, seen)
    return parsed


def _conversation(name: str, number: int, conversation, parsed: Parsed, seen: set[str]) -> None:
    at = f"{name}: conversation {number}"
    if not isinstance(conversation, dict):
        raise OuroError(f"{at}: expected a conversation object", hint=HINT)
    if isinstance(conversation.get("title"), str) and conversation["title"]:
        at += f" ({conversation['title'][:40]!r})"
    mapping = conversation.get("mapping")
    if not isinstance(mapping, dict):
        raise OuroError(f"{at}: no 'mapping' of messages", hint=HINT)
    for node_id, node in mapping.items():
        if not isinstance(node, dict):
            raise OuroError(f"{at}, message {node_id!r}: expected a node object", hint=HINT)
    total = sum(node.get("message") is not None for node in mapping.values())
    parsed.read += total
    key = conversation.get("conversation_id") or conversation.get("id") or at
    if not isinstance(key, str):
        raise OuroError(f"{at}: its 'id' is not a string", hint=HINT)
    if key in seen:                     # e.g. an old conversations.json beside the split files
        if total:
            parsed.dropped["duplicate"] += total
        return
    seen.add(key)
    branch = _kept_branch(at, conversation, mapping) if total else []
    on_branch = sum(mapping[node_id].get("message") is not None for node_id in branch)
    if total > on_branch:
        parsed.dropped["regenerated_branch"] += total - on_branch
    regenerated = _regenerated(at, mapping, branch)
    latest = _time(at, conversation.get("create_time"))
    for node_id in branch:
        message = mapping[node_id].get("message")
        if message is None:
            continue                    # the root: no message
        where = f"{at}, message {node_id!r}"
        if not isinstance(message, dict):
            raise OuroError(f"{where}: expected a message object", hint=HINT)
        reason, text = _read(where, message)
        when = _time(where, message.get("create_time"))
        if when is not None:
            latest = max(when, latest) if latest is not None else when
        if reason:
            parsed.dropped[reason] += 1
            continue
        if latest is None:
            raise OuroError(f"{where}: no 'create_time', nor one on its conversation or an earlier message", hint=HINT)
        parsed.messages.append(Message(chat=key, speaker=message["author"]["role"], at=latest, text=text,
                                       rejected=tuple(t for t in regenerated.get(node_id, ()) if t != text)))


def _kept_branch(at: str, conversation: dict, mapping: dict) -> list[str]:
    """Node ids from the root down to current_node: the branch the person kept."""
    node_id = conversation.get("current_node")
    if not isinstance(node_id, str) or node_id not in mapping:
        raise OuroError(f"{at}: 'current_node' {node_id!r} is not one of its messages", hint=HINT)
    branch: list[str] = []
    while node_id is not None:
        if len(branch) > len(mapping):
            raise OuroError(f"{at}, message {branch[-1]!r}: its parents run in a circle", hint=HINT)
        branch.append(node_id)
        parent = mapping[node_id].get("parent")
        if parent is not None and (not isinstance(parent, str) or parent not in mapping):
            raise OuroError(f"{at}, message {node_id!r}: its 'parent' {parent!r} is not in 'mapping'", hint=HINT)
        node_id = parent
    branch.reverse()
    return branch


def _regenerated(at: str, mapping: dict, branch: list[str]) -> dict[str, list[str]]:
    """{a kept answer's node id: the answers regenerated beside it}. The branches that leave the kept one
    between a prompt and its answer are where "Regenerate" put the other tries."""
    on_branch, out, since_prompt = set(branch), {}, []
    for node_id in branch:
        message = mapping[node_id].get("message")
        role = _role(message)
        if role == "user":
            since_prompt = [node_id]
        elif since_prompt and role == "assistant" and _visible(at, node_id, message) is not None:
            others = [child for n in since_prompt for child in _children(mapping, n) if child not in on_branch]
            tries = [text for child in others if (text := _first_answer(at, mapping, child))]
            if tries:
                out[node_id] = tries
            since_prompt = []
        elif since_prompt:
            since_prompt.append(node_id)
    return out


def _role(message) -> str | None:
    author = message.get("author") if isinstance(message, dict) else None
    return author.get("role") if isinstance(author, dict) else None


def _children(mapping: dict, node_id: str) -> list[str]:
    children = mapping[node_id].get("children")
    return [c for c in children if isinstance(c, str) and c in mapping] if isinstance(children, list) else []


def _first_answer(at: str, mapping: dict, node_id: str) -> str | None:
    """The first visible answer down a regenerated branch (following the newest child), before any prompt."""
    seen: set[str] = set()
    while node_id not in seen:
        seen.add(node_id)
        message = mapping[node_id].get("message")
        role = _role(message)
        if role == "user":
            return None
        if role == "assistant" and (text := _visible(at, node_id, message)) is not None:
            return text
        children = _children(mapping, node_id)
        if not children:
            return None
        node_id = children[-1]
    return None


def _visible(at: str, node_id: str, message: dict) -> str | None:
    """The text of a message kept as text, else None; a damaged one off the kept branch is only skipped."""
    try:
        reason, text = _read(f"{at}, message {node_id!r}", message)
    except OuroError:
        return None
    return None if reason else text


def _read(where: str, message: dict) -> tuple[str | None, str]:
    """(why it is left out, or None; its text)."""
    author, content = message.get("author"), message.get("content")
    if not isinstance(author, dict):
        raise OuroError(f"{where}: no 'author'", hint=HINT)
    if not isinstance(content, dict):
        raise OuroError(f"{where}: no 'content'", hint=HINT)
    role = author.get("role")
    metadata = message.get("metadata") if isinstance(message.get("metadata"), dict) else {}
    if role == "system":
        return "system", ""
    if role not in SPEAKERS or message.get("recipient") not in (None, "all"):
        return "tool", ""
    if metadata.get("is_visually_hidden_from_conversation"):
        return "hidden", ""
    if content.get("content_type") not in TEXT_TYPES:
        return "not_text", ""
    parts = content.get("parts")
    if not isinstance(parts, list):
        raise OuroError(f"{where}: content has no 'parts' list", hint=HINT)
    if not all(isinstance(part, str) for part in parts):
        return "media", ""
    text = _CITATION.sub("", "\n".join(parts)).strip()
    return ("empty" if not text else None), text


def _time(where: str, value) -> datetime | None:
    """Unix seconds → naive UTC; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OuroError(f"{where}: 'create_time' {value!r} is not unix seconds", hint=HINT)
    try:
        return _EPOCH + timedelta(seconds=value)
    except (OverflowError, ValueError) as exc:
        raise OuroError(f"{where}: 'create_time' {value!r} is not a readable time", hint=HINT) from exc
