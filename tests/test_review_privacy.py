"""Review verdicts and privacy at the store and export level: what is trained on, what is gone."""

from __future__ import annotations

import io
import logging
import sqlite3
import stat

import pytest

from core.files import ensure_private_dir
from engine.chat_states import ChatStates
from lineage.generations import Lineage
from memory.export import Delta, Example, reviewed_since, served_context, still_trainable
from memory.migrations import migrate, pending
from memory.store import Store
from ouro.logs import RedactSecrets
from ouro.review import run_terminal_review

ANN, BOB, ADMIN = 777001, 777002, 4242
GROUP = -900100


def answered(store, chat, user, text, reply, *, anchor=None, chat_type="private"):
    t = store.add_user_turn(chat_id=chat, user_id=user, text=text, chat_type=chat_type)
    store.complete_turn(t, reply_text=reply, generation_id="gen-0000", prompt_tokens=1, completion_tokens=1,
                        latency_s=0.1, ttft_s=0.1, context_start_turn_id=anchor or t)
    return t


def targets(delta):
    return [e.messages[-1]["content"] for e in delta.examples]


# --- review ---------------------------------------------------------------------------------------

def test_queue_puts_thumbs_up_first_with_context_and_skips_opted_out_people(store):
    first = answered(store, ANN, ANN, "hello", "hi Ann")
    unrated = answered(store, ANN, ANN, "how are you", "fine", anchor=first)
    liked = answered(store, ANN, ANN, "tell a joke", "a joke", anchor=first)
    disliked = answered(store, BOB, BOB, "help", "no")
    store.rate(liked, ANN, 1)
    store.rate(disliked, BOB, -1)
    hidden = answered(store, 5, 5, "secret", "shh")
    store.set_training_opt_out(5, True)

    item = store.next_review(opt_out_by_default=False)
    assert item.turn_id == liked and item.ups == 1 and item.remaining == 4
    assert [(e.user_text, e.reply_text) for e in item.context] == [("hello", "hi Ann"), ("how are you", "fine")]
    assert store.next_review(opt_out_by_default=False, skip={liked}).turn_id == disliked
    assert store.next_review(opt_out_by_default=False, skip={liked, disliked}).turn_id == first
    order = []
    skip: set[int] = set()
    while (nxt := store.next_review(opt_out_by_default=False, skip=skip)) is not None:
        order.append(nxt.turn_id)
        skip.add(nxt.turn_id)
    assert order == [liked, disliked, first, unrated] and hidden not in order
    # with "out unless they opt in" as the default, only people who opted in are queued
    store.set_training_opt_out(ANN, False)
    assert {store.next_review(opt_out_by_default=True, skip=s).turn_id for s in ((), {liked})} == {liked, first}


def test_first_verdict_stands_and_bad_verdicts_are_refused(store):
    t = answered(store, ANN, ANN, "q", "a")
    assert store.record_review(t, ADMIN, "approved") is True
    assert store.record_review(t, 99, "rejected") is False
    assert store.review_verdict(t) == "approved"
    assert store.next_review(opt_out_by_default=False) is None
    assert store.record_review(123456, ADMIN, "approved") is False      # no such turn
    with pytest.raises(ValueError):
        store.record_review(t, ADMIN, "maybe")
    with pytest.raises(ValueError):
        store.record_review(t, ADMIN, "edited")                          # an edit needs its text
    pending_turn = store.add_user_turn(chat_id=ANN, user_id=ANN, text="not answered yet")
    assert store.record_review(pending_turn, ADMIN, "approved") is False


def test_review_edit_is_awaited_per_admin_and_chat_then_taken_once(store):
    t = answered(store, ANN, ANN, "q", "served")
    assert store.take_review_edit(ADMIN, ADMIN, "nothing awaited") is None
    store.await_review_edit(ADMIN, ADMIN, t)
    assert store.awaiting_review_edit(ADMIN, ADMIN) == t and store.awaiting_review_edit(ADMIN, 1) is None
    assert store.take_review_edit(ADMIN, ADMIN, "  better  ") == t
    assert store.awaiting_review_edit(ADMIN, ADMIN) is None
    assert store.database.one("SELECT verdict, edited_text, reviewer_id FROM reviews") == {
        "verdict": "edited", "edited_text": "better", "reviewer_id": ADMIN}
    store.await_review_edit(ADMIN, ADMIN, t)
    assert store.cancel_review_edit(ADMIN, ADMIN) and store.take_review_edit(ADMIN, ADMIN, "x") is None


