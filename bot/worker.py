"""Inference off the event loop: one worker thread, one lock, one model.

llama.cpp contexts are not thread-safe and a 2-core machine gains nothing from running two
generations at once, so every model call is a job on a single FIFO thread. The event loop
only awaits the job's future; streamed text is handed back to the loop thread with
`call_soon_threadsafe`. Jobs run in submission order, so two chats writing at once are both
answered, in order. The backlog is bounded: past `max_backlog` a job is refused with `Busy`
instead of queueing forever.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from bot.engine import Engine
from ouro.errors import OuroError

T = TypeVar("T")


class Busy(OuroError):
    """Too many replies are already waiting for the model."""


class InferenceWorker:
    def __init__(self, engine: Engine, *, max_backlog: int = 64) -> None:
        self._engine = engine
        self._lock = threading.Lock()          # held while a job touches the model (and by swap)
        self._count_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._backlog = 0
        self.max_backlog = max_backlog

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def backlog(self) -> int:
        """Jobs submitted and not yet finished (the one running included)."""
        return self._backlog

    def _run(self, job: Callable[[Engine], T]) -> T:
        try:
            with self._lock:
                return job(self._engine)
        finally:
            with self._count_lock:
                self._backlog -= 1

    async def run(self, job: Callable[[Engine], T]) -> T:
        """Run `job(engine)` on the inference thread and await its result."""
        with self._count_lock:
            if self._backlog >= self.max_backlog:
                raise Busy(f"{self._backlog} replies are already waiting")
            self._backlog += 1
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, self._run, job)
        except BaseException:
            with self._count_lock:
                self._backlog -= 1
            raise
        return await future

    def run_sync(self, job: Callable[[Engine], T]) -> T:
        """The same, for callers without an event loop (the terminal chat, benchmarks)."""
        with self._count_lock:
            self._backlog += 1
        return self._executor.submit(self._run, job).result()

    def swap(self, new_engine: Engine) -> Engine:
        """Put `new_engine` in place between two jobs; return the old one for the caller to close."""
        with self._lock:
            old, self._engine = self._engine, new_engine
        return old

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._engine.close()


def loop_callback(loop: asyncio.AbstractEventLoop, fn: Callable[[str], None]) -> Callable[[str], None]:
    """Wrap a loop-side callback so the inference thread can call it safely."""

    def call(piece: str) -> None:
        loop.call_soon_threadsafe(fn, piece)

    return call
