"""Inference off the event loop: a FIFO of jobs, one lock, one model.

llama.cpp contexts are not thread-safe, so with `parallel = 1` every model call is a job on a
single FIFO thread. With `parallel = N` (an engine that decodes several replies in one batch,
engine/batched.py) up to N jobs run at once, on N threads, each blocked in its own reply while
the engine's decode thread serves them together; jobs still start in submission order. The
event loop only awaits the job's future; streamed text is handed back to the loop thread with
`call_soon_threadsafe`. The backlog is bounded: past `max_backlog` a job is refused with `Busy`
instead of queueing forever. Work that must not hold anyone up (the hot-swap warm-up) runs
as `background` pieces: when no reply waits, and between the tokens of one that streams.

During a hot-swap the worker holds two models for a while (`begin_handover`): the serving one
and the incoming one, which the warm-up is reading the active chats into. A reply job asks
`route` which model answers its chat; a chat moves to the incoming model as soon as that model
has read as much of the chat as the serving one (so the move costs the reply nothing), and stays
there. `finish_handover` then makes the incoming model the serving one for every chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from engine.protocol import Engine

T = TypeVar("T")
log = logging.getLogger(__name__)


class _SharedLock:
    """Jobs share it; swapping the model takes it alone (waiting writers go first, so a hot-swap is
    not starved by a stream of replies). With one job thread it acts as the plain lock it replaced."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Busy(Exception):
    """Too many replies are already waiting for the model (control flow: the turn is stored as busy)."""


class Cancelled(Exception):
    """The reply's reader left (an HTTP client hung up mid-stream): it is not written for nobody."""


class Abandoned(Busy):
    """The bot is stopping: the reply was given up (before or while generating) so the process can exit."""


@dataclass(eq=False)
class _Background:
    """Work done in short pieces whenever the model is free, and between the text pieces of replies."""

    piece: Callable[[], bool]        # one short piece; True once the whole task is done
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class _JobClock(threading.local):
    """Per job thread: when its job started and the background seconds run inside it."""

    started = 0.0
    background_s = 0.0


