"""ChatGPT, Messenger and Discord exports, the owner's aliases and the short-message filter.

Every fixture is written here by hand in the shape the real export has (field names, order,
quirks), so each edge case is visible next to what the parser must make of it.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import OuroError
from memory.importers import chatgpt, discord, limits, messenger, sources
from memory.importers.chat import Message, Parsed
from memory.importers.pipeline import PARSERS, build, import_chat, merge_and_split, visible_length
from ouro.cli import IMPORT_KINDS, main

T0 = 1_700_000_000.0                       # 2023-11-14 22:13:20 UTC
UTC0 = datetime(2023, 11, 14, 22, 13, 20)


# --- ChatGPT ------------------------------------------------------------------------------

def gpt(node_id: str, parent: str | None, role: str, text: str = "", t: float | None = None, *,
        content_type: str = "text", parts: list | None = None, **extra) -> dict:
    """One node of a conversation's mapping, with its message as the export writes it."""
    message = {"id": node_id, "author": {"role": role, "name": None, "metadata": {}}, "create_time": t,
               "update_time": None, "content": {"content_type": content_type,
                                                "parts": [text] if parts is None else parts},
               "status": "finished_successfully", "end_turn": True, "weight": 1.0, "metadata": {},
               "recipient": "all", "channel": None, **extra}
    return {"id": node_id, "message": message, "parent": parent, "children": []}


def conversation(cid: str, title: str, nodes: list[dict], current: str, created: float | None = T0) -> dict:
    mapping = {"root": {"id": "root", "message": None, "parent": None, "children": []}}
    mapping.update({n["id"]: n for n in nodes})
    for node_id, node in mapping.items():
        if node["parent"] in mapping:
            mapping[node["parent"]]["children"].append(node_id)
    return {"title": title, "create_time": created, "update_time": None, "mapping": mapping,
            "moderation_results": [], "current_node": current, "plugin_ids": None, "conversation_id": cid,
            "conversation_template_id": None, "gizmo_id": None, "is_archived": False, "safe_urls": [], "id": cid}


def talk(cid: str, start: float, n: int = 8, title: str = "Chat") -> dict:
    """A plain conversation of n messages, user first, a minute apart, no branches."""
    nodes, parent = [], "root"
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        nodes.append(gpt(f"{cid}-{i}", parent, role, f"{role} line {i} of {cid}", start + 60 * i))
        parent = f"{cid}-{i}"
    return conversation(cid, title, nodes, parent, created=start)


def branchy() -> dict:
    """A regenerated answer, a null time, an image, a system prompt, a tool call and its output."""
    nodes = [
        gpt("sys", "root", "system", "", None, metadata={"is_visually_hidden_from_conversation": True}),
        gpt("u1", "sys", "user", "Plan three days in Lisbon", T0 + 10),
        gpt("a1-old", "u1", "assistant", "Lisbon is hilly. Bring shoes.", T0 + 20),    # regenerated away
        gpt("a1", "u1", "assistant", "Day 1: Alfama【4†source】. Day 2: Belém.", T0 + 30),
        gpt("u2", "a1", "user", content_type="multimodal_text", t=T0 + 40,
            parts=[{"content_type": "image_asset_pointer", "asset_pointer": "file-service://file-1"}, "this tram?"]),
        gpt("a2", "u2", "assistant", "That is tram 28.", None),                        # null time
        gpt("call", "a2", "assistant", '{"query": "tram 28 hours"}', T0 + 50, content_type="code",
            recipient="browser"),
        gpt("tool", "call", "tool", "", T0 + 55, content_type="tether_browsing_display", parts=None),
        gpt("a3", "tool", "assistant", "It runs until 23:00.", T0 + 45),               # clock runs backwards
        gpt("u3", "a3", "user", "   ", T0 + 70),
    ]
    nodes[7]["message"]["content"] = {"content_type": "tether_browsing_display", "result": "…"}
    return conversation("conv-lisbon", "Lisbon", nodes, current="u3")


