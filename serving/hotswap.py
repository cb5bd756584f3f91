"""Putting a new generation in front of people without stopping the bot.

Check the new GGUF's SHA-256, load it beside the old one on a low-priority thread, smoke-test it,
read the active chats into it in short background pieces (the warm-up), then hand chats over one
by one as the new model has read them; close the old model last. Never close first: if anything
fails, the old model keeps serving. docs/design-notes.md has the whole design and what each
alternative measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from core.files import sha256_file
from engine.protocol import Engine, Sampling
from engine.worker import Abandoned, InferenceWorker, settle
from lineage.generations import Generation

log = logging.getLogger(__name__)
T = TypeVar("T")
SMOKE_KEY = "__smoke__"


@dataclass
class SwapResult:
    ok: bool
    gen_id: str
    previous_id: str
    reason: str = ""
    load_s: float = 0.0
    smoke_s: float = 0.0
    pause_s: float = 0.0      # time the swap itself held the inference lock (waiting for a reply included)
    warm_s: float = 0.0
    warm_tokens: int = 0
    moved: int = 0            # chats the new model answered already before it took over the rest
    stopping: bool = False    # given up because the bot is stopping, not because of the model


class HotSwapper:
    def __init__(self, worker: InferenceWorker, load: Callable[[Generation], Engine], *, persona: str = "",
                 smoke_tokens: int = 8, warm_tokens: int = 8192, warm_step: int = 8,
                 warm_threads: int = 1, nearly_read: int = 0) -> None:
        self.worker = worker
        self.load = load
        self.persona = persona
        self.smoke_tokens = smoke_tokens
        self.warm_tokens = warm_tokens
        self.warm_step = warm_step
        self.warm_threads = warm_threads   # 0: as many as the serving model reads with
        self.nearly_read = nearly_read     # tokens: a warm-up pass that found no more than this is the last
        self.catch_up_s = 30.0             # passes after the first (each reads only what is new) end by then
        self.recheck_s = 0.1
        self._lock = asyncio.Lock()
        self.swaps = 0

    def serving(self) -> tuple[str, str]:
        engine = self.worker.engine
        return engine.generation_id, engine.model_sha256

    def _load(self, gen: Generation) -> Engine:
        """Check and load, on a low-priority thread of its own (`_low_priority`)."""
        if sha256_file(gen.gguf) != gen.sha256:
            raise RuntimeError(f"{gen.gguf} does not match the SHA-256 recorded for {gen.id}")
        return self.load(gen)

    async def _read(self, engine: Engine, messages: list[dict], key: int | str, limit: int) -> int:
        """Read one conversation into `engine`, to its end or `limit` more tokens, as background
        work on the inference thread (`InferenceWorker.background`) in `warm_step`-token pieces;
        tokens read. Each piece reads with `warm_threads` threads (`LlamaEngine.set_batch_threads`),
        set and restored around it on the inference thread, so the replies in between read their
        prompts with the engine's own."""
        read = 0

        def piece() -> bool:
            nonlocal read
            if self.worker.has_moved(key):   # the new model answers this chat now: its own replies keep it read
                return True
            if engine.generating:   # between the tokens of a moved chat's reply: wait
                return False
            want = min(self.warm_step, limit - read)
            if self.warm_threads:
                engine.set_batch_threads(self.warm_threads)
            try:
                n = engine.prefill(messages, chat_key=key, max_tokens=want)
            finally:
                if self.warm_threads:
                    engine.set_batch_threads(None)
            read += n
            return n < want or read >= limit

        await self.worker.background(piece)
        return read

    async def _warm(self, engine: Engine, plan: Callable[[], list[tuple]], catch_up: bool) -> int:
        """Read the planned chats into `engine`, one background task per chat and pass; tokens read.

        `plan()` gives (chat, conversation so far[, a reply under way]). With `catch_up`, passes go
        on until one finds nothing new (at most `nearly_read` tokens) while no chat left to hand
        over has a reply under way — that reply is not in the plan yet, and a chat handed over
        without it reads it in its next reply — or `catch_up_s` after the first pass ends."""
        if self.warm_tokens <= 0:
            return 0
        read, deadline = 0, None
        while True:
            this_pass, busy = 0, False
            moved = self.worker.moved()
            for chat_key, messages, *under_way in plan():
                if chat_key in moved:
                    continue
                busy = busy or bool(under_way and under_way[0])
                n = await self._read(engine, messages, chat_key, self.warm_tokens - read)
                read += n
                this_pass += n
                if read >= self.warm_tokens:
                    return read
            if not catch_up:
                return read
            if deadline is None:
                deadline = time.monotonic() + self.catch_up_s
            if (this_pass <= self.nearly_read and not busy) or time.monotonic() >= deadline:
                return read
            if this_pass == 0:   # only a reply under way is left: look again once it may have landed
                await asyncio.sleep(self.recheck_s)

    def smoke_messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.persona}] if self.persona else []) + \
               [{"role": "user", "content": "Hi! How are you?"}]

    async def _smoke(self, engine: Engine) -> None:
        """The smoke test on the inference thread. Its prompt (the persona: often hundreds of tokens,
        seconds of reading on a small CPU) is read first in background pieces, so the test itself
        only writes its few tokens."""
        await self._read(engine, self.smoke_messages(), SMOKE_KEY, 1 << 30)

        def test() -> bool:
            self.smoke_test(engine)
            return True

        await self.worker.background(test)   # one piece: a few greedy tokens

    def smoke_test(self, engine: Engine) -> None:
        messages = self.smoke_messages()
        out = engine.generate(messages, chat_key=SMOKE_KEY, sampling=Sampling(
            temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=self.smoke_tokens))
        engine.forget(SMOKE_KEY)
        # a model that ends its turn at once without a word is broken; one still going after a few
        # tokens of whitespace (a leading newline or two) is merely slow to start
        if out.completion_tokens < 1 or (out.finish_reason == "stop" and not out.text.strip()):
            raise RuntimeError(f"the smoke test got an empty reply ({out.completion_tokens} tokens, "
                               f"finish: {out.finish_reason})")

    async def swap_to(self, gen: Generation,
                      warm: Callable[[], list[tuple]] | list | None = None) -> SwapResult:
        """`warm`: (chat, conversation so far[, a reply under way]) to read into the new model before
        it answers them — or a function returning them, called on the event loop before each pass,
        so the chats that moved on while the new model read them are caught up (a pass reads only
        what is new)."""
        plan = warm if callable(warm) else (lambda: warm or [])
        async with self._lock:
            previous, sha = self.serving()
            if previous == gen.id and sha == gen.sha256:
                return SwapResult(True, gen.id, previous, "already serving")
            engine = None
            handing_over = False
            try:
                t = time.perf_counter()
                engine = await _low_priority(self._load, gen)
                load_s, t = time.perf_counter() - t, time.perf_counter()
                # the smoke test and the warm-up run on the inference thread, between replies
                await self._smoke(engine)
                smoke_s, t = time.perf_counter() - t, time.perf_counter()
                await asyncio.to_thread(self.worker.begin_handover, engine)
                handing_over = True
                read = await self._warm(engine, plan, catch_up=callable(warm))
                warm_s = time.perf_counter() - t
            except BaseException as exc:
                if handing_over:   # chats the new model answered go back to the old one
                    engine = await asyncio.to_thread(self.worker.abort_handover)
                if engine is not None:   # (None: the worker was closed, and closed it)
                    with contextlib.suppress(Exception):
                        engine.close()
                if isinstance(exc, Abandoned):   # the bot is stopping: nothing about the new model was wrong
                    return SwapResult(False, gen.id, previous, "the bot is stopping", stopping=True)
                if not isinstance(exc, Exception):
                    raise
                log.warning("hot-swap to %s failed", gen.id, exc_info=True)   # the old generation keeps serving
                return SwapResult(False, gen.id, previous, f"{type(exc).__name__}: {exc}")
            moved = len(self.worker.moved())
            t = time.perf_counter()
            old = await asyncio.to_thread(self.worker.finish_handover)
            pause = time.perf_counter() - t
            await asyncio.to_thread(_dispose, old)
            await _low_priority(_trim_heap)
            del old
            self.swaps += 1
            log.info("now serving %s (was %s): load %.2fs, smoke %.2fs, warm-up %.2fs (%d tokens, %d chats "
                     "moved before the end)", gen.id, previous, load_s, smoke_s, warm_s, read, moved)
            return SwapResult(True, gen.id, previous, "", round(load_s, 3), round(smoke_s, 3), round(pause, 4),
                              warm_s=round(warm_s, 3), warm_tokens=read, moved=moved)


def _dispose(engine: Engine) -> None:
    """Close the old model, off the event loop. The heap is trimmed afterwards on a niced thread
    (`malloc_trim` walks the whole heap, CPU work right when the new model answers its first
    replies); not the collection: it holds the GIL throughout, and a niced thread holding the GIL
    would hold up the inference thread's Python between tokens."""
    engine.close()
    gc.collect()


async def _low_priority(fn: Callable[..., T], *args) -> T:
    """Run `fn` on a fresh thread at the lowest CPU priority (Linux sets nice per thread).
    For loading the new model and trimming the heap after the old one.

    Hashing and loading the new GGUF is CPU work beside a model answering on every core: at
    normal priority it preempts one of ggml's threads, whose partners then spin at each barrier
    and a reply slows several-fold. Niced, it gets only what the serving model leaves. A thread
    started in here would keep nice 19 for good: what is built here starts its threads on first
    use (engine/threads.py).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(settle, future, result, None)

    threading.Thread(target=run, name="hotswap-niced", daemon=True).start()
    return await future


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc only; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
