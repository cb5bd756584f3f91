"""Who may use the owner's web page: one-time login links, signed session cookies, CSRF tokens.

`ouro web-login` (run by whoever can read the data folder, i.e. the owner) writes a one-time login
token: a random 256-bit secret whose SHA-256 names a file under `<data_dir>/web/logins/`, holding the
admin id it logs in and when it expires (15 minutes). Opening the link deletes that file (so a link
works once, across restarts too) and sets a session cookie: `<admin>.<expires>.<nonce>.<HMAC>`,
signed with `<data_dir>/web/secret` (created once, owner-only). The cookie is HttpOnly and
SameSite=Strict and lasts 12 hours; every POST form carries a CSRF token, an HMAC of the session,
which is checked. A session is honoured only while its id is still an admin (settings.admin_ids), or
0, the owner at the machine (as `ouro review` signs its verdicts). Deleting the secret file logs
every session out. No token or cookie is ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass

from config.settings import Settings
from core.files import atomic_write_text, ensure_private_dir

COOKIE = "ouro_session"
SESSION_S = 12 * 3600
LOGIN_S = 15 * 60
OWNER_ID = 0            # the owner at the machine (`ouro web-login` without an admin id), as in `ouro review`
TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
SESSION = re.compile(r"(-?[0-9]{1,20})\.([0-9]{1,12})\.([A-Za-z0-9_-]{16})\.([0-9a-f]{64})")


@dataclass(frozen=True)
class Session:
    admin_id: int
    expires: int
    cookie: str


class WebAuth:
    """Login tokens, sessions and CSRF tokens of one data folder."""

    def __init__(self, settings: Settings, *, clock=time.time) -> None:
        self.settings = settings
        self.dir = settings.data_dir / "web"
        self.clock = clock
        self._secret: bytes | None = None

    # --- the secret -----------------------------------------------------------------------
    def secret(self) -> bytes:
        """The signing key, made once (owner-only; O_EXCL so two processes never make two)."""
        if self._secret is None:
            ensure_private_dir(self.dir)
            path = self.dir / "secret"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
                    f.flush()
                    os.fsync(f.fileno())
            value = path.read_text(encoding="utf-8").strip()
            if len(value) < 64:   # a half-written or emptied file: start over (every session ends)
                value = secrets.token_hex(32)
                atomic_write_text(path, value, mode=0o600)
            self._secret = bytes.fromhex(value)
        return self._secret

    def _sign(self, text: str) -> str:
        return hmac.new(self.secret(), text.encode(), hashlib.sha256).hexdigest()

    # --- login links -------------------------------------------------------------------------
    def may_log_in(self, admin_id: int) -> bool:
        return admin_id == OWNER_ID or self.settings.is_admin(admin_id)

    def create_login(self, admin_id: int) -> str:
        """A one-time login token for `admin_id` (returned here only; the file holds its SHA-256)."""
        if not self.may_log_in(admin_id):
            raise ValueError(f"{admin_id} is not an admin")
        token = secrets.token_urlsafe(32)
        logins = self.dir / "logins"
        ensure_private_dir(logins)
        record = {"admin_id": admin_id, "expires": int(self.clock()) + LOGIN_S}
        atomic_write_text(logins / hashlib.sha256(token.encode()).hexdigest(), json.dumps(record), mode=0o600)
        return token

    def use_login(self, token: str | None) -> Session | None:
        """Spend a login token: the new session, or None (unknown, used, expired, or no longer an admin)."""
        if not token or not TOKEN.fullmatch(token):
            return None
        path = self.dir / "logins" / hashlib.sha256(token.encode()).hexdigest()
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            os.remove(path)   # whoever removes it first logs in; a second use finds nothing
        except (OSError, ValueError):
            return None
        self._drop_expired_logins()
        admin_id, expires = record.get("admin_id"), record.get("expires")
        if not isinstance(admin_id, int) or not isinstance(expires, int) or expires < self.clock():
            return None
        if not self.may_log_in(admin_id):
            return None
        return self.new_session(admin_id)

    def _drop_expired_logins(self) -> None:
        for path in (self.dir / "logins").glob("*"):
            try:
                if json.loads(path.read_text(encoding="utf-8")).get("expires", 0) < self.clock():
                    path.unlink()
            except (OSError, ValueError, AttributeError):
                continue

    # --- sessions ------------------------------------------------------------------------------
    def new_session(self, admin_id: int) -> Session:
        expires = int(self.clock()) + SESSION_S
        payload = f"{admin_id}.{expires}.{secrets.token_urlsafe(12)}"
        return Session(admin_id, expires, f"{payload}.{self._sign(payload)}")

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie carries, when its signature holds, it has not expired and its id is an admin."""
        match = SESSION.fullmatch(cookie or "")
        if match is None:
            return None
        payload = cookie.rsplit(".", 1)[0]
        if not hmac.compare_digest(self._sign(payload), match.group(4)):
            return None
        admin_id, expires = int(match.group(1)), int(match.group(2))
        if expires < self.clock() or not self.may_log_in(admin_id):
            return None
        return Session(admin_id, expires, cookie)

    def csrf(self, session: Session) -> str:
        """The token every POST form of this session must carry."""
        return self._sign("csrf|" + session.cookie)

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(session).encode(), token.encode())   # str: ASCII only
