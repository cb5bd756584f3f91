"""Moving the active pointer: promote and rollback are one rule, recorded with who, when and why.

Every caller (the cycle's gate, the bot's admin commands, the live watch, the CLI, the start-up
fallback) goes through `promote`; `rollback` only chooses the target (the active generation's
parent unless one is named) and then promotes it with the event "rollback". Nothing is deleted.
"""

from __future__ import annotations

from config.settings import Settings
from core.errors import OuroError
from core.files import sha256_file
from lineage.generations import Lineage
from memory.store import Store


def promote(settings: Settings, store: Store, gen_id: str, *, actor: str, why: str, event: str = "promote") -> None:
    """Move the active pointer (atomically) and record who, when and why."""
    lineage = Lineage(settings.models_dir)
    previous_id = lineage.active_id()
    try:
        previous_sha = lineage.active().sha256
    except (OuroError, KeyError):   # the pointer names something unreadable: moving it off is the point
        previous_sha = ""
    gen = lineage.generation(gen_id)
    if sha256_file(gen.gguf) != gen.sha256:
        raise OuroError(f"{gen_id}'s GGUF does not match its recorded SHA-256; refusing to serve it")
    lineage.set_active(gen_id)
    lineage.append_ledger({"gen_folder": gen_id, "parent_sha": previous_sha, "child_sha": gen.sha256,
                           "event": event, "parent_id": previous_id or "", "gate": gen.meta.get("status", ""),
                           "reason": why, "actor": actor, "constitution_sha": gen.meta.get("constitution_sha256", "")})
    store.upsert_generation(gen_id=gen_id, parent_id=gen.parent_id, gguf_path=str(gen.gguf), gguf_sha256=gen.sha256,
                            status="promoted" if event == "promote" else "rolled_back_to", meta=gen.meta)
    store.log_event(event, detail={"gen": gen_id, "from": previous_id, "actor": actor, "why": why})


def rollback(settings: Settings, store: Store, gen_id: str | None, *, actor: str, why: str | None = None,
             event: str = "rollback") -> tuple[str, str]:
    """Serve `gen_id`, or the active generation's parent; returns (from, to). Deletes nothing."""
    active = Lineage(settings.models_dir).active()
    target = gen_id or active.parent_id
    if target is None:
        raise OuroError(f"{active.id} has no parent to roll back to")
    promote(settings, store, target, actor=actor, why=why or f"rollback from {active.id}", event=event)
    return active.id, target
