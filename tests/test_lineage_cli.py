"""promote / rollback / generations / eval from the CLI, on a lineage of small fake generations."""

from __future__ import annotations

import csv
import json

from core.files import atomic_write_text, sha256_file
from lineage.generations import Lineage
from ouro.cli import main


def make_lineage(data_dir, n=3):
    lineage = Lineage(data_dir / "models")
    parent = None
    for i in range(n):
        folder = lineage.dir / f"gen-{i:04d}"
        folder.mkdir(parents=True)
        (folder / "model.gguf").write_bytes(f"GGUF fake {i}".encode())
        meta = {"id": folder.name, "parent_id": parent, "gguf": "model.gguf",
                "gguf_sha256": sha256_file(folder / "model.gguf"), "status": "base" if i == 0 else "promoted",
                "scores": {"recall": 0.95, "generalization": 0.9, "style_drift": 1.0, "format": 1.0} if i else {},
                "data": {"new_examples": 10 * i}}
        atomic_write_text(folder / "meta.json", json.dumps(meta))
        if i:
            atomic_write_text(folder / "evals.json", json.dumps({
                "child": {"recall": {"score": 0.95}, "style_drift": {"score": 1.0, "replies": []}},
                "parent": {"style_drift": {"score": 2.0}}, "gate": {"passed": True, "reasons": []}}))
        parent = folder.name
    lineage.set_active(parent)
    return lineage


def ledger(lineage):
    with open(lineage.ledger_path, newline="") as f:
        return list(csv.DictReader(f))


def test_rollback_goes_to_the_parent_and_records_who_and_why(tmp_path, capsys):
    lineage = make_lineage(tmp_path)
    assert main(["--data-dir", str(tmp_path), "rollback", "--actor", "ann", "--why", "too chatty"]) == 0
    assert lineage.active_id() == "gen-0001"
    row = ledger(lineage)[-1]
    assert (row["event"], row["gen_folder"], row["actor"], row["reason"]) == ("rollback", "gen-0001", "ann", "too chatty")
    assert row["child_sha"] == lineage.generation("gen-0001").sha256
    assert all((lineage.dir / f"gen-{i:04d}" / "model.gguf").exists() for i in range(3))  # nothing deleted
    assert main(["--data-dir", str(tmp_path), "promote", "gen-0002"]) == 0
    assert lineage.active_id() == "gen-0002"


def test_a_tampered_gguf_is_never_promoted(tmp_path, capsys):
    lineage = make_lineage(tmp_path)
    (lineage.dir / "gen-0001" / "model.gguf").write_bytes(b"GGUF tampered")
    assert main(["--data-dir", str(tmp_path), "rollback"]) == 1
    assert "SHA-256" in capsys.readouterr().err and lineage.active_id() == "gen-0002"


def test_rollback_without_parent_and_unknown_generation_are_clear_errors(tmp_path, capsys):
    lineage = make_lineage(tmp_path, n=1)
    assert main(["--data-dir", str(tmp_path), "rollback"]) == 1
    assert "no parent" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path), "promote", "gen-0042"]) == 1
    assert "no generation 'gen-0042'" in capsys.readouterr().err and lineage.active_id() == "gen-0000"


def test_generations_and_eval_report_as_table_and_json(tmp_path, capsys):
    make_lineage(tmp_path)
    assert main(["--data-dir", str(tmp_path), "generations"]) == 0
    table = capsys.readouterr().out
    assert "* gen-0002" in table and "gen-0001" in table
    assert main(["--data-dir", str(tmp_path), "generations", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["gen-0000", "gen-0001", "gen-0002"] and rows[2]["active"]
    assert main(["--data-dir", str(tmp_path), "eval", "gen-0002", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gate"]["passed"] is True
    assert main(["--data-dir", str(tmp_path), "eval", "gen-0002"]) == 0
    assert "passed" in capsys.readouterr().out


def test_lineage_chart_is_a_png(tmp_path, capsys):
    make_lineage(tmp_path)
    out = tmp_path / "chart.png"
    assert main(["--data-dir", str(tmp_path), "generations", "--chart", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
