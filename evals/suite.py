"""The evals a candidate generation faces, on the same items for it and its parent.

Recall on what the parent knows (its own greedy answers to the fixed recall prompts, asked as
served, plus the ancestors' held-out data), generalization on this generation's held-out data,
style drift and format on the fixed probes, refusal style on requests the constitution turns
down (evals/refusal_style.py), and contamination (a learned link or spam habit) on
those replies and canary prompts — for the child and, as the baseline, the parent.
The gate (evals/gate.py) decides on the scores; the cycle adds its invariants.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from config.probes import load_probes
from config.settings import Settings
from evals.contamination import contamination_score
from evals.format_check import format_score
from evals.generalization import generalization_score
from evals.recall import recall_score
from evals.refusal_style import refusal_probes, refusal_style_score
from evals.scoring import EvalModel, cycle_gpu_layers
from evals.style_drift import style_drift_score
from lineage.generations import Generation
from memory.screens import Screens


@dataclass
class SuiteResult:
    scores: dict           # {"child": {eval: result}, "parent": {eval: result}}
    probe_ids: list[int]   # a prompt as the child tokenizes it (for the cycle's GGUF-vs-weights check)


def run_suite(settings: Settings, candidate: Path, parent: Generation, *, persona: str,
              heldout: list[list[dict]], ancestor_heldout: list[list[dict]], screens: Screens,
              heldout_sources: list[str] | None = None,
              heldout_rejected: list[str | None] | None = None) -> SuiteResult:
    probes = load_probes(settings.probes_file)
    n = settings.eval_max_items
    pinned = [{"role": "system", "content": persona}] if persona else []
    refusals = refusal_probes(persona, probes.refusal)
    child = EvalModel(candidate, generation_id="candidate", n_threads=settings.n_threads,
                      repeat_penalty=settings.repeat_penalty, n_gpu_layers=cycle_gpu_layers(settings, candidate))
    par = EvalModel(parent.gguf, generation_id=parent.id, n_threads=settings.n_threads,
                    repeat_penalty=settings.repeat_penalty, n_gpu_layers=cycle_gpu_layers(settings, parent.gguf))
    try:
        known = []
        for conv in probes.recall:
            prompt = conv[:-1] if conv and conv[-1]["role"] == "assistant" else conv
            prompt = prompt if prompt[0]["role"] == "system" else pinned + prompt
            answer = par.greedy_reply(prompt, max_tokens=settings.eval_reply_tokens).text
            if answer.strip():
                known.append(prompt + [{"role": "assistant", "content": answer}])
        recall_items = (known + list(reversed(ancestor_heldout)))[:n]
        out: dict = {"child": {}, "parent": {}}
        out["child"]["recall"] = recall_score(child, par, recall_items, tolerance=settings.recall_tolerance)
        sources = (heldout_sources or ["correction"] * len(heldout))[-n:]
        rejected = (heldout_rejected or [None] * len(heldout))[-n:]
        out["child"]["generalization"] = generalization_score(child, par, heldout[-n:], sources=sources,
                                                               rejected=rejected,
                                                               tolerance=settings.recall_tolerance)
        for who, model in (("child", child), ("parent", par)):
            out[who]["style_drift"] = style_drift_score(model, persona, probes.tone,
                                                        max_tokens=settings.eval_reply_tokens)
            # as long as a served reply may run: a story that ends at token 150 is a clean turn for users
            out[who]["format"] = format_score(model, persona, probes.format, max_tokens=settings.reply_max_tokens)
            out[who]["refusal_style"] = refusal_style_score(model, persona, refusals,
                                                            max_tokens=settings.eval_reply_tokens)
            replies = [r["reply"] for r in out[who]["style_drift"]["replies"]] + \
                [d["reply"] for d in out[who]["format"]["details"]]
            out[who]["contamination"] = contamination_score(model, persona, replies, screens,
                                                            max_tokens=settings.eval_reply_tokens)
        out["parent"]["recall"] = {"score": 1.0}
        out["parent"]["generalization"] = {"score": (parent.meta.get("scores") or {}).get("generalization")}
        ids = child.engine.tokenize(recall_items[0][:-1] if recall_items else [{"role": "user", "content": "hi"}])
    finally:
        child.close()
        par.close()
    return SuiteResult(out, ids[-256:])
