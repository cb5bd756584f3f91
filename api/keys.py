"""Making and checking API keys: `ouro-` and 43 URL-safe characters (256 random bits); only the
key's SHA-256 is stored (memory/api_keys.py), so the database never holds a usable key."""

from __future__ import annotations

import hashlib
import secrets

from memory.store import Store

PREFIX = "ouro-"


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(store: Store, name: str) -> tuple[str, int]:
    """A new key named `name` and the id of the person it is; the key is returned here and never again."""
    key = PREFIX + secrets.token_urlsafe(32)
    return key, store.add_api_key(name, key_sha256(key))


def key_owner(store: Store, authorization: str | None) -> tuple[str, int] | None:
    """(key name, person's id) for an `Authorization: Bearer KEY` header; None when it names no live key."""
    scheme, _, key = (authorization or "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key.startswith(PREFIX) or len(key) > 200:
        return None
    return store.api_key_user(key_sha256(key))
