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


# --- the evals and the redaction, per language --------------------------------------------

ASSISTANT_VOICE = {
    "en": ("As an AI, I don't have feelings, but I'd be happy to help!", "Ha, no way, I'd rather stay in bed today."),
    "fr": ("En tant qu'IA, je n'ai pas de sentiments, mais je serais ravi de vous aider.",
           "Franchement, je préfère rester au lit aujourd'hui, il pleut trop."),
    "de": ("Als KI habe ich keine Gefühle, aber ich helfe Ihnen gerne weiter.",
           "Ehrlich gesagt bleibe ich heute lieber im Bett, es regnet zu sehr."),
    "es": ("Como inteligencia artificial, no tengo sentimientos, pero estaré encantado de ayudarte.",
           "La verdad, hoy prefiero quedarme en la cama, llueve demasiado."),
    "pt": ("Como uma IA, não tenho sentimentos, mas fico feliz em ajudar.",
           "Na verdade, hoje prefiro ficar na cama, está chovendo demais."),
    "ru": ("Как ИИ, я не испытываю эмоций, но буду рад помочь вам.",
           "Честно, сегодня я лучше останусь в кровати, слишком сильный дождь."),
}
MORE_VOICE = {
    "fr": "Je suis désolé d'apprendre cela. N'hésitez pas à me poser d'autres questions !",
    "de": "Es tut mir leid, das zu hören. Wie kann ich Ihnen helfen?",
    "es": "Lamento escuchar eso. ¿En qué puedo ayudarte hoy?",
    "pt": "Lamento ouvir isso. Como posso te ajudar hoje?",
    "ru": "Мне жаль это слышать. Чем я могу вам помочь?",
}
OTHER_SPEAKER = {
    "en": "sure, see you at eight\nUser: and bring the cake", "fr": "d'accord, à ce soir\nUtilisateur : et le gâteau ?",
    "de": "klar, bis später\nNutzer: und der Kuchen?", "es": "vale, hasta luego\nUsuario: ¿y la tarta?",
    "pt": "combinado, até logo\nVocê: e o bolo?", "ru": "договорились, до вечера\nПользователь: а торт?",
}
ADDRESSES = {
    "en": ("Come by 221 Baker Street after work.", "Baker Street"),
    "fr": ("Passe au 12 rue de la Paix après le travail.", "rue de la Paix"),
    "de": ("Komm nach der Arbeit in die Hauptstraße 12 vorbei.", "Hauptstraße"),
    "es": ("Pásate por la Calle Mayor, 5 después del trabajo.", "Calle Mayor"),
    "pt": ("Passa na Rua das Flores, nº 12 depois do trabalho.", "Rua das Flores"),
    "ru": ("Заходи после работы на ул. Ленина, д. 5, кв. 12.", "Ленина"),
}


@pytest.mark.parametrize("lang", sorted(ASSISTANT_VOICE))
def test_assistant_voice_is_caught_in_each_language_and_plain_talk_is_not(lang):
    from evals.style_drift import is_assistant_voice

    drifted, plain = ASSISTANT_VOICE[lang]
    assert language.detect(drifted) == lang and language.detect(plain) == lang
    assert is_assistant_voice(drifted) and not is_assistant_voice(plain)
    if lang in MORE_VOICE:
        assert is_assistant_voice(MORE_VOICE[lang])


@pytest.mark.parametrize("lang", sorted(OTHER_SPEAKER))
def test_a_reply_that_writes_the_other_side_is_caught_in_each_language(lang):
    from evals.format_check import check_reply

    assert check_reply(OTHER_SPEAKER[lang], "stop") == ["continued as another speaker"]
    assert check_reply(OTHER_SPEAKER[lang].split("\n")[0], "stop") == []


@pytest.mark.parametrize("lang", sorted(ADDRESSES))
def test_street_addresses_are_redacted_in_each_language(lang):
    from memory.redact import redact

    sentence, street = ADDRESSES[lang]
    out = redact(sentence)
    assert street not in out and "[address]" in out
    assert redact(out) == out


def test_ordinary_sentences_with_numbers_keep_them():
    from memory.redact import redact

    for text in ("Ich bin in 5 Minuten weg, warte kurz.", "On se voit à la place 5 minutes avant.",
                 "Vamos a la plaza en 10 minutos.", "Я буду через 5 минут на площади."):
        assert redact(text) == text


def test_every_check_covers_the_same_six_languages():
    assert {check: sorted(known) for check, known in language.CHECKS.items()} == {
        check: ["de", "en", "es", "fr", "pt", "ru"] for check in ("style_drift", "format", "redaction")}
    assert language.not_covered(["en", "fr", "unknown", None]) == {}
    assert language.not_covered(["ja", "en"]) == {"ja": ["style_drift", "format", "redaction"]}


def test_a_generations_eval_report_names_the_languages_it_does_not_cover(tmp_path):
    from evals.report import eval_lines
    from lineage.generations import Generation

    data = {"languages": language.coverage({"fr": 30, "it": 4, "unknown": 2})}
    gen = Generation("gen-0001", tmp_path, {"parent_id": "gen-0000", "data": data})
    evals = {"child": {}, "parent": {}, "gate": {"passed": True}}
    assert "  languages NOT covered: it (no style_drift, format, redaction)" in eval_lines(gen, evals)
    data["languages"] = language.coverage({"fr": 30, "en": 3})
    assert any("fr 30, en 3 — all covered" in line for line in eval_lines(gen, evals))


def test_a_cards_windows_carry_its_language(store, tmp_path):
    from pathlib import Path

    from memory.importers.card import import_card

    card = Path(__file__).parent / "fixtures" / "imports" / "card" / "Aria.json"
    summary = import_card(store, card, persona_file=tmp_path / "persona.md", replace_persona=False,
                          reply_tokens=200, context_tokens=2048)
    assert summary["languages"] == {"en": 5} and summary["languages_not_covered"] == {}
    assert {r["language"] for r in store.database.query("SELECT language FROM imported_examples")} == {"en"}


def test_whatsapp_notes_written_in_the_phones_language_are_left_out(tmp_path):
    from memory.importers import whatsapp

    path = tmp_path / "chat.txt"
    path.write_text("12/03/2024 20:02 - Bob: Mensagem apagada\n12/03/2024 20:03 - Ann: Это сообщение удалено\n"
                    "12/03/2024 20:04 - Bob: Ce message a été supprimé\n"
                    "12/03/2024 20:05 - Ann: até já <Mensagem editada>\n", encoding="utf-8")
    parsed = whatsapp.parse(path)
    assert dict(parsed.dropped) == {"deleted": 3} and [m.text for m in parsed.messages] == ["até já"]
