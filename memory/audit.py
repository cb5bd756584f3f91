"""Generations and the audit log: the models the store knows of, and the events worth keeping.

Cycles, hot swaps, imports, refusals and review verdicts are logged as events, so what happened
can be told later; a generation's ratings feed the live watch's verdict against its parent.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from core.files import now
from memory.db import Database


class AuditMixin:
    """Generations and events rows, and the ratings of one generation's replies."""

    database: Database

    def upsert_generation(self, *, gen_id: str, parent_id: str | None, gguf_path: str, gguf_sha256: str,
                          status: str, meta: dict | None = None) -> None:
        with self.database.transaction() as conn:
            conn.execute(
                "INSERT INTO generations (id, parent_id, gguf_path, gguf_sha256, status, created_at, meta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET status = excluded.status, "
                "meta = excluded.meta", (gen_id, parent_id, gguf_path, gguf_sha256, status, now(),
                                         json.dumps(meta or {})))

    def retire_generations(self, *, moved_to: str) -> list[str]:
        """Remove every generations row, keeping them whole in one audit event: a new lineage (`ouro base
        scratch --replace-lineage`) starts at gen-0000 again, and its folder went to `moved_to`."""
        with self.database.transaction() as conn:
            rows = self.database.query("SELECT * FROM generations ORDER BY id")
            conn.execute("DELETE FROM generations")
            conn.execute("INSERT INTO events (at, kind, user_id, chat_id, detail) VALUES (?, ?, NULL, NULL, ?)",
                         (now(), "lineage_replaced", json.dumps({"moved_to": moved_to, "generations": rows})))
        return [r["id"] for r in rows]

    def generation(self, gen_id: str) -> dict | None:
        return self.database.one("SELECT * FROM generations WHERE id = ?", (gen_id,))

    def log_event(self, kind: str, *, user_id: int | None = None, chat_id: int | None = None,
                  detail: str | dict | None = None) -> None:
        if isinstance(detail, dict):
            detail = json.dumps(detail, ensure_ascii=False)
        with self.database.transaction() as conn:
            conn.execute("INSERT INTO events (at, kind, user_id, chat_id, detail) VALUES (?, ?, ?, ?, ?)",
                         (now(), kind, user_id, chat_id, detail))

    def events(self, kind: str | None = None, limit: int = 50) -> list[dict]:
        return self.database.query(
            "SELECT * FROM events WHERE (? IS NULL OR kind = ?) ORDER BY id DESC LIMIT ?", (kind, kind, limit))

    def generation_ratings(self, gen_id: str, *, limit: int, newest: bool = False,
                           source_of: Callable[[int | None], str | None] | None = None,
                           per_source: int | None = None) -> list[int]:
        """Ratings (+1/−1) of the replies `gen_id` wrote, one per turn, in the order they were first given.

        `newest` takes the latest `limit` instead of the first. A turn rated by several people
        (groups) counts by the sign of its ratings' sum; a tie counts as neither.
        `source_of` names the source a rater counts as (memory/trust.py `sources`; None: not capped,
        an admin or trusted person) and `per_source` is the most turns one source may decide: a
        turn whose raters' sources have all used theirs is passed over, so one stranger's run of 👎
        (or 👍) cannot fill the live watch's sample alone.
        """
        order = "DESC" if newest else "ASC"
        capped = source_of is not None and per_source is not None
        values: list[int] = []
        taken: Counter[str] = Counter()
        page, offset = (256 if capped else limit), 0
        while len(values) < limit:
            rows = self.database.query(
                "SELECT SUM(r.value) AS v, MIN(r.created_at) AS first_at, GROUP_CONCAT(r.user_id) AS raters "
                "FROM ratings r JOIN turns t ON t.id = r.turn_id "
                f"WHERE t.generation_id = ? GROUP BY r.turn_id HAVING v != 0 ORDER BY first_at {order}, "
                f"r.turn_id {order} LIMIT ? OFFSET ?", (gen_id, page, offset))
            for r in rows:
                if capped:   # a turn whose raters' sources have all had their say is passed over
                    names = {source_of(int(u) if u else None) for u in (r["raters"] or "").split(",")}
                    if None not in names and all(taken[n] >= per_source for n in names):
                        continue
                    taken.update(n for n in names if n is not None)
                values.append(1 if r["v"] > 0 else -1)
                if len(values) == limit:
                    break
            if len(rows) < page:
                break
            offset += page
        return values[::-1] if newest else values

    def rater_first_seen(self, gen_ids: tuple[str, ...]) -> dict[int, str]:
        """When each person who rated these generations' replies was first seen (for trust.sources)."""
        rows = self.database.query(
            "SELECT id, created_at FROM users WHERE id IN (SELECT r.user_id FROM ratings r JOIN turns t "
            "ON t.id = r.turn_id WHERE t.generation_id IN (SELECT value FROM json_each(?)))", (json.dumps(gen_ids),))
        return {r["id"]: r["created_at"] for r in rows}

    def ratings_by_generation(self) -> dict[str, dict[str, int]]:
        """Per generation that served turns: {"answered": n, "up": n, "down": n} — its answered turns and
        how many of them people rated 👍 and 👎 (as generation_ratings counts: a turn by the sign of its
        ratings' sum, a tie neither). The web page's "👎 share in live use" chart."""
        rows = self.database.query(
            "SELECT t.generation_id AS gen, COUNT(*) AS answered, SUM(CASE WHEN s.v > 0 THEN 1 ELSE 0 END) AS up, "
            "SUM(CASE WHEN s.v < 0 THEN 1 ELSE 0 END) AS down FROM turns t "
            "LEFT JOIN (SELECT turn_id, SUM(value) AS v FROM ratings GROUP BY turn_id) s ON s.turn_id = t.id "
            "WHERE t.status = 'answered' AND t.generation_id IS NOT NULL GROUP BY t.generation_id")
        return {r["gen"]: {"answered": r["answered"], "up": r["up"] or 0, "down": r["down"] or 0} for r in rows}

    def last_event(self, kinds: tuple[str, ...]) -> dict | None:
        marks = ",".join("?" * len(kinds))
        return self.database.one(f"SELECT * FROM events WHERE kind IN ({marks}) ORDER BY id DESC LIMIT 1", kinds)
