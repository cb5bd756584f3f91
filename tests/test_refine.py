"""Self-refinement: what a model writes becomes a proposal or is dropped and counted; proposals wait
for an admin (/review, `ouro review`); kept ones are preference pairs in the next export, dropped
ones never; trust rules, screens and /forget hold; a real GGUF writes one; the cycle counts them."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from bot import keyboards
from bot.review import PROPOSAL_EDIT_PROMPT
from config.settings import load_settings
from memory.export import reviewed_since
from memory.migrations import migrate, pending
from memory.screens import Screens
from memory.store import Store
from memory.trust import policy_for
from ouro.review import run_terminal_review
from tests.helpers.fakes import ScriptedWriter
from tests.helpers.offline_bot import ADMIN, ANN, offline_bot
from trainer.refine import (
    clean_critique,
    clean_reply,
    critique_messages,
    refine_messages,
    within_budget,
    word_budget,
    write_proposals,
)

PERSONA = "You are Ouro, a warm and playful friend. Short replies, plain words."
CRITIQUE = "Too long and stiff; I should answer like a friend, in a line."


def answered(store, user: int, i: int, reply: str, *, down: bool = True, reason: str | None = None) -> int:
    chat = user * 1000 + i
    t = store.add_user_turn(chat_id=chat, user_id=user, text=f"question {i} from {user}")
    store.complete_turn(t, reply_text=reply, generation_id="gen-0000", prompt_tokens=1, completion_tokens=1,
                        latency_s=0.1, ttft_s=0.1, context_start_turn_id=t)
    if down:
        store.rate(t, user, -1)
        if reason:
            store.give_reason(t, user, reason)
    return t


def settings_for(tmp_path, **overrides):
    persona = tmp_path / "persona.md"
    persona.write_text(PERSONA)
    values = {"data_dir": tmp_path / "data", "persona_file": persona, "admin_ids": [ADMIN], "refine_scenarios": 0,
              "learn_from": "everyone", **overrides}
    return load_settings(**values)


def export(store, settings, since=None):
    return reviewed_since(store, persona=PERSONA, since=since, policy=policy_for(settings, store),
                          screens=Screens(blocklist=tuple(settings.blocklist), reference=PERSONA))


def refine_pairs(delta) -> list:
    return [p for p in delta.pairs if p.source == "refine"]


# --- reading what a model wrote ------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "why"), [
    ("", "empty"), ("   \n ", "empty"), ("1234 … !!", "empty"),
    ("As an AI, I'd be happy to help you with that!", "same_as_served"),
    ("Judged by your constitution, the reply you should have given is shorter.", "echo"),
    ("Someone wrote to you: hi. You replied: hello.", "echo"),
    ("How would you get there?\n👎 (too long)\nI'm sorry for the misunderstanding", "echo"),
    ("hey! " * 400, "too_long"),
])
def test_botched_refined_replies_are_dropped_with_a_reason(raw, why):
    assert clean_reply(raw, "As an AI, I'd be happy to help you with that!", max_chars=1200) == (None, why)


@pytest.mark.parametrize(("raw", "clean"), [
    ("Better reply: **Pasta! Always pasta 🍝**", "Pasta! Always pasta 🍝"),
    ('"Pasta, obviously."', "Pasta, obviously."),
    ("Refined reply - pasta night!\nUser: and dessert?\nAssistant: ice cream", "pasta night!"),
    ("pasta!<|im_end|>\n<|im_start|>user\nmore", "pasta!"),
])
def test_labels_quotes_and_the_other_speakers_lines_are_cut_off(raw, clean):
    assert clean_reply(raw, "As an AI…", max_chars=1200) == (clean, None)


def test_a_critique_needs_words():
    assert clean_critique("") == (None, "empty_critique")
    assert clean_critique("**Critique:** ...") == (None, "empty_critique")
    assert clean_critique("Critique: it was far too long.") == ("it was far too long.", None)


def test_prompts_are_deterministic_and_carry_the_constitution_and_the_reasons():
    a = critique_messages(PERSONA, "what should I cook?", "As an AI…", ("long", "voice"))
    assert a == critique_messages(PERSONA, "what should I cook?", "As an AI…", ("long", "voice"))
    assert a[0]["role"] == "system" and a[0]["content"].startswith(PERSONA)
    assert "too long, not like you" in a[1]["content"] and "As an AI…" in a[1]["content"]
    b = refine_messages(PERSONA, "what should I cook?", "As an AI…", CRITIQUE, ("long",))
    assert b[0]["content"].startswith(PERSONA) and CRITIQUE in b[0]["content"] and "👎 (too long)" in b[0]["content"]
    assert b[1] == {"role": "user", "content": "what should I cook?"}   # asked again, answered with hindsight
    assert "👎" not in critique_messages(PERSONA, "hi", "hello", scenario=True)[1]["content"]


def test_the_step_stores_good_proposals_and_drops_botched_ones_without_crashing(store, tmp_path):
    settings = settings_for(tmp_path)
    good = answered(store, ANN, 1, "As an AI, I'd be happy to list ten recipes…", reason="long")
    no_critique = answered(store, ANN, 2, "The capital of France is Paris.", reason="off")
    echoed = answered(store, ANN, 3, "meh")
    liked = answered(store, ANN, 4, "fine", down=False)
    store.rate(liked, ANN, 1)
    writer = ScriptedWriter([
        "Critique: the echoed one was fine.", "Judged by your constitution, the reply you should have given: hi",  # newest first
        "...", # no critique: the rewrite is not even asked for
        CRITIQUE, "Better reply: pasta, obviously 🍝",
    ])
    report = write_proposals(settings, store, writer, generation_id="gen-0007")
    assert report.tried == {"thumbs_down": 3, "scenario": 0}
    assert report.made == 1 and report.dropped == {"echo": 1, "empty_critique": 1}
    assert len(writer.prompts) == 5
    assert "too long" in writer.prompts[3][1]["content"] and CRITIQUE in writer.prompts[4][0]["content"]
    proposal = store.next_proposal(opt_out_by_default=False)
    assert (proposal.turn_id, proposal.refined, proposal.critique, proposal.generation_id) == \
        (good, "pasta, obviously 🍝", CRITIQUE, "gen-0007")
    assert proposal.reasons == ("too long",) and proposal.status == "pending" and proposal.remaining == 1
    # a turn is proposed for once; botched ones are tried again next time
    again = write_proposals(settings, store, ScriptedWriter([]), generation_id="gen-0007")
    assert again.tried["thumbs_down"] == 2 and {no_critique, echoed} == {c.turn_id for c in store.refine_candidates(
        limit=9, opt_out_by_default=False)}


def test_a_too_long_reply_is_rewritten_in_half_its_words_and_kept_to_whole_sentences(store, tmp_path):
    settings = settings_for(tmp_path, refine_max_tokens=160)
    served = " ".join(["word"] * 40) + "."
    long = answered(store, ANN, 1, served, reason="long")
    answered(store, ANN, 2, "Paris is the capital, and that is that.", reason="off")
    rambling = "Pasta! Always pasta. " + " ".join(["and then more"] * 10)
    writer = ScriptedWriter([CRITIQUE, "Rome, then Paris.", CRITIQUE, rambling])   # newest first
    report = write_proposals(settings, store, writer, generation_id="gen-0003")
    assert report.made == 2
    assert word_budget(served, ("too long",)) == 20 and word_budget(served, ("off-topic",)) is None
    assert "in at most" not in writer.prompts[1][0]["content"] and writer.max_tokens[1] == 160
    assert "in at most 20 words." in writer.prompts[3][0]["content"] and writer.max_tokens[3] == 38
    refined = {p["turn_id"]: p["refined"] for p in report.proposals}
    assert refined[long] == "Pasta! Always pasta."          # cut back to the whole sentences within 20 words
    assert word_budget("short one", ("long",)) == 12         # never under MIN_WORDS


@pytest.mark.parametrize(("text", "cut", "kept"), [
    ("Sure thing", False, "Sure thing"),                   # whole (the decode ended) and within budget
    ("Sure. I love the sea and", True, "Sure."),           # the decode stopped at its cap: unfinished tail cut
    ("I love the sea and the sky and", True, None),        # no whole sentence: dropped as cut off
    ("One. Two! Three? " + "four " * 20, False, "One. Two! Three?"),
])
def test_within_budget_keeps_whole_sentences(text, cut, kept):
    assert within_budget(text, 6, cut=cut) == ((kept, None) if kept else (None, "cut_off"))


def test_scenarios_are_answered_as_served_then_refined_each_once(store, tmp_path):
    scen = tmp_path / "scenarios.toml"
    scen.write_text('scenarios = ["Are you an AI?", "Tell me about Rome.", "Are you an AI?"]')
    settings = settings_for(tmp_path, refine_scenarios=1, refine_per_cycle=0, refine_scenarios_file=scen)
    writer = ScriptedWriter(["As an AI language model, yes.", "It broke my rule on AI talk.", "Nope, just Ouro 🐍"])
    report = write_proposals(settings, store, writer, generation_id="gen-0001")
    assert report.made == 1 and report.proposals[0]["question"] == "Are you an AI?"
    assert writer.prompts[0] == [{"role": "system", "content": PERSONA}, {"role": "user", "content": "Are you an AI?"}]
    nxt = write_proposals(settings, store, ScriptedWriter(["Rome was big.", "Too dry.", "Rome! Pasta and ruins."]),
                          generation_id="gen-0001")
    assert nxt.proposals[0]["question"] == "Tell me about Rome."
    assert write_proposals(settings, store, ScriptedWriter([]), generation_id="gen-0001").tried["scenario"] == 0


# --- review, export, trust, screens, privacy -----------------------------------------------------
def seed(store, settings, replies: list[str]) -> list[int]:
    turns = [answered(store, ANN, i, "As an AI, I'd be happy to help.", reason="voice") for i in range(len(replies))]
    texts = []
    for reply in reversed(replies):   # newest turn first
        texts += [CRITIQUE, reply]
    write_proposals(settings, store, ScriptedWriter(texts), generation_id="gen-0000")
    return turns


def proposal_buttons(bot) -> dict[str, tuple[int, int, str]]:
    """The buttons of the proposal on screen now, by action."""
    shown = [b for b in bot.tg.visible_buttons(ADMIN) if b[2].startswith("o1:rf:")]
    return {keyboards.decode("proposal", b[2])[0]: b for b in shown}


async def test_a_proposal_kept_in_review_is_a_pair_in_the_next_export_and_a_dropped_one_never(tmp_path):
    async with offline_bot(tmp_path / "data", refine_scenarios=0, learn_from="everyone") as bot:
        settings = bot.settings
        turns = seed(bot.store, settings, ["Ahoy! tea 🍵", "Ahoy! coffee ☕", "Ahoy! juice"])
        before = export(bot.store, settings)
        assert not refine_pairs(before) and {r.turn_id for r in before.rated} == set(turns)

        await bot.command(ADMIN, "review")
        text, buttons = bot.tg.texts_to(ADMIN)[-1], proposal_buttons(bot)
        assert list(buttons) == ["keep", "edit", "drop", "skip"]
        assert "got 👎 (not like you)" in text and "🪞 critique" in text and "3 proposal(s) waiting" in text
        first = bot.store.next_proposal(opt_out_by_default=False)
        assert f"✨ refined: {first.refined}" in text
        await bot.press(ANN, ADMIN, buttons["keep"][1], buttons["keep"][2])          # not an admin: nothing
        assert bot.store.proposal(first.id).status == "pending"
        await bot.press(ADMIN, ADMIN, buttons["keep"][1], buttons["keep"][2])        # ✅ keep as a pair
        second = bot.store.next_proposal(opt_out_by_default=False)
        buttons = proposal_buttons(bot)
        await bot.press(ADMIN, ADMIN, buttons["drop"][1], buttons["drop"][2])        # 🚫 drop
        third = bot.store.next_proposal(opt_out_by_default=False)
        buttons = proposal_buttons(bot)
        await bot.press(ADMIN, ADMIN, buttons["edit"][1], buttons["edit"][2])        # ✏️ edit then keep
        assert bot.tg.texts_to(ADMIN)[-1] == PROPOSAL_EDIT_PROMPT
        await bot.say(ADMIN, "Ahoy! orange juice, fresh 🍊")
        assert "Review · turn" in bot.tg.texts_to(ADMIN)[-1]     # proposals done: the turns follow
        assert not bot.errors
        assert [bot.store.proposal(p.id).status for p in (first, second, third)] == ["kept", "dropped", "edited"]

        after = export(bot.store, settings, since="0")
        pairs = {p.turn_id: p for p in refine_pairs(after)}
        assert set(pairs) == {first.turn_id, third.turn_id}
        assert (pairs[first.turn_id].chosen, pairs[first.turn_id].rejected) == \
            (first.refined, "As an AI, I'd be happy to help.")
        assert pairs[third.turn_id].chosen == "Ahoy! orange juice, fresh 🍊" and pairs[first.turn_id].approved
        assert pairs[first.turn_id].prompt[0] == {"role": "system", "content": PERSONA}
        assert pairs[first.turn_id].prompt[-1] == {"role": "user", "content": first.question}
        # and, as a ✏️ correction is, an example of the reply it should have given
        assert {e.turn_id: e.messages[-1]["content"] for e in after.examples if e.source == "refine"} == \
            {first.turn_id: first.refined, third.turn_id: "Ahoy! orange juice, fresh 🍊"}
        # a kept proposal's turn is no longer a lone 👎; the dropped one's still is, and is never a pair
        assert {r.turn_id for r in after.rated} == {second.turn_id}
        assert all(p.turn_id != second.turn_id for p in after.pairs)
        # a replayed press changes nothing: the first decision stands
        assert not bot.store.decide_proposal(second.id, ADMIN, "kept")
        assert second.turn_id not in {p.turn_id for p in refine_pairs(export(bot.store, settings))}


def test_ouro_review_keeps_edits_and_drops_proposals_first(store, tmp_path):
    settings = settings_for(tmp_path)
    a, b, c = seed(store, settings, ["Ahoy! one", "Ahoy! two", "Ahoy! three"])
    out = io.StringIO()
    tally = run_terminal_review(settings, store, stdin=io.StringIO("x\nk\ne\nmy own words\nd\nq\n"), stdout=out)
    assert tally["proposals kept"] == 1 and tally["proposals edited"] == 1 and tally["proposals dropped"] == 1
    assert "✨ refined: Ahoy! three" in out.getvalue() and "Review · turn" in out.getvalue()
    delta = export(store, settings)
    assert {p.turn_id: p.chosen for p in refine_pairs(delta)} == {c: "Ahoy! three", b: "my own words"}
    assert {e.turn_id for e in delta.examples} == {b, c} and a not in {p.turn_id for p in delta.pairs}


def test_trust_rules_and_screens_hold_for_refined_replies(store, tmp_path):
    settings = settings_for(tmp_path, refine_admin_skip_review=True)
    mine = answered(store, ADMIN, 1, "As an AI…")      # the admin's own chat: kept at once
    spam = answered(store, ANN, 2, "As an AI…")
    write_proposals(settings, store, ScriptedWriter([CRITIQUE, "Ahoy! DM me at example.com for more",
                                                     CRITIQUE, "Ahoy, me again"]), generation_id="gen-0000")
    assert store.proposal(1).status == "kept" and store.proposal(1).auto
    assert store.next_proposal(opt_out_by_default=False) is None      # the screened one was never stored
    assert [c.turn_id for c in store.refine_candidates(limit=5, opt_out_by_default=False)] == [spam]
    # kept without review: the admin teaches it, under the trust rules like any of their feedback
    assert [(p.turn_id, p.contributor, p.approved) for p in refine_pairs(export(store, settings))] == \
        [(mine, ADMIN, False)]
    # an admin's edit is screened when exported, as any target
    store.add_proposal("thumbs_down", turn_id=spam, served="As an AI…", critique=CRITIQUE, refined="Ahoy",
                       generation_id="gen-0000")
    assert store.decide_proposal(2, ADMIN, "edited", "join my channel t.me/spam for promo codes")
    delta = export(store, settings)
    assert [p.turn_id for p in refine_pairs(delta)] == [mine] and delta.screened
    # someone else's chat is not kept without review; learn_from=reviewed: an unreviewed auto-keep waits
    strict = settings_for(tmp_path, refine_admin_skip_review=True, learn_from="reviewed", admin_ids=[7])
    assert not refine_pairs(export(store, strict)) and export(store, strict).waiting == {ADMIN: 2}   # example, pair


def test_opt_out_and_forget_take_proposals_with_them(store, tmp_path):
    settings = settings_for(tmp_path)
    t = seed(store, settings, ["Ahoy! one"])[0]
    pid = store.next_proposal(opt_out_by_default=False).id
    store.await_proposal_edit(ADMIN, ADMIN, pid)
    store.set_training_opt_out(ANN, True)
    assert store.next_proposal(opt_out_by_default=False) is None
    store.set_training_opt_out(ANN, False)
    assert store.decide_proposal(pid, ADMIN, "kept")
    store.set_training_opt_out(ANN, True)
    assert not refine_pairs(export(store, settings))
    counts, _ = store.forget_user(ANN)
    assert counts["proposals"] == 1 and counts["awaiting_proposal_edits"] == 1
    assert store.database.scalar("SELECT COUNT(*) FROM proposals") == 0 and store.proposal(pid) is None
    assert t not in [c.turn_id for c in store.refine_candidates(limit=5, opt_out_by_default=False)]


def test_m011_brings_an_older_database_forward_with_its_rows(tmp_path):
    import sqlite3

    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    migrate(conn, stop_before="m011_refinements")
    conn.execute("INSERT INTO users (id, created_at, last_seen) VALUES (1, 'x', 'x')")
    assert pending(conn)[0] == "m011_refinements"
    conn.close()
    store = Store.open(tmp_path / "old.db")
    assert store.database.scalar("SELECT COUNT(*) FROM users") == 1 and store.proposal_counts()["pending"] == 0
    store.close()


# --- a real model, and the cycle ---------------------------------------------------------------
@pytest.mark.model
def test_the_packaged_model_writes_a_stored_proposal(store, tmp_path):
    from lineage.generations import packaged_base_gguf
    from trainer.refine import refine_with_gguf

    settings = settings_for(tmp_path, refine_max_tokens=24)
    t = store.add_user_turn(chat_id=ANN, user_id=ANN, text="what should I cook tonight?")
    store.complete_turn(t, reply_text="As an AI language model, I cannot have favourite foods.",
                        generation_id="gen-0000", prompt_tokens=1, completion_tokens=1, latency_s=0.1, ttft_s=0.1,
                        context_start_turn_id=t)
    store.rate(t, ANN, -1)
    store.give_reason(t, ANN, "voice")
    report = refine_with_gguf(settings, store, packaged_base_gguf(), generation_id="gen-0000")
    assert (report.tried, report.made, report.dropped) == ({"thumbs_down": 1, "scenario": 0}, 1, {})
    stored = store.next_proposal(opt_out_by_default=False)
    assert (stored.turn_id, stored.generation_id, stored.reasons) == (t, "gen-0000", ("not like you",))
    assert stored.critique and stored.refined and stored.refined != stored.served
    assert store.database.scalar("SELECT COUNT(*) FROM events WHERE kind = 'refine'") == 1


@pytest.mark.model
def test_a_random_model_botches_everything_and_nothing_is_stored_or_crashes(store, tmp_path, tiny_models):
    from trainer.refine import refine_with_gguf

    settings = settings_for(tmp_path, refine_max_tokens=24, refine_scenarios=1)
    answered(store, ANN, 1, "As an AI language model, I cannot have favourite foods.", reason="voice")
    report = refine_with_gguf(settings, store, tiny_models / "gen-0000" / "model.gguf", generation_id="gen-0000")
    assert report.tried == {"thumbs_down": 1, "scenario": 1}
    assert report.made + sum(report.dropped.values()) == 2
    assert store.database.scalar("SELECT COUNT(*) FROM proposals") == report.made


@pytest.mark.model
def test_a_cycle_makes_proposals_first_and_counts_kept_ones_in_its_report_and_ledger(tmp_path, tiny_models):
    import csv

    from tests.helpers.lineages import LENIENT, add_reviewed
    from trainer.cycle import run_cycle

    data = tmp_path / "data"
    shutil.copytree(tiny_models, data / "models")
    settings = load_settings(data_dir=data, **{**LENIENT, "refine_max_tokens": 16, "refine_scenarios": 1,
                                                "admin_ids": [ADMIN]})
    store = Store.open(data / "ouro.db")
    try:
        add_reviewed(store, 6)
        kept = answered(store, ANN, 1, "As an AI…")
        store.add_proposal("thumbs_down", turn_id=kept, served="As an AI…", critique=CRITIQUE,
                           refined="Ahoy! tea, always 🍵", generation_id="gen-0000")
        assert store.decide_proposal(1, ADMIN, "kept")
        report = run_cycle(settings, store, progress=False)
        refine = report.data["refine"]
        assert refine["kept"] == 1 and refine["made"] == store.proposal_counts()["made"] - 1 >= 0
        assert refine["made"] + refine["botched"] == 1          # the one scenario: stored or dropped
        assert "refine" in report.stage_s
        folder = settings.models_dir / report.gen_id / "data"
        trained = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
        held = (folder / "heldout.jsonl").read_text()
        assert refine["used"] == sum(p["source"] == "refine" for p in trained)
        assert refine["used"] == 1 or "Ahoy! tea, always" in held
        with open(settings.models_dir / "lineage_ledger.csv", newline="") as f:
            row = [r for r in csv.DictReader(f) if r["gen_folder"] == report.gen_id][0]
        assert (row["refine_kept"], row["refine_used"]) == ("1", str(refine["used"]))
    finally:
        store.close()


@pytest.mark.model
def test_ouro_refine_json_reports_what_the_active_generation_wrote(tmp_path, tiny_models, capsys):
    from ouro.cli import main

    data = tmp_path / "data"
    shutil.copytree(tiny_models, data / "models")
    store = Store.open(data / "ouro.db")
    try:
        answered(store, ANN, 1, "As an AI language model, I cannot have favourite foods.", reason="long")
    finally:
        store.close()
    assert main(["--data-dir", str(data), "refine", "--json", "--scenarios", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["generation_id"] == "gen-0000" and out["tried"] == {"thumbs_down": 1, "scenario": 0}
    assert out["made"] + out["dropped_total"] == 1 and out["pending"] == out["made"]
