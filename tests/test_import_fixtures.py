"""The README's table of what each importer read, kept and dropped is what `ouro import --json` says
on the hand-written fixtures (tests/fixtures/imports/, tests/fixtures/docs/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ouro.cli import main

ROOT = Path(__file__).parent.parent
F = ROOT / "tests" / "fixtures" / "imports"
IMPORTS = {
    "telegram": [str(F / "telegram" / "result.json"), "--me", "Ann"],
    "whatsapp": [str(F / "whatsapp" / "WhatsApp Chat with Bob.txt"), "--me", "Ann"],
    "chatgpt": [str(F / "chatgpt" / "conversations.json")],
    "messenger": [str(F / "messenger"), "--me", "Ann Smith"],
    "discord": [str(F / "discord" / "partidas.json"), "--me", "Ann"],
    "card": [str(F / "card" / "Aria.json")],
    "docs": [str(ROOT / "tests" / "fixtures" / "docs")],
}


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "—"


def row(kind: str, s: dict) -> str:
    """One line of the README table, from an import's JSON summary."""
    if kind == "docs":
        skipped = ", ".join(Path(p).name for p in s["skipped_files"])
        return (f"| docs | {len(s['files']) + len(s['skipped_files'])} files | {len(s['files'])} "
                f"({s['chunks']} chunks) | {len(s['skipped_files'])} skipped ({skipped}) | — | — | — |")
    if kind == "card":
        return (f"| card | {s['examples_read']} examples | {s['examples_kept']} | {_counts(s['dropped'])} | "
                f"{s['windows_train']} / {s['windows_heldout']} | — | {_counts(s['languages'])} |")
    windows = f"{s['windows_train']} / {s['windows_heldout']}" + (
        f" ({s['windows_dropped_overlap']} overlapping a held-out one dropped)" if s["windows_dropped_overlap"] else "")
    left = s["preference_pairs_left_out"]
    pairs = f"{s['preference_pairs']}" + (f" ({_counts(left)} left out)" if left else "")
    return (f"| {kind} | {s['messages_read']} | {s['messages_kept']} | {_counts(s['dropped'])} | {windows} | "
            f"{pairs} | {_counts(s['languages'])} |")


@pytest.mark.parametrize("kind", list(IMPORTS))
def test_the_readme_table_is_what_the_importer_says(kind, capsys):
    assert main(["import", kind, *IMPORTS[kind], "--json"]) == 0
    line = row(kind, json.loads(capsys.readouterr().out))
    assert line in [s.strip() for s in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()], line
