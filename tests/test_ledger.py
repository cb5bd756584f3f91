"""The ledger as the design documents show it: GEN_ID the generation number, base_model as
generation 0's parent, the folder in a column of its own; older ledgers migrated in place."""

from __future__ import annotations

import csv

from lineage.generations import BASE_MODEL, LEDGER_COLUMNS, Lineage, gen_number, ledger_row

OLD_HEADER = ["GEN_ID", "parent_sha", "child_sha", "data_delta_sha", "steps", "lr", "walltime_min", "loss_start",
              "loss_end", "eval_recall", "eval_generalization", "eval_style_drift", "event", "parent_id", "gate",
              "reason", "actor", "at"]
OLD_ROWS = [
    ["gen-0000", "", "aaa", "", "", "", "", "", "", "", "", "", "base", "", "base", "registered", "system",
     "2026-01-01T00:00:00+00:00"],
    ["gen-0001", "aaa", "bbb", "ddd", "16", "0.0003", "1.5", "3.1", "2.2", "0.95", "0.9", "1", "candidate",
     "gen-0000", "passed", "all checks passed", "cli", "2026-01-02T00:00:00+00:00"],
    ["", "bbb", "", "", "", "", "", "", "", "", "", "", "skip", "gen-0001", "", "nothing reviewed", "cli",
     "2026-01-03T00:00:00+00:00"],
]


def _write_old(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(OLD_HEADER)
        w.writerows(OLD_ROWS)


def test_an_old_ledger_is_read_numbered_and_migrated_in_place_rows_kept(tmp_path):
    lineage = Lineage(tmp_path / "models")
    _write_old(lineage.ledger_path)
    # read before any write: already in the current columns
    rows = lineage.ledger()
    assert [(r["GEN_ID"], r["gen_folder"]) for r in rows] == [("0", "gen-0000"), ("1", "gen-0001"), ("", "")]
    assert rows[0]["parent_sha"] == BASE_MODEL and rows[1]["parent_sha"] == "aaa"
    assert set(LEDGER_COLUMNS) <= set(rows[2])
    # the next append migrates the file itself: the current header, every old row kept
    lineage.append_ledger({"gen_folder": "gen-0002", "event": "failed", "reason": "boom", "actor": "cli"})
    with open(lineage.ledger_path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == LEDGER_COLUMNS and header[:12] == OLD_HEADER[:12]
    rows = lineage.ledger()
    assert [(r["GEN_ID"], r["gen_folder"], r["event"]) for r in rows] == [
        ("0", "gen-0000", "base"), ("1", "gen-0001", "candidate"), ("", "", "skip"), ("2", "gen-0002", "failed")]
    assert [r["at"] for r in rows[:3]] == [r[-1] for r in OLD_ROWS]
    assert (rows[1]["eval_recall"], rows[1]["data_delta_sha"], rows[1]["constitution_sha"]) == ("0.95", "ddd", "")
    assert not list(lineage.dir.glob(".*tmp*"))   # no temporary left beside it


def test_writers_may_name_the_generation_by_its_folder_either_way(tmp_path):
    lineage = Lineage(tmp_path / "models")
    lineage.append_ledger({"GEN_ID": "gen-0000", "child_sha": "x", "event": "base"})
    lineage.append_ledger({"gen_folder": "gen-0012", "event": "promote", "parent_sha": "x"})
    rows = lineage.ledger()
    assert [(r["GEN_ID"], r["gen_folder"], r["parent_sha"]) for r in rows] == [
        ("0", "gen-0000", BASE_MODEL), ("12", "gen-0012", "x")]
    with open(lineage.ledger_path, newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    assert raw[0]["GEN_ID"] == "0" and raw[1]["GEN_ID"] == "12"   # on disk too, not only when read


def test_gen_number_and_ledger_row_rules():
    assert gen_number("gen-0003") == 3 and gen_number("gen-12345678") == 12345678
    assert gen_number("gen-3") is None and gen_number("") is None and gen_number("3") is None
    # a later row of generation 0 (a rollback to it) keeps the sha of what it moved off
    assert ledger_row({"GEN_ID": "gen-0000", "event": "rollback", "parent_sha": "abc"})["parent_sha"] == "abc"
    assert ledger_row({"GEN_ID": "", "event": "skip"}) == {"GEN_ID": "", "event": "skip"}