def test_verdicts_decide_what_the_next_cycle_learns(store):
    ctx = answered(store, ANN, ANN, "hi", "hello!")
    approved = answered(store, ANN, ANN, "what's up", "all good", anchor=ctx)
    rejected = answered(store, BOB, BOB, "insult me", "rude reply")
    edited = answered(store, 3, 3, "capital of France?", "Lyon")
    both = answered(store, 4, 4, "nice?", "very nice")
    store.rate(rejected, BOB, 1)                                   # 👍, but an admin rejects it
    store.await_correction(BOB, BOB, rejected)
    store.take_correction(BOB, BOB, "ruder reply")                 # its correction is not trained on either
    alt = store.add_alternative(rejected, "another rude one", "gen-0000")
    store.pick(rejected, alt, BOB, keep_alternative=True)
    store.rate(edited, 3, 1)                                       # the served reply loses its 👍 to the edit
    store.rate(both, 4, 1)
    assert store.record_review(approved, ADMIN, "approved")
    assert store.record_review(rejected, ADMIN, "rejected")
    assert store.record_review(edited, ADMIN, "edited", "Paris")
    assert store.record_review(both, ADMIN, "approved")

    delta = reviewed_since(store, persona="P", since=None)
    assert sorted(targets(delta)) == ["Paris", "all good", "very nice"]
    by_target = {e.messages[-1]["content"]: e for e in delta.examples}
    assert by_target["all good"].source == "review"
    assert by_target["all good"].messages == [
        {"role": "system", "content": "P"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "what's up"},
        {"role": "assistant", "content": "all good"}]
    assert by_target["Paris"].source == "review_edit" and by_target["very nice"].source == "thumbs_up"
    assert [(p.chosen, p.rejected, p.source) for p in delta.pairs] == [("Paris", "Lyon", "review_edit")]
    assert "rude" not in delta.to_jsonl() and delta.dropped["overruled"] == 2
    # approvals count in the window of their verdict, like a rating
    cutoff = store.database.scalar("SELECT MAX(created_at) FROM reviews")
    late = answered(store, 6, 6, "late", "late reply")
    assert reviewed_since(store, persona="P", since=cutoff).examples == []
    store.record_review(late, ADMIN, "approved")
    assert targets(reviewed_since(store, persona="P", since=cutoff)) == ["late reply"]


def test_terminal_review_records_verdicts_and_stops_at_quit(store, settings):
    first = answered(store, ANN, ANN, "one", "reply one")
    second = answered(store, ANN, ANN, "two", "reply two", anchor=first)
    third = answered(store, ANN, ANN, "three", "reply three", anchor=first)
    out = io.StringIO()
    tally = run_terminal_review(settings, store, stdin=io.StringIO("x\na\ns\ne\nmuch better\n"), stdout=out)
    assert store.review_verdict(first) == "approved" and store.review_verdict(second) is None
    assert store.database.one("SELECT verdict, edited_text, reviewer_id FROM reviews WHERE turn_id = ?", (third,)) \
        == {"verdict": "edited", "edited_text": "much better", "reviewer_id": 0}
    assert tally == {"approved": 1, "skipped": 1, "edited": 1}
    text = out.getvalue()
    assert "👤 one" in text and "🤖 reply one" in text and "[a]pprove" in text and "skipped are left" in text
    tally = run_terminal_review(settings, store, stdin=io.StringIO("r\n"), stdout=io.StringIO())
    assert tally == {"rejected": 1} and store.review_verdict(second) == "rejected"


# --- privacy --------------------------------------------------------------------------------------

def test_opt_out_and_in_are_kept_and_decide_training(store):
    assert store.training_opt_out(ANN) is None
    store.set_training_opt_out(ANN, True, username="ann")           # before ever chatting
    assert store.training_opt_out(ANN) is True
    t = answered(store, ANN, ANN, "q", "liked reply")
    store.rate(t, ANN, 1)
    assert store.training_opt_out(ANN) is True                      # chatting keeps the choice
    assert reviewed_since(store, persona="P", since=None).examples == []
    store.set_training_opt_out(ANN, False)
    assert targets(reviewed_since(store, persona="P", since=None, opt_out_by_default=True)) == ["liked reply"]


