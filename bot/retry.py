"""Telegram calls that survive flood control, timeouts and dropped connections."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from telegram.error import BadRequest, NetworkError, RetryAfter, TimedOut

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_FLOOD_WAIT_S = 120.0   # a longer 429 is raised: the caller gives the message up (and records so)


async def call_with_retry(fn: Callable[[], Awaitable[T]], *, attempts: int = 5, base_delay: float = 0.5,
                          max_delay: float = 30.0, max_flood_wait: float = MAX_FLOOD_WAIT_S) -> T:
    """Await `fn()`; on 429 wait all that Telegram asked (a retry sooner is refused again and spends
    an attempt), raising at once a wait longer than `max_flood_wait`; on timeouts / 5xx / network
    errors back off exponentially. A BadRequest is the caller's bug or bad data and is raised at once.
    A send whose answer timed out is sent again: Telegram may have got it (a reply shown twice), but
    not retrying would lose the ones it did not."""
    delay = base_delay
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except RetryAfter as exc:
            wait = flood_wait(exc)
            if attempt == attempts or wait > max_flood_wait:
                raise
            log.warning("flood control: waiting %.1fs (attempt %d/%d)", wait, attempt, attempts)
            await asyncio.sleep(wait)
        except BadRequest:
            raise
        except (TimedOut, NetworkError) as exc:
            if attempt == attempts:
                raise
            log.warning("telegram call failed (%s); retrying in %.1fs", exc.__class__.__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")


def flood_wait(exc: RetryAfter) -> float:
    """The seconds a 429 asks for (python-telegram-bot gives an int, or a timedelta once opted in)."""
    wait = exc.retry_after
    return float(wait.total_seconds() if hasattr(wait, "total_seconds") else wait)
