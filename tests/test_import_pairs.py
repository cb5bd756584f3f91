"""ChatGPT's regenerated answers: the answer kept over one regenerated in its place is a preference pair,
stored with the import and trained on by the next cycle's DPO stage."""

from __future__ import annotations

from pathlib import Path

from memory.export import reviewed_since
from memory.importers import chatgpt
from memory.importers.pipeline import format_summary, import_chat
from trainer.replay import make_split

FIXTURE = Path(__file__).parent / "fixtures" / "imports" / "chatgpt" / "conversations.json"


def test_the_kept_answer_carries_the_answers_regenerated_in_its_place():
    parsed = chatgpt.parse(FIXTURE)
    tries = {m.text[:20]: m.rejected for m in parsed.messages if m.rejected}
    assert tries == {
        "Warm in the day, coo": ("Certainly! As an AI, I don't have real-time weather data, but I'd be happy to "
                                 "share typical conditions.",),
        "250 g de farine, qua": ("Bien sûr ! En tant qu'IA, je serais ravi de vous aider. Voici une recette "
                                 "détaillée en dix étapes.",),
        "Am Samstag besser ja": ("Als KI kann ich das leider nicht wissen, zögern Sie nicht, dort anzurufen.",),
    }
    # the edited prompt ("what about shoes") and the answer to it are another branch, but no pair
    assert parsed.dropped["regenerated_branch"] == 5


def test_an_import_stores_the_pairs_once_and_keeps_held_out_replies_out(store):
    summary = import_chat(store, "chatgpt", FIXTURE, me="assistant")
    assert (summary["preference_pairs"], summary["new_pairs"]) == (2, 2)
    assert summary["preference_pairs_left_out"] == {"heldout": 1}   # the newest conversation is the held-out window
    assert "pairs      2 preference pairs" in format_summary(summary)
    rows = store.database.query("SELECT prompt, chosen, rejected, language FROM imported_pairs ORDER BY id")
    assert [r["language"] for r in rows] == ["en", "fr"]
    assert rows[1]["rejected"].startswith("Bien sûr ! En tant qu'IA") and rows[1]["chosen"].startswith("250 g")
    again = import_chat(store, "chatgpt", FIXTURE, me="assistant")
    assert (again["preference_pairs"], again["new_pairs"]) == (2, 0)


def test_learning_your_own_side_makes_no_pair_from_chatgpts_tries(store):
    summary = import_chat(store, "chatgpt", FIXTURE, me="user")
    assert summary["preference_pairs"] == 0
    assert summary["preference_pairs_left_out"] == {"not_the_persona": 3}
    assert store.database.query("SELECT COUNT(*) AS n FROM imported_pairs") == [{"n": 0}]


def test_the_next_cycle_trains_on_the_imported_pairs(store):
    import_chat(store, "chatgpt", FIXTURE, me="assistant")
    delta = reviewed_since(store, persona="You are Ann.", since=None)
    pairs = [p for p in delta.pairs if p.source == "import"]
    assert len(pairs) == 2 and all(p.prompt[0] == {"role": "system", "content": "You are Ann."} for p in pairs)
    assert pairs[0].prompt[-1]["content"] == "Is it going to be hot? I never know with the Atlantic."
    split = make_split(delta, [], fraction=0.1, replay_size=0, seed=0)
    assert {p.chosen for p in split.pairs} == {p.chosen for p in pairs}          # trained, never held out
    held = [m[-1]["content"] for m in split.heldout]
    assert not any(p.chosen in held for p in pairs)


def test_tries_of_a_merged_message_make_no_pair(tmp_path):
    from datetime import datetime, timedelta

    from memory.importers.chat import Message, Parsed
    from memory.importers.pipeline import build

    t0 = datetime(2024, 6, 1, 10, 0)
    texts = [("user", "Which train goes to the coast on Sunday mornings?", ()),
             ("assistant", "The 8:10 regional, change at the junction.", ("Certainly! I'd be happy to help.",)),
             ("assistant", "Or the 9:40 direct one if you sleep in.", ()),
             ("user", "Is the direct one much more expensive than the other?", ()),
             ("assistant", "A few euros more, worth it for the view.", ()),
             ("user", "Then the direct one it is, thanks a lot.", ()),
             ("assistant", "Sit on the left side for the sea.", ("Great question! Please note that fares vary.",))]
    parsed = Parsed(messages=[Message("c", who, t0 + timedelta(minutes=i), text, rejected=tries)
                              for i, (who, text, tries) in enumerate(texts)], read=len(texts))
    summary, _, pairs = build(parsed, "assistant", tmp_path)
    assert summary["preference_pairs_left_out"] == {"merged": 1}
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("Sit on the left side for the sea.", "Great question! Please note that fares vary.")]
    assert pairs[0]["prompt"][1]["content"] == "The 8:10 regional, change at the junction.\nOr the 9:40 direct one if you sleep in."
