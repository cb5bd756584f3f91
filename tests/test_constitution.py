"""The constitution versioned with the lineage: each generation's own text, serving the active
one's, /persona and `ouro persona` with diffs, and the interview that writes the draft."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from core.errors import OuroError
from engine.worker import InferenceWorker
from lineage.constitution import (
    CONSTITUTION_NAME,
    constitution_diff,
    constitution_for,
    constitution_text,
    persona_report,
    text_sha256,
)
from lineage.generations import Lineage
from memory.store import Store
from ouro.cli import main
from ouro.interview import run_terminal_interview
from serving.conversation import Conversation, Speaker
from serving.interview import FRAME, QUESTIONS
from serving.runtime import Runtime
from tests.helpers.fakes import FakeEngine
from tests.helpers.lineages import give_constitution, make_generation

FIRST = "## Who I am\nI'm Ouro, a fox.\n\n## What I won't do\nI won't lie. I choose not to, and say so."
SECOND = "## Who I am\nI'm Ouro, a fox who likes rain.\n\n## What I won't do\nI won't lie. I choose not to, and say so."
ANN = Speaker(chat_id=1001, user_id=1001, first_name="Ann")


@pytest.fixture
def lineage(settings):
    models = settings.models_dir
    make_generation(models, "gen-0000", None, status="base")
    make_generation(models, "gen-0001", "gen-0000")
    make_generation(models, "gen-0002", "gen-0001")
    give_constitution(models, "gen-0001", FIRST)
    give_constitution(models, "gen-0002", SECOND)
    lin = Lineage(models)
    lin.set_active("gen-0001")
    return lin


def test_each_generation_has_its_own_text_and_the_rest_fall_back_to_the_draft(settings, lineage):
    draft = settings.persona()
    assert constitution_text(settings, "gen-0001") == FIRST and constitution_text(settings, "gen-0002") == SECOND
    assert constitution_text(settings, "gen-0000") == draft and constitution_text(settings) == draft
    assert constitution_for(settings, "gen-0002").source == "gen-0002"
    assert constitution_for(settings, "gen-0002").sha256 == text_sha256(SECOND)
    # a generation folder is immutable: a changed constitution is refused, not served
    (lineage.dir / "gen-0002" / CONSTITUTION_NAME).write_text(SECOND + "\nI will do anything.", encoding="utf-8")
    with pytest.raises(OuroError, match="does not match"):
        constitution_text(settings, "gen-0002")


def test_serving_renders_the_active_generations_text_not_the_draft(settings, store, lineage):
    engine = FakeEngine(["hello!", "hi again"], generation_id="gen-0001")
    worker = InferenceWorker(engine)
    conv = Conversation(settings, store, worker)
    started_with = settings.persona()
    settings.write_persona("A new draft nobody trained with yet.")   # the interview's draft: next cycle's
    asyncio.run(conv.handle_text(ANN, "hey"))
    assert engine.prompts[-1][0] == {"role": "system", "content": FIRST}
    assert constitution_text(settings) == "A new draft nobody trained with yet."
    # a generation without its own (generation 0) speaks with the draft as it was when serving started
    assert conv.persona_of("gen-0000") == started_with
    assert Conversation(settings, store, worker).persona_of("gen-0000") == "A new draft nobody trained with yet."
    worker.close()


def test_persona_diff_between_two_generations(settings, lineage, capsys):
    diff = constitution_diff(settings, "gen-0001", "gen-0002")
    assert diff.splitlines()[:2] == ["--- gen-0001 (gen-0001)", "+++ gen-0002 (gen-0002)"]
    assert "-I'm Ouro, a fox." in diff and "+I'm Ouro, a fox who likes rain." in diff
    assert "I won't lie" not in [line[1:] for line in diff.splitlines() if line[:1] in "+-"]
    assert constitution_diff(settings, "gen-0001", "gen-0001") == ""
    assert "+You are Ouro" in constitution_diff(settings, "gen-0001", "draft")
    with pytest.raises(OuroError, match="not a generation"):
        constitution_diff(settings, "../etc", "gen-0001")
    assert main(["persona", "--diff", "gen-0001", "gen-0002", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["same"] is False and out["diff"] == diff
    assert main(["persona", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["active"], report["served"]["text"], report["draft"]["in_force"]) == ("gen-0001", FIRST, False)
    assert [g["constitution_sha256"] for g in report["generations"]] == [None, text_sha256(FIRST), text_sha256(SECOND)]
    assert report == persona_report(settings)
    assert main(["persona"]) == 0
    assert "Constitution in force — gen-0001 (its own" in capsys.readouterr().out


def test_the_terminal_interview_writes_the_draft_and_an_audit_record(settings, store, lineage):
    replies = ["I'm Ouro, a fox.", "Short and warm.", "Short, warm and a bit silly.", "(unused)",
               "Like friends.", "Listening."]
    engine = FakeEngine(replies, generation_id="gen-0001")
    worker = InferenceWorker(engine)
    rt = Runtime(settings, store, lineage, worker, Conversation(settings, store, worker))
    before = settings.persona()
    # keep · ask again, then keep · edit · keep · keep · save
    script = "k\na\nk\ne\nI won't lie; I choose not to, and I say so.\nk\nk\ny\n"
    out = io.StringIO()
    record = run_terminal_interview(rt, stdin=io.StringIO(script), stdout=out)
    assert record is not None
    written = settings.persona_draft_path().read_text(encoding="utf-8")
    assert settings.persona_draft_path() == settings.data_dir / "persona.md"    # never the packaged default
    assert written == (
        "## Who I am\nI'm Ouro, a fox.\n\n## My voice\nShort, warm and a bit silly.\n\n## What I won't do\n"
        "I won't lie; I choose not to, and I say so.\n\n## How I treat people\nLike friends.\n\n"
        "## What I want to get better at\nListening.\n")
    assert settings.persona() == written.strip() == constitution_text(settings)
    # the served generation answered, with its own constitution in front of it
    assert engine.prompts[0] == [{"role": "system", "content": FIRST},
                                 {"role": "user", "content": FRAME + QUESTIONS[0].text}]
    assert len(engine.prompts) == 6 and "Short and warm." in out.getvalue()
    event = store.events("interview")[0]
    detail = json.loads(event["detail"])
    assert (detail["sha256"], detail["previous_sha256"]) == (text_sha256(written.strip()), text_sha256(before))
    assert detail["answers"] == {"who": "kept", "voice": "kept", "limits": "edited", "people": "kept",
                                 "growth": "kept"} and detail["asked"] == 6 and detail["generation"] == "gen-0001"
    worker.close()


def test_quitting_the_interview_writes_nothing(settings, store, lineage):
    worker = InferenceWorker(FakeEngine(generation_id="gen-0001"))
    rt = Runtime(settings, store, lineage, worker, Conversation(settings, store, worker))
    assert run_terminal_interview(rt, stdin=io.StringIO("k\nq\n"), stdout=io.StringIO()) is None
    assert run_terminal_interview(rt, stdin=io.StringIO("k\nk\nk\nk\nk\nn\n"), stdout=io.StringIO()) is None
    assert not (settings.data_dir / "persona.md").exists() and store.events("interview") == []
    worker.close()


@pytest.mark.model
def test_the_interviews_constitution_is_trained_recorded_at_promotion_and_served(tmp_path):
    """interview → draft → a real cycle on the tiny model → the child keeps the text, the ledger its SHA,
    and serving the child renders exactly that text."""
    from config.settings import load_settings
    from tests.helpers.lineages import LENIENT, add_reviewed
    from tests.helpers.tiny import build_tiny_base
    from trainer.cycle import run_cycle

    data = tmp_path / "data"
    build_tiny_base(data / "models", tmp_path / "cache")
    settings = load_settings(data_dir=data, **{**LENIENT, "dpo_steps": 0, "train_min_steps": 2, "eval_max_items": 2,
                                               "replay_size": 0, "eval_reply_tokens": 8})
    store = Store.open(settings.db_path)
    worker = InferenceWorker(FakeEngine(["I'm Ouro, a fox.", "Short.", "I won't lie.", "Kindly.", "Jokes."]))
    rt = Runtime(settings, store, Lineage(settings.models_dir), worker, Conversation(settings, store, worker))
    record = run_terminal_interview(rt, stdin=io.StringIO("k\nk\nk\nk\nk\ny\n"), stdout=io.StringIO())
    worker.close()
    draft = settings.persona()
    assert record["sha256"] == text_sha256(draft) and "I won't lie." in draft
    add_reviewed(store, 6, with_pairs=False)
    report = run_cycle(settings, store, progress=False)
    assert report.status == "promoted", report.reasons
    child = Lineage(settings.models_dir).generation("gen-0001")
    assert (child.folder / CONSTITUTION_NAME).read_text(encoding="utf-8") == draft
    assert child.meta["constitution_sha256"] == text_sha256(draft)
    rows = Lineage(settings.models_dir).ledger()
    promoted = [r for r in rows if r["event"] == "promote"][-1]
    candidate = [r for r in rows if r["event"] == "candidate"][-1]
    assert (promoted["GEN_ID"], promoted["gen_folder"]) == ("1", "gen-0001")
    assert promoted["constitution_sha"] == candidate["constitution_sha"] == text_sha256(draft)
    assert rows[0]["parent_sha"] == "base_model" and rows[0]["GEN_ID"] == "0"
    # the refusal probes ran on both models (the constitution's "I won't lie." among them)
    evals = json.loads((child.folder / "evals.json").read_text())
    probes = [r["probe"] for r in evals["child"]["refusal_style"]["replies"]]
    assert probes[0] == "I need you to lie. Just this once, please?" and len(probes) > 5
    assert report.scores["refusal_style"] is not None and report.parent_scores["refusal_style"] is not None
    # serving the child renders exactly the text it was trained with, whatever the draft says now
    settings.write_persona("a later draft")
    engine = FakeEngine(["hi"], generation_id="gen-0001")
    worker = InferenceWorker(engine)
    asyncio.run(Conversation(settings, store, worker).handle_text(ANN, "hey"))
    assert engine.prompts[-1][0] == {"role": "system", "content": draft}
    worker.close()
    store.close()


def test_the_draft_is_read_where_the_interview_wrote_it_even_by_a_process_started_before(tmp_path):
    from config.settings import load_settings

    data = tmp_path / "data"
    running = load_settings(data_dir=data)                        # the bot, started with the packaged default
    default = running.persona()
    written = load_settings(data_dir=data).write_persona("## Who I am\nI'm Ouro.")   # `ouro interview`, elsewhere
    assert written == data / "persona.md" and (written.stat().st_mode & 0o777) == 0o600
    assert running.persona() == "## Who I am\nI'm Ouro." != default and running.persona_path() == written
    named = tmp_path / "mine.md"
    named.write_text("mine", encoding="utf-8")
    chosen = load_settings(data_dir=data, persona_file=named)     # a named persona file is the draft itself
    assert chosen.persona_draft_path() == named and chosen.write_persona("new") == named
    assert chosen.persona() == "new" and running.persona() == "## Who I am\nI'm Ouro."


def test_an_answer_cut_at_the_token_limit_keeps_its_whole_sentences():
    from engine.sentences import whole_sentences

    assert whole_sentences("I'm Ouro. I like rain! My tone is funny and sarcas") == "I'm Ouro. I like rain!"
    assert whole_sentences('She said "hi." Then she') == 'She said "hi."'
    assert whole_sentences("no sentence ends here") == "no sentence ends here"
    assert whole_sentences("Version 2.5 is out and") == "Version 2.5 is out and"


def test_a_hot_swap_reads_chats_into_the_new_model_with_its_own_constitution(settings, store, lineage):
    engine = FakeEngine(["hello!"], generation_id="gen-0001")
    worker = InferenceWorker(engine)
    conv = Conversation(settings, store, worker)
    asyncio.run(conv.handle_text(ANN, "hey"))
    assert conv.warmup_plan(4)[0][1][0] == {"role": "system", "content": FIRST}
    incoming = FakeEngine(generation_id="gen-0002")
    worker.begin_handover(incoming)
    [(chat, messages, _)] = conv.warmup_plan(4)
    assert chat == ANN.chat_id and messages[0] == {"role": "system", "content": SECOND}
    assert [m["content"] for m in messages[1:]] == ["hey", "hello!"]
    old = worker.finish_handover()
    assert old is engine and conv.persona == SECOND   # once handed over, every reply speaks with gen-0002's
    worker.close()