def test_chatgpt_takes_the_kept_branch_and_drops_with_reasons(tmp_path):
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps([branchy()], separators=(",", ":")), encoding="utf-8")   # one line, as ChatGPT writes it
    parsed = chatgpt.parse(path)
    assert [(m.speaker, m.text) for m in parsed.messages] == [
        ("user", "Plan three days in Lisbon"), ("assistant", "Day 1: Alfama. Day 2: Belém."),
        ("assistant", "That is tram 28."), ("assistant", "It runs until 23:00.")]
    times = [m.at for m in parsed.messages]
    assert times[0] == UTC0 + timedelta(seconds=10)
    assert times[2] == UTC0 + timedelta(seconds=40)      # null: the latest time before it (the image's)
    assert times[3] == UTC0 + timedelta(seconds=55)      # 45 after 55: held, never backwards
    assert times == sorted(times)
    assert {m.chat for m in parsed.messages} == {"conv-lisbon"}
    assert parsed.read == 10
    assert dict(parsed.dropped) == {"system": 1, "regenerated_branch": 1, "media": 1, "tool": 2, "empty": 1}


def test_chatgpt_each_conversation_is_its_own_chat_and_persona_picks_the_side(tmp_path):
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps([talk("c1", T0), talk("c2", T0 + 30)]), encoding="utf-8")   # overlapping in time
    parsed = chatgpt.parse(path)
    assert {m.chat for m in parsed.messages} == {"c1", "c2"}
    assert [len(c) for c in merge_and_split(parsed.messages, "assistant")] == [8, 8]
    summary, examples, _ = build(parsed, "assistant", path)
    assert summary["windows"] == 2 and all(e["messages"][-1]["role"] == "assistant" for e in examples)
    assert examples[0]["messages"][-1]["content"].startswith("assistant line 7")
    _, as_user, _ = build(parsed, "user", path)
    assert as_user[0]["messages"][-1] == {"role": "assistant", "content": "user line 6 of c1"}
    assert as_user[0]["messages"][0]["role"] == "assistant"        # the persona speaks first: it is the user


def test_chatgpt_split_files_in_a_folder_and_a_zip_and_a_duplicate(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "conversations-000.json").write_text(json.dumps([talk("c1", T0)]), encoding="utf-8")
    (export / "conversations-001.json").write_text(json.dumps([talk("c2", T0 + 9000)]), encoding="utf-8")
    (export / "conversations.json").write_text(json.dumps([talk("c1", T0)]), encoding="utf-8")   # an old copy
    (export / "chat.html").write_text("<html></html>", encoding="utf-8")
    (export / "user.json").write_text('{"email": "ann@example.com"}', encoding="utf-8")
    parsed = chatgpt.parse(export)
    assert [m.chat for m in parsed.messages] == ["c1"] * 8 + ["c2"] * 8
    assert dict(parsed.dropped) == {"duplicate": 8} and parsed.read == 24
    archive = tmp_path / "chatgpt-export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("conversations-000.json", json.dumps([talk("c1", T0)]))
        z.writestr("conversations-001.json", json.dumps([talk("c2", T0 + 9000)]))
        z.writestr("file-abc.png", b"\x89PNG")
    zipped = chatgpt.parse(archive)
    assert zipped.messages == parsed.messages and zipped.files == [archive, archive]
    (tmp_path / "empty").mkdir()
    with pytest.raises(OuroError, match=r"empty: no conversations\.json .* in this folder"):
        chatgpt.parse(tmp_path / "empty")


def test_a_one_line_conversations_json_over_the_line_limit_is_read(tmp_path):
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps([talk(f"c{i}", T0 + 9000 * i) for i in range(400)]), encoding="utf-8")
    assert path.stat().st_size > limits.MAX_LINE_BYTES and path.read_text().count("\n") == 0
    assert len(chatgpt.parse(path).messages) == 3200


@pytest.mark.parametrize("damage, match", [
    (lambda c: c["mapping"]["c-1"]["message"].pop("author"), ", message 'c-1': no 'author'"),
    (lambda c: c.pop("current_node"), ": 'current_node' None is not one of its messages"),
    (lambda c: c["mapping"]["c-0"].update(parent="c-7"), r", message 'c-\d': its parents run in a circle"),
    (lambda c: c["mapping"]["c-3"].update(parent="gone"), ", message 'c-3': its 'parent' 'gone' is not in 'mapping'"),
    (lambda c: c["mapping"]["c-2"]["message"]["content"].pop("parts"), ", message 'c-2': content has no 'parts'"),
    (lambda c: c["mapping"]["c-2"]["message"].update(create_time="yesterday"), ", message 'c-2': 'create_time'"),
    (lambda c: c["mapping"]["c-2"].update(message=None) or c.update(current_node="c-9"), ": 'current_node' 'c-9'"),
    (lambda c: c.pop("mapping"), ": no 'mapping'"),
])
def test_chatgpt_malformed_conversations_name_the_place_and_store_nothing(store, tmp_path, damage, match):
    conv = talk("c", T0)
    damage(conv)
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps([conv]), encoding="utf-8")
    with pytest.raises(OuroError, match=r"conversations\.json: conversation 1 \('Chat'\)" + match):
        import_chat(store, "chatgpt", path, me="assistant")
    assert store.imports() == [] and store.imported_examples(since=None, until=None) == []


