"""Numbered schema migrations, each applied once in its own transaction and recorded.

Rules: never edit a migration that has shipped; add a new one. Each function takes the raw
connection inside an open transaction. `_migrations` remembers what ran, so opening an old
database brings it forward with its rows kept.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from core.files import now

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    name = fn.__name__
    if any(existing == name for existing, _ in MIGRATIONS):
        raise ValueError(f"duplicate migration name {name}")
    MIGRATIONS.append((name, fn))
    return fn


@migration
def m001_conversations(conn: sqlite3.Connection) -> None:
    _script(conn, """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,            -- Telegram user id (terminal chat uses 0)
        username TEXT, first_name TEXT,
        created_at TEXT NOT NULL, last_seen TEXT NOT NULL
    );
    CREATE TABLE chats (
        id INTEGER PRIMARY KEY,            -- Telegram chat id
        type TEXT NOT NULL, title TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE sessions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        chat_id INTEGER NOT NULL REFERENCES chats(id),
        started_at TEXT NOT NULL, ended_at TEXT
    );
    CREATE INDEX sessions_chat ON sessions(chat_id, id);
    CREATE TABLE turns (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id INTEGER NOT NULL REFERENCES sessions(id),
        chat_id INTEGER NOT NULL REFERENCES chats(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        user_message_id INTEGER,
        user_text TEXT NOT NULL,
        created_at TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',   -- pending | answered | failed | refused | busy
        reply_text TEXT,
        generation_id TEXT,
        prompt_tokens INTEGER, completion_tokens INTEGER,
        latency_s REAL, ttft_s REAL,
        answered_at TEXT
    );
    CREATE INDEX turns_session ON turns(session_id, id);
    CREATE TABLE ratings (
        turn_id INTEGER NOT NULL REFERENCES turns(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        value INTEGER NOT NULL CHECK (value IN (-1, 1)),
        created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
        PRIMARY KEY (turn_id, user_id)
    );
    """)


@migration
def m002_feedback(conn: sqlite3.Connection) -> None:
    """Regenerated samples, preference pairs, corrections, and where each turn's context began."""
    _script(conn, """
    ALTER TABLE turns ADD COLUMN context_start_turn_id INTEGER;   -- first turn in the served context
    ALTER TABLE turns ADD COLUMN reply_message_ids TEXT;          -- JSON list of Telegram message ids
    ALTER TABLE turns ADD COLUMN picked_alternative_id INTEGER;   -- the 🔁 sample the user kept, if any
    CREATE TABLE alternatives (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        turn_id INTEGER NOT NULL REFERENCES turns(id),
        text TEXT NOT NULL, generation_id TEXT,
        message_ids TEXT, created_at TEXT NOT NULL
    );
    CREATE TABLE preferences (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        turn_id INTEGER NOT NULL REFERENCES turns(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        chosen TEXT NOT NULL, rejected TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('regenerate', 'correction')),
        created_at TEXT NOT NULL
    );
    CREATE TABLE corrections (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        turn_id INTEGER NOT NULL REFERENCES turns(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        text TEXT NOT NULL, created_at TEXT NOT NULL
    );
    CREATE TABLE awaiting_corrections (
        chat_id INTEGER NOT NULL, user_id INTEGER NOT NULL,
        turn_id INTEGER NOT NULL REFERENCES turns(id),
        created_at TEXT NOT NULL,
        PRIMARY KEY (chat_id, user_id)
    );
    """)


@migration
def m003_generations_and_events(conn: sqlite3.Connection) -> None:
    """The lineage mirror (the ledger CSV is the portable copy) and an audit trail."""
    _script(conn, """
    CREATE TABLE generations (
        id TEXT PRIMARY KEY,               -- gen-0000, gen-0001, …
        parent_id TEXT,
        gguf_path TEXT NOT NULL, gguf_sha256 TEXT NOT NULL,
        status TEXT NOT NULL,              -- base | promoted | refused | candidate | rolled_back
        created_at TEXT NOT NULL,
        meta TEXT                          -- JSON: evals, gate reasons, steps, …
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        kind TEXT NOT NULL,                -- admin_refused, promote, rollback, error, …
        user_id INTEGER, chat_id INTEGER,
        detail TEXT
    );
    CREATE INDEX events_kind ON events(kind, id);
    """)


@migration
def m004_training_consent(conn: sqlite3.Connection) -> None:
    """Whether a person's chats may be trained on (default from settings, set by /optout, /optin)."""
    _script(conn, """
    ALTER TABLE users ADD COLUMN training_opt_out INTEGER;        -- NULL: the settings' default
    CREATE INDEX turns_created ON turns(created_at);
    """)


@migration
def m005_imports(conn: sqlite3.Connection) -> None:
    """Chat-history imports (cold start): each run, and the redacted windows it produced for training."""
    _script(conn, """
    CREATE TABLE imports (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,                -- telegram | whatsapp
        file TEXT NOT NULL, file_sha256 TEXT NOT NULL,
        owner TEXT NOT NULL,               -- the --me name: whose messages became the assistant's
        created_at TEXT NOT NULL,
        summary TEXT NOT NULL              -- JSON: read, kept, dropped by reason, windows, tokens, …
    );
    CREATE TABLE imported_examples (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        import_id INTEGER NOT NULL REFERENCES imports(id),
        messages TEXT NOT NULL,            -- JSON [{role, content}], redacted; the persona is added at export
        split TEXT NOT NULL CHECK (split IN ('train', 'heldout')),
        ended_at TEXT,                     -- when the window's last message was written (the chat's clock)
        created_at TEXT NOT NULL,          -- when it was imported: the cycle's data window looks at this
        sha256 TEXT NOT NULL UNIQUE        -- of `messages`: importing the same chat twice adds nothing
    );
    CREATE INDEX imported_examples_created ON imported_examples(created_at);
    """)


# Migrations run in the order they are defined here (not sorted by name): keep m005 above m006.
@migration
def m006_review_and_forget(conn: sqlite3.Connection) -> None:
    """Admins' verdicts on turns (/review, `ouro review`), and tombstones of people who used /forget."""
    _script(conn, """
    CREATE TABLE reviews (
        turn_id INTEGER PRIMARY KEY REFERENCES turns(id),
        reviewer_id INTEGER,               -- admin's Telegram id (0: `ouro review`); NULL once they /forget
        verdict TEXT NOT NULL CHECK (verdict IN ('approved', 'rejected', 'edited')),
        edited_text TEXT,                  -- the admin's reply, for 'edited'
        created_at TEXT NOT NULL
    );
    CREATE INDEX reviews_created ON reviews(created_at);
    CREATE TABLE awaiting_review_edits (   -- an admin pressed ✏️ Edit: their next message is the new reply
        chat_id INTEGER NOT NULL, reviewer_id INTEGER NOT NULL,
        turn_id INTEGER NOT NULL REFERENCES turns(id),
        created_at TEXT NOT NULL,
        PRIMARY KEY (chat_id, reviewer_id)
    );
    CREATE TABLE tombstones (              -- that a /forget happened; nothing about who or what
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        forgotten_at TEXT NOT NULL,
        counts TEXT NOT NULL               -- JSON: rows deleted per table
    );
    """)


@migration
def m007_turn_speaker(conn: sqlite3.Connection) -> None:
    """The name a group turn is read under (memory/speakers.py), fixed when it is stored. Turns stored
    before keep NULL: they were served without a name, and training must read them as served."""
    _script(conn, """
    ALTER TABLE turns ADD COLUMN speaker TEXT;     -- NULL: a private chat's turn (read as written)
    """)


@migration
def m008_api_keys(conn: sqlite3.Connection) -> None:
    """Keys of the OpenAI-compatible API (api/): only each key's SHA-256 is kept. Every key is a person
    (a users row, id below API_USER_BASE in memory/api_keys.py), so trust, opt-out, /forget and the caps
    treat it as they treat a Telegram user."""
    _script(conn, """
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: the person's id derives from it
        name TEXT NOT NULL,
        key_sha256 TEXT NOT NULL UNIQUE,
        user_id INTEGER NOT NULL UNIQUE,        -- no foreign key: /forget deletes the person, not the key
        created_at TEXT NOT NULL,
        last_used_at TEXT,
        revoked_at TEXT
    );
    CREATE UNIQUE INDEX api_keys_live_name ON api_keys(name) WHERE revoked_at IS NULL;
    """)


@migration
def m009_documents(conn: sqlite3.Connection) -> None:
    """The owner's documents (`ouro import docs`): each file once, cut into redacted chunks that a cycle's
    continued-pretraining pass reads (trainer/pretrain.py). Chunks go in id order; a generation records the
    last chunk id it trained on, so the next cycle reads only the ones after it."""
    _script(conn, """
    CREATE TABLE documents (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        file TEXT NOT NULL,                -- where it was read from
        format TEXT NOT NULL,              -- txt | md | html | pdf
        sha256 TEXT NOT NULL UNIQUE,       -- of the file's bytes: the same file twice adds nothing
        chars INTEGER NOT NULL,            -- characters of text extracted (before redaction)
        created_at TEXT NOT NULL
    );
    CREATE TABLE document_chunks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        document_id INTEGER NOT NULL REFERENCES documents(id),
        position INTEGER NOT NULL,         -- its place in the document
        text TEXT NOT NULL,                -- redacted
        created_at TEXT NOT NULL,
        sha256 TEXT NOT NULL UNIQUE        -- of `text`: a passage two documents share is stored once
    );
    """)


@migration
def m010_rating_reasons(conn: sqlite3.Connection) -> None:
    """Why a reply got its 👎, when the person tapped a reason (memory/feedback.py REASONS): shown in
    /review and kept with the KTO item the 👎 becomes. Ratings stored before keep NULL (no reason)."""
    _script(conn, """
    ALTER TABLE ratings ADD COLUMN reason TEXT;    -- a REASONS key; NULL: none given, or not a 👎
    """)


@migration
def m011_refinements(conn: sqlite3.Connection) -> None:
    """Self-refinement proposals (memory/proposals.py, trainer/refine.py): a generation's critique of a
    reply — a lone 👎'd one, or its own answer to a scenario from the constitution — and the reply it
    should have given. Each waits for an admin (kept, edited or dropped); kept ones become preference
    pairs. A scenario proposal has no turn: its question is `prompt`."""
    _script(conn, """
    CREATE TABLE proposals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('thumbs_down', 'scenario')),
        turn_id INTEGER REFERENCES turns(id),   -- the 👎'd turn; NULL for a scenario
        prompt TEXT,                           -- a scenario's question; NULL for a turn (its context is the turn's)
        served TEXT NOT NULL,                  -- the reply as served (or as the generation answered the scenario)
        critique TEXT NOT NULL,                -- why it falls short of the constitution, in the model's words
        refined TEXT NOT NULL,                 -- the reply it should have given
        reasons TEXT,                          -- JSON list of the 👎 reasons it was written from
        generation_id TEXT,                    -- the generation that wrote it
        status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'kept', 'edited', 'dropped')),
        edited_text TEXT,                      -- the admin's version, for 'edited'
        reviewer_id INTEGER,                   -- who decided (0: the terminal); NULL once they /forget
        auto INTEGER NOT NULL DEFAULT 0,       -- kept without review (refine_admin_skip_review)
        created_at TEXT NOT NULL,
        decided_at TEXT
    );
    CREATE UNIQUE INDEX proposals_turn ON proposals(turn_id) WHERE turn_id IS NOT NULL;
    CREATE INDEX proposals_status ON proposals(status, id);
    CREATE TABLE awaiting_proposal_edits (  -- an admin pressed ✏️ on a proposal: their next message is the reply
        chat_id INTEGER NOT NULL, reviewer_id INTEGER NOT NULL,
        proposal_id INTEGER NOT NULL REFERENCES proposals(id),
        created_at TEXT NOT NULL,
        PRIMARY KEY (chat_id, reviewer_id)
    );
    """)


@migration
def m012_languages(conn: sqlite3.Connection) -> None:
    """The language of each imported window and each live turn (memory/language.py; NULL: stored
    before, or too short to tell), preference pairs an import found (a ChatGPT answer kept over a
    regenerated one), and each import's consent: whose messages became the persona, and whether
    they were the importer's own."""
    _script(conn, """
    ALTER TABLE imported_examples ADD COLUMN language TEXT;   -- ISO 639-1, its conversation's majority language
    ALTER TABLE turns ADD COLUMN language TEXT;               -- of the user's text, else of the chat so far
    ALTER TABLE imports ADD COLUMN consent TEXT;              -- JSON {persona_of, own, consent_of}; NULL: before m012
    CREATE TABLE imported_pairs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        import_id INTEGER NOT NULL REFERENCES imports(id),
        prompt TEXT NOT NULL,              -- JSON [{role, content}] up to the user's message, redacted
        chosen TEXT NOT NULL,              -- the reply kept
        rejected TEXT NOT NULL,            -- a reply the person regenerated away from
        language TEXT,
        ended_at TEXT,                     -- when the chosen reply was written (the export's clock)
        created_at TEXT NOT NULL,          -- when it was imported: the cycle's data window looks at this
        sha256 TEXT NOT NULL UNIQUE        -- of (prompt, chosen, rejected): importing twice adds nothing
    );
    CREATE INDEX imported_pairs_created ON imported_pairs(created_at);
    """)


@migration
def m013_lookup_indexes(conn: sqlite3.Connection) -> None:
    """Indexes for lookups by turn and by person that every review page, the People page and the trust
    tiers make: without them each turn in the review queue scanned every correction (a queue of 90k
    turns took seconds, on the event loop), and each person's counts scanned every turn."""
    _script(conn, """
    CREATE INDEX IF NOT EXISTS corrections_turn ON corrections(turn_id, user_id);
    CREATE INDEX IF NOT EXISTS corrections_user ON corrections(user_id);
    CREATE INDEX IF NOT EXISTS preferences_user ON preferences(user_id);
    CREATE INDEX IF NOT EXISTS preferences_turn ON preferences(turn_id);
    CREATE INDEX IF NOT EXISTS alternatives_turn ON alternatives(turn_id);
    CREATE INDEX IF NOT EXISTS turns_user ON turns(user_id, id);
    CREATE INDEX IF NOT EXISTS turns_generation ON turns(generation_id, id);
    CREATE INDEX IF NOT EXISTS ratings_user ON ratings(user_id);
    """)


def _script(conn: sqlite3.Connection, sql: str) -> None:
    """Run statements one by one: `executescript` would COMMIT the migration's transaction."""
    buffer = ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            conn.execute(buffer)
            buffer = ""
    if buffer.strip():
        conn.execute(buffer)


def applied(conn: sqlite3.Connection) -> list[str]:
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    return [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]


def pending(conn: sqlite3.Connection) -> list[str]:
    done = set(applied(conn))
    return [name for name, _ in MIGRATIONS if name not in done]


def migrate(conn: sqlite3.Connection, *, stop_before: str | None = None) -> list[str]:
    """Apply every pending migration in order (each in its own transaction); return their names."""
    done = set(applied(conn))
    ran = []
    for name, fn in MIGRATIONS:
        if name == stop_before:
            break
        if name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        # another process opening the store at the same moment (`ouro serve` and `ouro web` started
        # together) may have applied it between our read of the list and our write lock
        if conn.execute("SELECT 1 FROM _migrations WHERE name = ?", (name,)).fetchone():
            conn.execute("ROLLBACK")
            continue
        try:
            fn(conn)
            conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (name, now()))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        ran.append(name)
    return ran
