"""The owner's documents: each file once, and the redacted chunks a cycle's continued pretraining reads.

The importer (memory/importers/docs.py) reads, extracts and redacts; this records the result in one
transaction, so a folder lands whole or not at all, and a document or a chunk already stored (same
SHA-256) is skipped and counted: importing the same file twice stores nothing new.
"""

from __future__ import annotations

from core.files import now
from memory.audit import AuditMixin


class DocumentsMixin(AuditMixin):
    """documents and document_chunks rows."""

    def add_documents(self, documents: list[dict]) -> dict:
        """Store `documents` ({file, format, sha256, chars, chunks: [{text, sha256}]}) in one transaction.

        Returns {"new_documents", "known_documents", "new_chunks", "already_present"} and, per document in
        the order given, its new chunk count under "per_document"."""
        ts = now()
        out = {"new_documents": 0, "known_documents": 0, "new_chunks": 0, "already_present": 0, "per_document": []}
        with self.database.transaction() as conn:
            for doc in documents:
                row = conn.execute("INSERT INTO documents (file, format, sha256, chars, created_at) "
                                   "VALUES (?, ?, ?, ?, ?) ON CONFLICT(sha256) DO NOTHING",
                                   (doc["file"], doc["format"], doc["sha256"], doc["chars"], ts))
                if not row.rowcount:   # this very file was imported before
                    out["known_documents"] += 1
                    out["already_present"] += len(doc["chunks"])
                    out["per_document"].append(0)
                    continue
                out["new_documents"] += 1
                new = 0
                for position, chunk in enumerate(doc["chunks"]):
                    new += conn.execute(
                        "INSERT INTO document_chunks (document_id, position, text, created_at, sha256) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT(sha256) DO NOTHING",
                        (row.lastrowid, position, chunk["text"], ts, chunk["sha256"])).rowcount
                out["new_chunks"] += new
                out["already_present"] += len(doc["chunks"]) - new
                out["per_document"].append(new)
            if out["new_chunks"]:
                self.log_event("import", detail={"kind": "docs", "new_documents": out["new_documents"],
                                                 "new_chunks": out["new_chunks"]})
        return out

    def document_chunks(self, *, after_id: int = 0, max_chars: int | None = None) -> list[dict]:
        """Chunks stored after chunk `after_id`, oldest first ({id, text}); with `max_chars`, only as many
        as reach that many characters (the trainer's token budget, roughly: one pass never needs more)."""
        out, total = [], 0
        with self.database.lock:
            cur = self.database.conn.execute("SELECT id, text FROM document_chunks WHERE id > ? ORDER BY id",
                                             (after_id,))
            for chunk_id, text in cur:
                if max_chars is not None and total >= max_chars:
                    break
                out.append({"id": chunk_id, "text": text})
                total += len(text)
        return out

    def document_stats(self, *, after_id: int = 0) -> dict:
        row = self.database.one("SELECT COUNT(*) AS chunks, COALESCE(SUM(LENGTH(text)), 0) AS chars "
                                "FROM document_chunks WHERE id > ?", (after_id,))
        return {"chunks": row["chunks"], "chars": row["chars"]}