def test_chatgpt_bad_json_and_wrong_document(tmp_path):
    path = tmp_path / "conversations.json"
    path.write_text('[{"title": "x",, }]', encoding="utf-8")
    with pytest.raises(OuroError, match=r"conversations\.json: line 1, column 16: not valid JSON"):
        chatgpt.parse(path)
    path.write_text('{"conversations": []}', encoding="utf-8")
    with pytest.raises(OuroError, match="expected a list of conversations"):
        chatgpt.parse(path)


def test_a_zipped_conversations_json_that_inflates_past_the_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_FILE_BYTES", 1 << 20)       # the real limit is 256 MiB: same code, less to write
    archive = tmp_path / "chatgpt.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("conversations.json", "[" + " " * (3 << 20) + "]")
    assert archive.stat().st_size < 64 << 10
    with pytest.raises(OuroError, match=r"chatgpt\.zip \(conversations\.json\): larger than 1 MiB"):
        chatgpt.parse(archive)


# --- Messenger ----------------------------------------------------------------------------

def fb_text(s: str) -> str:
    """What Facebook does to text: each UTF-8 byte written as its own \\u00XX character."""
    return s.encode("utf-8").decode("latin-1")


def fb(sender: str, ms: int, content: str | None = None, **extra) -> dict:
    m = {"sender_name": fb_text(sender), "timestamp_ms": ms}
    if content is not None:
        m["content"] = fb_text(content)
    return {**m, **extra, "is_geoblocked_for_viewer": False}


MS0 = 1_700_000_000_000


def fb_thread(messages: list[dict], path: str = "inbox/zoe_123") -> dict:
    """A thread file: newest first, as Facebook writes it."""
    return {"participants": [{"name": fb_text("Zoë Ångström")}, {"name": "Ann Smith"}],
            "messages": sorted(messages, key=lambda m: -m["timestamp_ms"]), "title": fb_text("Zoë Ångström"),
            "is_still_participant": True, "thread_path": path, "magic_words": []}


def write_json(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc), encoding="utf-8")      # ensure_ascii: \u00c3\u00a9, as Facebook writes
    return path


def test_messenger_mojibake_order_across_files_and_drops(tmp_path):
    thread = tmp_path / "messages" / "inbox" / "zoe_123"
    older = [fb("Zoë Ångström", MS0, "on se voit au café ? 😂"), fb("Ann Smith", MS0 + 60_000, "naïve question: où ?"),
             fb("Ann Smith", MS0 + 61_000, photos=[{"uri": "photos/1.jpg", "creation_timestamp": 1}]),
             fb("Zoë Ångström", MS0 + 62_000, "Zoë unsent a message", is_unsent=True)]
    newer = [fb("Zoë Ångström", MS0 + 120_000, "Reacted 😂 to your message"),
             fb("Ann Smith", MS0 + 120_000, "à 18h ✅"),
             fb("Zoë Ångström", MS0 + 180_000, sticker={"uri": "stickers/1.png"}),
             fb("Ann Smith", MS0 + 181_000, "https://example.org", share={"link": "https://example.org"}, type="Share"),
             fb("Zoë Ångström", MS0 + 182_000, "Zoë called you.", call_duration=12, type="Call"),
             fb("Zoë Ångström", MS0 + 183_000, "Zoë named the group Paris.", type="Subscribe")]
    write_json(thread / "message_1.json", fb_thread(newer))
    write_json(thread / "message_2.json", fb_thread(older))
    plain = fb_thread([fb("Ann Smith", MS0, "x")])
    plain["messages"][0]["content"] = "naïve, written right"          # not mojibake: left as it is
    write_json(tmp_path / "plain" / "message_1.json", plain)
    parsed = messenger.parse(thread)
    assert [(m.speaker, m.text) for m in parsed.messages] == [
        ("Zoë Ångström", "on se voit au café ? 😂"), ("Ann Smith", "naïve question: où ?"), ("Ann Smith", "à 18h ✅")]
    assert parsed.messages[0].at == datetime(2023, 11, 14, 22, 13, 20)
    assert parsed.read == 10
    assert dict(parsed.dropped) == {"media": 2, "unsent": 1, "reaction": 1, "share": 1, "call": 1, "system": 1}
    assert messenger.parse(tmp_path / "plain" / "message_1.json").messages[0].text == "naïve, written right"
    assert messenger.fix_text(fb_text("🙂 Ça va")) == "🙂 Ça va" and messenger.fix_text("Ça va") == "Ça va"


