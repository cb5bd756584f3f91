"""Telegram calls that survive flood control, timeouts and dropped connections."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from telegram.error import BadRequest, NetworkError, RetryAfter, TimedOut

log = logging.getLogger(__name__)
T = TypeVar("T")


async def call_with_retry(fn: Callable[[], Awaitable[T]], *, attempts: int = 5, base_delay: float = 0.5,
                          max_delay: float = 30.0) -> T:
    """Await `fn()`; on 429 wait what Telegram asked, on timeouts / 5xx / network errors back off
    exponentially. A BadRequest is the caller's bug or bad data and is raised at once."""
    delay = base_delay
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except RetryAfter as exc:
            wait = exc.retry_after.total_seconds() if hasattr(exc.retry_after, "total_seconds") else exc.retry_after
            if attempt == attempts:
                raise
            log.warning("flood control: waiting %.1fs (attempt %d/%d)", wait, attempt, attempts)
            await asyncio.sleep(min(float(wait), max_delay))
        except BadRequest:
            raise
        except (TimedOut, NetworkError) as exc:
            if attempt == attempts:
                raise
            log.warning("telegram call failed (%s); retrying in %.1fs", exc.__class__.__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")
