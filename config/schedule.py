"""When the bot trains: the schedule setting, parsed into an APScheduler trigger.

One small language, so a person can say what they mean in `settings.toml` or an env var:
`daily` (03:00 in `cycle_timezone`), `off`, `every 6h` / `every 90m` / `every 2d`
(an interval), or a five-field crontab line (`0 3 * * 1` = Mondays at 03:00).
"""

from __future__ import annotations

import re

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

_EVERY = re.compile(r"every\s+(\d+)\s*(m|min|minutes?|h|hours?|d|days?)", re.IGNORECASE)


def parse_schedule(text: str, timezone: str = "UTC") -> BaseTrigger | None:
    """The trigger for `text`, or None for 'off'. Raises ValueError with an example on nonsense."""
    value = (text or "").strip()
    low = value.lower()
    if low in ("off", "never", "none", ""):
        return None
    if low == "daily":
        return CronTrigger(hour=3, minute=0, timezone=timezone)
    if low == "hourly":
        return IntervalTrigger(hours=1, timezone=timezone)
    m = _EVERY.fullmatch(low)
    if m:
        n, unit = int(m.group(1)), m.group(2)[0]
        if n <= 0:
            raise ValueError("the interval must be at least 1")
        kwargs = {"m": "minutes", "h": "hours", "d": "days"}[unit]
        return IntervalTrigger(**{kwargs: n}, timezone=timezone)
    if len(value.split()) == 5:
        try:
            return CronTrigger.from_crontab(value, timezone=timezone)
        except ValueError as exc:
            raise ValueError(f"not a valid crontab line ({exc})") from exc
    raise ValueError(f"can't read the schedule {text!r}: use 'daily', 'off', 'every 6h', 'every 30m' "
                     "or a crontab line like '0 3 * * *'")


def describe(text: str) -> str:
    low = (text or "").strip().lower()
    if low in ("off", "never", "none", ""):
        return "off"
    if low == "daily":
        return "daily at 03:00"
    return text.strip()
