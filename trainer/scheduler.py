"""The training schedule inside the running bot (APScheduler 3, on the bot's event loop).

The job lives in a SQLite job store (`run/schedule.sqlite`, via SQLAlchemy), so the
schedule, a pause, and a run that fell due while the bot was down all survive a restart:
a missed run fires once when the bot comes back (`coalesce`, no grace limit) instead of
being silently dropped, and never more than one runs at a time (`max_instances=1`).

A persisted job must name its function by import path, so the job is the module-level
`scheduled_cycle(data_dir)`, which hands over to whatever the running bot registered for
that data folder. The scheduler only decides *when*; the cycle itself runs in its own
process (`trainer/cycle_job.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from config.schedule import describe, parse_schedule
from config.settings import Settings
from core.files import ensure_private_dir

log = logging.getLogger(__name__)
JOB_ID = "learning-cycle"
_TARGETS: dict[str, Callable[[str], Awaitable[object]]] = {}


async def scheduled_cycle(data_dir: str) -> None:
    """The persisted job: run the cycle of the bot serving `data_dir`."""
    target = _TARGETS.get(data_dir)
    if target is None:
        log.warning("scheduled cycle for %s fired, but no bot registered for it", data_dir)
        return
    await target("scheduler")


class CycleScheduler:
    def __init__(self, settings: Settings, on_due: Callable[[str], Awaitable[object]]) -> None:
        self.settings = settings
        self.on_due = on_due
        self.key = str(settings.data_dir.resolve())
        self.scheduler = None

    def start(self) -> None:
        """Start on the running event loop; reconcile the stored job with the current setting."""
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        run_dir = self.settings.data_dir / "run"
        ensure_private_dir(run_dir)
        store = SQLAlchemyJobStore(url=f"sqlite:///{run_dir / 'schedule.sqlite'}")
        self.scheduler = AsyncIOScheduler(
            jobstores={"default": store}, timezone=self.settings.cycle_timezone,
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1})
        _TARGETS[self.key] = self.on_due
        self.scheduler.start(paused=True)  # nothing fires until the stored job is reconciled
        trigger = parse_schedule(self.settings.cycle_schedule, self.settings.cycle_timezone)
        job = self.scheduler.get_job(JOB_ID)
        if trigger is None:
            if job is not None:
                self.scheduler.remove_job(JOB_ID)
        elif job is None:
            self.scheduler.add_job("trainer.scheduler:scheduled_cycle", trigger, id=JOB_ID, args=[self.key],
                                   name="learning cycle")
        else:
            paused = job.next_run_time is None
            if str(job.trigger) != str(trigger):
                log.info("training schedule changed: %s → %s", job.trigger, trigger)
                self.scheduler.reschedule_job(JOB_ID, trigger=trigger)
                if paused:
                    self.scheduler.pause_job(JOB_ID)
            if list(job.args) != [self.key]:
                self.scheduler.modify_job(JOB_ID, args=[self.key])
        self.scheduler.resume()

    async def shutdown(self) -> None:
        """Stop for good. APScheduler 3 quirk: a wake-up already queued on the loop (by resume_job,
        say) still processes jobs after `shutdown()` — the state is then 'stopped', not 'paused' — and
        would fire a due job into the closed executor, where it is cancelled and its run lost. So:
        pause, let queued wake-ups see the pause, then shut down."""
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.pause()
            await asyncio.sleep(0.05)
            self.scheduler.shutdown(wait=False)
        _TARGETS.pop(self.key, None)

    # --- what admins steer ---------------------------------------------------------------
    def _job(self):
        return self.scheduler.get_job(JOB_ID) if self.scheduler is not None else None

    @property
    def enabled(self) -> bool:
        return self._job() is not None

    @property
    def paused(self) -> bool:
        job = self._job()
        return job is not None and job.next_run_time is None

    def next_run(self) -> datetime | None:
        job = self._job()
        return job.next_run_time if job is not None else None

    def pause(self) -> bool:
        """Stop scheduled training (kept across restarts). False when there is no schedule."""
        if self._job() is None:
            return False
        self.scheduler.pause_job(JOB_ID)
        return True

    def resume(self) -> bool:
        if self._job() is None:
            return False
        self.scheduler.resume_job(JOB_ID)
        return True

    def describe(self) -> str:
        if not self.enabled:
            return "scheduled training is off (OURO_CYCLE_SCHEDULE)"
        if self.paused:
            return f"scheduled training is paused ({describe(self.settings.cycle_schedule)}); /resume restarts it"
        nxt = self.next_run()
        return f"next cycle {nxt:%Y-%m-%d %H:%M %Z} ({describe(self.settings.cycle_schedule)})"
