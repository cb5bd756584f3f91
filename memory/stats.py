"""Figures across the whole store: counts of chats, turns and feedback, and recent speed.

The status report (serving/status.py) shows them; nothing else counts rows itself.
"""

from __future__ import annotations

from memory.db import Database


class StatsMixin:
    """Counts and throughput read from every table."""

    database: Database

    def stats(self) -> dict:
        q = self.database.scalar
        recent = self.database.query(
            "SELECT completion_tokens, latency_s, ttft_s FROM turns WHERE status = 'answered' "
            "AND completion_tokens > 0 AND latency_s > 0 ORDER BY id DESC LIMIT 20")
        gen_time = sum(max(r["latency_s"] - (r["ttft_s"] or 0.0), 1e-6) for r in recent)
        return {
            "chats": q("SELECT COUNT(*) FROM chats"),
            "users": q("SELECT COUNT(*) FROM users"),
            "turns": q("SELECT COUNT(*) FROM turns"),
            "turns_answered": q("SELECT COUNT(*) FROM turns WHERE status = 'answered'"),
            "turns_pending": q("SELECT COUNT(*) FROM turns WHERE status = 'pending'"),
            "ratings_up": q("SELECT COUNT(*) FROM ratings WHERE value = 1"),
            "ratings_down": q("SELECT COUNT(*) FROM ratings WHERE value = -1"),
            "preferences": q("SELECT COUNT(*) FROM preferences"),
            "corrections": q("SELECT COUNT(*) FROM corrections"),
            "recent_tokens_per_s": round(sum(r["completion_tokens"] for r in recent) / gen_time, 1) if recent else None,
        }
