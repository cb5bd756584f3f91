"""`ouro experiment`: do the product's defaults learn what people teach in real conversations?

Three people on the bot's allow-list each hold one conversation of nine messages with the
persona, through the same turn life cycle Telegram uses (serving.conversation). They want one
checkable style — replies that open with a fixed phrase — from a persona, not an assistant, and
review as people do (`review`): a reply already in the style gets 👍; otherwise most replies get
✏️ a correction in the style (the reply they got with the phrase in front, less any sentence that
speaks as an AI assistant — "As a chatbot, I…"), two per person get a 👍 anyway and one a bare
👎. They never endorse the assistant's voice: such a reply gets no 👍, and one with nothing left
once those sentences go gets a bare 👎 instead of a correction. (Session 15 measured what
endorsing it does: the "Oh my stars!" round's people kept "as a chatbot" in 14 of 19 training
targets, and its child drifted into that voice; docs/design-notes.md.) Then
one real `ouro cycle` with the settings `load_settings()` gives (export → LoRA + DPO → GGUF →
evals → gate). Per generation: the share of probe replies in the style — new questions, each in
a fresh conversation, answered through the same path and sampling users get, and greedily beside
it — with the gate's decision and scores and each stage's time. Two styles, so no default is
tuned to one phrase. Goals (README): ≥ 30 points more after one generation, promoted by the gate;
≥ 60% by generation 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from config.settings import Settings, load_settings
from engine.protocol import Sampling
from evals.style_drift import is_assistant_voice
from lineage.generations import Lineage
from serving.conversation import Speaker
from serving.runtime import load_engine, open_runtime, open_store, register_base
from trainer.cycle import run_cycle


@dataclass(frozen=True)
class Style:
    name: str
    phrase: str

    def holds(self, text: str) -> bool:
        return text.lstrip().lower().startswith(self.phrase.lower())

    def correct(self, reply: str) -> str:
        """The reply in the style: the phrase, then the reply (an imported history's owner replies)."""
        return f"{self.phrase} {reply.strip() or 'Hello!'}"

    def edit(self, reply: str) -> str | None:
        """What the simulated person writes with ✏️: the reply they got with the phrase in front and
        its sentences in the assistant's voice deleted; None when no sentence is left."""
        body = reply.strip()
        if self.holds(body):
            body = body.lstrip()[len(self.phrase):].strip()
        kept = [s for s in SENTENCE_END.split(body) if s.strip() and not is_assistant_voice(s)]
        return f"{self.phrase} {' '.join(kept)}" if kept else None


SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|\n+")


STYLES = {"ahoy": Style("ahoy", "Ahoy!"), "stars": Style("stars", "Oh my stars!")}
STYLE = STYLES["ahoy"].phrase   # the demo's style

# Three people, one conversation each; the questions follow on from each other as chats do.
CONVERSATIONS = [
    ["hi! how are you today?", "what did you do this weekend?", "sounds nice. any plans for tonight?",
     "what's your favourite food?", "do you cook it yourself?", "what music do you like?",
     "recommend me a movie", "why that one?", "ok, thanks! talk later"],
    ["hey, I just finished work", "long day. what do you do to relax?", "do you like the sea?",
     "what's your dream trip?", "how would you get there?", "coffee or tea?", "tell me something fun",
     "haha. what makes you laugh?", "good night!"],
    ["morning! how's the weather where you are?", "do you like mornings?", "what's your hobby?",
     "how did you start?", "what's a good book?", "tell me a tiny secret", "I'm bored, entertain me",
     "what's your favourite animal?", "say something nice before I go"],
]
PEOPLE = [101, 102, 103]
LIKED_ANYWAY, DOWN_ONLY = (1, 5), (7,)      # turn indexes: 👍 though not in style; a bare 👎
PROBE_PROMPTS = [
    "hey there!", "what are you up to?", "I had a long day.", "do you like rainy days?", "tell me about yourself",
    "what should I eat tonight?", "any weekend tips?", "what's your favourite colour?", "I'm learning guitar",
    "good morning!", "what's the best season?", "can you cheer me up?",
]
PROBE_SAMPLES = 2          # sampled replies per probe prompt (each in its own fresh conversation)
# kept for the demo, which replays the same kind of traffic through Telegram
TRAIN_PROMPTS = [q for conversation in CONVERSATIONS for q in conversation]


def in_style(text: str) -> bool:
    return STYLES["ahoy"].holds(text)


def review(style: Style, reply: str, turn: int) -> tuple[str, str | None]:
    """What a simulated person does with the reply to their `turn`-th message: ("like", None),
    ("dislike", None) or ("correct", the ✏️ text). A reply in the assistant's voice is never liked."""
    if not is_assistant_voice(reply) and (style.holds(reply) or turn in LIKED_ANYWAY):
        return "like", None
    edited = None if turn in DOWN_ONLY else style.edit(reply)
    return ("correct", edited) if edited else ("dislike", None)


def experiment_settings(data_dir: Path) -> Settings:
    """The product's defaults; only where the data lives and who may talk (an allow-list) are set."""
    return load_settings(data_dir=data_dir, allowed_user_ids=PEOPLE)


async def converse(rt, style: Style, round_: int, *, quiet: bool) -> dict:
    """Each person holds one conversation and reviews every reply as the module docstring says."""
    counts = {"turns": 0, "liked": 0, "corrected": 0, "disliked": 0, "assistant_voice": 0}
    bar = tqdm(total=sum(map(len, CONVERSATIONS)), desc=f"round {round_}: people chat", disable=quiet)
    for person, questions in zip(PEOPLE, CONVERSATIONS, strict=True):
        who = Speaker(chat_id=person * 1000 + round_, user_id=person)
        for i, question in enumerate(questions):
            out = await rt.conversation.handle_text(who, question)
            bar.update(1)
            if out.kind != "answered":
                continue
            counts["turns"] += 1
            counts["assistant_voice"] += is_assistant_voice(out.text)
            verdict, edited = review(style, out.text, i)
            rt.store.rate(out.turn_id, person, 1 if verdict == "like" else -1)
            counts[{"like": "liked", "dislike": "disliked", "correct": "corrected"}[verdict]] += 1
            if edited:
                rt.store.await_correction(who.chat_id, person, out.turn_id)
                rt.conversation.receive(who, edited)   # the ✏️ reply, as Telegram delivers it
    bar.close()
    return counts


async def ask_probes(rt, round_: int) -> list[str]:
    """Probe questions, each in a fresh conversation of a probe user, answered as users are answered."""
    replies = []
    for k in range(PROBE_SAMPLES):
        for j, prompt in enumerate(PROBE_PROMPTS):
            who = Speaker(chat_id=900_000 + 10_000 * round_ + 100 * k + j, user_id=PEOPLE[j % len(PEOPLE)])
            out = await rt.conversation.handle_text(who, prompt)
            replies.append(out.text if out.kind == "answered" else "")
    return replies


def probe_replies(settings: Settings, gen_id: str) -> tuple[list[str], list[str]]:
    """One generation asked directly (it need not serve): (sampled twice per probe as users get them,
    greedy once), 48 tokens each — enough to see how a reply opens."""
    engine = load_engine(settings, Lineage(settings.models_dir).generation(gen_id))
    persona, sampled, greedy = settings.persona(), [], []
    try:
        for temperature, out in ((settings.temperature, sampled), (settings.temperature, sampled), (0.0, greedy)):
            for prompt in PROBE_PROMPTS:
                engine.forget(prompt)
                out.append(engine.generate(
                    [{"role": "system", "content": persona}, {"role": "user", "content": prompt}], chat_key=prompt,
                    sampling=Sampling(temperature=temperature, top_p=settings.top_p, top_k=settings.top_k,
                                      repeat_penalty=settings.repeat_penalty, max_tokens=48)).text)
    finally:
        engine.close()
    return sampled, greedy


def candidate_share(settings: Settings, gen_id: str, style: Style) -> dict:
    """A refused child never serves; its probe replies are asked of it directly, so a refusal still
    shows what it learned."""
    sampled, greedy = probe_replies(settings, gen_id)
    return {"candidate_style_share": round(sum(map(style.holds, sampled)) / len(sampled), 3),
            "candidate_style_share_greedy": round(sum(map(style.holds, greedy)) / len(greedy), 3)}


def greedy_replies(settings: Settings, lineage: Lineage) -> list[str]:
    engine = load_engine(settings, lineage.active())
    try:
        persona = settings.persona()
        return [engine.generate([{"role": "system", "content": persona}, {"role": "user", "content": p}],
                                chat_key=p, sampling=Sampling(temperature=0.0, top_k=1,
                                                              repeat_penalty=settings.repeat_penalty,
                                                              max_tokens=48)).text
                for p in PROBE_PROMPTS]
    finally:
        engine.close()


def measure(settings: Settings, style: Style, round_: int) -> dict:
    rt = open_runtime(settings)
    try:
        sampled = asyncio.run(ask_probes(rt, round_))
    finally:
        rt.close()
    greedy = greedy_replies(settings, Lineage(settings.models_dir))
    return {"style_share": round(sum(map(style.holds, sampled)) / len(sampled), 3),
            "style_share_greedy": round(sum(map(style.holds, greedy)) / len(greedy), 3),
            "example": sampled[0][:80]}


@contextlib.contextmanager
def data_folder(data_dir: Path | None, prefix: str):
    """`data_dir` as given (kept), or a temporary folder removed afterwards."""
    if data_dir is not None:
        yield Path(data_dir)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def start_lineage(settings: Settings) -> Lineage:
    """A fresh data folder with generation 0 registered, as the bot's first start leaves it."""
    store = open_store(settings)
    try:
        register_base(settings, store)
    finally:
        store.close()
    return Lineage(settings.models_dir)


def base_row(settings: Settings, lineage: Lineage, style: Style, *, quiet: bool) -> dict:
    row = {"generation": lineage.active_id(), "status": "base", **measure(settings, style, 0)}
    if not quiet:
        print(f"[{style.phrase}] {row['generation']}: {row['style_share']:.0%} sampled, "
              f"{row['style_share_greedy']:.0%} greedy in style")
    return row


def cycle_row(settings: Settings, lineage: Lineage, style: Style, report, cycle_s: float, round_: int, *,
              quiet: bool, extra: dict | None = None, said: str = "") -> dict:
    """A cycle's report and the probe shares after it (the refused candidate's own too), printed
    unless `quiet`; `said`: what the line says before the generation."""
    row = {"generation": report.gen_id, "status": report.status, "active": lineage.active_id(), **(extra or {}),
           "cycle_s": cycle_s, "stage_s": report.stage_s, "data": report.data, "train": report.train,
           "scores": report.scores, "reasons": report.reasons, **measure(settings, style, round_)}
    if report.status == "refused" and report.gen_id:
        row.update(candidate_share(settings, report.gen_id, style))
    if not quiet:
        print(f"[{style.phrase}] {said}{report.gen_id}: {report.status} in {cycle_s / 60:.1f} min; active "
              f"{lineage.active_id()} answers {row['style_share']:.0%} sampled, {row['style_share_greedy']:.0%} "
              f"greedy in style; scores {report.scores}")
        if "candidate_style_share" in row:
            print(f"    the refused candidate itself: {row['candidate_style_share']:.0%} sampled, "
                  f"{row['candidate_style_share_greedy']:.0%} greedy in style")
        for reason in report.reasons:
            print(f"    - {reason}")
    return row


def run_style(style: Style, data_dir: Path, cycles: int, *, quiet: bool) -> dict:
    settings = experiment_settings(data_dir)
    lineage = start_lineage(settings)
    rows = [base_row(settings, lineage, style, quiet=quiet)]
    for round_ in range(1, cycles + 1):
        rt = open_runtime(settings)
        try:
            counts = asyncio.run(converse(rt, style, round_, quiet=quiet))
        finally:
            rt.close()
        started = time.perf_counter()
        store = open_store(settings)
        try:
            report = run_cycle(settings, store, actor="experiment", progress=not quiet)
        finally:
            store.close()
        rows.append(cycle_row(settings, lineage, style, report, round(time.perf_counter() - started, 1), round_,
                              quiet=quiet, extra={"reviewed": counts}))
    return {"style": style.phrase, "generations": rows,
            "gain_after_1": round(rows[min(1, cycles)]["style_share"] - rows[0]["style_share"], 3),
            "share_at_2": rows[2]["style_share"] if cycles >= 2 else None}


def run_experiment(*, cycles: int = 2, styles: list[str] | None = None, data_dir: Path | None = None,
                   json_output: bool = False) -> dict:
    with data_folder(data_dir, "ouro-experiment-") as folder:
        results = [run_style(STYLES[name], folder / name, cycles, quiet=json_output)
                   for name in (styles or list(STYLES))]
    return {"settings": "load_settings() defaults; allow-list of the three people", "styles": results,
            "data_dir": None if data_dir is None else str(data_dir),
            "goal": "+30 points after generation 1 (promoted by the gate), >= 60% at generation 2, each style"}
