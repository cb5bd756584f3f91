"""The store: every read and write of conversations, feedback, lineage and audit events.

Nothing else in the project writes SQL for these tables. `Store` only opens and closes the
database; each kind of record has its own module and mixin (memory/sessions.py, turns.py,
feedback.py, review_queue.py, proposals.py, privacy.py, audit.py, history_imports.py, documents.py, stats.py,
api_keys.py), and the
records they return are importable from here as before.
"""

from __future__ import annotations

from pathlib import Path

from memory.api_keys import ApiKeysMixin
from memory.audit import AuditMixin
from memory.db import Database
from memory.documents import DocumentsMixin
from memory.feedback import FeedbackMixin
from memory.history_imports import HistoryImportsMixin
from memory.migrations import migrate
from memory.privacy import PrivacyMixin
from memory.proposals import ProposalsMixin
from memory.review_queue import ReviewItem, ReviewQueueMixin
from memory.sessions import SessionsMixin
from memory.stats import StatsMixin
from memory.turns import Exchange, TurnRef, TurnsMixin

__all__ = ["Exchange", "ReviewItem", "Store", "TurnRef"]


class Store(ReviewQueueMixin, TurnsMixin, SessionsMixin, FeedbackMixin, PrivacyMixin,
            HistoryImportsMixin, DocumentsMixin, AuditMixin, StatsMixin, ApiKeysMixin, ProposalsMixin):
    def __init__(self, database: Database) -> None:
        self.database = database

    @classmethod
    def open(cls, path: Path | str) -> Store:
        database = Database(path)
        with database.lock:
            migrate(database.conn)
        return cls(database)

    def close(self) -> None:
        self.database.close()
