"""Starting on a generation that can really be served, even when the active one is damaged.

`open_runtime` serves the generation `models/ACTIVE` names. When that generation's GGUF is
missing, does not match the SHA-256 recorded for it, or fails the structural check
(`engine.gguf.check_gguf`: magic, metadata, every tensor inside the file) — or the pointer
names no readable generation at all — the file is never handed to llama.cpp. Instead the start
walks back to the newest generation that passes both checks: the active one's parent chain first,
then the other promoted generations (newest first), then gen-0000. The pointer moves there with
`promote(..., event="fallback")`, so the ledger and the audit log say when and why, and the
returned notices tell the admins once the bot is up (`build_application(notices=...)`).
If nothing passes, the start fails with every generation's reason.

At runtime the same protection sits in the hot-swap (serving/hotswap.py): a generation that fails its
checks never replaces the one serving.
"""

from __future__ import annotations

import logging

from config.settings import Settings
from core.errors import OuroError
from core.files import sha256_file
from engine.gguf import check_gguf
from lineage.generations import GEN_ZERO, Generation, Lineage
from lineage.promote import promote
from memory.store import Store

log = logging.getLogger(__name__)


def gguf_problem(gen: Generation) -> str | None:
    """Why this generation's GGUF must not be served, or None when it passes both checks."""
    if not gen.gguf.is_file():
        return f"its GGUF {gen.gguf.name} is missing"
    try:
        if sha256_file(gen.gguf) != gen.sha256:
            return "its GGUF does not match the SHA-256 recorded for it"
        check_gguf(gen.gguf)
    except (OSError, KeyError) as exc:
        return f"its GGUF cannot be read ({exc})"
    except OuroError as exc:
        return f"its GGUF is broken ({exc})"
    return None


def readable_generations(lineage: Lineage) -> dict[str, Generation]:
    """Every generation folder whose meta.json can be read (a damaged one is skipped, not fatal)."""
    found = {}
    for folder in sorted(lineage.dir.glob("gen-*")):
        if folder.is_dir() and (folder / "meta.json").exists():
            try:
                found[folder.name] = lineage.generation(folder.name)
            except OuroError:
                log.warning("skipping %s: its meta.json is unreadable", folder.name)
    return found


def fallback_order(gens: dict[str, Generation], active_id: str | None) -> list[str]:
    """Where to look when `active_id` cannot be served: its parent chain, the other promoted
    generations (newest first), then gen-0000."""
    order: list[str] = []
    gen = gens.get(active_id or "")
    while gen is not None and gen.parent_id and gen.parent_id not in order:
        order.append(gen.parent_id)
        gen = gens.get(gen.parent_id)
    order += [gid for gid in sorted(gens, reverse=True) if gens[gid].meta.get("status") == "promoted"
              and gid not in order]
    order.append(GEN_ZERO)
    unique: list[str] = []
    for gid in order:
        if gid in gens and gid != active_id and gid not in unique:
            unique.append(gid)
    return unique


def servable_generation(settings: Settings, store: Store, lineage: Lineage) -> tuple[Generation, list[str]]:
    """The generation to serve and the notices for the admins (empty when the active one is fine)."""
    gens = readable_generations(lineage)
    active_id = lineage.active_id()
    active = gens.get(active_id or "")
    why = gguf_problem(active) if active is not None else "the pointer names no readable generation"
    if why is None:
        return active, []
    log.error("refusing to serve %s: %s", active_id, why)
    tried = [f"{active_id}: {why}"]
    for gid in fallback_order(gens, active_id):
        problem = gguf_problem(gens[gid])
        if problem is not None:
            tried.append(f"{gid}: {problem}")
            continue
        reason = f"{active_id} cannot be served: {why}"
        promote(settings, store, gid, actor="system", why=f"fallback at start: {reason}", event="fallback")
        skipped = "; ".join(tried[1:])
        notice = (f"⚠️ Started on {gid} instead of {active_id}: {why}. The active pointer now names {gid} "
                  f"(ledger event 'fallback'); {active_id} was not loaded and nothing was deleted."
                  + (f" Also skipped: {skipped}." if skipped else ""))
        log.warning("%s", notice)
        return gens[gid], [notice]
    raise OuroError("no generation can be served: " + "; ".join(tried),
                    hint="restore a generation's model.gguf from a backup, or start with a fresh --data-dir")
