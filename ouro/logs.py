"""Logging set-up with one rule: the bot token never reaches a log line."""

from __future__ import annotations

import logging
import os
import re
from logging.handlers import RotatingFileHandler
from pathlib import Path

_TOKEN_RE = re.compile(r"\b\d{6,12}:[A-Za-z0-9_-]{30,}\b")


class RedactSecrets(logging.Filter):
    """Masks the configured token and anything shaped like a bot token, wherever it appears."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def _clean(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<token>")
        return _TOKEN_RE.sub("<token>", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self._clean(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = self._clean(logging.Formatter().formatException(record.exc_info))
        return True


LOG_FILE_MAX_BYTES = 10 * 2**20   # `--log-file`: rotated at 10 MiB, 5 old files kept (60 MiB at most)
LOG_FILE_BACKUPS = 5


class _PrivateRotatingFileHandler(RotatingFileHandler):
    """Log lines can quote users (and tracebacks), so the file and its rotations are owner-only."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def setup_logging(level: str = "INFO", *, log_file: Path | None = None) -> None:
    """Log to stderr; with `log_file`, also to that file, rotated by size (it never grows past
    LOG_FILE_MAX_BYTES x (1 + LOG_FILE_BACKUPS))."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(_PrivateRotatingFileHandler(log_file, maxBytes=LOG_FILE_MAX_BYTES,
                                                    backupCount=LOG_FILE_BACKUPS, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        handler.addFilter(RedactSecrets([os.environ.get("TELEGRAM_BOT_TOKEN", "")]))
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    # httpx logs every request URL, and Bot API URLs contain the token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
