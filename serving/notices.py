"""What admins read in the chat about the lineage: plain text built from records, no Telegram calls."""

from __future__ import annotations

import time

from evals.report import SCORES
from serving.hotswap import SwapResult
from trainer.cycle_job import CycleOutcome

ICONS = {"promoted": "✅", "held": "⏸", "refused": "🛑", "skipped": "⏭", "failed": "💥", "killed": "💥"}


def _score(v) -> str:
    return "—" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def cycle_message(outcome: CycleOutcome, swap: SwapResult | None) -> str:
    r = outcome.report
    gen, parent = r.get("gen_id"), r.get("parent_id")
    head = {"promoted": f"{gen} promoted and now serving (parent {parent})",
            "held": f"{gen} passed the gate against {parent} but was not promoted: the active generation "
                    "changed while it trained",
            "refused": f"{gen} refused by the gate; {parent} keeps serving",
            "skipped": "Learning cycle skipped",
            "failed": f"Learning cycle failed{' on ' + gen if gen else ''}; nothing served changed",
            "killed": "Learning cycle was stopped; nothing served changed"}.get(outcome.status, outcome.status)
    lines = [f"{ICONS.get(outcome.status, '•')} {head}"]
    scores, parent_scores = r.get("scores") or {}, r.get("parent_scores") or {}
    if scores:
        lines.append("score            child   parent")
        for key in SCORES:
            lines.append(f"{key:15} {_score(scores.get(key)):>6}   {_score(parent_scores.get(key)):>6}")
    docs = (r.get("data") or {}).get("documents") or {}
    if docs.get("chunks"):
        lines.append(f"Documents read before SFT: {docs['chunks']} chunks, {docs['tokens']} tokens")
    for reason in outcome.reasons[:6]:
        lines.append(f"- {reason}")
    if swap is not None and not swap.ok:
        lines.append(f"⚠️ hot-swap failed: {swap.reason}")
    if r.get("pruned"):
        lines.append(f"Disk: deleted the GGUFs of {', '.join(r['pruned'])} (older than the keep_gguf that "
                     "served most recently; their data and evals stay)")
    if gen and outcome.status in ("promoted", "held", "refused"):
        lines.append(f"Details: /evals {gen}")
    return "\n".join(lines)


def cycle_progress(info: dict | None) -> str:
    if not info:
        return "no learning cycle running"
    stage = info.get("stage", "?")
    step, total = info.get("step") or 0, info.get("total") or 0
    progress = f" step {step}/{total}" if total else ""
    minutes = (time.time() - info.get("started_at", time.time())) / 60
    return f"cycle running (started by {info.get('actor', '?')}, {minutes:.0f} min ago): {stage}{progress}"
