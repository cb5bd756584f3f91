"""`ouro experiment`: does the loop really learn what people reward?

A simulated rater likes one distinctive, checkable style — replies that open with "Ahoy!" —
and talks to the persona through the same store the bot uses: replies in that style get 👍,
every other reply gets ✏️ a correction in that style (the reply with "Ahoy!" in front), which
is both a training example and a preference pair. After each round a real `ouro cycle` runs
(export → LoRA + DPO → GGUF → evals → gate). Per generation we report the share of replies
to fixed probe prompts (never used for training) that are in the style, and the recall score.
Goal: near 0% at generation 0, ≥ 50% by generation 3, recall ≥ 0.90 throughout.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from tqdm import tqdm

from config.settings import Settings, load_settings
from engine.protocol import Sampling
from lineage.generations import Lineage
from serving.conversation import Speaker
from serving.runtime import load_engine, open_store, register_base
from trainer.cycle import run_cycle

STYLE = "Ahoy!"
TRAIN_PROMPTS = [
    "hi! how are you today?", "what did you do this weekend?", "any plans for tonight?", "what's your favourite food?",
    "do you like the sea?", "tell me something fun", "I'm bored, entertain me", "what music do you like?",
    "recommend me a movie", "how's the weather where you are?", "what's your dream trip?", "do you like mornings?",
    "tell me a tiny secret", "what makes you laugh?", "coffee or tea?", "what's your favourite animal?",
    "I just finished work", "what's a good book?", "do you cook?", "how do you relax?", "what's your hobby?",
    "say something nice", "what's new?", "guess what happened today",
]
PROBE_PROMPTS = [
    "hey there!", "what are you up to?", "I had a long day.", "do you like rainy days?", "tell me about yourself",
    "what should I eat tonight?", "any weekend tips?", "what's your favourite colour?", "I'm learning guitar",
    "good morning!", "what's the best season?", "can you cheer me up?",
]


def in_style(text: str) -> bool:
    return text.lstrip().lower().startswith(STYLE.lower())


def experiment_settings(data_dir: Path, base: Settings | None = None) -> Settings:
    """Enough optimizer steps for ~24 new examples per generation on 2 CPU cores."""
    values = base.model_dump() if base else {}
    values.update(data_dir=data_dir, max_seq_len=256, train_batch=2, train_epochs=2, learning_rate=2e-4,
                  dpo_steps=4, replay_size=24, eval_max_items=12, seed=None, temperature=0.8)
    return load_settings(**values)


def style_share(settings: Settings, lineage: Lineage, persona: str, gen_id: str | None = None) -> tuple[float, list[str]]:
    """Share of greedy replies to the probe prompts in the style, for the active (or a named) generation."""
    engine = load_engine(settings, lineage.generation(gen_id) if gen_id else lineage.active())
    try:
        replies = []
        for prompt in PROBE_PROMPTS:
            messages = [{"role": "system", "content": persona}, {"role": "user", "content": prompt}]
            replies.append(engine.generate(messages, chat_key=prompt, sampling=Sampling(
                temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=24)).text)
    finally:
        engine.close()
    return sum(in_style(r) for r in replies) / len(replies), replies


def rate_a_round(settings: Settings, round_: int, *, quiet: bool) -> dict:
    """The simulated users chat with the active generation; the rater reviews every reply."""
    from serving.runtime import open_runtime

    rt = open_runtime(settings)
    counts = {"liked": 0, "corrected": 0}
    try:
        async def chat() -> None:
            for i, prompt in enumerate(tqdm(TRAIN_PROMPTS, desc=f"round {round_}: users chat", disable=quiet)):
                who = Speaker(chat_id=10_000 * (round_ + 1) + i, user_id=10_000 * (round_ + 1) + i)
                out = await rt.conversation.handle_text(who, prompt)
                if out.kind != "answered":
                    continue
                if in_style(out.text):
                    rt.store.rate(out.turn_id, who.user_id, 1)
                    counts["liked"] += 1
                else:
                    rt.store.rate(out.turn_id, who.user_id, -1)
                    rt.store.await_correction(who.chat_id, who.user_id, out.turn_id)
                    rt.store.take_correction(who.chat_id, who.user_id, f"{STYLE} {out.text.strip() or 'Hello!'}")
                    counts["corrected"] += 1

        asyncio.run(chat())
    finally:
        rt.close()
    return counts


def run_experiment(*, cycles: int = 3, data_dir: Path | None = None, json_output: bool = False) -> dict:
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ouro-experiment-")
        data_dir = Path(tmp.name)
    settings = experiment_settings(Path(data_dir))
    store = open_store(settings)
    try:
        register_base(settings, store)
    finally:
        store.close()
    lineage = Lineage(settings.models_dir)
    persona = settings.persona()
    share, replies = style_share(settings, lineage, persona)
    rows = [{"generation": lineage.active_id(), "status": "base", "style_share": share, "recall": None,
             "generalization": None, "style_drift": None, "example": replies[0]}]
    if not json_output:
        print(f"{lineage.active_id()}: {share:.0%} of probe replies in style  e.g. {replies[0][:60]!r}")
    for round_ in range(1, cycles + 1):
        counts = rate_a_round(settings, round_, quiet=json_output)
        store = open_store(settings)
        try:
            report = run_cycle(settings, store, actor="experiment", progress=not json_output)
        finally:
            store.close()
        share, replies = style_share(settings, lineage, persona)
        candidate_share = None
        if report.gen_id and report.status in ("promoted", "refused"):
            candidate_share = share if report.status == "promoted" else style_share(
                settings, lineage, persona, report.gen_id)[0]
        rows.append({"generation": report.gen_id, "status": report.status, "style_share": share,
                     "candidate_style_share": candidate_share,
                     "recall": report.scores.get("recall"), "generalization": report.scores.get("generalization"),
                     "style_drift": report.scores.get("style_drift"), "format": report.scores.get("format"),
                     "reasons": report.reasons, "rated": counts, "active": lineage.active_id(),
                     "example": replies[0]})
        if not json_output:
            cand = "" if candidate_share is None else f" (the candidate itself: {candidate_share:.0%})"
            print(f"{report.gen_id}: {report.status}; active {lineage.active_id()} answers {share:.0%} in style"
                  f"{cand}; recall {report.scores.get('recall')}  e.g. {replies[0][:60]!r}")
            for reason in report.reasons:
                print(f"    - {reason}")
    result = {"style": f"replies that open with {STYLE!r}", "generations": rows, "data_dir": str(data_dir),
              "goal": "style share from ~0% to >= 50% by generation 3 with recall >= 0.90"}
    if tmp is not None:
        tmp.cleanup()
        result["data_dir"] = None
    return result
