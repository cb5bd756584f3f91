"""Imported chat histories: each import and the training windows cut from it.

The importers (memory/importers/) parse an export; this records the result in one transaction,
skipping windows already stored, and logs the import as an audit event.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from core.files import now
from memory.audit import AuditMixin


class HistoryImportsMixin(AuditMixin):
    """Imports and imported_examples rows."""

    def add_import(self, *, kind: str, file: str, file_sha256: str, owner: str, summary: dict,
                   examples: list[dict], pairs: Sequence[dict] = (), consent: dict | None = None) -> dict:
        """Record one import and its windows in a single transaction: all of it lands, or none of it.

        `examples` are {"messages", "split", "ended_at", "sha256", "language"}; `pairs` {"prompt",
        "chosen", "rejected", "ended_at", "sha256", "language"}; one already stored (same sha256, e.g.
        the same export imported again) is skipped and counted. `consent`: whose messages became the
        persona and on whose say (memory/importers/pipeline.py). Returns `summary` completed with
        import_id, new_examples, already_present and new_pairs.
        """
        ts = now()
        with self.database.transaction() as conn:
            import_id = conn.execute(
                "INSERT INTO imports (kind, file, file_sha256, owner, created_at, summary, consent) "
                "VALUES (?, ?, ?, ?, ?, '{}', ?)",
                (kind, file, file_sha256, owner, ts,
                 json.dumps(consent, ensure_ascii=False) if consent is not None else None)).lastrowid
            new = 0
            for ex in examples:
                new += conn.execute(
                    "INSERT INTO imported_examples (import_id, messages, split, ended_at, created_at, sha256, language) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sha256) DO NOTHING",
                    (import_id, json.dumps(ex["messages"], ensure_ascii=False), ex["split"], ex.get("ended_at"),
                     ts, ex["sha256"], ex.get("language"))).rowcount
            new_pairs = 0
            for pair in pairs:
                new_pairs += conn.execute(
                    "INSERT INTO imported_pairs (import_id, prompt, chosen, rejected, language, ended_at, created_at, "
                    "sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sha256) DO NOTHING",
                    (import_id, json.dumps(pair["prompt"], ensure_ascii=False), pair["chosen"], pair["rejected"],
                     pair.get("language"), pair.get("ended_at"), ts, pair["sha256"])).rowcount
            summary = {**summary, "import_id": import_id, "new_examples": new,
                       "already_present": len(examples) - new, "new_pairs": new_pairs}
            conn.execute("UPDATE imports SET summary = ? WHERE id = ?",
                         (json.dumps(summary, ensure_ascii=False), import_id))
            self.log_event("import", detail={"import_id": import_id, "kind": kind, "new_examples": new})
        return summary

    def imported_examples(self, *, since: str | None, until: str | None) -> list[dict]:
        """Imported windows stored in (since, until], oldest first: {messages, split, created_at, ended_at}."""
        rows = self.database.query(
            "SELECT messages, split, created_at, ended_at FROM imported_examples "
            "WHERE (? IS NULL OR created_at > ?) AND (? IS NULL OR created_at <= ?) ORDER BY created_at, id",
            (since, since, until, until))
        return [{**r, "messages": json.loads(r["messages"])} for r in rows]

    def imported_pairs(self, *, since: str | None, until: str | None) -> list[dict]:
        """Preference pairs imported in (since, until], oldest first: {prompt, chosen, rejected, created_at}."""
        rows = self.database.query(
            "SELECT prompt, chosen, rejected, created_at FROM imported_pairs "
            "WHERE (? IS NULL OR created_at > ?) AND (? IS NULL OR created_at <= ?) ORDER BY created_at, id",
            (since, since, until, until))
        return [{**r, "prompt": json.loads(r["prompt"])} for r in rows]

    def history_languages(self) -> dict[str, int]:
        """{language (or "unknown"): imported windows and live turns stored in it}: what the evals and the
        redaction must cover (memory/language.py)."""
        rows = self.database.query(
            "SELECT COALESCE(language, 'unknown') AS language, COUNT(*) AS n FROM ("
            "SELECT language FROM imported_examples UNION ALL SELECT language FROM turns) GROUP BY 1")
        return {r["language"]: r["n"] for r in rows}

    def imports(self) -> list[dict]:
        rows = self.database.query("SELECT * FROM imports ORDER BY id")
        return [{**r, "summary": json.loads(r["summary"]), "consent": json.loads(r["consent"] or "null")}
                for r in rows]
