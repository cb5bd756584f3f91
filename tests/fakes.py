"""A fake engine that records the exact prompt (the rolling context) it was given."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

from bot.engine import Completion, Message, OnText, Sampling


def word_count(messages: list[Message]) -> int:
    """Tokens, for the fake: 4 per message of template overhead plus one per word."""
    return sum(4 + len(m["content"].split()) for m in messages) + 3


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
        self.prompts: list[list[Message]] = []
        self.chat_keys: list[int | str] = []
        self.forgotten: list[int | str] = []
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
        text = self.replies.popleft() if self.replies else f"echo: {messages[-1]['content']}"
        words = text.split(" ")
        for i, word in enumerate(words):
            if self.delay_s:
                time.sleep(self.delay_s / max(len(words), 1))
            if on_text:
                on_text(word if i == 0 else " " + word)
        return Completion(text=text, prompt_tokens=word_count(messages), completion_tokens=len(words),
                          ttft_s=0.001, total_s=time.perf_counter() - start, finish_reason="stop")

    def forget(self, chat_key: int | str) -> None:
        self.forgotten.append(chat_key)

    def close(self) -> None:
        self.closed = True
