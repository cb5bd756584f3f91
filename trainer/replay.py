"""Stage 2: hold out the newest data, and mix in a rehearsal sample from the ancestors.

The hold-out is chronological (the newest share), because a random split would leak the
conversation a held-out turn belongs to into training. Replay rehearses what earlier
generations learned, which is what keeps recall up across a long lineage.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lineage.generations import Generation, Lineage
from memory.export import Delta, Example, Pair, Rated


@dataclass
class Split:
    train: list[Example]
    pairs: list[Pair]
    heldout: list[list[dict]]        # messages ending with the reference reply
    replay: list[Example]
    heldout_sources: list[str] = field(default_factory=list)   # what made each held-out reply the target
    heldout_rejected: list[str | None] = field(default_factory=list)   # the served reply a correction replaced
    rated: list[Rated] = field(default_factory=list)          # lone 👍/👎 for KTO, none of a held-out turn


def holdout(delta: Delta, fraction: float) -> tuple[list[Example], list[Pair], list[list[dict]]]:
    """(train examples, train pairs, held-out conversations): see `holdout_with_sources`."""
    train, pairs, heldout, _, _ = holdout_with_sources(delta, fraction)
    return train, pairs, heldout


def holdout_with_sources(delta: Delta, fraction: float) -> tuple[list[Example], list[Pair], list[list[dict]],
                                                                 list[str], list[str | None]]:
    """The newest `fraction` of the reviewed turns (by time) held out; at least one when ≥ 2 turns.

    Returns (train examples, train pairs, held-out conversations, their sources, and for each the
    reply it replaced when the turn was corrected — the pair's rejected reply, else None).

    A turn is held out whole: its example and its preference pair both leave training (a pair
    trained by DPO would leak the held-out correction), and it is one held-out item (the example's,
    else the pair's chosen reply), with its source. Imported examples carry their own chronological
    split (`Example.split`, 90/10 within the chat history, see memory/importers) and go where it
    says, outside this count, as do imported pairs (train: the importer kept out those whose reply a
    held-out window grades). Their held-out windows come first: that history is older than any
    live turn, and the eval takes the newest items.
    """
    presplit = [e for e in delta.examples if e.split]
    turns: dict = {}
    for i, item in enumerate([e for e in delta.examples if not e.split] + [p for p in delta.pairs if not p.split]):
        key = item.turn_id if item.turn_id is not None else ("item", i)
        turns.setdefault(key, []).append(item)
    order = sorted(turns, key=lambda k: min((x.created_at, isinstance(x, Pair)) for x in turns[k]))
    n_held = int(round(len(order) * fraction))
    if len(order) >= 2:
        n_held = max(1, n_held)
    n_held = min(n_held, len(order) - 1) if order else 0
    held_keys = set(order[len(order) - n_held:])
    heldout = [e.messages for e in presplit if e.split == "heldout"]
    sources = ["import"] * len(heldout)
    rejected: list[str | None] = [None] * len(heldout)
    for key in order[len(order) - n_held:]:
        items = turns[key]
        example = next((x for x in items if isinstance(x, Example)), None)
        pair = next((x for x in items if isinstance(x, Pair)), None)
        if example is not None:
            heldout.append(example.messages)
            sources.append(example.source)
            same = pair is not None and pair.chosen == example.messages[-1]["content"]
            rejected.append(pair.rejected if same else None)
        else:
            heldout.append(pair.prompt + [{"role": "assistant", "content": pair.chosen}])
            sources.append(pair.source)
            rejected.append(pair.rejected)
    kept = [x for k in order if k not in held_keys for x in turns[k]]
    return ([x for x in kept if isinstance(x, Example)] + [e for e in presplit if e.split == "train"],
            [x for x in kept if isinstance(x, Pair)] + [p for p in delta.pairs if p.split == "train"],
            heldout, sources, rejected)


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
    nobody who used /forget or /optout since, no turn an admin rejected). A lone 👍's KTO item leaves
    training with its held-out turn; lone 👎s are never held out (they have no reference reply) and
    are not replayed (a rating speaks of the model that was rated)."""
    train, pairs, heldout, sources, rejected = holdout_with_sources(delta, fraction)
    kept = {x.turn_id for x in [*train, *pairs]}
    held = {x.turn_id for x in [*delta.examples, *delta.pairs] if x.turn_id is not None} - kept
    rated = [r for r in delta.rated if r.turn_id is None or r.turn_id not in held]
    replay = _replay(ancestor_examples(chain), replay_size, random.Random(seed), allowed)
    return Split(train=train, pairs=pairs, heldout=heldout, replay=replay, heldout_sources=sources,
                 heldout_rejected=rejected, rated=rated)


def _replay(pool: list[Example], size: int, rng: random.Random,
            allowed: Callable[[list[Example]], list[Example]] | None) -> list[Example]:
    """`size` of the ancestors' examples, drawn at random (seeded) among those `allowed` — checked in
    the drawn order, a batch at a time, until enough pass: a lineage months old holds tens of
    thousands, and each check reads the store, so checking them all for a hundred took minutes."""
    order = list(pool)
    rng.shuffle(order)
    if allowed is None:
        return order[:size]
    replay: list[Example] = []
    batch = max(size, 32)
    for start in range(0, len(order), batch):
        if len(replay) >= size:
            break
        replay += allowed(order[start:start + batch])
    return replay[:size]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
