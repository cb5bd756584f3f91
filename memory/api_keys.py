"""API keys: who may use the OpenAI-compatible API (api/), each key a person of its own.

Only a key's SHA-256 is stored; the key itself is printed once when it is made. Each key gets a
user id below `API_USER_BASE` (-2**53): Telegram says user and chat ids have at most 52
significant bits, so these can never collide with a Telegram user, group or channel, nor with the
terminal's ids (0 and -1). The key's private chat has the same id, as a Telegram user's has.
"""

from __future__ import annotations

import re

from core.errors import OuroError
from core.files import now
from memory.db import Database

API_USER_BASE = -(2**53)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_api_user(user_or_chat_id: int) -> bool:
    """Whether this id is an API key's person (or its chat), not a Telegram or terminal one."""
    return user_or_chat_id <= API_USER_BASE


class ApiKeysMixin:
    """The api_keys rows."""

    database: Database

    def add_api_key(self, name: str, key_sha256: str) -> int:
        """Record a new key under `name` (unique among live keys); returns the id of its person."""
        if not NAME.fullmatch(name):
            raise OuroError(f"bad key name {name!r}", hint="1-64 characters of A-Z a-z 0-9 _ . - (a letter or digit first)")
        ts = now()
        with self.database.transaction() as conn:
            if conn.execute("SELECT 1 FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone():
                raise OuroError(f"an API key named {name!r} already exists",
                                hint=f"ouro api-key revoke {name} first, or pick another name")
            key_id = conn.execute("INSERT INTO api_keys (name, key_sha256, user_id, created_at) VALUES (?, ?, 0, ?)",
                                  (name, key_sha256, ts)).lastrowid
            user_id = API_USER_BASE - key_id
            conn.execute("UPDATE api_keys SET user_id = ? WHERE id = ?", (user_id, key_id))
            conn.execute("INSERT INTO users (id, username, first_name, created_at, last_seen) VALUES (?, NULL, ?, ?, ?) "
                         "ON CONFLICT(id) DO NOTHING", (user_id, name, ts, ts))
            return user_id

    def api_key_user(self, key_sha256: str) -> tuple[str, int] | None:
        """(name, person's id) of the live key with this SHA-256; None for an unknown or revoked key."""
        row = self.database.one("SELECT name, user_id FROM api_keys WHERE key_sha256 = ? AND revoked_at IS NULL",
                                (key_sha256,))
        if row is None:
            return None
        with self.database.transaction() as conn:
            conn.execute("UPDATE api_keys SET last_used_at = ? WHERE key_sha256 = ?", (now(), key_sha256))
        return row["name"], row["user_id"]

    def api_keys(self, *, revoked: bool = False) -> list[dict]:
        """Keys (never their secret), oldest first; revoked ones only when asked for."""
        return self.database.query("SELECT name, user_id, created_at, last_used_at, revoked_at FROM api_keys "
                                   "WHERE ? OR revoked_at IS NULL ORDER BY id", (int(revoked),))

    def revoke_api_key(self, name: str) -> int | None:
        """Revoke the live key named `name`; returns its person's id, None when there is none."""
        with self.database.transaction() as conn:
            row = conn.execute("SELECT user_id FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (now(), name))
            return row[0]
