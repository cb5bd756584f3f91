"""SillyTavern character cards (`ouro import card`): V1, V2 and V3, as JSON or inside a PNG.

Every card and every PNG is built here by hand (the PNG chunk by chunk, with struct and zlib),
so what the importer must make of each field is visible next to the field.
"""

from __future__ import annotations

import base64
import json
import stat
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config.settings import load_settings
from core.errors import OuroError
from core.files import now
from memory.export import reviewed_since
from memory.importers import card, limits
from ouro.cli import main

REPLY_TOKENS = 200          # the served reply budget (reply_max_tokens' default)

ARIA = {   # V2, as SillyTavern exports it: every field present, most of them empty
    "spec": "chara_card_v2", "spec_version": "2.0",
    "data": {
        "name": "Aria",
        "description": "{{char}} keeps the lighthouse and writes letters to {{user}}.",
        "personality": "dry, kind, curious",
        "scenario": "{{user}} visits <BOT>'s lighthouse in a storm.",
        "first_mes": "*{{char}} opens the door.* Come in before the wind takes {{user}}.",
        "mes_example": ("<START>\n"
                        "{{user}}: What do you do all night?\n"
                        "{{char}}: I count ships.\n"
                        "And I count the ones that do not come back.\n"
                        "{{user}}: That sounds lonely.\n"
                        "{{char}}: It is quiet, not lonely.\n"
                        "<START>\n"
                        "{{char}}: *waves* {{user}} again!\n"
                        "{{user}}: Me again.\n"
                        "{{char}}: Tea is on the stove. The harbour is +49 170 1234567 if you need it.\n"),
        "creator_notes": "a test card", "system_prompt": "", "post_history_instructions": "Stay in character.",
        "alternate_greetings": ["Oh! {{user}}'s boat is back.", "   "],
        "tags": ["test"], "creator": "ann", "character_version": "1", "extensions": {},
    },
}
ARIA_PERSONA = ("You are Aria.\n\n"
                "Aria keeps the lighthouse and writes letters to the user.\n\n"
                "Aria's personality: dry, kind, curious\n\n"
                "Scenario: The user visits Aria's lighthouse in a storm.")


def mira(name: str = "Captain Mira Vale") -> dict:
    """V3: a nickname, a system prompt with {{original}}, four dialogues, a lorebook, odd lines of every kind."""
    long_reply = " ".join(["word"] * 300)
    dialogues = [
        "(how Mira talks at sea)\n{{user}}: Where are we going?\nMira: North.\nThen further north.\n{{user}}: Aye.",
        "{{user}}: Can I steer?\n{{CHAR}}: Not yet, {{user}}.\n{{char}}: Watch me first.",     # two of Mira: merged
        "{{user}}: Is that a storm?\n{{char}}: That is weather. A storm is worse.\n"
        "{{user}}: How much worse?\n{{char}}: " + long_reply,
        "{{user}}: Where are we going?\n{{char}}: South, this time.",   # its question is the first's: never held out
        "{{user}}: Hello? Anyone?",                               # no reply of Mira
    ]
    return {
        "spec": "chara_card_v3", "spec_version": "3.0",
        "data": {
            "name": name, "nickname": "Mira",
            "description": "{{char}} captains the Gull. {{random:grumpy,cheerful}} today.",
            "personality": "", "scenario": "",
            "first_mes": "Welcome aboard the Gull, {{user}}.",
            "alternate_greetings": ["Welcome aboard the Gull, {{user}}."],            # the same again
            "group_only_greetings": ["Welcome, all of you."],
            "mes_example": "\n".join("<START>\n" + d for d in dialogues),
            "system_prompt": "{{original}}\nYou are {{char}}, captain of the Gull. Speak to {{user}} as crew.",
            "post_history_instructions": "", "creator_notes": "", "tags": [], "creator": "", "character_version": "",
            "character_book": {"entries": [{"keys": ["Gull"], "content": "A ship."}]},
            "extensions": {}, "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
        },
    }


