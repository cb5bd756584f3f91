"""The lineage and a generation's evals as rows and lines — shared by the CLI and the bot's admin commands,
so `ouro generations` and /generations never disagree."""

from __future__ import annotations

import json

from core.errors import OuroError
from lineage.generations import Generation, Lineage
from memory.language import coverage_line

SCORES = ("recall", "generalization", "style_drift", "format", "contamination", "refusal_style")


def generation_rows(lineage: Lineage) -> list[dict]:
    active = lineage.active_id()
    rows = []
    for g in lineage.generations():
        scores = g.meta.get("scores") or {}
        data = g.meta.get("data") or {}
        rows.append({"id": g.id, "parent": g.parent_id, "created_at": g.meta.get("created_at"),
                     "status": g.meta.get("status"), "active": g.id == active,
                     "examples": data.get("new_examples"), "pairs": data.get("new_pairs"),
                     "recall": scores.get("recall"), "generalization": scores.get("generalization"),
                     "style_drift": scores.get("style_drift"), "format": scores.get("format"),
                     "contamination": scores.get("contamination"), "contributors": data.get("contributors"),
                     "largest_share": data.get("largest_share"),
                     "reasons": g.meta.get("reasons", []), "gguf_sha256": g.sha256,
                     "gguf_pruned": None if (note := g.pruned) is None else note.get("pruned_at", "?")})
    return rows


def table_lines(rows: list[dict], *, compact: bool = False) -> list[str]:
    """A fixed-width table (`compact` drops columns for a phone screen)."""
    cell = lambda v: "—" if v is None else str(v)  # noqa: E731
    if compact:
        fmt = "{:1}{:4} {:4} {:5} {:8} {:>4} {:>5} {:>5} {:>5}"
        out = [fmt.format("", "gen", "par", "date", "status", "data", "rec", "gen", "drift")]
        for r in rows:
            out.append(fmt.format("*" if r["active"] else "", r["id"].replace("gen-", ""),
                                  (r["parent"] or "—").replace("gen-", ""), (r["created_at"] or "")[5:10],
                                  (r["status"] or "")[:8], cell(r["examples"]), cell(r["recall"])[:5],
                                  cell(r["generalization"])[:5], cell(r["style_drift"])[:5]))
        return out
    fmt = "{:1} {:9} {:9} {:20} {:9} {:>5} {:>7} {:>7} {:>6} {:>6}"
    out = [fmt.format("", "id", "parent", "created", "status", "data", "recall", "general", "drift", "format")]
    for r in rows:
        out.append(fmt.format("*" if r["active"] else "", r["id"], cell(r["parent"]), (r["created_at"] or "")[:19],
                              r["status"] or "", cell(r["examples"]), cell(r["recall"]), cell(r["generalization"]),
                              cell(r["style_drift"]), cell(r["format"])))
    return out


def load_evals(gen: Generation) -> dict:
    path = gen.folder / "evals.json"
    if not path.exists():
        raise OuroError(f"{gen.id} has no evals (generation 0 is the baseline its children are measured against)")
    return json.loads(path.read_text(encoding="utf-8"))


def eval_lines(gen: Generation, evals: dict) -> list[str]:
    gate = evals.get("gate", {})
    lines = [f"{gen.id} vs its parent {gen.parent_id}: {'passed' if gate.get('passed') else 'refused'}"]
    for key in SCORES:
        c = (evals["child"].get(key) or {})
        p = (evals["parent"].get(key) or {})
        lines.append(f"  {key:15} child {c.get('score')!s:>8}   parent {p.get('score')!s:>8}")
    data = gen.meta.get("data") or {}
    if data.get("contributors") is not None:
        lines.append(f"  taught by {data['contributors']} people; largest single share {data.get('largest_share')}")
    if data.get("kto_desirable") or data.get("kto_undesirable"):
        lines.append(f"  lone ratings (KTO): {data.get('kto_desirable') or 0} 👍 desirable · "
                     f"{data.get('kto_undesirable') or 0} 👎 undesirable")
    refine = data.get("refine") or {}
    if refine.get("made") or refine.get("kept") or refine.get("dropped"):
        lines.append(f"  self-refinement: {refine.get('made', 0)} proposals made · {refine.get('kept', 0)} kept · "
                     f"{refine.get('dropped', 0)} dropped · {refine.get('used', 0)} trained as pairs")
    held = {k: v for k, v in (data.get("screened") or {}).items() if v}
    if held or data.get("waiting_review") or data.get("deferred"):
        lines.append(f"  kept out: screened {held or 0} · waiting for /review {sum((data.get('waiting_review') or {}).values())}"
                     f" · over a person's share {data.get('deferred') or 0} (next generation)")
    if data.get("languages"):
        lines.append("  " + coverage_line(data["languages"]))
    for reason in gate.get("reasons", []):
        lines.append(f"  - {reason}")
    for hit in (evals["child"].get("contamination") or {}).get("hits", [])[:3]:
        lines.append(f"  contaminated ({', '.join(hit['reasons'])}): {hit['reply'][:80]!r}")
    drifted = [r for r in evals["child"].get("style_drift", {}).get("replies", []) if r["assistant_voice"]]
    for r in drifted[:5]:
        lines.append(f"  assistant voice on {r['probe']!r}: {r['reply'][:80]!r}")
    slipped = [r for r in (evals["child"].get("refusal_style") or {}).get("replies", []) if r["voice"] == "assistant"]
    for r in slipped[:3]:
        lines.append(f"  said no as an assistant to {r['probe']!r}: {r['reply'][:80]!r}")
    return lines
