"""Putting a new generation in front of people without stopping the bot.

The new model is loaded beside the old one on a helper thread (the inference thread keeps
answering meanwhile), checked against its recorded SHA-256, and smoke-tested: it must
answer a plain greeting (greedy, a few tokens, on one thread) without ending its turn
empty-handed. Only then is it swapped into the worker — under the inference lock, so a reply
being generated finishes on the old model and the next one starts on the new. The old model is
closed afterwards, which also drops every cached chat KV state (they belong to the old
weights). One swap at a time.

Warm-up: dropping the KV states would make every active chat re-read its whole history on the
new model's first reply — seconds of silence right after the swap. So before swapping, the
new model reads the conversations of the most recently active chats (newest first, at most
`swap_warm_tokens` tokens in all) into its own per-chat states. It does so in short steps
(`warm_step` tokens, a fraction of a second each) on the inference thread, each run right after
the job running now (`next_in_line`), so steps and replies alternate — not on a thread of its own: ggml's threads spin while they wait, so two models computing at once
on a small machine slow each other several-fold (measured: a warm-up beside four busy chats
took 20 s, then 44 s, then 110 s per swap and still left chats unread). Interleaved, the serving
model and the new one take turns at full speed, and no step holds a reply up for longer than a
short reply takes. Chats move on meanwhile, so the plan is read again after each pass; a pass
that finds (almost) nothing new ends the warm-up, and the swap follows at once.

Memory stays flat because nothing else holds the old engine: the worker gave up its only
reference, and `close()` frees llama.cpp's buffers at once instead of waiting for the GC.
Those buffers were allocated on helper threads, whose glibc malloc arenas keep freed pages
mapped; `malloc_trim(0)` hands them back (measured: +100 MB over 20 swaps without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from bot.engine import Engine, Sampling
from bot.worker import Abandoned, InferenceWorker
from trainer.lineage import Generation, sha256_file

log = logging.getLogger(__name__)


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
    stopping: bool = False    # given up because the bot is stopping, not because of the model


class HotSwapper:
    def __init__(self, worker: InferenceWorker, load: Callable[[Generation], Engine], *, persona: str = "",
                 smoke_tokens: int = 8, warm_tokens: int = 8192, warm_step: int = 64) -> None:
        self.worker = worker
        self.load = load
        self.persona = persona
        self.smoke_tokens = smoke_tokens
        self.warm_tokens = warm_tokens
        self.warm_step = warm_step
        self.catch_up_passes = 2
        self._lock = asyncio.Lock()
        self.swaps = 0

    def serving(self) -> tuple[str, str]:
        engine = self.worker.engine
        return engine.generation_id, getattr(engine, "model_sha256", "")

    def _prepare(self, gen: Generation) -> tuple[Engine, float, float]:
        """Check, load and smoke-test on a helper thread; the serving model keeps answering."""
        t0 = time.perf_counter()
        if sha256_file(gen.gguf) != gen.sha256:
            raise RuntimeError(f"{gen.gguf} does not match the SHA-256 recorded for {gen.id}")
        engine = self.load(gen)
        t1 = time.perf_counter()
        try:
            quiet = getattr(engine, "background_threads", None)
            with quiet() if quiet else contextlib.nullcontext():
                self.smoke_test(engine)
        except BaseException:
            engine.close()
            raise
        return engine, t1 - t0, time.perf_counter() - t1

    async def _warm(self, engine: Engine, plan: Callable[[], list[tuple[int, list[dict]]]], passes: int) -> int:
        """Read the planned chats into `engine` in steps queued on the inference thread; tokens read."""
        prefill = getattr(engine, "prefill", None)
        if prefill is None or self.warm_tokens <= 0:
            return 0
        read = 0
        for _ in range(passes):
            this_pass = 0
            for chat_key, messages in plan():
                while read < self.warm_tokens:
                    step = min(self.warm_step, self.warm_tokens - read)
                    n = await self.worker.run(
                        lambda _serving, m=messages, k=chat_key, s=step: prefill(m, chat_key=k, max_tokens=s),
                        bounded=False, next_in_line=True)
                    read += n
                    this_pass += n
                    if n < step:    # this chat is read to its end
                        break
                if read >= self.warm_tokens:
                    return read
            if this_pass <= self.warm_step:   # the chats are (nearly) all read: swap now
                break
        return read

    def smoke_test(self, engine: Engine) -> None:
        messages = ([{"role": "system", "content": self.persona}] if self.persona else []) + \
                   [{"role": "user", "content": "Hi! How are you?"}]
        out = engine.generate(messages, chat_key="__smoke__", sampling=Sampling(
            temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=self.smoke_tokens))
        engine.forget("__smoke__")
        # a model that ends its turn at once without a word is broken; one still going after a few
        # tokens of whitespace (a leading newline or two) is merely slow to start
        if out.completion_tokens < 1 or (out.finish_reason == "stop" and not out.text.strip()):
            raise RuntimeError(f"the smoke test got an empty reply ({out.completion_tokens} tokens, "
                               f"finish: {out.finish_reason})")

    async def swap_to(self, gen: Generation,
                      warm: Callable[[], list[tuple[int, list[dict]]]] | list | None = None) -> SwapResult:
        """`warm`: (chat, conversation so far) to read into the new model before it serves — or a
        function returning them, called on the event loop before each pass, so the chats that moved
        on while the new model read them are caught up (a pass reads only what is new)."""
        plan = warm if callable(warm) else (lambda: warm or [])
        async with self._lock:
            previous, sha = self.serving()
            if previous == gen.id and sha == gen.sha256:
                return SwapResult(True, gen.id, previous, "already serving")
            engine = None
            try:
                engine, load_s, smoke_s = await asyncio.to_thread(self._prepare, gen)
                t = time.perf_counter()
                read = await self._warm(engine, plan, 1 + self.catch_up_passes if callable(warm) else 1)
                warm_s = time.perf_counter() - t
            except Abandoned:   # the bot is stopping: nothing about the new model was wrong
                if engine is not None:
                    engine.close()
                return SwapResult(False, gen.id, previous, "the bot is stopping", stopping=True)
            except Exception as exc:  # the old generation keeps serving
                log.warning("hot-swap to %s failed", gen.id, exc_info=True)
                if engine is not None:   # failed while warming; _prepare closes its own on failure
                    with contextlib.suppress(Exception):
                        engine.close()
                return SwapResult(False, gen.id, previous, f"{type(exc).__name__}: {exc}")
            t = time.perf_counter()
            old = await asyncio.to_thread(self.worker.swap, engine)
            pause = time.perf_counter() - t
            await asyncio.to_thread(old.close)
            del old
            gc.collect()
            _trim_heap()
            self.swaps += 1
            log.info("now serving %s (was %s): load %.2fs, smoke %.2fs, warm-up %.2fs (%d tokens)",
                     gen.id, previous, load_s, smoke_s, warm_s, read)
            return SwapResult(True, gen.id, previous, "", round(load_s, 3), round(smoke_s, 3), round(pause, 4),
                              warm_s=round(warm_s, 3), warm_tokens=read)


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc only; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
