"""A fake engine that records the exact prompt (the rolling context) it was given.

It implements the whole Engine protocol (engine/protocol.py), per-chat cached state included:
a prompt is a list of word "tokens" (4 per message of template overhead plus one per word, and
3 for the generation prompt), so `unread`, `prefill` and the hot-swap's handover take the same
paths as with llama.cpp.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from pathlib import Path

from engine.protocol import Completion, Message, OnText, Sampling

GENERATION_PROMPT = ["<|assistant|>", "<|start|>", "<|sep|>"]


def tokens_of(messages: list[Message], *, generation_prompt: bool = True) -> list[str]:
    out: list[str] = []
    for m in messages:
        out += [f"<|{m['role']}|>", "<|start|>", "<|sep|>", *m["content"].split(), "<|end|>"]
    return out + (GENERATION_PROMPT if generation_prompt else [])


def word_count(messages: list[Message]) -> int:
    """Tokens, for the fake: 4 per message of template overhead plus one per word."""
    return len(tokens_of(messages))


def _shared(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class FakeEngine:
    def __init__(self, replies: list[str] | None = None, *, n_ctx: int = 2048, generation_id: str = "gen-0000",
                 delay_s: float = 0.0, fail_with: BaseException | None = None) -> None:
        self.replies = deque(replies or [])
        self.n_ctx = n_ctx
        self.generation_id = generation_id
        self.model_path = Path("/fake/model.gguf")
        self.model_sha256 = "0" * 64
        self.delay_s = delay_s
        self.fail_with = fail_with
        self.generating = False
        self.placement = "CPU (a fake engine)"
        self.prompts: list[list[Message]] = []
        self.chat_keys: list[int | str] = []
        self.forgotten: list[int | str] = []
        self.prefilled: list[tuple[int | str, int]] = []    # (chat, tokens read) per prefill call
        self.batch_threads: list[int | None] = []
        self.cached: dict[int | str, list[str]] = {}
        self.states_saved = 0   # save_states() calls (the worker's clean shutdown)
        self.closed = False

    def count_tokens(self, messages: list[Message]) -> int:
        return word_count(messages)

    def generate(self, messages: list[Message], *, chat_key: int | str, sampling: Sampling,
                 on_text: OnText | None = None) -> Completion:
        start = time.perf_counter()
        self.prompts.append([dict(m) for m in messages])
        self.chat_keys.append(chat_key)
        if self.fail_with is not None:
            raise self.fail_with
        prompt = tokens_of(messages)
        cached = _shared(prompt, self.cached.get(chat_key, []))
        text = self.replies.popleft() if self.replies else f"echo: {messages[-1]['content']}"
        words = text.split(" ")
        self.generating = True
        try:
            for i, word in enumerate(words):
                if self.delay_s:
                    time.sleep(self.delay_s / max(len(words), 1))
                if on_text:
                    on_text(word if i == 0 else " " + word)
        finally:
            self.generating = False
        self.cached[chat_key] = prompt + text.split() + ["<|end|>"]
        return Completion(text=text, prompt_tokens=len(prompt), completion_tokens=len(words),
                          ttft_s=0.001, total_s=time.perf_counter() - start, finish_reason="stop",
                          cached_tokens=cached)

    def unread(self, messages: list[Message], *, chat_key: int | str) -> int:
        prompt = tokens_of(messages)
        return len(prompt) - _shared(prompt, self.cached.get(chat_key, []))

    def prefill(self, messages: list[Message], *, chat_key: int | str, max_tokens: int | None = None) -> int:
        if self.generating:
            raise RuntimeError("prefill() while this model streams a reply")
        text = tokens_of(messages, generation_prompt=False)
        keep = _shared(text, self.cached.get(chat_key, []))
        end = len(text) if max_tokens is None else min(len(text), keep + max_tokens)
        if keep >= end:
            return 0
        self.cached[chat_key] = text[:end]
        self.prefilled.append((chat_key, end - keep))
        return end - keep

    def set_batch_threads(self, n: int | None) -> None:
        self.batch_threads.append(n)

    def forget(self, chat_key: int | str) -> None:
        self.forgotten.append(chat_key)
        self.cached.pop(chat_key, None)

    def save_states(self) -> int:
        self.states_saved += 1
        return len(self.cached)

    def close(self) -> None:
        self.closed = True


class GatedEngine(FakeEngine):
    """A FakeEngine whose replies wait for the test: `hold()`, then each `generate` signals `started`
    and blocks until `release()`, so a test can act while a reply is being written, without sleeps."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()
        self._open = threading.Event()
        self._open.set()

    def hold(self) -> None:
        self._open.clear()
        self.started.clear()

    def release(self) -> None:
        self._open.set()

    async def wait_started(self) -> None:
        """Until a held reply is being written (a test that never gets there fails, not hangs)."""
        assert await asyncio.to_thread(self.started.wait, 10), "no reply started"

    def generate(self, messages: list[Message], **kwargs) -> Completion:
        self.started.set()
        self._open.wait(10)
        return super().generate(messages, **kwargs)


class ScriptedWriter:
    """Writes what it is told, in order (trainer/refine.py's Writer): for the self-refinement step's
    handling of what a model writes, botched outputs included. Records every prompt it was given."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = deque(texts)
        self.prompts: list[list[Message]] = []
        self.max_tokens: list[int] = []

    def greedy_reply(self, messages: list[Message], max_tokens: int = 96) -> Completion:
        """The next text; finish_reason "length" when it has more words than `max_tokens` (a cut decode)."""
        self.prompts.append(messages)
        self.max_tokens.append(max_tokens)
        text = self.texts.popleft() if self.texts else ""
        return Completion(text=text, prompt_tokens=0, completion_tokens=len(text.split()), ttft_s=0.0,
                          total_s=0.0, finish_reason="length" if len(text.split()) > max_tokens else "stop")