def test_messenger_whole_export_zip_keeps_threads_apart(tmp_path):
    archive = tmp_path / "facebook-ann.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("your_facebook_activity/messages/inbox/zoe_123/message_1.json", json.dumps(fb_thread(
            [fb("Zoë Ångström", MS0, "second, same millisecond"), fb("Ann Smith", MS0, "first")])))   # newest first
        z.writestr("your_facebook_activity/messages/inbox/bob_456/message_1.json", json.dumps(fb_thread(
            [fb("Bob", MS0, "hi Ann")], path="inbox/bob_456")))
        z.writestr("your_facebook_activity/messages/inbox/bob_456/photos/1.jpg", b"\xff\xd8")
        z.writestr("your_facebook_activity/profile_information/profile_information.json", "{}")
    parsed = messenger.parse(archive)
    assert [(m.chat, m.text) for m in parsed.messages] == [
        ("inbox/bob_456", "hi Ann"), ("inbox/zoe_123", "first"), ("inbox/zoe_123", "second, same millisecond")]


@pytest.mark.parametrize("damage, match", [
    (lambda d: d["messages"][1].pop("timestamp_ms"), r"message_1\.json: messages\[1\]: no 'timestamp_ms'"),
    (lambda d: d["messages"][0].update(content=["x"]), r"message_1\.json: messages\[0\]: 'content' is not a string"),
    (lambda d: d.pop("messages"), r"message_1\.json: not a Messenger thread"),
])
def test_messenger_malformed_files_name_the_place_and_store_nothing(store, tmp_path, damage, match):
    doc = fb_thread([fb("Ann Smith", MS0 + i, f"m{i}") for i in range(3)])
    damage(doc)
    path = write_json(tmp_path / "inbox" / "zoe_123" / "message_1.json", doc)
    with pytest.raises(OuroError, match=match):
        import_chat(store, "messenger", tmp_path / "inbox", me="Ann Smith")
    assert store.imports() == [] and store.imported_examples(since=None, until=None) == []
    assert str(path) in str(pytest.raises(OuroError, messenger.parse, path).value)


# --- Discord ------------------------------------------------------------------------------

def dc(i: int, ts: str, name: str, content: str = "", *, nickname: str | None = None, kind: str = "Default",
       bot: bool = False, **extra) -> dict:
    return {"id": str(1000 + i), "type": kind, "timestamp": ts, "timestampEdited": None, "callEndedTimestamp": None,
            "isPinned": False, "content": content,
            "author": {"id": str(hash(name) % 10**6), "name": name, "discriminator": "0000",
                       "nickname": nickname or name, "color": None, "isBot": bot, "roles": [], "avatarUrl": ""},
            "attachments": [], "embeds": [], "stickers": [], "reactions": [], "mentions": [], **extra}


def dce(messages: list[dict], channel_id: str = "555", name: str = "general") -> dict:
    return {"guild": {"id": "1", "name": "Friends", "iconUrl": ""},
            "channel": {"id": channel_id, "type": "GuildTextChat", "categoryId": "2", "category": "Text",
                        "name": name, "topic": None},
            "dateRange": {"after": None, "before": None}, "exportedAt": "2024-04-01T10:00:00+02:00",
            "messages": messages, "messageCount": len(messages)}


