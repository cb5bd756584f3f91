"""Stage 2: hold out the newest data, and mix in a rehearsal sample from the ancestors.

The hold-out is chronological (the newest share), because a random split would leak the
conversation a held-out turn belongs to into training. Replay rehearses what earlier
generations learned, which is what keeps recall up across a long lineage.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lineage.generations import Generation, Lineage
from memory.export import Delta, Example, Pair


@dataclass
class Split:
    train: list[Example]
    pairs: list[Pair]
    heldout: list[list[dict]]        # messages ending with the reference reply
    replay: list[Example]


def holdout(delta: Delta, fraction: float) -> tuple[list[Example], list[Pair], list[list[dict]]]:
    """Newest `fraction` of all items (examples and pairs, by time) held out; at least one when ≥ 2 items.

    Imported examples carry their own chronological split (`Example.split`, 90/10 within the chat
    history, see memory/importers) and go where it says, outside this count. Their held-out windows
    come first: that history is older than any live turn, and the eval takes the newest items.
    """
    presplit = [e for e in delta.examples if e.split]
    items = [(e.created_at, 0, i, e) for i, e in enumerate(delta.examples) if not e.split]
    items += [(p.created_at, 1, i, p) for i, p in enumerate(delta.pairs)]
    items.sort(key=lambda t: (t[0], t[1], t[2]))
    n_held = int(round(len(items) * fraction))
    if len(items) >= 2:
        n_held = max(1, n_held)
    n_held = min(n_held, len(items) - 1) if items else 0
    kept, held = items[: len(items) - n_held], items[len(items) - n_held:]
    heldout = [e.messages for e in presplit if e.split == "heldout"]
    heldout += [(x.messages if isinstance(x, Example) else x.prompt + [{"role": "assistant", "content": x.chosen}])
                for *_, x in held]
    return ([x for *_, x in kept if isinstance(x, Example)] + [e for e in presplit if e.split == "train"],
            [x for *_, x in kept if isinstance(x, Pair)], heldout)


def ancestors(lineage: Lineage, parent: Generation) -> list[Generation]:
    chain, gen = [], parent
    while gen is not None:
        chain.append(gen)
        gen = lineage.generation(gen.parent_id) if gen.parent_id else None
    return chain


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ancestor_examples(chain: list[Generation]) -> list[Example]:
    """The new training examples each ancestor learned from (not their replays: no snowballing)."""
    out = []
    for gen in chain:
        for row in _read_jsonl(gen.folder / "data" / "train.jsonl"):
            out.append(Example(**row))
    return out


def ancestor_heldout(chain: list[Generation]) -> list[list[dict]]:
    out = []
    for gen in chain:
        out += [row["messages"] for row in _read_jsonl(gen.folder / "data" / "heldout.jsonl")]
    return out


def make_split(delta: Delta, chain: list[Generation], *, fraction: float, replay_size: int, seed: int,
               allowed: Callable[[list[Example]], list[Example]] | None = None) -> Split:
    """`allowed` re-checks the ancestors' examples before any is replayed (memory.export.still_trainable:
    nobody who used /forget or /optout since, no turn an admin rejected)."""
    train, pairs, heldout = holdout(delta, fraction)
    pool = ancestor_examples(chain)
    if allowed is not None:
        pool = allowed(pool)
    rng = random.Random(seed)
    replay = rng.sample(pool, min(replay_size, len(pool))) if pool else []
    return Split(train=train, pairs=pairs, heldout=heldout, replay=replay)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
