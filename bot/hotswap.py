"""Putting a new generation in front of people without stopping the bot.

The new model is loaded beside the old one on a helper thread (the inference thread keeps
answering meanwhile), checked against its recorded SHA-256, and smoke-tested: it must
answer a plain greeting (greedy, a few tokens) without ending its turn empty-handed. Only then is it swapped into the
worker — under the inference lock, so a reply being generated finishes on the old model and
the next one starts on the new. The old model is closed afterwards, which also drops every
cached chat KV state (they belong to the old weights). One swap at a time.

Warm-up: dropping the KV states would make every active chat re-read its whole history on the
new model's first reply — seconds of silence right after the swap. So before swapping, the
new model reads the conversations of the most recently active chats into its own per-chat
states on the loading thread — newest first, at most `swap_warm_tokens` tokens in all, on one
thread — while the old one keeps answering. That takes seconds, during which the chats move on;
up to two catch-up passes then read only what they said meanwhile (each prefix is reused), so
the first reply of each on the new model evaluates a few tokens, not a turn or three. The
budget counts every pass.

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
from bot.worker import InferenceWorker
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


class HotSwapper:
    def __init__(self, worker: InferenceWorker, load: Callable[[Generation], Engine], *, persona: str = "",
                 smoke_tokens: int = 8, warm_tokens: int = 4096) -> None:
        self.worker = worker
        self.load = load
        self.persona = persona
        self.smoke_tokens = smoke_tokens
        self.warm_tokens = warm_tokens
        self.catch_up_passes = 2
        self._lock = asyncio.Lock()
        self.swaps = 0

    def serving(self) -> tuple[str, str]:
        engine = self.worker.engine
        return engine.generation_id, getattr(engine, "model_sha256", "")

    def _prepare(self, gen: Generation, warm: list[tuple[int, list[dict]]]) -> tuple[Engine, int, float, float]:
        t0 = time.perf_counter()
        if sha256_file(gen.gguf) != gen.sha256:
            raise RuntimeError(f"{gen.gguf} does not match the SHA-256 recorded for {gen.id}")
        engine = self.load(gen)
        t1 = time.perf_counter()
        try:
            self.smoke_test(engine)
            read = self._warm(engine, warm, self.warm_tokens)
        except BaseException:
            engine.close()
            raise
        return engine, read, t1 - t0, time.perf_counter() - t1

    @staticmethod
    def _warm(engine: Engine, warm: list[tuple[int, list[dict]]], budget: int) -> int:
        """Read the chats into the new model (on one thread) until `budget` tokens are read; tokens read."""
        prefill = getattr(engine, "prefill", None)
        if prefill is None:
            return 0
        quiet = getattr(engine, "background_threads", None)
        read = 0
        with quiet() if quiet else contextlib.nullcontext():
            for chat_key, messages in warm:
                if budget - read <= 0:
                    break
                read += prefill(messages, chat_key=chat_key)
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
        function returning them, called on the event loop, so the chats that moved on while the
        new model read them can be caught up (each pass reads only what is new: a few tokens)."""
        plan = warm if callable(warm) else (lambda: warm or [])
        async with self._lock:
            previous, sha = self.serving()
            if previous == gen.id and sha == gen.sha256:
                return SwapResult(True, gen.id, previous, "already serving")
            engine = None
            try:
                engine, read, load_s, smoke_s = await asyncio.to_thread(self._prepare, gen, plan())
                for _ in range(self.catch_up_passes if callable(warm) else 0):
                    if read >= self.warm_tokens:
                        break
                    more = await asyncio.to_thread(self._warm, engine, plan(), self.warm_tokens - read)
                    if not more:
                        break
                    read += more
            except Exception as exc:  # the old generation keeps serving
                log.warning("hot-swap to %s failed", gen.id, exc_info=True)
                if engine is not None:   # a catch-up pass failed; _prepare closes its own on failure
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
            log.info("now serving %s (was %s): load %.2fs, smoke + warm-up %.2fs", gen.id, previous, load_s, smoke_s)
            return SwapResult(True, gen.id, previous, "", round(load_s, 3), round(smoke_s, 3), round(pause, 4))


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc only; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
