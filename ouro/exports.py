"""`ouro export`: where the data comes from, where the file goes, what to tell the person.

Data for `openai`, `sft` and `dpo`:
- no GEN: everything reviewed so far (or since `--since GEN` took its training data), through
  `memory.export.reviewed_since`, so redaction, opt-outs, the content screens and the review
  mode apply as they do to training: a stranger's correction still waiting in /review, or a
  reply carrying a link, is not in the file (the report counts both). Not cut to `data_budget`
  and no per-source cap: those shape one generation, not what a person may take away.
- GEN: the new data that generation learned from, as its cycle kept it: `data/train.jsonl`
  (its delta less the held-out share; the replay sample from ancestors is not stored, so it is
  not included) and `data/pairs.jsonl`.
`ollama` writes a Modelfile for GEN (`lineage.ollama`).

Files land in `<data dir>/exports/` (created owner-only) unless `--out` says otherwise.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from config.settings import Settings
from core.errors import OuroError
from core.files import ensure_private_dir
from lineage.generations import Generation, Lineage
from memory.dataset_export import DATASET_FORMATS, write_dataset
from memory.export import Delta, Example, Pair, reviewed_since
from memory.screens import screens_for
from memory.store import Store
from memory.trust import policy_for

FORMATS = (*DATASET_FORMATS, "ollama", "llama-cpp-python")


def exports_dir(settings: Settings) -> Path:
    path = settings.data_dir / "exports"
    ensure_private_dir(path)
    return path


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def generation_delta(gen: Generation) -> Delta:
    """The new examples and pairs `gen` learned from, from the files its cycle kept."""
    data = gen.folder / "data"
    if not (data / "train.jsonl").exists():
        raise OuroError(f"{gen.id} keeps no training data (the base model was not trained here)",
                        hint="export without a generation for everything reviewed so far")
    return Delta(examples=[Example(**row) for row in _read_jsonl(data / "train.jsonl")],
                 pairs=[Pair(**row) for row in _read_jsonl(data / "pairs.jsonl")])


def run_export(settings: Settings, store: Store | None, fmt: str, *, gen: str | None = None,
               since: str | None = None, out: Path | None = None) -> dict:
    """Write one export and return its report (what `--json` prints)."""
    if fmt not in FORMATS:
        raise OuroError(f"unknown export format {fmt!r}", hint=f"one of {', '.join(FORMATS)}")
    lineage = Lineage(settings.models_dir)
    if fmt == "ollama":
        if not gen:
            raise OuroError("an Ollama export is for one generation", hint="ouro export --format ollama gen-0003")
        if since:
            raise OuroError("--since selects training data; it does not apply to --format ollama")
        from lineage.ollama import write_modelfile

        generation = lineage.generation(gen)
        return write_modelfile(settings, generation, out or exports_dir(settings) / f"{gen}.Modelfile")

    if fmt == "llama-cpp-python":
        if gen or since:
            raise OuroError("a llama-cpp-python server config lists every generation; it takes no GEN or --since")
        from lineage.server_config import write_server_config

        return write_server_config(settings, lineage, out or exports_dir(settings) / "llama-cpp-python-server.json")

    if gen and since:
        raise OuroError("give a generation or --since, not both",
                        hint="GEN exports the new data it learned from; --since GEN what was reviewed after it")
    if gen:
        delta, label = generation_delta(lineage.generation(gen)), gen
        source = {"generation": gen}
    else:
        if store is None:
            raise OuroError("exporting reviewed turns needs the database")
        cutoff = lineage.generation(since).meta.get("data_cutoff") if since else None
        uncapped = replace(policy_for(settings, store), max_share=1.0)
        delta = reviewed_since(store, persona=settings.persona(), since=cutoff, until=None, budget=10**9,
                               opt_out_by_default=settings.training_opt_out_default, policy=uncapped,
                               screens=screens_for(settings))
        label = f"reviewed-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
        source = {"reviewed_since": since, "cutoff": cutoff, "left_out": left_out(delta)}
        waiting = source["left_out"]["waiting_for_review"]
        if waiting and not (delta.pairs if fmt == "dpo" else delta.examples):
            raise OuroError(f"nothing to export yet: {waiting} items wait for an admin in /review",
                            hint="approve them with /review in the chat or `ouro review`, then export again")
    report = write_dataset(delta, fmt, out or exports_dir(settings) / f"{label}.{fmt}.jsonl",
                           price_per_mtok=settings.openai_price_per_mtok,
                           max_tokens_per_example=settings.openai_max_tokens_per_example)
    return {**report, "source": source}


def left_out(delta: Delta) -> dict:
    """What the trust rules and screens kept out of an export of reviewed turns, by why."""
    return {"screened": dict(delta.screened), "waiting_for_review": sum(delta.waiting.values()),
            "not_trusted": delta.dropped.get("not_trusted", 0)}


def report_lines(report: dict) -> list[str]:
    """The report for a person."""
    if report["format"] == "ollama":
        return [f"wrote {report['path']}",
                f"  FROM {report['gguf']}",
                f"  TEMPLATE {report['template_family']}; stop {' '.join(report['stop'])}",
                f"next: {report['create']}"]
    if report["format"] == "llama-cpp-python":
        return [f"wrote {report['path']}: {', '.join(report['generations'])}",
                f"next: {report['run']}", f"then: OURO_ENGINE=openai OURO_ENGINE_BASE_URL={report['engine_base_url']}"]
    what = "preference pairs" if report["format"] == "dpo" else "examples"
    lines = [f"wrote {report['rows']} {what} to {report['path']}"]
    out = (report.get("source") or {}).get("left_out") or {}
    if out.get("screened"):
        lines.append("  left out by the content screens: "
                     + ", ".join(f"{n} {reason}" for reason, n in sorted(out["screened"].items())))
    if out.get("waiting_for_review"):
        lines.append(f"  left out, waiting for an admin in /review: {out['waiting_for_review']}")
    if out.get("not_trusted"):
        lines.append(f"  left out, from people this bot does not learn from (learn_from): {out['not_trusted']}")
    if report["format"] == "openai":
        lines += [
            f"  tokens ({report['encoding']}): {report['tokens_total']:,} in total; per example min "
            f"{report['tokens_min']:,}, mean {report['tokens_mean']:,}, max {report['tokens_max']:,}",
            f"  over the {report['max_tokens_per_example']:,}-token limit: {report['over_limit']}",
            f"  estimated training cost: ${report['estimated_cost_usd']:.2f} "
            f"({report['billed_tokens_per_epoch']:,} tokens × {report['epochs']} epochs × "
            f"${report['price_per_mtok_usd']:.2f} per million)",
        ]
        lines += [f"  warning: {w}" for w in report["warnings"]]
    return lines
