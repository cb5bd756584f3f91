"""The store: turns written before replies, ratings, preferences, corrections, migrations."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

from memory.migrations import MIGRATIONS, migrate, pending
from memory.store import Store


def test_user_message_is_stored_as_pending_before_reply(store):
    turn = store.add_user_turn(chat_id=5, user_id=7, text="hello", user_message_id=11)
    t = store.turn(turn)
    assert t.status == "pending" and t.user_text == "hello" and t.reply_text is None
    assert store.pending_turns()[0]["id"] == turn
    store.complete_turn(turn, reply_text="hi!", generation_id="gen-0000", prompt_tokens=12, completion_tokens=2,
                        latency_s=0.5, ttft_s=0.1, context_start_turn_id=None)
    t = store.turn(turn)
    assert t.status == "answered" and t.reply_text == "hi!" and t.generation_id == "gen-0000"
    assert store.pending_turns() == []


def test_rating_is_one_per_user_per_reply_and_can_change(store):
    turn = store.add_user_turn(chat_id=5, user_id=7, text="q")
    assert store.rate(turn, 7, 1) == "new"
    assert store.rate(turn, 7, 1) == "same"
    assert store.rate(turn, 7, -1) == "changed"
    assert store.rating(turn, 7) == -1
    assert store.database.scalar("SELECT COUNT(*) FROM ratings") == 1


def test_pick_records_preference_once_and_context_uses_kept_sample(store):
    turn = store.add_user_turn(chat_id=5, user_id=7, text="q")
    store.complete_turn(turn, reply_text="first", generation_id="g", prompt_tokens=1, completion_tokens=1,
                        latency_s=0.1, ttft_s=0.1, context_start_turn_id=turn)
    alt = store.add_alternative(turn, "second", "g")
    assert store.pick(turn, alt, 7, keep_alternative=True) is True
    assert store.pick(turn, alt, 7, keep_alternative=False) is False  # replayed press
    pref = store.database.one("SELECT chosen, rejected, source FROM preferences")
    assert pref == {"chosen": "second", "rejected": "first", "source": "regenerate"}
    session = store.current_session(5)
    assert [e.reply_text for e in store.history(session)] == ["second"]


def test_correction_is_stored_with_preference_and_only_when_awaited(store):
    turn = store.add_user_turn(chat_id=5, user_id=7, text="q")
    store.complete_turn(turn, reply_text="meh", generation_id="g", prompt_tokens=1, completion_tokens=1,
                        latency_s=0.1, ttft_s=0.1, context_start_turn_id=turn)
    assert store.take_correction(5, 7, "not awaited") is None
    store.await_correction(5, 7, turn)
    assert store.take_correction(5, 8, "someone else") is None
    assert store.take_correction(5, 7, "much better") == turn
    assert store.take_correction(5, 7, "again") is None
    assert store.database.one("SELECT text FROM corrections") == {"text": "much better"}
    assert store.database.one("SELECT chosen, rejected, source FROM preferences") == {
        "chosen": "much better", "rejected": "meh", "source": "correction"}


def test_reset_starts_a_new_session_with_empty_history(store):
    turn = store.add_user_turn(chat_id=5, user_id=7, text="q")
    store.complete_turn(turn, reply_text="a", generation_id="g", prompt_tokens=1, completion_tokens=1,
                        latency_s=0.1, ttft_s=0.1, context_start_turn_id=turn)
    old = store.current_session(5)
    new = store.reset_session(5, user_id=7)
    assert new != old and store.history(new) == [] and len(store.history(old)) == 1


def test_blank_database_gets_every_migration_and_wal(tmp_path):
    store = Store.open(tmp_path / "x.db")
    assert pending(store.database.conn) == []
    assert store.database.scalar("PRAGMA journal_mode") == "wal"
    names = [r["name"] for r in store.database.query("SELECT name FROM _migrations")]
    assert names == [name for name, _ in MIGRATIONS]
    assert (tmp_path / "x.db").stat().st_mode & 0o077 == 0  # private to its owner
    store.close()


def test_lookups_by_turn_and_by_person_never_scan_a_whole_table(store):
    """What the review queue, the People page, /privacy and the live watch ask about each turn or each
    person is found by index: a store months old (90k turns) answered the review queue in seconds,
    on the event loop, when every turn in it scanned every correction."""
    t = store.add_user_turn(chat_id=5, user_id=7, text="q")
    store.complete_turn(t, reply_text="a", generation_id="gen-0001", prompt_tokens=1, completion_tokens=1,
                        latency_s=0.1, ttft_s=0.1, context_start_turn_id=t)
    statements: list[str] = []
    store.database.conn.set_trace_callback(statements.append)
    store.review_queue(opt_out_by_default=False, limit=5)
    store.people()
    store.user_data_counts(7)
    store.generation_ratings("gen-0001", limit=20)
    store.database.conn.set_trace_callback(None)
    scans = []
    for sql in statements:
        if sql.lstrip().upper().startswith(("SELECT", "WITH")):
            plan = [row[-1] for row in store.database.conn.execute("EXPLAIN QUERY PLAN " + sql)]
            driving = {"SCAN t", "SCAN u"}   # the queue's turns, the People page's people: one pass each
            scans += [(sql[:80], step) for step in plan if step.startswith("SCAN") and step not in driving
                      and "json_each" not in step]
    assert len(statements) >= 6 and scans == []


def test_older_schema_is_migrated_with_rows_kept(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, stop_before="m002_feedback")
    conn.execute("INSERT INTO users VALUES (7, 'ann', 'Ann', 'then', 'then')")
    conn.execute("INSERT INTO chats VALUES (5, 'private', NULL, 'then')")
    conn.execute("INSERT INTO sessions (chat_id, started_at) VALUES (5, 'then')")
    conn.execute("INSERT INTO turns (session_id, chat_id, user_id, user_text, created_at, status, reply_text) "
                 "VALUES (1, 5, 7, 'old question', 'then', 'answered', 'old answer')")
    conn.execute("INSERT INTO ratings VALUES (1, 7, 1, 'then', 'then')")
    conn.close()
    store = Store.open(path)
    assert pending(store.database.conn) == []
    assert [(e.user_text, e.reply_text) for e in store.history(1)] == [("old question", "old answer")]
    assert store.rating(1, 7) == 1
    assert store.stats()["ratings_up"] == 1
    # the new columns and tables work on the old rows
    alt = store.add_alternative(1, "new take", "gen-0000")
    assert store.pick(1, alt, 7, keep_alternative=True)
    store.close()


def test_failed_migration_rolls_back_and_leaves_nothing_half_applied(tmp_path):
    from memory import migrations

    conn = sqlite3.connect(tmp_path / "y.db", isolation_level=None)

    def broken(c):
        c.execute("CREATE TABLE half (x)")
        raise RuntimeError("boom")

    migrations.MIGRATIONS.append(("m999_broken", broken))
    try:
        try:
            migrate(conn)
        except RuntimeError:
            pass
        assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'half'").fetchone()[0] == 0
        assert "m999_broken" in pending(conn)
        assert "m003_generations_and_events" not in pending(conn)
    finally:
        migrations.MIGRATIONS.pop()
        conn.close()


def test_two_processes_migrating_at_once_both_open_the_store(tmp_path, monkeypatch):
    """`ouro serve` and `ouro web` started together on a new or upgraded database: both read the
    pending list, one takes the write lock first and applies it all; the other must skip what is
    done by then, not fail on "duplicate column" or "table already exists"."""
    from memory import migrations

    path = tmp_path / "race.db"
    migrate(sqlite3.connect(path, isolation_level=None), stop_before="m002_feedback")   # an older database
    first, second = (sqlite3.connect(path, isolation_level=None) for _ in range(2))
    real_applied, raced = migrations.applied, []

    def applied_then_overtaken(conn):
        done = real_applied(conn)
        if conn is second and not raced:       # the other process wins the lock after our read
            raced.append(migrate(first))
        return done

    monkeypatch.setattr(migrations, "applied", applied_then_overtaken)
    assert migrate(second) == []               # everything it had read as pending was done meanwhile
    assert raced and raced[0] and pending(first) == pending(second) == []
    first.close()
    second.close()


def test_a_correction_left_unanswered_lapses_and_the_next_message_is_a_message(store):
    """✏️ tapped and never answered (or answered where the bot could not hear it, in a group):
    a message half an hour later is not stored as a better reply and a preference pair."""
    from memory.feedback import CORRECTION_WAIT_S

    turn = store.add_user_turn(chat_id=5, user_id=7, text="what is 2+2?")
    store.complete_turn(turn, reply_text="5", generation_id="gen-0000", prompt_tokens=1, completion_tokens=1,
                        latency_s=0.1, ttft_s=0.1, context_start_turn_id=None)
    store.await_correction(5, 7, turn)
    assert store.take_correction(5, 7, "4") == turn                       # answered in time: taken
    store.await_correction(5, 7, turn)
    with store.database.transaction() as conn:                             # ... and this one left waiting
        conn.execute("UPDATE awaiting_corrections SET created_at = ?",
                     ((datetime.now(UTC) - timedelta(seconds=CORRECTION_WAIT_S + 60)).isoformat(timespec="milliseconds"),))
    assert store.take_correction(5, 7, "@bot what's the capital of France?") is None
    assert store.database.scalar("SELECT COUNT(*) FROM corrections") == 1
    assert store.database.scalar("SELECT COUNT(*) FROM preferences") == 1
    assert store.database.scalar("SELECT COUNT(*) FROM awaiting_corrections") == 0


def _answered(store, chat: int, n: int = 1, anchor_at: int | None = None) -> list[int]:
    ids = []
    for i in range(n):
        t = store.add_user_turn(chat_id=chat, user_id=chat, text=f"m{i}")
        store.complete_turn(t, reply_text=f"r{i}", generation_id="gen-0000", prompt_tokens=1, completion_tokens=1,
                            latency_s=0.1, ttft_s=0.1, context_start_turn_id=anchor_at or t)
        ids.append(t)
    return ids


def test_a_reply_reads_its_session_from_the_window_anchor_and_the_latest_only(store):
    """A session lasts until /reset: a group's months of turns must not be read for every message."""
    ids = _answered(store, 5, 40)
    session = store.current_session(5)
    assert [e.turn_id for e in store.history(session)] == ids
    assert [e.turn_id for e in store.history(session, since_turn_id=ids[30])] == ids[30:]
    assert [e.turn_id for e in store.history(session, since_turn_id=ids[30], before_turn_id=ids[35])] == ids[30:35]
    assert [e.turn_id for e in store.history(session, last=3)] == ids[-3:]


def test_recent_chats_are_the_latest_answered_open_sessions_newest_first(store):
    _answered(store, 1, 300)                 # a busy chat long ago: more than a page of turns
    _answered(store, 2)
    _answered(store, 3)
    store.reset_session(3)                   # reset, not answered since: nothing to read ahead
    _answered(store, 4)
    _answered(store, 2)                      # chat 2 again, most recently of all
    current = {c: store.current_session(c) for c in (1, 2, 4)}
    assert store.recent_chats(10) == [(2, current[2]), (4, current[4]), (1, current[1])]
    assert store.recent_chats(2) == [(2, current[2]), (4, current[4])]
    _answered(store, 1, 300)                 # the busy chat's turns now fill the newest pages
    assert store.recent_chats(3) == [(1, current[1]), (2, current[2]), (4, current[4])]
