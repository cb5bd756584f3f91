"""The `ouro` command line and the terminal chat."""

from __future__ import annotations

import io
import json

from engine.worker import InferenceWorker
from lineage.generations import Lineage
from memory.store import Store
from ouro.cli import build_parser, main
from ouro.terminal import run_terminal_chat
from serving.conversation import TERMINAL_CHAT_ID, Conversation
from serving.runtime import Runtime
from tests.helpers.fakes import FakeEngine


def test_help_lists_every_command_with_a_description(capsys):
    parser = build_parser()
    text = parser.format_help()
    for name in ("serve", "chat", "status", "settings", "bench"):
        assert name in text
    try:
        main(["serve", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "--base-url" in capsys.readouterr().out


def test_serve_without_token_is_a_clear_error(capsys):
    assert main(["serve"]) == 1
    err = capsys.readouterr().err
    assert "TELEGRAM_BOT_TOKEN is not set" in err and "Traceback" not in err


def test_status_json_on_a_fresh_data_dir(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "fresh"), "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["serving"] is False and report["turns"] == 0 and report["queue_depth"] == 0
    assert report["runs_on"].startswith("CPU") and report["runs_on"].endswith(" (when serving)")   # n_gpu_layers 0
    disk = report["disk"]   # what the lineage takes, and what is left, for an owner running it for months
    assert disk["generations"] == 0 and disk["models_bytes"] == 0 and disk["free_bytes"] > 0 and disk["keep_gguf"] == 10


def test_status_shows_what_the_lineage_takes_on_disk(tmp_path, capsys):
    from lineage.generations import Lineage
    from tests.helpers.lineages import make_generation

    models = tmp_path / "d" / "models"
    make_generation(models, "gen-0000", None, b"G" * 1000)
    make_generation(models, "gen-0001", "gen-0000", b"G" * 3000)
    Lineage(models).set_active("gen-0001")
    Lineage(models).generation("gen-0000").prune_gguf("a test")
    assert main(["--data-dir", str(tmp_path / "d"), "status"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Disk:"))
    assert "over 2 generations, 1 GGUFs pruned (keep_gguf 10)" in line and "GB free" in line


def test_bad_setting_names_the_setting(monkeypatch, capsys):
    monkeypatch.setenv("OURO_N_CTX", "12")
    assert main(["status"]) == 1
    assert "n_ctx" in capsys.readouterr().err


def test_settings_json_lists_every_setting_with_help(capsys):
    assert main(["settings", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {"admin_ids", "n_ctx", "reply_max_tokens", "kv_cache_chats"} <= names
    assert all(r["help"] for r in rows)


def test_terminal_chat_logs_turns_ratings_and_corrections(settings):
    store = Store.open(settings.db_path)
    engine = FakeEngine(["hi there", "second"])
    worker = InferenceWorker(engine)
    rt = Runtime(settings, store, Lineage(settings.models_dir), worker, Conversation(settings, store, worker))
    script = "hello\n/good\n/better a warmer hello\nagain\n/bad\n/reset\nfresh start\n/quit\n"
    out = io.StringIO()
    assert run_terminal_chat(rt, stdin=io.StringIO(script), stdout=out) == 0
    text = out.getvalue()
    assert "hi there" in text and "rating new" in text and "correction stored" in text
    rows = store.database.query("SELECT user_text, status FROM turns WHERE chat_id = ? ORDER BY id",
                                (TERMINAL_CHAT_ID,))
    assert [r["user_text"] for r in rows] == ["hello", "again", "fresh start"]
    assert store.stats()["ratings_up"] == 1 and store.stats()["ratings_down"] == 1
    assert store.database.one("SELECT text FROM corrections") == {"text": "a warmer hello"}
    assert [m["role"] for m in engine.prompts[-1]] == ["system", "user"]  # after /reset
    rt.close()
