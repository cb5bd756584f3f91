"""The learning loop inside the running bot: schedule → cycle process → hot-swap → live watch.

One object owns the moving parts so the Telegram side only asks it for things:
- `run_cycle(actor)`: a cycle in its own process (trainer/cycle_job.py); afterwards the bot
  serves whatever is active and admins get the result.
- `promote` / `rollback`: move the active pointer (trainer.cycle.promote, recorded with who,
  when and why) and hot-swap.
- `sync()`: serve what `models/ACTIVE` names. Also runs every few seconds, so a promotion
  or rollback made with the CLI while the bot runs is picked up too. A generation that
  fails to load or its smoke test is never served: the pointer goes back to the generation
  still serving (recorded as `swap_failed`) and admins are told why.
- the data trigger (trainer/trigger.py): with `cycle_min_items` set, every `cycle_check_s` the
  tick counts the new trainable items and starts a cycle at N; a scheduled run with fewer is
  skipped as a thin delta (logged, recorded, admins told once per count).
- the live watch (evals/live_watch.py): after a promotion, the new generation's 👎 share
  over its first N rated replies against the generation it replaced; clearly worse → an
  automatic rollback, recorded in the ledger, admins told.

Admin messages go through `notify(text)`, given by the Telegram side; nothing here speaks
Telegram.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial

from config.settings import Settings
from core.errors import OuroError
from engine.neighbours import training_beside
from engine.worker import InferenceWorker
from evals.live_watch import Verdict, judge
from lineage.generations import Lineage
from lineage.promote import promote, rollback
from memory.store import Store
from memory.trust import OTHER, policy_for, sources
from serving.hotswap import HotSwapper, SwapResult
from trainer.cycle_job import CycleOutcome, CycleRunner, read_cycle_status
from trainer.scheduler import CycleScheduler
from trainer.trigger import Waiting, thin_delta, waiting_items

log = logging.getLogger(__name__)
Notify = Callable[[str], Awaitable[None]]
ACTIVATIONS = ("promote", "rollback", "auto_rollback", "swap_failed", "watch_verdict")
TRIGGER_ACTOR = "data trigger"
TRIGGER_BACKOFF_S = 3600.0   # after a triggered cycle made no generation: wait, or it would retry every check


async def _quiet(text: str) -> None:
    log.info("admin notice: %s", text)


class LearningLoop:
    def __init__(self, settings: Settings, store: Store, worker: InferenceWorker, *, notify: Notify | None = None,
                 load=None, tick_s: float = 2.0,
                 warmup: Callable[[int], list[tuple]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from serving.runtime import load_engine

        self.settings = settings
        self.store = store
        self.lineage = Lineage(settings.models_dir)
        self.notify = notify or _quiet
        self.runner = CycleRunner(settings)
        self.scheduler = CycleScheduler(settings, self.run_cycle)
        self.swapper = HotSwapper(worker, load or partial(load_engine, settings), persona=settings.persona(),
                                  smoke_tokens=settings.swap_smoke_tokens, warm_tokens=settings.swap_warm_tokens,
                                  warm_threads=settings.swap_warm_threads)
        self.tick_s = tick_s
        self.clock = clock        # when to count waiting items next (the data trigger)
        self.warmup = warmup      # Conversation.warmup_plan: the chats a new model reads before serving
        self.last_outcome: CycleOutcome | None = None
        self._cycle_task: asyncio.Task | None = None
        self._ticker: asyncio.Task | None = None
        self._failed: tuple[str, str] | None = None
        self.waiting: Waiting | None = None        # the last count of new trainable items (status)
        self._next_count = float("-inf")           # self.clock() of the next count
        self._thin_told: int | None = None         # the count the last thin-delta notice named

    # --- life ---------------------------------------------------------------------------------
    async def start(self, *, schedule: bool = True) -> None:
        if schedule:
            self.scheduler.start()
        await self.sync()
        self._ticker = asyncio.create_task(self._tick_forever(), name="learning-loop")

    async def stop(self) -> None:
        """Stop ticking and scheduling; a cycle still training is stopped (the next one starts over)."""
        await self.scheduler.shutdown()
        for task in (self._ticker, self._cycle_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.runner.kill()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
            except Exception:
                log.exception("learning-loop tick failed")

    async def tick(self) -> None:
        await self.sync()
        await self.check_watch()
        await self.check_trigger()

    # --- cycles ---------------------------------------------------------------------------
    def cycle_status(self) -> dict | None:
        """Stage and step of the cycle in progress (read from its process's status file)."""
        if self._cycle_task is None or self._cycle_task.done():
            if not self.runner.running:
                return None
        info = read_cycle_status(self.settings) if self.runner.running else None
        return info or {"stage": "starting", "actor": self.runner.actor}

    def start_cycle(self, actor: str) -> bool:
        """Start a cycle in the background (for /train); False when one is already running."""
        if self.busy:
            return False
        self._cycle_task = asyncio.create_task(self.run_cycle(actor), name="learning-cycle")
        return True

    # --- the data trigger -------------------------------------------------------------------
    async def count_waiting(self) -> Waiting:
        """Count the new trainable items now (off the event loop: it runs the cycle's export)."""
        self.waiting = await asyncio.to_thread(waiting_items, self.settings, self.store)
        self._next_count = self.clock() + self.settings.cycle_check_s
        return self.waiting

    async def check_trigger(self) -> bool:
        """Start a cycle when `cycle_min_items` new trainable items wait; True when one was started.
        Counts at most every `cycle_check_s`; stands still while training is paused, a cycle runs,
        or the stop rule halted the lineage."""
        from trainer.cycle import HALT_FILE

        minimum = self.settings.cycle_min_items
        if (not minimum or self.clock() < self._next_count or self.scheduler.paused or self.busy
                or (self.settings.models_dir / HALT_FILE).exists()):
            return False
        waiting = await self.count_waiting()
        if waiting.items < minimum or self.busy:
            return False
        log.info("data trigger: %s", waiting.describe(minimum))
        self.store.log_event("cycle_triggered", detail={"items": waiting.items, "minimum": minimum,
                                                        "since_gen": waiting.since_gen})
        return self.start_cycle(TRIGGER_ACTOR)

    def describe_trigger(self) -> str | None:
        """One line for /status: the trigger's setting and its last count (None: the trigger is off)."""
        minimum = self.settings.cycle_min_items
        if not minimum:
            return None
        if self.waiting is None:
            return f"a cycle starts at {minimum} new trainable items (not counted yet)"
        return f"{self.waiting.describe(minimum)} (counted {self.waiting.checked_at}); a cycle starts at {minimum}"

    async def _thin(self, actor: str) -> CycleOutcome | None:
        """A skipped outcome when a scheduled run finds too few new items; None when it may run."""
        if actor != "scheduler" or not self.settings.cycle_min_items:
            return None
        waiting = await self.count_waiting()
        reason = thin_delta(waiting, self.settings.cycle_min_items)
        if reason is None:
            return None
        log.info("scheduled cycle skipped: %s", reason)
        self.store.log_event("cycle_skipped", detail={"actor": actor, "reason": reason, "items": waiting.items,
                                                      "minimum": self.settings.cycle_min_items})
        outcome = CycleOutcome("skipped", {"status": "skipped", "reasons": [reason]})
        self.last_outcome = outcome
        if self._thin_told != waiting.items:   # a clock every 30 min would say the same thing all day
            self._thin_told = waiting.items
            from serving.notices import cycle_message

            await self.notify(cycle_message(outcome, None))
        return outcome

    @property
    def busy(self) -> bool:
        return self.runner.running or (self._cycle_task is not None and not self._cycle_task.done())

    async def run_cycle(self, actor: str) -> CycleOutcome:
        if self.runner.running:
            reason = f"a cycle started by {self.runner.actor} is still running"
            self.store.log_event("cycle_skipped", detail={"actor": actor, "reason": reason})
            return CycleOutcome("skipped", {"status": "skipped", "reasons": [reason]})
        thin = await self._thin(actor)
        if thin is not None:
            return thin
        self.store.log_event("cycle_started", detail={"actor": actor})
        try:
            with training_beside():
                outcome = await self.runner.run(actor)
        except OuroError as exc:
            outcome = CycleOutcome("failed", {"status": "failed", "reasons": [str(exc)]})
        except Exception as exc:   # could not even start it (a full disk, no memory to fork): admins must hear
            log.exception("the learning cycle could not start")
            from trainer.cycle import disk_full

            full = "the disk is full; " if disk_full(exc) else ""
            outcome = CycleOutcome("failed", {"status": "failed",
                                              "reasons": [f"the cycle could not start: {full}{type(exc).__name__}: {exc}"]})
        self.last_outcome = outcome
        if actor == TRIGGER_ACTOR and outcome.status not in ("promoted", "held", "refused"):
            self._next_count = self.clock() + max(TRIGGER_BACKOFF_S, self.settings.cycle_check_s)
        if outcome.status in ("killed", "failed"):
            self.store.log_event("cycle_" + outcome.status, detail={"actor": actor, "reasons": outcome.reasons,
                                                                   "stderr": outcome.stderr_tail[-1500:]})
        swap = await self.sync()
        from serving.notices import cycle_message

        await self.notify(cycle_message(outcome, swap))
        return outcome

    # --- what is served -------------------------------------------------------------------------
    async def sync(self) -> SwapResult | None:
        """Serve the active generation; None when nothing had to change."""
        try:
            gen = self.lineage.active()
        except OuroError:   # no lineage in this data folder (yet)
            return None
        serving_id, serving_sha = self.swapper.serving()
        if (gen.id, gen.sha256) == (serving_id, serving_sha) or (gen.id, gen.sha256) == self._failed:
            return None
        warm = (functools.partial(self.warmup, self.settings.kv_cache_chats)
                if self.warmup and self.settings.kv_cache_chats and self.settings.swap_warm_tokens else None)
        result = await self.swapper.swap_to(gen, warm)
        if result.ok and result.reason == "already serving" or result.stopping:   # a race, or shutting down
            return result
        if result.ok:
            self._failed = None
            self.store.log_event("hot_swap", detail={"gen": gen.id, "from": result.previous_id,
                                                     "load_s": result.load_s, "smoke_s": result.smoke_s,
                                                     "warm_s": result.warm_s, "warm_tokens": result.warm_tokens,
                                                     "moved": result.moved, "pause_s": result.pause_s})
            return result
        self._failed = (gen.id, gen.sha256)
        why = f"{gen.id} failed to load or its smoke test ({result.reason}); {serving_id} kept serving"
        self.store.log_event("swap_failed", detail={"gen": gen.id, "serving": serving_id, "reason": result.reason})
        moved = False
        with contextlib.suppress(OuroError):  # a serving model that is not a generation (tests) has no pointer
            # back only if it still names the generation that failed: a promotion made during the
            # swap (the CLI, a cycle) stands, and the next tick swaps to it
            moved = await asyncio.to_thread(promote, self.settings, self.store, serving_id, actor="bot", why=why,
                                            event="swap_failed", expect=gen.id)
        now_id = self.lineage.active_id()
        where = (f"The active pointer is back on {serving_id}." if moved else
                 f"The active pointer still names {gen.id}: it could not be moved back." if now_id == gen.id else
                 f"The active pointer had moved on to {now_id} meanwhile; that is tried next.")
        await self.notify(f"⚠️ Hot-swap refused: {why}. {where}")
        return result

    async def promote(self, gen_id: str, *, actor: str, why: str, expect: str | None = None) -> SwapResult | None:
        """Someone asks for `gen_id` now: tried even if it failed before (an inference server may have
        been given it meanwhile; see engine/openai_server.py). `expect`: the generation active when
        they were asked to confirm; if the pointer has moved since, nothing is done (an OuroError)."""
        if not await asyncio.to_thread(promote, self.settings, self.store, gen_id, actor=actor, why=why,
                                       expect=expect):
            raise OuroError(f"the active generation changed to {self.lineage.active_id()} meanwhile; nothing was "
                            "moved", hint="ask again")
        self._failed = None
        return await self.sync()

    async def rollback(self, gen_id: str | None, *, actor: str, why: str | None = None,
                       event: str = "rollback") -> tuple[str, str, SwapResult | None]:
        was, target = await asyncio.to_thread(rollback, self.settings, self.store, gen_id, actor=actor, why=why,
                                              event=event)
        self._failed = None
        return was, target, await self.sync()

    # --- the live watch -------------------------------------------------------------------------
    def watched(self) -> tuple[str, str] | None:
        """(child, the generation it replaced) while a promotion awaits its live verdict."""
        last = self.store.last_event(ACTIVATIONS)
        if last is None or last["kind"] != "promote":
            return None
        detail = json.loads(last["detail"] or "{}")
        active = self.lineage.active_id()
        if detail.get("gen") != active or not detail.get("from") or detail["from"] == active:
            return None
        return active, detail["from"]

    def watch_ratings(self, child: str, parent: str) -> tuple[list[int], list[int]]:
        """The ratings the live watch judges: the child's first and the parent's latest
        `watch_min_ratings`, where one untrusted source — a person, or a burst of new accounts
        (memory/trust.py) — decides at most `watch_margin` of them, so that it alone cannot move the
        👎 share past the margin either way. Admins, trusted people and the allow-list are not
        capped. (The cheap uncapped count first: until the child has enough ratings at all,
        nothing more is read.)"""
        n = self.settings.watch_min_ratings
        uncapped = self.store.generation_ratings(child, limit=n)
        if len(uncapped) < n:
            return uncapped, []
        policy = policy_for(self.settings, self.store)
        names = sources(policy, self.store.rater_first_seen((child, parent)))

        def source_of(uid: int | None) -> str | None:
            if policy.tier(uid) != OTHER or (uid is not None and uid in policy.known):
                return None
            return names.get(uid, f"user:{uid}")

        per_source = max(1, math.floor(self.settings.watch_margin * n + 1e-9))
        return (self.store.generation_ratings(child, limit=n, source_of=source_of, per_source=per_source),
                self.store.generation_ratings(parent, limit=n, newest=True, source_of=source_of,
                                              per_source=per_source))

    async def check_watch(self) -> Verdict | None:
        pair = self.watched()
        if pair is None:
            return None
        child, parent = pair
        n = self.settings.watch_min_ratings
        verdict = judge(child, parent, *self.watch_ratings(child, parent), min_ratings=n,
                        margin=self.settings.watch_margin)
        if not verdict.decided:
            return verdict
        self.store.log_event("watch_verdict", detail=verdict.to_dict())
        if verdict.status == "worse":
            why = f"live watch: {verdict.reason()}"
            try:
                _, _, swap = await self.rollback(parent, actor="live-watch", why=why, event="auto_rollback")
            except OuroError as exc:   # the verdict ends the watch either way: say it once, with the way out
                self.store.log_event("auto_rollback_failed", detail={"gen": child, "to": parent, "error": str(exc)})
                await self.notify(f"⚠️ Live watch: {child} did worse than {parent}, but the automatic rollback "
                                  f"failed: {exc}. {child} keeps serving; /rollback <generation> serves another.\n"
                                  f"{verdict.reason()}")
                return verdict
            served = "" if swap is None or swap.ok else " (but the hot-swap failed: the bot keeps the old model)"
            await self.notify(f"↩️ Automatic rollback {child} → {parent}{served}.\n{verdict.reason()}")
        else:
            await self.notify(f"👀 Live watch over for {child}: {verdict.reason()}.")
        return verdict
