"""`ouro experiment --imported`'s plumbing, cheaply: the history it writes is a Telegram Desktop
export the real importer reads whole, every training window ends on the owner's reply in the style,
and the CLI takes the flag (and refuses two experiments at once). The experiment itself (one real
cycle, ~15 minutes) is not run here; its figures are in the README."""

from __future__ import annotations

import json

import pytest

from core.errors import OuroError
from memory.importers.pipeline import import_chat
from ouro.bench.experiment import PROBE_PROMPTS, STYLES
from ouro.bench.imported import FRIENDS, HISTORY, OWNER, telegram_export
from ouro.cli import build_parser


def fake_history(style):
    return [[(q, style.correct(f"answer {n}.{i}")) for i, q in enumerate(questions)]
            for n, questions in enumerate(HISTORY)]


def test_the_history_is_a_telegram_export_the_importer_reads_whole(tmp_path, store):
    style = STYLES["stars"]
    export = tmp_path / "result.json"
    export.write_text(json.dumps(telegram_export(fake_history(style))), encoding="utf-8")
    summary = import_chat(store, "telegram", export, me=OWNER)
    messages = sum(map(len, HISTORY)) * 2
    assert summary["messages_read"] == summary["messages_kept"] == messages
    assert summary["dropped"] == {} and summary["conversations"] == len(FRIENDS)   # no merges, no splits
    assert summary["windows_train"] >= 2 * len(FRIENDS) and summary["windows_heldout"] >= 1
    rows = store.database.query("SELECT messages, split FROM imported_examples")
    assert len(rows) == summary["windows_train"] + summary["windows_heldout"]
    for row in rows:
        window = json.loads(row["messages"])
        replies = [m["content"] for m in window if m["role"] == "assistant"]
        assert window[-1]["role"] == "assistant" and replies and all(map(style.holds, replies))
        assert not any(m["content"] in PROBE_PROMPTS for m in window)   # probes stay new questions


def test_the_cli_takes_imported_and_refuses_two_experiments(capsys):
    from ouro.cli import cmd_experiment

    args = build_parser().parse_args(["experiment", "--imported", "--style", "stars", "--json"])
    assert args.imported and args.style == ["stars"]
    both = build_parser().parse_args(["experiment", "--imported", "--attack"])
    with pytest.raises(OuroError, match="one experiment at a time"):
        cmd_experiment(both)
