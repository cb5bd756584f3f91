"""Moving the active pointer: promote and rollback are one rule, recorded with who, when and why.

Every caller (the cycle's gate, the bot's admin commands, the live watch, the CLI, the start-up
fallback) goes through `promote`; `rollback` only chooses the target (the active generation's
parent unless one is named) and then promotes it with the event "rollback". Nothing is deleted.
"""

from __future__ import annotations

from config.settings import Settings
from core.errors import OuroError
from core.files import sha256_file
from lineage.generations import Generation, Lineage
from memory.store import Store

# the ledger events `promote` writes (its callers name them): each made a generation the active one
POINTER_EVENTS = ("base", "promote", "rollback", "auto_rollback", "fallback", "swap_failed")


def promote(settings: Settings, store: Store, gen_id: str, *, actor: str, why: str, event: str = "promote",
            expect: str | None = None) -> bool:
    """Move the active pointer (atomically) and record who, when and why; True when it moved.

    `expect`: move it only if it still names that generation, else change nothing and answer False
    — for a decision taken on what it named earlier (a cycle promoting the child of the generation
    it trained, hours later; a failed hot-swap moving back), so that it cannot undo a rollback or a
    promotion made meanwhile. The check and the move happen under the lineage's pointer lock."""
    lineage = Lineage(settings.models_dir)
    gen = lineage.generation(gen_id)
    _refuse_pruned(gen, settings)
    try:
        sha = sha256_file(gen.gguf)
    except OSError as exc:   # gone or unreadable: the same refusal, one error type for every caller
        raise OuroError(f"{gen_id}'s GGUF cannot be read ({exc.strerror or exc}); refusing to serve it") from exc
    if sha != gen.sha256:
        raise OuroError(f"{gen_id}'s GGUF does not match its recorded SHA-256; refusing to serve it")
    with lineage.pointer_lock():
        _refuse_pruned(gen, settings)   # again: pruning holds this lock, and may have run since the hash
        previous_id = lineage.active_id()
        if expect is not None and previous_id != expect:
            return False
        try:
            previous_sha = lineage.active().sha256
        except (OuroError, KeyError):   # the pointer names something unreadable: moving it off is the point
            previous_sha = ""
        lineage.set_active(gen_id)
        lineage.append_ledger({"gen_folder": gen_id, "parent_sha": previous_sha, "child_sha": gen.sha256,
                               "event": event, "parent_id": previous_id or "", "gate": gen.meta.get("status", ""),
                               "reason": why, "actor": actor,
                               "constitution_sha": gen.meta.get("constitution_sha256", "")})
    store.upsert_generation(gen_id=gen_id, parent_id=gen.parent_id, gguf_path=str(gen.gguf), gguf_sha256=gen.sha256,
                            status="promoted" if event == "promote" else "rolled_back_to", meta=gen.meta)
    store.log_event(event, detail={"gen": gen_id, "from": previous_id, "actor": actor, "why": why})
    return True


def rollback(settings: Settings, store: Store, gen_id: str | None, *, actor: str, why: str | None = None,
             event: str = "rollback") -> tuple[str, str]:
    """Serve `gen_id`, or the active generation's parent; returns (from, to). Deletes nothing.
    Refused if the pointer moves between choosing the target and moving it."""
    active = Lineage(settings.models_dir).active()
    target = gen_id or active.parent_id
    if target is None:
        raise OuroError(f"{active.id} has no parent to roll back to")
    if not promote(settings, store, target, actor=actor, why=why or f"rollback from {active.id}", event=event,
                   expect=active.id):
        now_id = Lineage(settings.models_dir).active_id()
        raise OuroError(f"the active generation changed from {active.id} to {now_id} while rolling back; "
                        "nothing was moved", hint="look at /lineage and try again")
    return active.id, target


def _refuse_pruned(gen: Generation, settings: Settings) -> None:
    note = gen.pruned
    if note is not None:
        raise OuroError(f"{gen.id}'s GGUF was deleted on {note.get('pruned_at', '?')} to bound disk use "
                        f"({note.get('reason', 'pruned')}); it cannot be served again",
                        hint=f"keep_gguf (now {settings.keep_gguf}) sets how many served generations keep theirs; "
                             "its data and evals are still in its folder")