class InferenceWorker:
    def __init__(self, engine: Engine, *, max_backlog: int = 64, parallel: int = 1) -> None:
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, not {parallel}")
        self._engine = engine
        self.parallel = parallel
        self._lock = _SharedLock()             # shared by jobs touching the model, taken alone by swap
        self._count_lock = threading.Lock()
        self._background_lock = threading.Lock()   # one background piece at a time, whichever thread
        self._executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="inference")
        self._backlog = 0
        self._queued = 0                       # regular jobs submitted and not yet started
        self._running = 0                      # regular jobs under way (several with `parallel` > 1)
        self._abandon = threading.Event()    # set when stopping: running and queued jobs give up
        self._closing = threading.Event()    # set by close(): background work stops at its next piece
        self.max_backlog = max_backlog
        self.peak_backlog = 0
        self._waits: deque[float] = deque(maxlen=10_000)   # seconds from submission to start, latest jobs
        self._background: deque[_Background] = deque()       # run in pieces, see `background`
        self.background_share = 1.0     # background seconds per second of reply, at most, while a reply streams
        self._job = _JobClock()
        self._incoming: Engine | None = None   # during a hot-swap's handover, see `route`
        self._moved: set = set()               # chats the incoming model answers already
        self.move_slack = 32    # prompt tokens a chat's first reply on the incoming model may read beyond the old one's

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def incoming(self) -> Engine | None:
        return self._incoming

    @property
    def engines(self) -> list[Engine]:
        """The models in memory: the serving one, and during a handover the incoming one. Only on the
        inference thread (inside a job) is this list stable."""
        return [self._engine] + ([self._incoming] if self._incoming is not None else [])

    @property
    def backlog(self) -> int:
        """Jobs submitted and not yet finished (the one running included)."""
        return self._backlog

    def wait_stats(self) -> dict:
        """Queue wait (submission → start) of the latest jobs: count, p50, p95 and max in seconds."""
        waits = sorted(self._waits)
        if not waits:
            return {"jobs": 0, "p50_s": None, "p95_s": None, "max_s": None}
        p95 = waits[min(len(waits) - 1, round(0.95 * (len(waits) - 1)))]
        return {"jobs": len(waits), "p50_s": round(statistics.median(waits), 4), "p95_s": round(p95, 4),
                "max_s": round(waits[-1], 4)}

    def reset_stats(self) -> None:
        self._waits.clear()
        self.peak_backlog = self._backlog

    def _run(self, job: Callable[[Engine], T] | None, submitted: float) -> T | None:
        try:
            with self._lock.shared():
                if job is None:        # a placeholder: background work while no reply waits
                    self._background_while_idle()
                    return None
                with self._count_lock:
                    self._queued -= 1
                self._waits.append(time.perf_counter() - submitted)
                if self._abandon.is_set():
                    raise Abandoned("the bot is stopping")
                self._job.started, self._job.background_s = time.perf_counter(), 0.0
                with self._count_lock:
                    self._running += 1
                try:
                    return job(self._engine)
                finally:
                    with self._count_lock:
                        self._running -= 1
        finally:
            if job is not None and self._background:
                # background work goes on once this job's caller has its result, not before
                self._placeholder()
            with self._count_lock:
                self._backlog -= 1

    def _placeholder(self) -> None:
        with self._count_lock:
            self._backlog += 1
        try:
            self._executor.submit(self._run, None, time.perf_counter())
        except RuntimeError:          # shut down: close() tells whoever waits
            with self._count_lock:
                self._backlog -= 1

    async def run(self, job: Callable[[Engine], T], *, bounded: bool = True) -> T:
        """Run `job(engine)` on the inference thread and await its result. `bounded=False` is for
        small jobs that must run even under overload (dropping a forgotten person's cached state)."""
        with self._count_lock:
            if bounded and self._backlog >= self.max_backlog:
                raise Busy(f"{self._backlog} replies are already waiting")
            self._backlog += 1
            self._queued += 1
            self.peak_backlog = max(self.peak_backlog, self._backlog)
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, self._run, job, time.perf_counter())
        except BaseException:
            with self._count_lock:
                self._backlog -= 1
                self._queued -= 1
            raise
        return await future

    def run_sync(self, job: Callable[[Engine], T]) -> T:
        """The same, for callers without an event loop (plain code such as tests; every transport awaits `run`)."""
        with self._count_lock:
            self._backlog += 1
            self._queued += 1
        return self._executor.submit(self._run, job, time.perf_counter()).result()

    async def background(self, piece: Callable[[], bool]) -> None:
        """Run `piece()` again and again on the inference thread until it returns True: whenever no
        reply is waiting, and — while a reply streams — between its pieces of text, taking at most
        `background_share` of the time (the reply slows down; its text never stops for longer than
        one piece). For the hot-swap warm-up: a step between replies left the chats without text for
        as long as the step took, and steps short enough to hide could not keep up with chats that
        kept talking. Each piece should take well under a second."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._background.append(_Background(piece, future, loop))
        self._placeholder()   # so the work starts at once when the model is free
        await future

    def _background_piece(self) -> None:
        task = self._background[0]
        try:
            if self._abandon.is_set() or self._closing.is_set():
                raise Abandoned("the bot is stopping")
            done = task.piece()
        except BaseException as exc:   # handed to the awaiting coroutine
            self._background.popleft()
            with contextlib.suppress(RuntimeError):    # its loop is closed already
                task.loop.call_soon_threadsafe(settle, task.future, None, exc)
            return
        if done:
            self._background.popleft()
            with contextlib.suppress(RuntimeError):
                task.loop.call_soon_threadsafe(settle, task.future, None, None)

    def _background_while_idle(self) -> None:
        """Background pieces until a reply comes to wait or, with several job threads, starts
        (checked between pieces). A reply under way on another job thread takes its pieces
        between its own text (`_between_text`), so their share stays bounded: a placeholder
        running pieces back to back beside it made the hot-swap's warm-up take the model from the
        reply as often as the reply had it."""
        with self._background_lock:
            while self._background and not self._queued and not self._running:
                self._background_piece()

    def _between_text(self) -> None:
        """Called on the inference thread after each piece of a reply's text: one background piece
        when the reply has had its share of the time."""
        if not self._background:
            return
        now = time.perf_counter()
        job = self._job
        if job.background_s > self.background_share * (now - job.started - job.background_s):
            return
        if not self._background_lock.acquire(blocking=False):   # another reply's thread runs one
            return
        try:
            if self._background:
                self._background_piece()
        finally:
            self._background_lock.release()
        job.background_s += time.perf_counter() - now

    def abandon(self) -> None:
        """Stopping: jobs still queued give up at once, a reply being generated at its next piece of text."""
        self._abandon.set()

    def check(self, cancelled: threading.Event | None = None) -> None:
        """Raise Abandoned once `abandon()` was called, Cancelled once `cancelled` is set."""
        if self._abandon.is_set():
            raise Abandoned("the bot is stopping")
        if cancelled is not None and cancelled.is_set():
            raise Cancelled("the reply's reader left")

    def guard(self, on_text: Callable[[str], None] | None,
              cancelled: threading.Event | None = None) -> Callable[[str], None]:
        """Wrap a job's `on_text` so that generation stops once `abandon()` was called (raises
        Abandoned) or its reader left (`cancelled` set: raises Cancelled), freeing its slot."""

        def checked(piece: str) -> None:
            self.check(cancelled)
            if on_text is not None:
                on_text(piece)
            self._between_text()

        return checked

    def swap(self, new_engine: Engine) -> Engine:
        """Put `new_engine` in place between two jobs; return the old one for the caller to close."""
        with self._lock.exclusive():
            old, self._engine = self._engine, new_engine
        return old

    # --- the hot-swap's handover, chat by chat ----------------------------------------------
    def begin_handover(self, new_engine: Engine) -> None:
        """From now on `route` may send a chat's reply to `new_engine` (blocks for a running job)."""
        with self._lock.exclusive():
            self._incoming = new_engine
            with self._count_lock:
                self._moved = set()

    def moved(self) -> frozenset:
        """The chats the incoming model answers already (safe from any thread)."""
        with self._count_lock:
            return frozenset(self._moved)

    def has_moved(self, chat_key: int | str) -> bool:
        return chat_key in self._moved

    def route(self, chat_key: int | str, messages: list) -> Engine:
        """The model to answer `chat_key`'s next reply (prompt `messages`), for jobs on the inference thread.

        Without a handover, the serving model. During one, a chat the incoming model answered
        before stays on it; any other moves to it once it needs to read at most `move_slack`
        prompt tokens more there than on the serving model (`unread`) — typically when the
        warm-up has read the chat up to its last reply. A chat whose last reply the incoming
        model has not read yet stays on the serving model for this reply: reading that reply
        again now would delay this one (measured: 70-120 tokens, 0.7-1.2 s before the first
        word, right after a swap that swapped every chat at once).
        """
        new = self._incoming
        if new is None:
            return self._engine
        if chat_key in self._moved:
            return new
        old = self._engine
        if new.unread(messages, chat_key=chat_key) > old.unread(messages, chat_key=chat_key) + self.move_slack:
            return old
        with self._count_lock:
            self._moved.add(chat_key)
        return new

    def forget(self, chat_keys) -> None:
        """Drop these chats' cached states in every model in memory (a job body: call it on the
        inference thread). During a handover they count as moved, so the warm-up leaves them be."""
        for engine in self.engines:
            for key in chat_keys:
                engine.forget(key)
        if self._incoming is not None:
            with self._count_lock:
                self._moved.update(chat_keys)

    def finish_handover(self) -> Engine:
        """The incoming model serves every chat from the next job on; returns the old one to close."""
        with self._lock.exclusive():
            if self._incoming is None:
                raise RuntimeError("no handover under way")
            old, self._engine, self._incoming = self._engine, self._incoming, None
            with self._count_lock:
                self._moved = set()
        return old

    def abort_handover(self) -> Engine | None:
        """Back to the serving model for every chat; returns the incoming one (None if `close` took it)."""
        with self._lock.exclusive():
            new, self._incoming = self._incoming, None
            with self._count_lock:
                self._moved = set()
        return new

    def close(self) -> None:
        self._closing.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        while self._background:         # never finished: whoever awaits it is told the worker stopped
            task = self._background.popleft()
            with contextlib.suppress(RuntimeError):   # that loop is closed already
                task.loop.call_soon_threadsafe(settle, task.future, None, Abandoned("the worker was closed"))
        with self._lock.exclusive():
            try:    # a clean shutdown: the serving model's chats need not be read again after a restart
                saved = self._engine.save_states()
                if saved:
                    log.info("saved the KV states of %d chats", saved)
            except Exception:   # never keeps the bot from stopping
                log.warning("could not save the chats' KV states", exc_info=True)
            self._engine.close()
            if self._incoming is not None:
                self._incoming.close()
                self._incoming = None


def settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    """Complete `future` (on its loop's thread) with a result or an exception, unless it was cancelled."""
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def loop_callback(loop: asyncio.AbstractEventLoop, fn: Callable[[str], None]) -> Callable[[str], None]:
    """Wrap a loop-side callback so the inference thread can call it safely."""

    def call(piece: str) -> None:
        loop.call_soon_threadsafe(fn, piece)

    return call