def _everything(store) -> list[tuple[str, str, object]]:
    """Every (table, column, value) in the database."""
    cells = []
    tables = [r["name"] for r in store.database.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        for row in store.database.query(f"SELECT * FROM {table}"):
            cells += [(table, col, value) for col, value in row.items()]
    return cells


def test_forget_deletes_every_trace_and_leaves_a_tombstone_without_content(store, settings):
    # Ann in private: rated, corrected, regenerated, reviewed; pending correction; events
    a1 = answered(store, ANN, ANN, "zebra-secret one", "zebra-reply one")
    a2 = answered(store, ANN, ANN, "zebra-secret two", "zebra-reply two", anchor=a1)
    store.rate(a1, ANN, 1)
    store.await_correction(ANN, ANN, a1)
    store.take_correction(ANN, ANN, "zebra-correction")
    alt = store.add_alternative(a2, "zebra-alternative", "gen-0000")
    store.pick(a2, alt, ANN, keep_alternative=True)
    store.await_correction(ANN, ANN, a2)
    store.record_review(a2, ADMIN, "edited", "zebra-admin-edit")
    store.set_training_opt_out(ANN, False)
    store.log_event("admin_refused", user_id=ANN, chat_id=ANN, detail="/status zebra")
    # Ann and Bob in a group: Bob's liked turn was served with Ann's message in its context
    g1 = answered(store, GROUP, ANN, "zebra-secret in the group", "zebra-group-reply", chat_type="group")
    g2 = answered(store, GROUP, BOB, "bob asks", "bob's answer", anchor=g1, chat_type="group")
    store.rate(g2, BOB, 1)
    store.rate(g2, ANN, 1)                                          # Ann's rating of Bob's turn
    store.await_review_edit(ANN, ANN, g2)                           # (as if Ann were an admin)
    ancestors = reviewed_since(store, persona="P", since=None).examples   # what a generation trained on
    assert any("zebra" in str(e.messages) for e in ancestors)

    counts, chats = store.forget_user(ANN)

    assert sorted(chats) == sorted([ANN, GROUP])
    assert counts["turns"] == 3 and counts["users"] == 1 and counts["chats"] == 1 and counts["ratings"] == 2
    leftovers = [(t, c, v) for t, c, v in _everything(store) if v == ANN or "zebra" in str(v)]
    assert leftovers == []
    assert store.user_data_counts(ANN) == {"messages": 0, "ratings": 0, "corrections": 0, "picks": 0}
    stones = store.tombstones()
    assert len(stones) == 1 and set(stones[0]) == {"id", "forgotten_at", "counts"} and stones[0]["counts"] == counts
    assert store.events("forgotten")[0]["user_id"] is None
    # no later dataset holds any of it: the export, nor the replay of ancestors' data
    delta = reviewed_since(store, persona="P", since=None)
    assert targets(delta) == ["bob's answer"] and "zebra" not in delta.to_jsonl()
    assert "zebra" not in str([e.messages for e in still_trainable(store, ancestors, opt_out_by_default=False)])
    # Bob's group session lives on; Ann's next message starts from nothing
    assert store.turn(g2) is not None and store.current_session(GROUP) is not None
    again = store.add_user_turn(chat_id=ANN, user_id=ANN, text="hello again")
    assert store.history(store.turn(again).session_id) == [] and store.training_opt_out(ANN) is None
    # forgetting someone with nothing stored leaves no tombstone
    assert store.forget_user(999)[0] == {k: 0 for k in counts} and len(store.tombstones()) == 1


def test_forgotten_text_is_not_left_in_the_database_files(settings):
    store = Store.open(settings.db_path)
    for i in range(30):
        answered(store, ANN, ANN, f"okapi-marker {i} " + "x" * 200, f"okapi-reply {i}")
    answered(store, BOB, BOB, "bob stays", "ok")
    store.forget_user(ANN)
    store.close()
    raw = b"".join(p.read_bytes() for p in settings.db_path.parent.glob("ouro.db*"))
    assert b"okapi" not in raw and b"bob stays" in raw


def test_replay_drops_examples_of_forgotten_opted_out_or_rejected_turns(store):
    kept = answered(store, ANN, ANN, "kept", "ok")
    quiet = answered(store, BOB, BOB, "bob", "ok")
    rejected = answered(store, 3, 3, "bad", "bad")
    edited = answered(store, 4, 4, "edit", "served")
    store.set_training_opt_out(BOB, True)
    store.record_review(rejected, ADMIN, "rejected")
    store.record_review(edited, ADMIN, "edited", "better")
    pool = [Example(served_context(store, t, "P") + [{"role": "assistant", "content": "target"}], src, "2024",
                    turn_id=t)
            for t, src in ((kept, "thumbs_up"), (quiet, "thumbs_up"), (rejected, "correction"),
                           (edited, "thumbs_up"), (edited, "review_edit"))]
    pool.append(Example([{"role": "user", "content": "gone"}, {"role": "assistant", "content": "x"}], "thumbs_up",
                        "2024", turn_id=987654))
    pool.append(Example([{"role": "assistant", "content": "imported"}], "import", "2024", turn_id=quiet))
    allowed = still_trainable(store, pool, opt_out_by_default=False)
    assert [(e.turn_id, e.source) for e in allowed] == [(kept, "thumbs_up"), (edited, "review_edit"),
                                                        (quiet, "import")]


def test_replay_checks_the_examples_it_draws_not_the_whole_lineage(store, tmp_path):
    """A lineage months old holds tens of thousands of examples and each check reads the store: the
    replay draws at random (the same draw for the same seed) and checks a batch at a time until it has
    enough, so a cycle checks about `replay_size` of them, and never replays one that fails."""
    from tests.helpers.lineages import make_generation
    from trainer.replay import make_split, write_jsonl

    gens = []
    for g in range(3):
        gen = make_generation(tmp_path / "models", f"gen-{g:04d}", f"gen-{g - 1:04d}" if g else None)
        write_jsonl(gen.folder / "data" / "train.jsonl",
                    [{"messages": [{"role": "user", "content": f"q{g}-{i}"}, {"role": "assistant", "content": "a"}],
                      "source": "import" if i % 3 else "thumbs_up", "created_at": "2024", "turn_id": 10**6 + i}
                     for i in range(300)])   # every third one's turn is gone (forgotten): it never replays
        gens.append(gen)
    checked = []

    def allowed(batch):
        checked.extend(batch)
        return still_trainable(store, batch, opt_out_by_default=False)

    split = make_split(Delta(), gens, fraction=0.0, replay_size=20, seed=7, allowed=allowed)
    again = make_split(Delta(), gens, fraction=0.0, replay_size=20, seed=7, allowed=allowed)
    assert len(split.replay) == 20 and all(e.source == "import" for e in split.replay)
    assert [e.messages for e in split.replay] == [e.messages for e in again.replay]
    assert len(checked) <= 2 * 2 * 32   # two draws, a batch or two each — not 2 × 900
    assert len({e.messages[0]["content"][:2] for e in split.replay}) == 3   # drawn from every ancestor


def test_optout_takes_a_persons_group_messages_out_of_other_members_examples(store):
    """/optout covers what the person said in a group too: their turns leave the context of everyone
    else's examples (as /forget's do), fresh and replayed; with opt-out the default, only those who
    opted in are context."""
    said = answered(store, GROUP, BOB, "my diagnosis came back", "I'm so sorry", chat_type="group")
    asked = answered(store, GROUP, ANN, "anyway, tell me a joke", "ha", anchor=said, chat_type="group")
    store.rate(asked, ANN, 1)
    before = reviewed_since(store, persona="P", since=None).examples
    assert "diagnosis" in str(before[0].messages)
    store.set_training_opt_out(BOB, True)
    after = reviewed_since(store, persona="P", since=None)
    assert targets(after) == ["ha"] and "diagnosis" not in str(after.examples) and "sorry" not in str(after.examples)
    assert still_trainable(store, before, opt_out_by_default=False) == []       # the replayed copy goes too
    assert still_trainable(store, after.examples, opt_out_by_default=False) == after.examples

    store.database.conn.execute("UPDATE users SET training_opt_out = NULL WHERE id = ?", (BOB,))   # never chose
    store.set_training_opt_out(ANN, False)
    by_default = reviewed_since(store, persona="P", since=None, opt_out_by_default=True)
    assert targets(by_default) == ["ha"] and "diagnosis" not in str(by_default.examples)
    assert "diagnosis" in str(reviewed_since(store, persona="P", since=None).examples)


def test_review_tables_reach_an_older_database_with_its_rows(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, stop_before="m006_review_and_forget")
    conn.execute("INSERT INTO users (id, created_at, last_seen) VALUES (7, 'then', 'then')")
    conn.close()
    store = Store.open(path)
    assert pending(store.database.conn) == [] and store.tombstones() == []
    assert store.training_opt_out(7) is None and store.forget_user(7)[0]["users"] == 1
    store.close()


def test_database_and_models_folders_are_private_to_their_owner(tmp_path):
    data = tmp_path / "new" / "data"
    store = Store.open(data / "ouro.db")
    answered(store, ANN, ANN, "q", "a")                              # the WAL and its index exist now
    files = list(data.glob("ouro.db*"))
    assert len(files) >= 2 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700 and stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    store.close()
    Lineage(data / "models").append_ledger({"GEN_ID": "gen-0000"})
    assert stat.S_IMODE((data / "models").stat().st_mode) == 0o700
    ensure_private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700


def test_tokens_never_reach_a_log_line(caplog):
    token = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
    logger = logging.getLogger("test.redact")
    handler = logging.StreamHandler(stream := io.StringIO())
    handler.addFilter(RedactSecrets([token]))
    logger.addHandler(handler)
    try:
        logger.warning("calling https://api.telegram.org/bot%s/getMe", token)
        logger.warning("another bot's 987654321:ZZZdqTcvCH1vGWJxfSeofSAs0K5PALDsaw too")
        try:
            raise RuntimeError(f"failed with {token}")
        except RuntimeError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "AAHdqTcv" not in text and "ZZZdqTcv" not in text and text.count("<token>") >= 3
    assert "getMe" in text and "Traceback" in text


def test_forgetting_the_live_chat_keeps_it_from_being_saved_again():
    states = ChatStates(llm=None, max_chats=4)
    states.current = ANN
    states.forget(ANN)
    assert states.current is None and len(states) == 0
