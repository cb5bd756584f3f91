"""Consent: an import names whose messages become the persona; someone else's need --consent-of, which is
recorded with the import and shown in its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memory.store import Store
from ouro.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "imports"
TELEGRAM = FIXTURES / "telegram" / "result.json"                  # a personal chat with Bob
WHATSAPP = FIXTURES / "whatsapp" / "WhatsApp Chat with Bob.txt"
MESSENGER = FIXTURES / "messenger"                                # a one-to-one thread with Боб


def imports(settings) -> list[dict]:
    store = Store.open(settings.db_path)
    try:
        return store.imports()
    finally:
        store.close()


def test_your_own_messages_are_recorded_as_yours(settings, capsys):
    assert main(["import", "telegram", str(TELEGRAM), "--me", "Ann", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["consent"] == {"persona_of": ["Ann"], "own": True, "consent_of": None}
    assert imports(settings)[0]["consent"] == {"persona_of": ["Ann"], "own": True, "consent_of": None}


@pytest.mark.parametrize("kind, path, other", [("telegram", TELEGRAM, "Bob"), ("whatsapp", WHATSAPP, "Bob"),
                                               ("messenger", MESSENGER, "Боб")])
def test_me_naming_the_other_person_of_a_one_to_one_chat_is_refused(settings, capsys, kind, path, other):
    assert main(["import", kind, str(path), "--me", other]) == 1
    err = capsys.readouterr().err
    assert f"'{other}' is the person this chat was with, not the one who exported it" in err
    assert f"--persona-of '{other}' --consent-of" in err
    assert imports(settings) == []


def test_someone_elses_messages_need_their_consent_and_it_is_recorded(settings, capsys):
    assert main(["import", "telegram", str(TELEGRAM), "--persona-of", "Bob"]) == 1
    assert "--persona-of makes someone else's messages the persona: it needs --consent-of WHO" in capsys.readouterr().err
    assert main(["import", "telegram", str(TELEGRAM), "--me", "Ann", "--consent-of", "Bob"]) == 1
    assert "--consent-of is for someone else's messages, but --me says they are yours" in capsys.readouterr().err
    assert imports(settings) == []

    assert main(["import", "telegram", str(TELEGRAM), "--persona-of", "Bob", "--consent-of", "Bob, in person"]) == 0
    out = capsys.readouterr().out
    assert "consent    the persona learns Bob's messages, not the importer's: with the consent of Bob, in person" in out
    record = {"persona_of": ["Bob"], "own": False, "consent_of": "Bob, in person"}
    assert imports(settings)[0]["consent"] == record and imports(settings)[0]["summary"]["consent"] == record


def test_a_chatgpt_export_is_your_own_account_unless_you_say_whose(settings, capsys):
    path = FIXTURES / "chatgpt" / "conversations.json"
    assert main(["import", "chatgpt", str(path), "--persona", "user", "--consent-of", "Dana"]) == 0
    assert "the account holder's own messages, from someone else's account, with the consent of Dana" in \
        capsys.readouterr().out
    assert imports(settings)[0]["consent"] == {"persona_of": ["user"], "own": False, "consent_of": "Dana"}
    assert main(["import", "chatgpt", str(path), "--persona-of", "Dana", "--consent-of", "Dana"]) == 1
    assert main(["import", "card", str(FIXTURES / "card" / "Aria.json"), "--consent-of", "Dana"]) == 1
    assert "--consent-of is not used for a card import" in capsys.readouterr().err
