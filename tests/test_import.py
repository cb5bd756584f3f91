"""Chat-history imports (cold start): WhatsApp and Telegram exports → redacted windows → the next cycle."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from core.errors import OuroError
from core.files import now
from memory.export import Delta, reviewed_since
from memory.importers import telegram, whatsapp
from memory.importers.chat import Message
from memory.importers.pipeline import import_chat, merge_and_split, rolling_windows, split
from memory.migrations import migrate
from memory.store import Store
from ouro.cli import main
from trainer.replay import holdout

NNBSP = "\u202f"   # iOS (and newer Android) put this narrow no-break space before AM/PM
LRM = "\u200e"     # iOS marks its own media and system notes with a left-to-right mark


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def android_chat(start: datetime, layout: str = "%m/%d/%y, %H:%M") -> str:
    """Three conversations (20, 8 and 3 messages, 30+ minutes apart), Bob then Ann alternating."""
    lines, t = [f"{start:{layout}} - Messages and calls are end-to-end encrypted. No one outside of this chat, "
                "not even WhatsApp, can read or listen to them. Tap to learn more."], start
    for size in (20, 8, 3):
        for i in range(size):
            who = "Bob" if i % 2 == 0 else "Ann"
            lines.append(f"{t:{layout}} - {who}: {who} says {i} in a conversation of {size} 🙂")
            t += timedelta(minutes=2)
        t += timedelta(minutes=45)
    return "\n".join(lines) + "\n"


# --- WhatsApp -----------------------------------------------------------------------------

def test_whatsapp_android_us_24h_multiline_media_and_system_lines(tmp_path):
    path = write(tmp_path, "chat.txt", (
        "12/31/23, 21:00 - Messages and calls are end-to-end encrypted. No one outside of this chat, not even "
        "WhatsApp, can read or listen to them. Tap to learn more.\n"
        "12/31/23, 21:05 - Bob: are you coming tonight?\n"
        "12/31/23, 21:06 - Ann: yes!\n"
        "bringing snacks 🍕\n"
        "\n"
        "and my cousin\n"
        "12/31/23, 21:07 - Bob: <Media omitted>\n"
        "12/31/23, 21:08 - Ann: This message was deleted\n"
        "12/31/23, 21:09 - Bob: IMG-20231231-WA0001.jpg (file attached)\n"
        "12/31/23, 21:10 - Bob changed the subject from \"Party\" to \"Party: NYE\"\n"
        "12/31/23, 21:11 - Ann: see you <This message was edited>\n"))
    parsed = whatsapp.parse(path)
    assert [(m.speaker, m.text) for m in parsed.messages] == [
        ("Bob", "are you coming tonight?"), ("Ann", "yes!\nbringing snacks 🍕\n\nand my cousin"), ("Ann", "see you")]
    assert parsed.messages[0].at == datetime(2023, 12, 31, 21, 5)
    assert parsed.read == 8
    assert dict(parsed.dropped) == {"system": 2, "media": 2, "deleted": 1}


def test_whatsapp_day_first_dotted_dates(tmp_path):
    path = write(tmp_path, "chat.txt", "31.12.23, 21:05 - Jörg: Guten Rutsch! 🎆\n01.01.24, 00:01 - Ann: Frohes Neues\n")
    parsed = whatsapp.parse(path)
    assert [m.at for m in parsed.messages] == [datetime(2023, 12, 31, 21, 5), datetime(2024, 1, 1, 0, 1)]
    assert parsed.messages[0].speaker == "Jörg"


def test_whatsapp_ios_with_seconds_lrm_notes_and_an_attachment(tmp_path):
    path = write(tmp_path, "_chat.txt", (
        f"[31/12/2023, 21:05:09] Bob: {LRM}Messages and calls are end-to-end encrypted. No one outside of this "
        "chat, not even WhatsApp, can read or listen to them.\n"
        "[31/12/2023, 21:05:30] Bob: hi Ann\n"
        f"{LRM}[31/12/2023, 21:06:00] Ann: {LRM}image omitted\n"
        f"{LRM}[31/12/2023, 21:06:10] Bob: {LRM}sticker omitted\n"
        "[31/12/2023, 21:06:12] Ann: <attached: 00000012-PHOTO-2023-12-31-21-06-12.jpg>\n"
        f"[31/12/2023, 21:07:00] Bob: {LRM}Missed voice call\n"
        "[31/12/2023, 21:08:45] Ann: hey Bob 👋\n"))
    parsed = whatsapp.parse(path)
    assert [(m.speaker, m.text, m.at) for m in parsed.messages] == [
        ("Bob", "hi Ann", datetime(2023, 12, 31, 21, 5, 30)), ("Ann", "hey Bob 👋", datetime(2023, 12, 31, 21, 8, 45))]
    assert dict(parsed.dropped) == {"system": 2, "media": 3}


@pytest.mark.parametrize("text", [
    f"[12/31/23, 12:05:09{NNBSP}AM] Bob: midnight\n[12/31/23, 1:15:00{NNBSP}PM] Ann: afternoon\n",   # iOS, US
    f"12/31/23, 12:05{NNBSP}AM - Bob: midnight\n12/31/23, 1:15{NNBSP}PM - Ann: afternoon\n",       # Android
    "12/31/23, 12:05 am - Bob: midnight\n12/31/23, 1:15 p.m. - Ann: afternoon\n",
])
def test_whatsapp_12h_clock_with_narrow_no_break_space(tmp_path, text):
    at = [m.at.replace(second=0) for m in whatsapp.parse(write(tmp_path, "chat.txt", text)).messages]
    assert at == [datetime(2023, 12, 31, 0, 5), datetime(2023, 12, 31, 13, 15)]


def test_whatsapp_ambiguous_dates_follow_the_reading_where_time_runs_forward(tmp_path):
    # 01/02 then 02/01: day first would run backwards (1 Feb → 2 Jan), so this file is month first
    path = write(tmp_path, "chat.txt", "01/02/24, 10:00 - Bob: one\n02/01/24, 10:00 - Ann: two\n")
    assert [m.at.date().isoformat() for m in whatsapp.parse(path).messages] == ["2024-01-02", "2024-02-01"]


def test_whatsapp_zip_and_a_media_caption(tmp_path):
    import zipfile

    path = tmp_path / "WhatsApp Chat - Bob.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("_chat.txt", "[31/12/2023, 21:05:09] Bob: hi\r\n"
                                "[31/12/2023, 21:05:30] Ann: IMG-20231231-WA0001.jpg (file attached)\r\nlook 😂\r\n")
        z.writestr("00000001-PHOTO-2023-12-31.jpg", b"\xff\xd8")
    parsed = whatsapp.parse(path)
    assert [(m.speaker, m.text) for m in parsed.messages] == [("Bob", "hi")]
    assert dict(parsed.dropped) == {"media": 1}


def test_whatsapp_file_without_a_message_line_names_line_1(tmp_path):
    path = write(tmp_path, "notes.txt", "shopping list\nmilk\n12/31/23, 21:05 - Bob: hi\n")
    with pytest.raises(OuroError, match=r"notes\.txt: line 1: not a WhatsApp message line"):
        whatsapp.parse(path)
    with pytest.raises(OuroError, match="line 1"):
        whatsapp.parse(write(tmp_path, "empty.txt", ""))


def test_whatsapp_impossible_date_names_its_line(tmp_path):
    path = write(tmp_path, "chat.txt", "31.12.23, 21:05 - Bob: hi\n31.13.23, 21:06 - Ann: ?\n")
    with pytest.raises(OuroError, match=r"chat\.txt: line 2: unreadable date"):
        whatsapp.parse(path)


# --- Telegram -----------------------------------------------------------------------------

def tg(i: int, at: datetime, who: str, text, **extra) -> dict:
    return {"id": i, "type": "message", "date": at.isoformat(), "date_unixtime": str(int(at.timestamp())),
            "from": who, "from_id": f"user{abs(hash(who)) % 10**9}", "text": text, **extra}


def test_telegram_single_chat_entities_forwarded_service_and_media(tmp_path):
    t = datetime(2023, 12, 31, 21, 0)
    chat = {"name": "Bob", "type": "personal_chat", "id": 4242, "messages": [
        {"id": 1, "type": "service", "date": t.isoformat(), "actor": "Ann", "action": "phone_call", "text": ""},
        tg(2, t, "Bob", "party tonight?"),
        tg(3, t, "Ann", ["sure, see ", {"type": "link", "text": "https://example.org/nye"}, " ",
                         {"type": "bold", "text": "at 10"}, " 🎉"]),
        tg(4, t, "Bob", "", photo="photos/photo_1@31-12-2023_21-00-00.jpg", width=1280, height=960),
        tg(5, t, "Ann", "", file="stickers/sticker.webp", media_type="sticker", sticker_emoji="😂"),
        tg(6, t, "Bob", "Breaking: fireworks", forwarded_from="City News"),
        tg(7, t, "Ann", "", file="voice_messages/audio_1.ogg", media_type="voice_message", duration_seconds=3),
        tg(8, t, "Bob", "   "),
    ]}
    parsed = telegram.parse(write(tmp_path, "result.json", json.dumps(chat, ensure_ascii=False)))
    assert [(m.speaker, m.text) for m in parsed.messages] == [
        ("Bob", "party tonight?"), ("Ann", "sure, see https://example.org/nye at 10 🎉")]
    assert parsed.read == 8
    assert dict(parsed.dropped) == {"service": 1, "media": 3, "forwarded": 1, "empty": 1}


def test_telegram_full_account_export_keeps_chats_apart_and_skips_channels(tmp_path):
    t = datetime(2024, 3, 1, 9, 0)
    export = {"about": "Here is the data you requested.", "personal_information": {"first_name": "Ann"},
              "chats": {"about": "This page lists all chats from this export.", "list": [
                  {"name": "Bob", "type": "personal_chat", "id": 1, "messages": [tg(1, t, "Bob", "hi Ann")]},
                  {"type": "saved_messages", "id": 2, "messages": [tg(2, t, "Ann", "note to self")]},
                  {"name": "News", "type": "public_channel", "id": 3, "messages": [tg(3, t, "News", "headline")]},
                  {"name": "Cleo", "type": "personal_chat", "id": 4, "messages": [tg(4, t, "Cleo", "hi Ann")]},
              ]}}
    parsed = telegram.parse(write(tmp_path, "result.json", json.dumps(export)))
    assert [(m.chat, m.speaker) for m in parsed.messages] == [("1", "Bob"), ("4", "Cleo")]
    assert dict(parsed.dropped) == {"skipped_chat": 2}
    # two chats at the same minute are still two conversations
    assert len(merge_and_split(parsed.messages, "ann")) == 2


def test_telegram_bad_json_names_line_and_column(tmp_path):
    path = write(tmp_path, "result.json", '{\n  "name": "Bob",\n  "messages": [\n    {"id": 1,,}\n  ]\n}\n')
    with pytest.raises(OuroError, match=r"result\.json: line 4, column \d+: not valid JSON"):
        telegram.parse(path)


def test_telegram_unknown_document_and_bad_message_are_clear_errors(tmp_path):
    with pytest.raises(OuroError, match="not a Telegram Desktop export"):
        telegram.parse(write(tmp_path, "a.json", '{"hello": "world"}'))
    bad = {"name": "Bob", "type": "personal_chat", "id": 1,
           "messages": [tg(1, datetime(2024, 1, 1), "Bob", "ok"), {"id": 2, "type": "message", "from": "Bob",
                                                                   "text": "no date"}]}
    with pytest.raises(OuroError, match=r"messages\[1\] \(id 2\): missing or unreadable \"date\""):
        telegram.parse(write(tmp_path, "b.json", json.dumps(bad)))


# --- the pipeline -------------------------------------------------------------------------

def msgs(spec: list[tuple[str, int]], chat: str = "c") -> list[Message]:
    """(speaker, minute offset) → messages."""
    t0 = datetime(2024, 5, 1, 12, 0)
    return [Message(chat, who, t0 + timedelta(minutes=m), f"{who}@{m}") for who, m in spec]


def test_merge_within_3_minutes_and_new_conversation_at_30():
    convs = merge_and_split(msgs([("Bob", 0), ("Ann", 1), ("Ann", 2), ("Ann", 5), ("Ann", 9), ("Bob", 10),
                                  ("Bob", 40), ("Ann", 69)]), "ann")
    assert [[(t.role, t.text) for t in c] for c in convs] == [
        [("user", "Bob@0"), ("assistant", "Ann@1\nAnn@2\nAnn@5"), ("assistant", "Ann@9"), ("user", "Bob@10")],
        [("user", "Bob@40"), ("assistant", "Ann@69")]]


def test_windows_end_on_the_owner_and_the_heldout_tenth_never_overlaps_training():
    spec = [("Bob" if i % 2 == 0 else "Ann", 2 * i) for i in range(20)]
    (conv,) = merge_and_split(msgs(spec), "ann")
    windows = rolling_windows(conv, 0)
    assert [len(w.turns) for w in windows] == [12, 11, 12, 11, 8]
    assert all(w.turns[-1].role == "assistant" and 6 <= len(w.turns) <= 12 for w in windows)
    train, heldout, dropped = split(windows)
    assert len(heldout) == 1 and heldout[0].turns[-1].text == "Ann@38"
    assert dropped == 3 and len(train) == 1
    assert not train[0].ids & heldout[0].ids


def test_import_whatsapp_end_to_end_redacts_keeps_emoji_and_reports(store, tmp_path):
    text = android_chat(datetime(2023, 12, 31, 20, 0)).replace(
        "Bob says 2 in a conversation of 20 🙂", "call me on +49 170 1234567 or bob@example.com 🙂")
    text += "01/01/24, 09:00 - Bob: <Media omitted>\n"
    summary = import_chat(store, "whatsapp", write(tmp_path, "chat.txt", text), me="ann")
    assert summary["messages_read"] == 33 and summary["messages_kept"] == 31
    assert summary["dropped"] == {"media": 1, "system": 1}
    assert summary["conversations"] == 3 and summary["conversations_without_window"] == 1
    assert (summary["windows"], summary["windows_train"], summary["windows_heldout"]) == (6, 5, 1)
    assert summary["new_examples"] == 6 and summary["already_present"] == 0
    assert summary["tokens_estimate"]["windows"] > summary["tokens_estimate"]["messages"] > 0
    stored = store.imported_examples(since=None, until=None)
    contents = "\n".join(m["content"] for r in stored for m in r["messages"])
    assert "[phone]" in contents and "[email]" in contents and "1234567" not in contents
    assert "🙂" in contents
    assert all(r["messages"][-1]["role"] == "assistant" for r in stored)
    assert [r["split"] for r in stored].count("heldout") == 1


def test_reimporting_the_same_export_adds_nothing(store, tmp_path):
    path = write(tmp_path, "chat.txt", android_chat(datetime(2024, 2, 1, 18, 0)))
    first = import_chat(store, "whatsapp", path, me="Ann")
    again = import_chat(store, "whatsapp", path, me="Ann")
    assert first["new_examples"] > 0
    assert again["new_examples"] == 0 and again["already_present"] == first["new_examples"]
    assert len(store.imported_examples(since=None, until=None)) == first["new_examples"]
    assert [i["summary"]["new_examples"] for i in store.imports()] == [first["new_examples"], 0]


def test_unknown_owner_lists_the_speakers_and_stores_nothing(store, tmp_path):
    path = write(tmp_path, "chat.txt", android_chat(datetime(2024, 2, 1, 18, 0)))
    with pytest.raises(OuroError) as err:
        import_chat(store, "whatsapp", path, me="Annie")
    assert "'Annie'" in str(err.value) and "Bob (" in str(err.value) and "Ann (" in str(err.value)
    assert store.imports() == [] and store.imported_examples(since=None, until=None) == []


def test_a_failure_while_storing_leaves_nothing_behind(store, tmp_path, monkeypatch):
    import memory.importers.pipeline as pipeline

    real_build = pipeline.build

    def build_with_a_bad_last_row(*args):
        summary, examples, pairs = real_build(*args)
        examples[-1]["split"] = "bogus"                     # violates the CHECK after the other rows went in
        return summary, examples, pairs

    monkeypatch.setattr(pipeline, "build", build_with_a_bad_last_row)
    with pytest.raises(Exception, match="CHECK"):
        import_chat(store, "whatsapp", write(tmp_path, "chat.txt", android_chat(datetime(2024, 2, 1))), me="Ann")
    assert store.imports() == [] and store.imported_examples(since=None, until=None) == []
    assert store.events("import") == []


# --- into the cycle -----------------------------------------------------------------------

def test_imported_windows_reach_the_next_cycles_delta_and_its_heldout(store, tmp_path):
    summary = import_chat(store, "whatsapp", write(tmp_path, "chat.txt", android_chat(datetime(2024, 2, 1))),
                          me="Ann")
    cutoff = now()
    delta = reviewed_since(store, persona="You are Ann.", since=None, until=cutoff)
    assert len(delta.examples) == summary["windows"]
    assert {e.source for e in delta.examples} == {"import"}
    assert all(e.messages[0] == {"role": "system", "content": "You are Ann."} for e in delta.examples)
    assert '"source": "import"' in delta.to_jsonl()              # so it is part of data_delta_sha
    assert Delta.from_jsonl(delta.to_jsonl()).examples[0].split in ("train", "heldout")
    train, pairs, heldout = holdout(delta, 0.2)
    assert (len(train), len(heldout)) == (summary["windows_train"], summary["windows_heldout"])
    # the next generation's window starts after this cycle's cutoff: nothing is trained twice
    assert reviewed_since(store, persona="P", since=cutoff, until=None).examples == []


def test_holdout_keeps_an_imports_split_and_still_holds_out_live_data():
    from memory.export import Example

    live = [Example([{"role": "assistant", "content": f"live {i}"}], "thumbs_up", f"2024-01-0{i}") for i in range(1, 6)]
    imported = [Example([{"role": "assistant", "content": f"imp {i}"}], "import", "2024-01-09",
                        split="heldout" if i == 9 else "train") for i in range(10)]
    train, _, heldout = holdout(Delta(examples=live + imported), 0.2)
    assert [m[-1]["content"] for m in heldout] == ["imp 9", "live 5"]      # history first: evals take the newest
    assert len(train) == 4 + 9


def test_migration_adds_the_import_tables_to_an_older_database(tmp_path):
    from memory.db import Database

    db = Database(tmp_path / "old.db")
    migrate(db.conn, stop_before="m005_imports")
    db.conn.execute("INSERT INTO users (id, created_at, last_seen) VALUES (7, 'x', 'x')")
    db.close()
    store = Store.open(tmp_path / "old.db")
    try:
        assert store.database.scalar("SELECT COUNT(*) FROM users") == 1
        assert store.imports() == [] and store.imported_examples(since=None, until=None) == []
    finally:
        store.close()


# --- the command --------------------------------------------------------------------------

def test_cli_import_prints_a_summary_and_json(tmp_path, capsys, settings):
    path = write(tmp_path, "chat.txt", android_chat(datetime(2024, 2, 1)))
    assert main(["import", "whatsapp", str(path), "--me", "Ann"]) == 0
    out = capsys.readouterr().out
    assert "6 new, 0 already there" in out and "ouro cycle" in out
    assert main(["import", "whatsapp", str(path), "--me", "Ann", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["already_present"] == 6 and doc["kind"] == "whatsapp"


def test_cli_import_errors_cleanly(tmp_path, capsys):
    path = write(tmp_path, "result.json", "{not json")
    assert main(["import", "telegram", str(path), "--me", "Ann"]) == 1
    assert "result.json: line 1, column 2: not valid JSON" in capsys.readouterr().err
