"""`ouro experiment --refine`'s plumbing, cheaply: people 👎 only rule-breaking replies, the admin keeps
only rewrites that keep the rule, the settings change nothing about training, the CLI takes it, and
(with a tiny model) one round runs end to end. The experiment itself (an hour) is not run here."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from config.settings import load_settings
from engine.worker import InferenceWorker
from ouro.bench.experiment import PEOPLE
from ouro.bench.refine_round import (
    ADMIN,
    RULES,
    SHORT_WORDS,
    admin_review,
    refine_round_settings,
    thumbs_down_only,
)
from ouro.cli import build_parser
from serving.conversation import Conversation
from tests.helpers.fakes import FakeEngine

LONG = " ".join(["word"] * (SHORT_WORDS + 1))


def test_the_rules_are_checkable():
    assert RULES["short"].broken(LONG) and not RULES["short"].broken("Pasta, always 🍝")
    assert RULES["voice"].broken("As an AI, I'd be happy to help!") and not RULES["voice"].broken("pasta, duh")


def test_people_press_thumbs_down_only_on_replies_that_break_the_rule(settings, store):
    engine = FakeEngine([LONG, "short one", "fine", LONG, "ok"])
    worker = InferenceWorker(engine, max_backlog=settings.max_backlog)
    try:
        counts = asyncio.run(thumbs_down_only(Conversation(settings, store, worker), store, RULES["short"], 1,
                                              [["a", "b", "c"], ["d", "e"]]))
    finally:
        worker.close()
    assert counts == {"turns": 5, "disliked": 2}
    rows = store.database.query("SELECT t.reply_text, r.value, r.reason, r.user_id FROM ratings r "
                                "JOIN turns t ON t.id = r.turn_id ORDER BY t.id")
    assert [(r["reply_text"], r["value"], r["reason"]) for r in rows] == [(LONG, -1, "long")] * 2
    assert {r["user_id"] for r in rows} == {PEOPLE[0], PEOPLE[1]}


def test_the_admin_keeps_only_rewrites_that_keep_the_rule_and_the_other_checkable_one(settings, store):
    t = store.add_user_turn(chat_id=5, user_id=5, text="hi")
    store.complete_turn(t, reply_text=LONG, generation_id="gen-0000", prompt_tokens=1, completion_tokens=1,
                        latency_s=0.1, ttft_s=0.1, context_start_turn_id=t)
    store.add_proposal("thumbs_down", turn_id=t, served=LONG, critique="too long", refined="Hi! 👋",
                       generation_id="gen-0000")
    store.add_proposal("scenario", prompt="Tell me about Rome.", served=LONG, critique="long",
                       refined=LONG + " more", generation_id="gen-0000")
    store.add_proposal("scenario", prompt="Who are you?", served=LONG, critique="long",
                       refined="As an AI, I'd be happy to help!", generation_id="gen-0000")   # short, but not a person
    assert admin_review(settings, store, RULES["short"]) == {"kept": 1, "dropped": 2, "dropped_other_rule": 1}
    assert [store.proposal(i).status for i in (1, 2, 3)] == ["kept", "dropped", "dropped"]
    assert store.database.scalar("SELECT COUNT(*) FROM proposals WHERE reviewer_id = ?", (ADMIN,)) == 3


def test_the_round_changes_nothing_about_training_and_the_cli_takes_it(tmp_path, monkeypatch):
    for name in [n for n in type(load_settings()).model_fields if n != "data_dir"]:
        monkeypatch.delenv(f"OURO_{name.upper()}", raising=False)
    ours = refine_round_settings(tmp_path).model_dump()
    defaults = load_settings(data_dir=tmp_path).model_dump()
    assert {k for k in ours if ours[k] != defaults[k]} == {"allowed_user_ids", "admin_ids", "refine_per_cycle",
                                                           "refine_scenarios"}
    args = build_parser().parse_args(["experiment", "--refine", "--rule", "voice", "--cycles", "1"])
    assert args.refine and args.rule == ["voice"] and args.cycles == 1


@pytest.mark.model
def test_one_round_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_models):
    from ouro.bench.refine_round import run_refine_round
    from tests.helpers.lineages import LENIENT

    shutil.copytree(tiny_models, tmp_path / "data" / "models")
    result = run_refine_round(RULES["short"], tmp_path / "data", 1, quiet=True, conversations=[["hi", "and?"]],
                              probe_samples=1, **{**LENIENT, "reply_max_tokens": 48, "refine_max_tokens": 16})
    base, gen = result["generations"]
    assert base["status"] == "base" and 0.0 <= base["rule_broken_share"] <= 1.0
    assert gen["people"]["turns"] == 2 and gen["proposals"]["made"] + gen["proposals"]["botched"] == \
        gen["people"]["disliked"] + 2                          # every 👎'd reply and two scenarios were tried
    assert gen["proposals"]["kept"] + gen["proposals"]["dropped"] == gen["proposals"]["made"]
    assert gen["status"] in ("promoted", "refused", "skipped") and "rule_broken_share_greedy" in gen
    assert set(result) >= {"halved_within_2", "recall_held", "rule"}
