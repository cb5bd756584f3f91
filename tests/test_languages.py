"""Languages: each conversation's language is stored with its windows and turns, and the evals and the
redaction say which of the history's languages they cover."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta

import pytest

from memory import language
from memory.importers.pipeline import format_summary, import_chat
from memory.migrations import migrate
from memory.store import Store

SENTENCES = {
    "en": "I'll be home late tonight, the train is stuck again somewhere outside the city.",
    "fr": "Je rentre tard ce soir, le train est encore bloqué quelque part avant la gare.",
    "de": "Ich komme heute Abend spät nach Hause, der Zug steht schon wieder vor dem Bahnhof.",
    "es": "Llego tarde esta noche, el tren está parado otra vez antes de la estación.",
    "pt": "Vou chegar tarde hoje à noite, o comboio parou outra vez antes da estação.",
    "ru": "Я сегодня вернусь поздно, поезд опять застрял где-то перед вокзалом.",
}


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_a_sentence_is_detected_in_its_language(lang):
    assert language.detect(SENTENCES[lang]) == lang


def test_short_messages_say_nothing():
    assert [language.detect(t) for t in ("ok", "merci!", "😂😂😂", "lol 👍")] == [None] * 4


def test_code_switching_takes_the_majority_by_letters():
    french_mostly = ["Salut, tu viens ce soir au concert avec nous ?", "yeah maybe, depends on work",
                     "Allez, viens, ça va être génial, il y aura tout le monde !", "ok", "Parfait, on se retrouve à huit heures devant la salle."]
    assert language.majority(french_mostly) == "fr"
    assert language.majority(["ok", "👍"]) is None


def whatsapp_chat(lines_by_speaker: list[tuple[str, str]], start=datetime(2024, 3, 1, 20, 0), repeat=2) -> str:
    out, t = [], start
    for n in range(repeat):
        for who, text in lines_by_speaker:
            out.append(f"{t:%d/%m/%Y, %H:%M} - {who}: {text}" + " 🙂" * n)
            t += timedelta(minutes=4)
        t += timedelta(hours=2)
    return "\n".join(out) + "\n"


FRENCH = [("Bob", "Salut Ann, tu as vu le match hier soir ?"), ("Ann", "Oui, quelle fin incroyable, j'ai crié !"),
          ("Bob", "Moi aussi, les voisins ont dû m'entendre."), ("Ann", "Haha, on regarde le prochain ensemble ?"),
          ("Bob", "Avec plaisir, je ramène des bières fraîches."), ("Ann", "Super, et moi je fais une quiche maison.")]
ITALIAN = [("Bob", "Ciao Ann, hai visto la partita ieri sera?"), ("Ann", "Sì, che finale incredibile, ho urlato!"),
           ("Bob", "Anch'io, i vicini mi avranno sentito."), ("Ann", "Ahah, guardiamo la prossima insieme?"),
           ("Bob", "Volentieri, porto delle birre fresche."), ("Ann", "Perfetto, e io preparo una torta salata.")]


def test_an_import_stores_each_window_with_its_conversations_language(store, tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text(whatsapp_chat(FRENCH), encoding="utf-8")
    summary = import_chat(store, "whatsapp", path, me="Ann")
    rows = store.database.query("SELECT language FROM imported_examples")
    assert rows and {r["language"] for r in rows} == {"fr"}
    assert summary["languages"] == {"fr": len(rows)} and summary["conversation_languages"] == {"fr": 2}
    assert summary["languages_not_covered"] == {}
    assert "windows by conversation language: fr 2; all covered" in format_summary(summary)


def test_an_import_in_a_language_the_checks_lack_says_so(store, tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text(whatsapp_chat(ITALIAN), encoding="utf-8")
    summary = import_chat(store, "whatsapp", path, me="Ann")
    assert summary["languages_not_covered"] == {"it": ["style_drift", "format", "redaction"]}
    assert "NOT covered: it (no style_drift, format, redaction)" in format_summary(summary)
    report = language.coverage(store.history_languages())
    assert report["not_covered"] == {"it": ["style_drift", "format", "redaction"]}
    assert report["covered"] == ["de", "en", "es", "fr", "pt", "ru"]


def test_a_live_turn_stores_its_language_and_a_short_one_the_conversations(store):
    first = store.add_user_turn(chat_id=7, user_id=7, text=SENTENCES["de"])
    short = store.add_user_turn(chat_id=7, user_id=7, text="ok 👍")
    other = store.add_user_turn(chat_id=8, user_id=8, text="ok")
    got = {r["id"]: r["language"] for r in store.database.query("SELECT id, language FROM turns")}
    assert got == {first: "de", short: "de", other: None}
    assert store.history_languages() == {"de": 2, "unknown": 1}


def test_migrating_an_older_database_keeps_its_rows_without_a_language(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, stop_before="m012_languages")
    conn.execute("INSERT INTO imports (kind, file, file_sha256, owner, created_at, summary) "
                 "VALUES ('whatsapp', 'x', 'y', 'Ann', '2024-01-01', '{}')")
    conn.execute("INSERT INTO imported_examples (import_id, messages, split, created_at, sha256) "
                 "VALUES (1, '[]', 'train', '2024-01-01', 'abc')")
    conn.close()
    store = Store.open(path)
    try:
        assert store.database.query("SELECT language FROM imported_examples") == [{"language": None}]
        assert store.history_languages() == {"unknown": 1}
    finally:
        store.close()
