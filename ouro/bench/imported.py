"""`ouro experiment --imported`: a good generation 1 before anyone rates anything (cold start).

The owner, Ann, imports her Telegram history (Telegram Desktop's account-wide JSON export, the format
`ouro import telegram` reads) and runs one real `ouro cycle` on it with `load_settings()`'s defaults;
nobody has chatted with or rated the bot. Her history: six one-to-one chats with friends, nine
messages each, where Ann always opens her reply with one phrase — the same checkable style as
`ouro experiment` ("Ahoy!", or "Oh my stars!"). What she says after the phrase is generation 0's own
reply in that conversation (sampled at the serving settings), so the only thing that separates her
replies from the base model's is the style: the same construction as the experiment's ✏️
corrections, without a single rating. Measured before and after as `ouro experiment` measures: new
probe questions, each in a fresh conversation, sampled as users get them and greedily beside it;
with the gate's decision and scores, and the refused candidate's own share when it is refused.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

from tqdm import tqdm

from config.settings import Settings
from engine.protocol import Sampling
from lineage.generations import Lineage
from memory.importers.pipeline import import_chat
from ouro.bench.experiment import (
    CONVERSATIONS,
    STYLES,
    Style,
    base_row,
    cycle_row,
    data_folder,
    experiment_settings,
    start_lineage,
)
from serving.runtime import load_engine, open_store
from trainer.cycle import run_cycle

OWNER = "Ann"
FRIENDS = ["Bea", "Cal", "Dan", "Eve", "Finn", "Gus"]
# Three more conversations beside the experiment's three; none asks a probe question.
MORE_CONVERSATIONS = [
    ["yo! what's new?", "did you sleep well?", "what are you having for lunch?", "is it any good?",
     "I might try that. what else do you like to eat?", "what did you do after work yesterday?",
     "any good shows lately?", "should I start it tonight?", "ok bye for now"],
    ["hello hello", "I got a new plant today", "any tips to keep it alive?", "do you have plants?",
     "what's your favourite flower?", "I'm going to a concert friday", "what should I wear?",
     "do you like dancing?", "see you!"],
    ["guess what, I passed my exam!", "thanks! what should I do to celebrate?", "pizza or sushi?",
     "what's your favourite dessert?", "do you bake?", "I'm thinking of learning to swim",
     "is it hard for adults?", "any advice for a beginner?", "wish me luck!"],
]
HISTORY = CONVERSATIONS + MORE_CONVERSATIONS
START = datetime(2026, 11, 2, 18, 0)


def owner_history(settings: Settings, style: Style, *, quiet: bool) -> list[list[tuple[str, str]]]:
    """Each conversation as (friend's message, Ann's reply): generation 0 answers in context, Ann's
    reply is the phrase followed by that answer."""
    lineage = Lineage(settings.models_dir)
    engine = load_engine(settings, lineage.active())
    persona = settings.persona()
    sampling = Sampling.serving(settings, seed=settings.train_seed)
    out = []
    bar = tqdm(total=sum(map(len, HISTORY)), desc="Ann's history", disable=quiet)
    try:
        for n, questions in enumerate(HISTORY):
            messages = [{"role": "system", "content": persona}]
            pairs = []
            for question in questions:
                messages.append({"role": "user", "content": question})
                reply = style.correct(engine.generate(messages, chat_key=f"history-{n}", sampling=sampling).text)
                messages.append({"role": "assistant", "content": reply})
                pairs.append((question, reply))
                bar.update(1)
            out.append(pairs)
    finally:
        bar.close()
        engine.close()
    return out


def telegram_export(history: list[list[tuple[str, str]]]) -> dict:
    """Telegram Desktop's account-wide JSON: one personal chat per friend, a message every few minutes
    (never within the importer's 3-minute merge of one speaker, never a 30-minute gap), a day apart."""
    chats, message_id = [], 1
    for n, (friend, pairs) in enumerate(zip(FRIENDS, history, strict=True)):
        at, messages = START + timedelta(days=n), []
        for question, reply in pairs:
            for speaker, text in ((friend, question), (OWNER, reply)):
                messages.append({"id": message_id, "type": "message", "date": at.isoformat(timespec="seconds"),
                                 "date_unixtime": str(int(at.timestamp())), "from": speaker,
                                 "from_id": f"user{100 + (0 if speaker == OWNER else n + 1)}", "text": text})
                message_id += 1
                at += timedelta(minutes=4)
        chats.append({"name": friend, "type": "personal_chat", "id": 5000 + n, "messages": messages})
    return {"about": "written by ouro experiment --imported", "chats": {"about": "", "list": chats}}


def run_imported_style(style: Style, data_dir: Path, *, quiet: bool) -> dict:
    settings = experiment_settings(data_dir)
    lineage = start_lineage(settings)
    base = base_row(settings, lineage, style, quiet=quiet)
    started = time.perf_counter()
    history = owner_history(settings, style, quiet=quiet)
    export = data_dir / "telegram-export" / "result.json"
    export.parent.mkdir(parents=True, exist_ok=True)
    export.write_text(json.dumps(telegram_export(history), ensure_ascii=False, indent=1), encoding="utf-8")
    history_s = round(time.perf_counter() - started, 1)
    store = open_store(settings)
    try:
        summary = import_chat(store, "telegram", export, me=OWNER)
        started = time.perf_counter()
        report = run_cycle(settings, store, actor="experiment", progress=not quiet)
    finally:
        store.close()
    imported = {k: summary.get(k) for k in ("messages_read", "messages_kept", "conversations", "windows_train",
                                             "windows_heldout", "windows_dropped_overlap")}
    row = cycle_row(settings, lineage, style, report, round(time.perf_counter() - started, 1), 1, quiet=quiet,
                    extra={"imported": imported},
                    said=f"imported {summary['messages_kept']} of {summary['messages_read']} messages "
                         f"({summary['windows_train']} training windows, {summary['windows_heldout']} held out); ")
    return {"style": style.phrase, "history_s": history_s, "import": summary, "generations": [base, row],
            "gain_after_1": round(row["style_share"] - base["style_share"], 3),
            "candidate_gain": round(row.get("candidate_style_share", row["style_share"]) - base["style_share"], 3)}


def run_imported_experiment(*, styles: list[str] | None = None, data_dir: Path | None = None,
                            json_output: bool = False) -> dict:
    with data_folder(data_dir, "ouro-experiment-imported-") as folder:
        results = [run_imported_style(STYLES[name], folder / f"imported-{name}", quiet=json_output)
                   for name in (styles or ["ahoy"])]
    return {"settings": "load_settings() defaults; nothing rated: one Telegram history import, then one cycle",
            "styles": results, "data_dir": None if data_dir is None else str(data_dir)}
