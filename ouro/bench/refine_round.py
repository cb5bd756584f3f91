"""`ouro experiment --refine`: does the persona learn from 👎 alone, through self-refinement?

The simulated people of `ouro experiment` hold the same conversations, but give no corrections and
no 👍: they press 👎 (with its reason) only on replies that break one checkable rule of the
constitution — `short`: more than SHORT_WORDS words ("short replies"), or `voice`: the assistant
voice the style-drift eval counts ("talk like a person, not like a customer-service assistant").
The active generation then critiques and rewrites every 👎'd reply and a few scenarios
(trainer/refine.py), a simulated admin keeps exactly the proposals whose refined reply keeps the
rule — and the other checkable rule, as a mentor holding the whole constitution would — and drops
the rest, and one real cycle trains on what was kept (the product's defaults, with
the self-refinement done before the admin's review rather than inside the cycle). Per generation:
the share of probe replies (new questions, fresh conversations; sampled as users get them, and
greedy) that break the rule, recall and style drift. Goal (issue 18): the share halves within two
generations with recall ≥ 0.90 — learning from 👎 alone.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from config.settings import Settings, load_settings
from engine.protocol import Sampling
from evals.style_drift import is_assistant_voice
from lineage.generations import Lineage
from memory.store import Store
from ouro.bench.experiment import CONVERSATIONS, PEOPLE, PROBE_PROMPTS, data_folder, start_lineage
from serving.conversation import Conversation, Speaker
from serving.runtime import load_engine, open_runtime, open_store
from trainer.cycle import run_cycle
from trainer.refine import refine_with_gguf

ADMIN = 4242                 # the simulated admin who reviews the proposals
SHORT_WORDS = 30
PROBE_TOKENS = 96            # long enough for a reply to break the `short` rule
SCENARIOS_PER_ROUND = 2
PROBE_SEED = 1000


@dataclass(frozen=True)
class Rule:
    name: str
    reason: str              # the 👎 reason people tap (memory/feedback.py REASONS)
    says: str                # the constitution's words for it

    def broken(self, text: str) -> bool:
        if self.name == "short":
            return len(text.split()) > SHORT_WORDS
        return is_assistant_voice(text)


RULES = {"short": Rule("short", "long", f"short replies (at most {SHORT_WORDS} words)"),
         "voice": Rule("voice", "voice", "talk like a person, not like a customer-service assistant")}


async def thumbs_down_only(conversation: Conversation, store: Store, rule: Rule, round_: int,
                           conversations: list[list[str]] = CONVERSATIONS) -> dict:
    """Each person holds one conversation and presses 👎 (with the rule's reason) on exactly the
    replies that break the rule; nothing else."""
    counts = {"turns": 0, "disliked": 0}
    for person, questions in zip(PEOPLE, conversations, strict=False):
        who = Speaker(chat_id=person * 1000 + round_, user_id=person)
        for question in questions:
            out = await conversation.handle_text(who, question)
            if out.kind != "answered":
                continue
            counts["turns"] += 1
            if rule.broken(out.text):
                store.rate(out.turn_id, person, -1)
                store.give_reason(out.turn_id, person, rule.reason)
                counts["disliked"] += 1
    return counts


def admin_review(settings: Settings, store: Store, rule: Rule) -> dict:
    """The simulated admin: keep each pending proposal whose refined reply keeps the rule and the
    constitution's other checkable rule (RULES), drop the rest. Why both (session 19): keeping every
    short rewrite, the admin kept 3 of 9 in the assistant voice ("I'm an AI assistant for text
    re-writing…") over served replies that were not, and the round taught that voice (style drift
    and refusal style refused the child) — a mentor holding the constitution drops those."""
    counts = {"kept": 0, "dropped": 0, "dropped_other_rule": 0}
    while (p := store.next_proposal(opt_out_by_default=settings.training_opt_out_default)) is not None:
        breaks_rule = rule.broken(p.refined)
        breaks_other = any(r.broken(p.refined) for r in RULES.values() if r.name != rule.name)
        verdict = "dropped" if breaks_rule or breaks_other else "kept"
        store.decide_proposal(p.id, ADMIN, verdict)
        counts[verdict] += 1
        counts["dropped_other_rule"] += breaks_other and not breaks_rule
    return counts


def rule_share(settings: Settings, gen_id: str, rule: Rule, *, samples: int = 2) -> dict:
    """One generation asked the probe questions directly, each in a fresh conversation: sampled
    `samples` times as users get them, and greedily; the share of replies that break the rule.
    The k-th sampling of every generation uses seed PROBE_SEED + k, so generations are compared on
    the same draws (one run's base measured 71% and another's 46% with unseeded draws)."""
    engine = load_engine(settings, Lineage(settings.models_dir).generation(gen_id))
    persona, sampled, greedy = settings.persona(), [], []
    try:
        draws = [(settings.temperature, PROBE_SEED + k, sampled) for k in range(samples)] + [(0.0, 0, greedy)]
        for temperature, seed, out in draws:
            for prompt in PROBE_PROMPTS:
                engine.forget(prompt)
                out.append(engine.generate(
                    [{"role": "system", "content": persona}, {"role": "user", "content": prompt}], chat_key=prompt,
                    sampling=Sampling.serving(settings, temperature=temperature, seed=seed,
                                              max_tokens=PROBE_TOKENS)).text)
    finally:
        engine.close()
    return {"rule_broken_share": round(sum(map(rule.broken, sampled)) / max(1, len(sampled)), 3),
            "rule_broken_share_greedy": round(sum(map(rule.broken, greedy)) / max(1, len(greedy)), 3),
            "example": (greedy or [""])[0][:100]}


def refine_round_settings(data_dir: Path, **overrides) -> Settings:
    """The experiment's settings (the product's defaults, the people's allow-list), an admin to review,
    and self-refinement run by the round itself, before the admin's review, rather than by the cycle."""
    return load_settings(**{"data_dir": data_dir, "allowed_user_ids": PEOPLE, "admin_ids": [ADMIN],
                            "refine_per_cycle": 0, "refine_scenarios": 0, **overrides})


def run_refine_round(rule: Rule, data_dir: Path, cycles: int, *, quiet: bool,
                     conversations: list[list[str]] = CONVERSATIONS, probe_samples: int = 2, **overrides) -> dict:
    settings = refine_round_settings(data_dir, **overrides)
    lineage = start_lineage(settings)
    rows = [{"generation": lineage.active_id(), "status": "base",
             **rule_share(settings, lineage.active_id(), rule, samples=probe_samples)}]
    say = (lambda text: None) if quiet else print
    say(f"[{rule.name}] {rows[0]['generation']}: {rows[0]['rule_broken_share']:.0%} sampled, "
        f"{rows[0]['rule_broken_share_greedy']:.0%} greedy break the rule")
    for round_ in range(1, cycles + 1):
        rt = open_runtime(settings)
        try:
            people = asyncio.run(thumbs_down_only(rt.conversation, rt.store, rule, round_, conversations))
        finally:
            rt.close()
        started = time.perf_counter()
        store = open_store(settings)
        try:
            active = lineage.active()
            refined = refine_with_gguf(settings, store, active.gguf, generation_id=active.id,
                                       turns=people["disliked"], scenarios=SCENARIOS_PER_ROUND).to_dict()
            admin = admin_review(settings, store, rule)
            report = run_cycle(settings, store, actor="experiment", progress=not quiet)
        finally:
            store.close()
        row = {"generation": report.gen_id, "status": report.status, "active": lineage.active_id(),
               "people": people, "proposals": {"made": refined["made"], "botched": refined["dropped_total"],
                                               **admin, "refine_s": refined["wall_s"]},
               "used": (report.data.get("refine") or {}).get("used"), "cycle_s": round(time.perf_counter() - started, 1),
               "scores": report.scores, "reasons": report.reasons,
               "recall": report.scores.get("recall"), "style_drift": report.scores.get("style_drift"),
               **rule_share(settings, lineage.active_id(), rule, samples=probe_samples)}
        rows.append(row)
        say(f"[{rule.name}] {report.gen_id}: {report.status}; 👎 {people['disliked']} of {people['turns']} · "
            f"proposals {refined['made']} (kept {admin['kept']}, dropped {admin['dropped']}, "
            f"{admin['dropped_other_rule']} of them for the other rule) · active "
            f"{lineage.active_id()} breaks the rule in {row['rule_broken_share']:.0%} sampled, "
            f"{row['rule_broken_share_greedy']:.0%} greedy · recall {row['recall']} · drift {row['style_drift']}")
    first = rows[0]["rule_broken_share"]
    best = min((r["rule_broken_share"] for r in rows[1:3]), default=first)
    return {"rule": rule.name, "says": rule.says, "generations": rows,
            "halved_within_2": bool(first) and best <= first / 2,
            "recall_held": all((r.get("recall") or 0) >= 0.90 for r in rows[1:3] if r["status"] == "promoted")}


def run_refine_experiment(*, cycles: int = 2, rules: list[str] | None = None, data_dir: Path | None = None,
                          json_output: bool = False) -> dict:
    with data_folder(data_dir, "ouro-experiment-refine-") as folder:
        results = [run_refine_round(RULES[name], folder / f"refine-{name}", cycles, quiet=json_output)
                   for name in (rules or ["short"])]
    return {"settings": "load_settings() defaults; allow-list of the three people; one admin reviews proposals",
            "rules": results, "data_dir": None if data_dir is None else str(data_dir),
            "goal": "the rule-breaking share halves within two generations, recall >= 0.90, from 👎 alone"}