def test_discord_offsets_nickname_replies_and_drops(tmp_path):
    msgs = [
        dc(1, "2024-03-31T01:58:00+01:00", "bob42", "up late?", nickname="Bob"),
        dc(2, "2024-03-31T03:00:30+02:00", "ann_b", "yes, clocks just jumped", nickname="Ann"),   # 00:58 → 01:00:30 UTC
        dc(3, "2024-03-31T03:01:00+02:00", "ann_b", "", nickname="Ann",
           attachments=[{"id": "9", "url": "cat.png", "fileName": "cat.png", "fileSizeBytes": 10}]),
        dc(4, "2024-03-31T03:02:00+02:00", "bob42", "cute", nickname="Bob", kind="Reply",
           reference={"messageId": "1003", "channelId": "555", "guildId": "1"}),
        dc(5, "2024-03-31T03:03:00+02:00", "bob42", "Bob joined.", kind="GuildMemberJoin"),
        dc(6, "2024-03-31T03:04:00+02:00", "MEE6", "GG ann_b, you just advanced to level 3!", bot=True),
        dc(7, "2024-03-31T03:05:00+02:00", "bob42", "", embeds=[{"title": "link preview"}]),
        dc(8, "2024-03-31T03:06:00+02:00", "ann_b", "", kind="Call"),
        dc(9, "2024-03-31T01:05:00Z", "ann_b", "thanks bot", nickname="Ann"),
    ]
    path = write_json(tmp_path / "Friends - general [555].json", dce(msgs))
    parsed = discord.parse(path)
    assert [(m.speaker, m.text, m.at) for m in parsed.messages] == [
        ("bob42", "up late?", datetime(2024, 3, 31, 0, 58)),
        ("ann_b", "yes, clocks just jumped", datetime(2024, 3, 31, 1, 0, 30)),
        ("bob42", "cute", datetime(2024, 3, 31, 1, 2)),
        ("MEE6", "GG ann_b, you just advanced to level 3!", datetime(2024, 3, 31, 1, 4)),
        ("ann_b", "thanks bot", datetime(2024, 3, 31, 1, 5))]
    assert parsed.messages[1].aliases == ("Ann",) and parsed.messages[0].aliases == ("Bob",)
    assert dict(parsed.dropped) == {"media": 1, "system": 1, "empty": 1, "call": 1} and parsed.read == 9
    (conv,) = merge_and_split(parsed.messages, ["ann"])            # the nickname makes ann_b the owner
    assert [t.role for t in conv] == ["user", "assistant", "user", "user", "assistant"]


def test_discord_folder_of_channels_and_malformed_messages(store, tmp_path):
    folder = tmp_path / "dce"
    write_json(folder / "a.json", dce([dc(1, "2024-01-01T10:00:00+00:00", "ann_b", "in a")], channel_id="1"))
    write_json(folder / "b.json", dce([dc(1, "2024-01-01T10:00:00+00:00", "bob42", "in b")], channel_id="2"))
    write_json(folder / "a.json_Files" / "meta.json", {"not": "a channel"})        # media folder: not read
    assert [(m.chat, m.text) for m in discord.parse(folder).messages] == [("1", "in a"), ("2", "in b")]
    bad = dce([dc(1, "2024-01-01T10:00:00+00:00", "ann_b", "ok"), dc(2, "yesterday", "ann_b", "x")])
    path = write_json(tmp_path / "bad.json", bad)
    with pytest.raises(OuroError, match=r"bad\.json: messages\[1\] \(id 1002\): missing or unreadable 'timestamp'"):
        import_chat(store, "discord", path, me="ann_b")
    bad["messages"][1] = {"id": "7", "type": "Default", "timestamp": "2024-01-01T10:00:00Z", "content": "x"}
    write_json(path, bad)
    with pytest.raises(OuroError, match=r"bad\.json: messages\[1\] \(id 7\): no 'author'"):
        import_chat(store, "discord", path, me="ann_b")
    assert store.imports() == []


def test_discord_zip_reads_its_top_level_only_and_files_come_in_natural_order(tmp_path):
    archive = tmp_path / "dce.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("general.json", json.dumps(dce([dc(1, "2024-01-01T10:00:00Z", "ann_b", "hi")])))
        z.writestr("general.json_Files/embed.json", json.dumps({"not": "a channel"}))
    assert [m.text for m in discord.parse(archive).messages] == ["hi"]
    for n in (10, 2, 1):
        write_json(tmp_path / "t" / f"message_{n}.json", fb_thread([fb("Bob", MS0, f"file {n}")]))
    docs = sources.documents(tmp_path / "t", messenger.FILES, looking_for="message_1.json", what="x", hint="")
    assert [d.member for d in docs] == ["message_1.json", "message_2.json", "message_10.json"]


