"""Contrast pairs for an imported history (trainer/contrast.py): which owner replies are paired, and
a real cycle on the tiny Llama that makes them from the parent's own replies and trains DPO on them."""

from __future__ import annotations

import json
import shutil

import pytest

from config.settings import load_settings
from memory.export import Example
from memory.importers.pipeline import import_chat
from memory.store import Store
from ouro.bench.experiment import STYLES
from ouro.bench.imported import HISTORY, OWNER, telegram_export
from tests.helpers.lineages import LENIENT
from trainer.contrast import candidates, contrast_pairs


def window(*texts: str, source: str = "import", at: str = "2026-11-02T18:00:00") -> Example:
    """A window alternating user/assistant from the first text, the persona in front."""
    messages = [{"role": "system", "content": "persona"}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]
    return Example(messages=messages, source=source, created_at=at, split="train")


def test_candidates_take_each_owner_reply_once_with_the_least_of_the_owner_in_front():
    first = window("hi", "A1", "how are you", "A2", "and you?", "A3")
    later = window("how are you", "A2", "and you?", "A3", "bye", "A4")     # overlaps: A2 and A3 again, shallower
    live = window("q", "not an import", source="correction")
    got = candidates([first, later, live], limit=10)
    replies = [reply for _, reply, _ in got]
    assert sorted(replies) == ["A1", "A2", "A3", "A4"] and "not an import" not in replies
    by_reply = {reply: prompt for prompt, reply, _ in got}
    assert [m["content"] for m in by_reply["A2"]] == ["persona", "how are you"]      # the later window's instance
    assert [m["content"] for m in by_reply["A3"]] == ["persona", "how are you", "A2", "and you?"]
    assert replies[:2] == ["A1", "A2"]                                              # no owner reply in front first
    assert len(candidates([first, later], limit=3)) == 3
    assert all(prompt[-1]["role"] == "user" for prompt, _, _ in got)


def test_an_imported_window_teaches_every_owner_reply_that_answers_a_message():
    from trainer.cycle import sft_examples
    from trainer.dataset import merge_conversations

    imported = window("hi", "A1", "how are you", "A2", "and you?", "A3")
    opens_with_owner = Example(messages=[{"role": "system", "content": "p"}, {"role": "assistant", "content": "B0"},
                                         {"role": "user", "content": "q"}, {"role": "assistant", "content": "B1"}],
                               source="import", created_at="x", weight=2.0)
    live = window("hi", "L1", "more?", "L2", source="correction")
    sft, weights = sft_examples([imported, opens_with_owner, live])
    assert [m[-1]["content"] for m in sft] == ["A1", "A2", "A3", "B1", "L2"]     # B0 answers nothing; live: last only
    assert weights == [1.0, 1.0, 1.0, 2.0, 1.0]
    chats = merge_conversations(sft, weights)
    assert len(chats) == 3 and sorted(len(c.targets) for c in chats) == [1, 1, 3]   # one row per window, as before


def test_contrast_pairs_prefer_the_owner_over_the_parent_and_skip_the_parent_s_own_words():
    seeds: list[int] = []

    class Parent:
        def reply(self, messages, seed):
            seeds.append(seed)
            return "A2" if messages[-1]["content"] == "how are you" else f"parent says {seed}"

    report = contrast_pairs([window("hi", "A1", "how are you", "A2")], Parent(), limit=5, seed=100)
    assert report.candidates == 2 and report.made == 1 and report.same == 1
    (pair,) = report.pairs
    assert pair.chosen == "A1" and pair.rejected == "parent says 100" and pair.source == "contrast"
    assert pair.split == "train" and pair.prompt[-1] == {"role": "user", "content": "hi"}
    assert seeds == [100, 101]                                      # each reply its own seeded draw


@pytest.mark.model
def test_a_cycle_on_an_import_pairs_owner_replies_with_the_parent_s_and_trains_dpo_on_them(tmp_path, tiny_models):
    data = tmp_path / "data"
    shutil.copytree(tiny_models, data / "models")
    store = Store.open(data / "ouro.db")
    try:
        style = STYLES["ahoy"]
        history = [[(q, style.correct(f"answer {n}.{i}, said kindly")) for i, q in enumerate(questions)]
                   for n, questions in enumerate(HISTORY)]
        export = tmp_path / "result.json"
        export.write_text(json.dumps(telegram_export(history)), encoding="utf-8")
        summary = import_chat(store, "telegram", export, me=OWNER)
        settings = load_settings(data_dir=data, **{**LENIENT, "contrast_pairs": 4, "reply_max_tokens": 12})
        from trainer.cycle import run_cycle

        stages: list[str] = []
        report = run_cycle(settings, store, progress=False, on_stage=stages.append)
        assert report.status == "promoted", report.reasons
        assert stages.index("contrast") < stages.index("train")
        made = report.data["contrast"]
        assert made["candidates"] == 4 and made["made"] + made["same"] == 4 and made["made"] >= 1
        assert report.data["dpo_pairs"] == made["made"] and report.train["dpo_steps"] > 0
        # every owner reply of a window is a target, not only its last (trainer/dataset.py every_reply)
        assert report.train["chats"] == summary["windows_train"] < report.train["examples"]
        gen = settings.models_dir / report.gen_id
        pairs = [json.loads(line) for line in (gen / "data" / "pairs.jsonl").read_text().splitlines()]
        assert len(pairs) == made["made"] and {p["source"] for p in pairs} == {"contrast"}
        held = [json.loads(line)["messages"][-1]["content"]
                for line in (gen / "data" / "heldout.jsonl").read_text().splitlines()]
        owner = {r for conversation in history for _, r in conversation}
        assert all(p["chosen"] in owner and p["chosen"] not in held and p["rejected"] != p["chosen"] for p in pairs)
    finally:
        store.close()