BOB_V1 = {"name": "Bob", "description": "<BOT> likes trains.", "personality": "", "scenario": "",
          "first_mes": "Hello <USER>! Seen any trains?", "mes_example": ""}


# --- files -----------------------------------------------------------------------------------------

def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) if crc is None
                                                                    else crc)


def b64(doc: object) -> bytes:
    return base64.b64encode(json.dumps(doc).encode())


def png(*text_chunks: bytes) -> bytes:
    """A valid 1x1 grayscale PNG with the given chunks between IHDR and IDAT."""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    return (card.PNG_SIGNATURE + ihdr + b"".join(text_chunks) + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
            + chunk(b"IEND", b""))


def write(tmp_path: Path, name: str, content: bytes | dict) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content, indent=2).encode())
    return path


def run(store, path: Path, target: Path, **kw) -> dict:
    return card.import_card(store, path, persona_file=target, reply_tokens=REPLY_TOKENS, **kw)


def stored(store) -> list[dict]:
    return store.imported_examples(since=None, until=None)


def assert_nothing_stored(store, target: Path) -> None:
    assert store.imports() == [] and stored(store) == [] and store.events("import") == []
    assert not target.exists()


# --- V2 JSON -----------------------------------------------------------------------------------------

def test_v2_json_persona_greetings_and_dialogues(store, tmp_path):
    target = tmp_path / "data" / "persona.md"
    s = run(store, write(tmp_path, "Aria.json", ARIA), target)
    assert target.read_text(encoding="utf-8") == ARIA_PERSONA + "\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert (s["spec"], s["spec_version"], s["source"], s["name"]) == ("chara_card_v2", "2.0", "JSON", "Aria")
    assert s["fields"] == ["name", "description", "personality", "scenario", "first_mes", "alternate_greetings",
                           "mes_example"]
    assert s["not_used"] == ["creator_notes", "post_history_instructions", "tags", "creator", "character_version"]
    assert (s["greetings"], s["dialogues"], s["examples_read"], s["examples_kept"]) == (3, 2, 7, 6)
    assert s["dropped"] == {"empty": 1}                                         # the blank alternate greeting
    assert (s["windows"], s["windows_train"], s["windows_heldout"]) == (6, 6, 0)   # two dialogues: all train
    assert (s["new_examples"], s["already_present"], s["persona_written"]) == (6, 0, "created")
    assert s["persona_chars"] == len(ARIA_PERSONA) and s["warnings"] == []
    rows = stored(store)
    assert [r["messages"] for r in rows[:2]] == [
        [{"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "*Aria opens the door.* Come in before the wind takes you."}],
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Oh! Your boat is back."}]]
    first, second = rows[3]["messages"], rows[5]["messages"]                 # each dialogue's last window
    assert first == [
        {"role": "user", "content": "What do you do all night?"},
        {"role": "assistant", "content": "I count ships.\nAnd I count the ones that do not come back."},
        {"role": "user", "content": "That sounds lonely."},
        {"role": "assistant", "content": "It is quiet, not lonely."}]
    assert rows[2]["messages"] == first[:2]                                  # one window per reply of Aria
    assert second[:2] == [{"role": "user", "content": "Hi!"},                 # Aria speaks first: the opener
                          {"role": "assistant", "content": "*waves* You again!"}]
    assert second[-1]["content"] == "Tea is on the stove. The harbour is [phone] if you need it."   # redacted
    assert all(r["split"] == "train" and r["messages"][-1]["role"] == "assistant" for r in rows)


def test_the_same_card_twice_adds_nothing_and_leaves_the_persona(store, tmp_path):
    target = tmp_path / "data" / "persona.md"
    path = write(tmp_path, "Aria.json", ARIA)
    first = run(store, path, target)
    again = run(store, path, target)
    assert again["new_examples"] == 0 and again["already_present"] == first["new_examples"] == 6
    assert again["persona_written"] == "unchanged" and len(stored(store)) == 6
    shas = [i["file_sha256"] for i in store.imports()]
    assert len(shas) == 2 and shas[0] == shas[1] and len(shas[0]) == 64


def test_an_existing_different_persona_is_kept_unless_replaced(store, tmp_path):
    target = tmp_path / "data" / "persona.md"
    target.parent.mkdir(exist_ok=True)
    target.write_text("You are Ouro, my own persona.\n", encoding="utf-8")
    path = write(tmp_path, "Aria.json", ARIA)
    with pytest.raises(OuroError, match="already holds a different persona") as err:
        run(store, path, target)
    assert "--replace-persona" in str(err.value)
    assert target.read_text(encoding="utf-8") == "You are Ouro, my own persona.\n"
    assert store.imports() == [] and stored(store) == []                      # nothing half-done
    s = run(store, path, target, replace_persona=True)
    assert s["persona_written"] == "replaced" and target.read_text(encoding="utf-8") == ARIA_PERSONA + "\n"
    target.write_text("\n" + ARIA_PERSONA + "\n\n", encoding="utf-8")       # the same text: not "different"
    assert run(store, path, target)["persona_written"] == "unchanged"


# --- V3 in a PNG ------------------------------------------------------------------------------------

def test_v3_png_prefers_ccv3_and_reads_every_kind_of_line(store, tmp_path):
    data = png(chunk(b"tEXt", b"chara\0" + b64(mira("Old Mira"))), chunk(b"tEXt", b"ccv3\0" + b64(mira())))
    path = write(tmp_path, "mira.png", data)
    try:
        from PIL import Image
    except ImportError:                                                       # pragma: no cover
        Image = None
    if Image is not None:                                                     # the fixture is a real PNG
        with Image.open(path) as image:
            image.verify()
    target = tmp_path / "data" / "persona.md"
    s = run(store, path, target)
    assert (s["name"], s["spec"], s["spec_version"], s["source"]) == (
        "Captain Mira Vale", "chara_card_v3", "3.0", "PNG chunk 'ccv3'")
    persona = target.read_text(encoding="utf-8")
    assert persona.startswith("You are Mira, captain of the Gull. Speak to the user as crew.\n\nMira captains")
    assert "{{original}}" not in persona and "Old Mira" not in persona
    assert s["not_used"] == ["group_only_greetings", "character_book", "assets"]
    assert s["dialogues"] == 5 and s["dialogues_without_reply"] == 1 and s["untagged_lines"] == 1
    assert s["dropped"] == {"duplicate": 1, "too_long": 1}
    assert (s["greetings"], s["examples_read"], s["examples_kept"]) == (2, 7, 5)
    assert any("{{random}}" in w for w in s["warnings"])
    rows = stored(store)
    contents = [[m["content"] for m in r["messages"]] for r in rows]
    assert ["Where are we going?", "North.\nThen further north."] in contents          # "Mira:" tags Mira too
    assert ["Can I steer?", "Not yet, you.\nWatch me first."] in contents             # one speaker's run merged
    assert not any("word word" in c[-1] for c in contents)                           # the 300-word reply
    # four dialogues with replies: one is held out whole, the last whose messages no other window has
    held = [r["messages"] for r in rows if r["split"] == "heldout"]
    assert [[m["content"] for m in w] for w in held] == [["Is that a storm?", "That is weather. A storm is worse."]]
    assert (s["windows_train"], s["windows_heldout"]) == (4, 1)
    held_text = {m["content"] for w in held for m in w}
    assert not held_text & {m["content"] for r in rows if r["split"] == "train" for m in r["messages"]}


def test_png_text_chunks_compressed_ztxt_and_itxt(store, tmp_path):
    v2 = {**ARIA, "data": {**ARIA["data"], "name": "Zed"}}
    ztxt = chunk(b"zTXt", b"chara\0\0" + zlib.compress(b64(v2)))
    assert card.read_card(write(tmp_path, "z.png", png(ztxt))).name == "Zed"
    itxt = chunk(b"iTXt", b"ccv3\0\x01\0en\0\0" + zlib.compress(b64(mira())))
    got = card.read_card(write(tmp_path, "i.png", png(ztxt, itxt)))
    assert (got.name, got.source) == ("Captain Mira Vale", "PNG chunk 'ccv3'")
    broken_chara = chunk(b"tEXt", b"chara\0***")                 # never read: the ccv3 chunk is preferred
    assert card.read_card(write(tmp_path, "b.png", png(broken_chara, itxt))).name == "Captain Mira Vale"


# --- V1 --------------------------------------------------------------------------------------------

def test_v1_flat_json(store, tmp_path):
    target = tmp_path / "data" / "persona.md"
    s = run(store, write(tmp_path, "bob.json", BOB_V1), target, context_tokens=12)
    assert (s["spec"], s["spec_version"]) == ("chara_card_v1", "1.0")
    assert s["persona_tokens_estimate"] == 8 and "over half the 12-token context" in s["warnings"][0]
    assert target.read_text(encoding="utf-8") == "You are Bob.\n\nBob likes trains.\n"
    assert [r["messages"] for r in stored(store)] == [[{"role": "user", "content": "Hi!"},
                                                       {"role": "assistant", "content": "Hello you! Seen any trains?"}]]
    assert (s["dialogues"], s["examples_read"], s["windows"]) == (0, 1, 1)


@pytest.mark.parametrize(("raw", "persona", "examples"), [
    ("{{char}} meets {{user}}.", "Aria meets the user.", "Aria meets you."),
    ("{{User}} waves. {{ USER }}'s hat!", "The user waves. The user's hat!", "You waves. Your hat!"),
    ("*<user> nods* <BOT> and <Bot>", "*The user nods* Aria and Aria", "*You nods* Aria and Aria"),
    ("{{original}}Hi {{user}}’s friend", "Hi the user’s friend", "Hi your friend"),
    ("{{random:a,b}} {{char}}", "{{random:a,b}} Aria", "{{random:a,b}} Aria"),
])
def test_macros(raw, persona, examples):
    assert card.fill(raw, "Aria", card.USER_IN_PERSONA) == persona
    assert card.fill(raw, "Aria", card.USER_IN_EXAMPLES) == examples


# --- broken cards store nothing --------------------------------------------------------------------

GOOD = png(chunk(b"tEXt", b"chara\0" + b64(ARIA)))
BROKEN = {
    "truncated png": (GOOD[:-20], "runs past the end of the PNG"),
    "bad crc": (png(chunk(b"tEXt", b"chara\0" + b64(ARIA), crc=1)), "fails its CRC check"),
    "not ihdr first": (card.PNG_SIGNATURE + chunk(b"tEXt", b"chara\0" + b64(ARIA)), "first chunk is b'tEXt'"),
    "no card chunk": (png(chunk(b"tEXt", b"Software\0GIMP")), "without a character card in it"),
    "bad base64": (png(chunk(b"tEXt", b"chara\0" + b"!!not*base64!!")), "(PNG chunk 'chara'): not base64"),
    "base64 of no json": (png(chunk(b"tEXt", b"chara\0" + base64.b64encode(b"{oops"))),
                          "(PNG chunk 'chara'): line 1, column 2: not valid JSON"),
    "bad zlib": (png(chunk(b"zTXt", b"chara\0\0not zlib")), "compressed text is damaged"),
    "bad json": (b'{"spec": "chara_card_v2",', "line 1, column 26: not valid JSON"),
    "no name": (json.dumps({"spec": "chara_card_v2", "data": {"description": "x"}}).encode(), "no 'data.name'"),
    "blank v1 name": (json.dumps({"name": "  ", "first_mes": "x"}).encode(), "no 'name'"),
    "no data": (json.dumps({"spec": "chara_card_v3", "name": "X"}).encode(), "without a 'data' object"),
    "unknown spec": (json.dumps({"spec": "chara_card_v9", "data": {"name": "X"}}).encode(), "'chara_card_v9'"),
    "field not text": (json.dumps({"name": "X", "first_mes": ["a"]}).encode(), "'first_mes' is not text"),
    "greetings not texts": (json.dumps({"spec": "chara_card_v2", "data": {"name": "X", "alternate_greetings": [1]}})
                            .encode(), "'data.alternate_greetings' is not a list of texts"),
    "a list": (b"[1, 2]", "expected a JSON object"),
    "neither": (b"GIF89a....", "neither a PNG image nor JSON"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_card_is_a_clear_error_and_stores_nothing(store, tmp_path, case):
    content, message = BROKEN[case]
    path = write(tmp_path, "card.png", content)
    target = tmp_path / "data" / "persona.md"
    with pytest.raises(OuroError) as err:
        run(store, path, target)
    assert str(path) in str(err.value) and message in str(err.value)
    assert_nothing_stored(store, target)


def test_the_good_png_of_the_broken_cases_imports(store, tmp_path):      # so the cases fail for their reason
    assert run(store, write(tmp_path, "card.png", GOOD), tmp_path / "persona.md")["new_examples"] == 6


def test_a_card_over_the_size_limit_is_refused_before_reading(store, tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_CARD_BYTES", len(GOOD) - 1)
    target, path = tmp_path / "data" / "persona.md", write(tmp_path, "card.png", GOOD)
    with monkeypatch.context() as m:
        m.setattr(Path, "open", lambda *a, **kw: pytest.fail("a card over the limit was opened"))
        with pytest.raises(OuroError, match="larger than"):
            run(store, path, target)
    assert_nothing_stored(store, target)
    monkeypatch.setattr(limits, "MAX_CARD_BYTES", 1000)                   # the inflated text is bounded too
    bomb = png(chunk(b"zTXt", b"chara\0\0" + zlib.compress(b"A" * 5000)))
    with pytest.raises(OuroError, match="inflates to more than"):
        card.read_card(write(tmp_path, "bomb.png", bomb))


KEYS = ["spec", "spec_version", "data", "name", "description", "first_mes", "mes_example", "alternate_greetings",
        "system_prompt", "nickname", "personality", "scenario"]
PIECES = st.sampled_from(["chara_card_v2", "<START>\n", "\n{{char}}: hi", "\n{{user}}: yo", "\n", "*", "{{user}}'s",
                          "\n<BOT>:", "\nX: ", "{{original}}", "{{random:a}}", " ", "é", "+49 170 1234567"])
TEXT = st.lists(PIECES, max_size=12).map("".join)
FIELD = TEXT | TEXT | TEXT | st.lists(TEXT, max_size=3) | st.none() | st.booleans() | st.integers()
JSON_VALUES = st.recursive(FIELD, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(KEYS), inner, max_size=6), max_leaves=25)
WELL_TYPED = st.fixed_dictionaries({"name": st.just("X")}, optional={
    **{k: TEXT for k in card.USED if k != "name"}, "alternate_greetings": st.lists(TEXT, max_size=3)})
FIELDS = st.dictionaries(st.sampled_from(KEYS), FIELD, max_size=8) | WELL_TYPED
CARDS = (JSON_VALUES | FIELDS.map(lambda d: {"name": "X", **d})                       # anything, a V1, a V2/V3
         | st.tuples(st.sampled_from(["chara_card_v2", "chara_card_v3"]), FIELDS).map(
             lambda t: {"spec": t[0], "data": {"name": "X", **t[1]}}))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(doc=CARDS, as_png=st.booleans())
def test_any_json_card_builds_or_fails_cleanly(doc, as_png):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "card.png"
        path.write_bytes(png(chunk(b"tEXt", b"chara\0" + b64(doc))) if as_png else json.dumps(doc).encode())
        try:
            persona, summary, examples = card.build(card.read_card(path), reply_tokens=REPLY_TOKENS)
        except OuroError as exc:
            assert str(path) in str(exc)
        else:
            assert persona and summary["examples_kept"] == len(examples)
            assert summary["examples_read"] == len(examples) + sum(summary["dropped"].values())
            assert all(e["messages"][-1]["role"] == "assistant" for e in examples)
            held = {m["content"] for e in examples if e["split"] == "heldout" for m in e["messages"]}
            assert not held & {m["content"] for e in examples if e["split"] == "train" for m in e["messages"]}


# --- into the settings, the next cycle and the command ---------------------------------------------

def test_the_settings_prefer_the_data_folders_persona_unless_one_is_set(tmp_path, monkeypatch):
    data = tmp_path / "data"
    assert load_settings(data_dir=data).persona_file.parent.name == "config"     # none written yet
    data.mkdir()
    (data / "persona.md").write_text("You are Aria.\n", encoding="utf-8")
    assert load_settings(data_dir=data).persona() == "You are Aria."
    mine = tmp_path / "mine.md"
    mine.write_text("You are mine.", encoding="utf-8")
    assert load_settings(data_dir=data, persona_file=mine).persona() == "You are mine."
    monkeypatch.setenv("OURO_PERSONA_FILE", str(mine))
    assert load_settings(data_dir=data).persona() == "You are mine."


def test_card_windows_reach_the_next_cycle_under_the_cards_persona(store, tmp_path):
    cfg = load_settings(data_dir=tmp_path / "data")
    s = run(store, write(tmp_path, "Aria.json", ARIA), cfg.data_dir / "persona.md")
    persona = load_settings(data_dir=tmp_path / "data").persona()
    assert persona == ARIA_PERSONA
    delta = reviewed_since(store, persona=persona, since=None, until=now())
    assert len(delta.examples) == s["windows"] and {e.source for e in delta.examples} == {"import"}
    assert all(e.messages[0] == {"role": "system", "content": ARIA_PERSONA} for e in delta.examples)


def test_cli_import_card(tmp_path, capsys, settings):
    path = write(tmp_path, "Aria.json", ARIA)
    assert main(["import", "card", str(path)]) == 0
    out = capsys.readouterr().out
    assert "imported character card 'Aria'" in out and "6 new, 0 already there" in out
    assert f"created: {settings.data_dir / 'persona.md'}" in out and "next start" in out
    assert load_settings().persona() == ARIA_PERSONA                        # what `ouro serve` will load
    assert main(["import", "card", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "card" and doc["already_present"] == 6 and doc["persona_written"] == "unchanged"
    other = write(tmp_path, "bob.json", BOB_V1)
    assert main(["import", "card", str(other)]) == 1
    assert "already holds a different persona" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path / "d2"), "import", "card", str(other), "--replace-persona"]) == 0
    assert "next start" in capsys.readouterr().out


def test_cli_card_options_and_help(tmp_path, capsys, settings, monkeypatch):
    path = write(tmp_path, "Aria.json", ARIA)
    assert main(["import", "card", str(path), "--me", "Ann"]) == 1
    assert "--me is not used for a card import" in capsys.readouterr().err
    assert main(["import", "card", str(path), "--min-chars", "3"]) == 1
    assert "--min-chars is not used" in capsys.readouterr().err
    assert main(["import", "whatsapp", str(path), "--me", "Ann", "--replace-persona"]) == 1
    assert "--replace-persona is only for card imports" in capsys.readouterr().err
    assert main(["import", "card", str(tmp_path / "missing.png")]) == 1
    assert "missing.png: cannot read it" in capsys.readouterr().err
    mine = tmp_path / "mine.md"
    mine.write_text("You are mine.", encoding="utf-8")
    monkeypatch.setenv("OURO_PERSONA_FILE", str(mine))
    assert main(["import", "card", str(path)]) == 0
    assert "note: persona_file is set to" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["import", "--help"])
    help_text = capsys.readouterr().out
    assert all(k in help_text for k in ("chub.ai", "Export and Download", "--replace-persona", "<START>"))