# --- owner aliases and short messages -----------------------------------------------------

def chat(spec: list[tuple[str, str]], chat_id: str = "c", aliases: dict | None = None) -> Parsed:
    t0 = datetime(2024, 5, 1, 12, 0)
    return Parsed(messages=[Message(chat_id, who, t0 + timedelta(minutes=5 * i), text,
                                    aliases=(aliases or {}).get(who, ())) for i, (who, text) in enumerate(spec)],
                  read=len(spec))


def test_several_names_for_the_owner_and_none_of_them_present(tmp_path):
    parsed = chat([("Bob", "hi"), ("Ann Smith", "hello Bob"), ("Bob", "how are you"), ("Annie", "fine, you?")] * 2)
    summary, examples, _ = build(parsed, ["Ann Smith", "annie"], tmp_path)
    assert summary["owner"] == "Ann Smith, annie" and summary["owner_speakers"] == ["Ann Smith", "Annie"]
    assert [m["role"] for m in examples[0]["messages"]] == ["user", "assistant"] * 4
    assert build(parsed, "Ann Smith, Annie ,", tmp_path)[0]["owner"] == "Ann Smith, Annie"     # comma-separated
    assert build(parsed, ["Ann Smith", "Ann B"], tmp_path)[0]["owner_speakers"] == ["Ann Smith"]   # one may be absent
    with pytest.raises(OuroError, match=r"nobody named 'Ann B' or 'A\. Smith'.*\n.*Bob \(4\)"):
        build(parsed, ["Ann B", "A. Smith"], tmp_path)
    with pytest.raises(OuroError, match="no owner name given"):
        build(parsed, [" ", ","], tmp_path)


def test_the_owner_under_two_names_is_one_speaker_when_merging():
    t0 = datetime(2024, 5, 1, 12, 0)
    (conv,) = merge_and_split([Message("c", "Ann", t0, "a"), Message("c", "Annie", t0 + timedelta(minutes=1), "b"),
                               Message("c", "Bob", t0 + timedelta(minutes=2), "c")], ["ann", "annie"])
    assert [(t.role, t.text) for t in conv] == [("assistant", "a\nb"), ("user", "c")]


def test_short_messages_of_the_owner_are_left_out(tmp_path):
    parsed = chat([("Bob", "k"), ("Ann", "k"), ("Bob", "?"), ("Ann", "👍🏽"), ("Bob", "so?"), ("Ann", "ok"),
                   ("Bob", "❤️"), ("Ann", " ? ")])
    summary, _, _ = build(parsed, "Ann", tmp_path)
    assert summary["dropped"] == {"short": 3} and summary["messages_kept"] == 5
    assert summary["merged_messages"] == 5               # Bob's "k" and "?" now follow each other, 10 minutes apart
    assert build(parsed, "Ann", tmp_path, 0)[0]["dropped"] == {}
    assert build(parsed, "Ann", tmp_path, 3)[0]["dropped"] == {"short": 4}
    assert [visible_length(s) for s in ("👍🏽", "❤️", "e\u0301", " ok ", "👨‍👩‍👧")] == [1, 1, 1, 2, 3]


# --- end to end and the command -----------------------------------------------------------

