"""The data-driven trigger beside the clock: how many new trainable items wait, and is that enough.

A generation trained on three examples teaches nothing visible and costs a full cycle (train,
convert, evals) and a hot-swap; a busy bot may gather a hundred before the clock comes round.
So `cycle_min_items` works both ways: the bot starts a cycle as soon as N items wait, and a
scheduled run with fewer is skipped ("thin delta") and says so.

"New" means trained by no generation yet, counted exactly as the cycle exports them
(memory/export.reviewed_since with the trust policy's review mode and caps, the content
screens, and what the last generation deferred over a cap): an item waiting for /review, or
screened out, is not trainable and does not count. The count starts at the newest data cutoff
of *any* generation, refused and rolled-back ones included: they trained on their delta too,
and counting it again would start the same refused cycle over and over. (The cycle itself still
trains on everything since the *active* generation, so a refused delta is retried with the next.)
Documents (`ouro import docs`) ride along with the next cycle and do not count.
"""

from __future__ import annotations

from dataclasses import dataclass

from config.settings import Settings
from core.files import now
from lineage.generations import Generation, Lineage
from memory.export import Delta, reviewed_since, still_paired, still_trainable, still_unwanted
from memory.screens import screens_for
from memory.store import Store
from memory.trust import policy_for


@dataclass(frozen=True)
class Waiting:
    """What the next cycle would find that no generation has trained on."""

    items: int                  # examples + preference pairs, after review mode, screens, caps and budget
    since_gen: str | None       # the generation whose data cutoff the count starts from
    since: str | None           # that cutoff (None: everything ever stored)
    considered: int             # rated items looked at
    checked_at: str             # when this was counted

    def describe(self, minimum: int) -> str:
        return f"{self.items} of {minimum} new trainable items waiting"


def carried_over(gen: Generation, store: Store, settings: Settings) -> Delta:
    """What `gen`'s cycle deferred over a source's cap, still trainable now (no /forget, /optout or
    rejection since; a lone 👎 also still a lone 👎): examples, pairs and lone ratings alike."""
    path = gen.folder / "data" / "deferred.jsonl"
    carried = Delta.from_jsonl(path.read_text(encoding="utf-8")) if path.exists() else Delta()
    opt_out = settings.training_opt_out_default
    carried.examples = still_trainable(store, carried.examples, opt_out_by_default=opt_out)
    carried.pairs = still_paired(store, carried.pairs, opt_out_by_default=opt_out)
    carried.rated = still_unwanted(store, carried.rated, opt_out_by_default=opt_out)
    return carried


def newest_trained(lineage: Lineage) -> Generation | None:
    """The generation with the latest data cutoff (one a cycle made; generation 0 has none)."""
    made = [g for g in lineage.generations() if g.meta.get("data_cutoff")]
    return max(made, key=lambda g: g.meta["data_cutoff"]) if made else None


def waiting_items(settings: Settings, store: Store) -> Waiting:
    """Count the new trainable items through the cycle's own export path (see the module docstring)."""
    newest = newest_trained(Lineage(settings.models_dir))
    since = newest.meta["data_cutoff"] if newest else None
    delta = reviewed_since(store, persona=settings.persona(), since=since, until=now(),
                           budget=settings.data_budget, opt_out_by_default=settings.training_opt_out_default,
                           policy=policy_for(settings, store), screens=screens_for(settings),
                           carried=carried_over(newest, store, settings) if newest else None)
    return Waiting(items=len(delta.examples) + len(delta.pairs), since_gen=newest.id if newest else None,
                   since=since, considered=delta.considered, checked_at=now("seconds"))


def thin_delta(waiting: Waiting, minimum: int) -> str | None:
    """Why a cycle should not run on so little (None: enough, or no minimum set)."""
    if minimum <= 0 or waiting.items >= minimum:
        return None
    return (f"thin delta: only {waiting.items} new trainable item{'s' if waiting.items != 1 else ''} waiting "
            f"(cycle_min_items is {minimum}); the cycle runs once {minimum} have gathered")