def exports(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """One export per new format, each long enough for windows: kind → (path, owner)."""
    write_json(tmp_path / "gpt" / "conversations-000.json", [talk("c1", T0), talk("c2", T0 + 9000)])
    thread = tmp_path / "fb" / "messages" / "inbox" / "zoe_123"
    gap = 45 * 60_000                                  # two conversations of 8: two windows, one held out
    fb_msgs = [fb("Zoë Ångström" if i % 2 == 0 else "Ann Smith", MS0 + 60_000 * i + (gap if i >= 8 else 0),
                  f"message {i} ☕") for i in range(16)]
    write_json(thread / "message_1.json", fb_thread(fb_msgs[8:]))
    write_json(thread / "message_2.json", fb_thread(fb_msgs[:8]))
    dc_msgs = [dc(i, f"2024-01-01T{10 + i // 8}:{i:02d}:00+01:00", "ann_b" if i % 2 else "bob42", f"line {i}",
                  nickname="Ann" if i % 2 else None) for i in range(16)]
    dc_path = write_json(tmp_path / "dc" / "general.json", dce(dc_msgs))
    return {"chatgpt": (tmp_path / "gpt", "assistant"), "messenger": (tmp_path / "fb", "Ann Smith"),
            "discord": (dc_path, "Ann")}


@pytest.mark.parametrize("kind", ["chatgpt", "messenger", "discord"])
def test_each_format_imports_and_a_second_import_adds_nothing(store, tmp_path, kind):
    path, owner = exports(tmp_path)[kind]
    first = import_chat(store, kind, path, me=owner)
    assert first["windows"] >= 2 and first["new_examples"] == first["windows"]
    stored = store.imported_examples(since=None, until=None)
    assert all(r["messages"][-1]["role"] == "assistant" for r in stored)
    again = import_chat(store, kind, path, me=owner)
    assert again["new_examples"] == 0 and again["already_present"] == first["new_examples"]
    assert len(store.imported_examples(since=None, until=None)) == len(stored)
    sha = [i["file_sha256"] for i in store.imports()]
    assert sha[0] == sha[1] and len(sha[0]) == 64


def test_a_folder_fingerprint_changes_with_its_files(store, tmp_path):
    path, _ = exports(tmp_path)["chatgpt"]
    first = import_chat(store, "chatgpt", path, me="assistant")
    write_json(path / "conversations-001.json", [talk("c3", T0 + 20000)])
    second = import_chat(store, "chatgpt", path, me="assistant")
    assert second["new_examples"] == 1 and second["already_present"] == first["windows"]
    shas = [i["file_sha256"] for i in store.imports()]
    assert shas[0] != shas[1]


def test_an_export_bigger_than_the_total_limit_is_refused(tmp_path, monkeypatch):
    path, _ = exports(tmp_path)["messenger"]
    monkeypatch.setattr(limits, "MAX_EXPORT_BYTES", 1000)
    with pytest.raises(OuroError, match=r"fb: its files hold more than"):
        messenger.parse(path)


def test_cli_import_kinds_and_owner_options(tmp_path, capsys, settings):
    assert IMPORT_KINDS == (*PARSERS, "card", "docs")   # card: memory/importers/card.py; docs: importers/docs.py
    paths = exports(tmp_path)
    assert main(["import", "messenger", str(paths["messenger"][0])]) == 1
    assert "--me is required for a messenger import" in capsys.readouterr().err
    assert main(["import", "chatgpt", str(paths["chatgpt"][0]), "--me", "Ann"]) == 1
    assert "--persona" in capsys.readouterr().err
    assert main(["import", "discord", str(paths["discord"][0]), "--me", "Ann", "--persona", "user"]) == 1
    assert "--persona is only for chatgpt" in capsys.readouterr().err
    assert main(["import", "chatgpt", str(paths["chatgpt"][0]), "--persona", "user", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["owner"] == "user" and doc["kind"] == "chatgpt" and doc["new_examples"] == 2
    assert main(["import", "discord", str(paths["discord"][0]), "--me", "nobody", "--me", "ann_b",
                 "--min-chars", "0"]) == 0
    out = capsys.readouterr().out
    assert "as 'nobody, ann_b' (import" in out and "2 new, 0 already there" in out
    assert main(["import", "discord", str(paths["discord"][0]), "--me", "Ann"]) == 0
    assert "as 'Ann' (written as ann_b)" in capsys.readouterr().out            # matched through the nickname
    with pytest.raises(SystemExit):
        main(["import", "--help"])
    help_text = capsys.readouterr().out
    assert all(k in help_text for k in ("Export data", "Accounts Center", "DiscordChatExporter", "--persona"))


# --- any JSON fails cleanly ---------------------------------------------------------------

KEYS = ["messages", "mapping", "current_node", "parent", "message", "author", "role", "content", "parts",
        "content_type", "create_time", "sender_name", "timestamp_ms", "timestamp", "type", "name", "nickname",
        "attachments", "photos", "is_unsent", "children", "channel", "id"]
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner,
                                                                                       max_size=5), max_leaves=30)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(kind=st.sampled_from(["chatgpt", "messenger", "discord"]), doc=JSON_VALUES)
def test_any_json_document_parses_or_fails_cleanly(kind, doc):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / {"chatgpt": "conversations.json", "messenger": "message_1.json"}.get(kind, "c.json")
        path.write_text(json.dumps(doc), encoding="utf-8")
        try:
            parsed = PARSERS[kind](path)
            assert parsed.read >= len(parsed.messages)
        except OuroError as exc:
            assert str(path) in str(exc)
