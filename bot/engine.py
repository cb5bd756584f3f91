"""What the rest of the bot needs from a language model, and nothing more.

Keeping this interface tiny lets unit tests use a fake that records the exact prompt it
was given, and lets the hot-swap code treat every model the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

Message = dict[str, str]
OnText = Callable[[str], None]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int | None = None
    max_tokens: int = 200


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float            # from the call to the first generated token
    total_s: float
    finish_reason: str       # "stop" (end of turn) | "length" (hit max_tokens)
    cached_tokens: int = 0   # prompt tokens served from a cached KV state
    stats: dict = field(default_factory=dict)


class Engine(Protocol):
    """A loaded model. Not thread-safe: the InferenceWorker is its only caller."""

    generation_id: str
    model_path: Path
    model_sha256: str
    n_ctx: int

    def count_tokens(self, messages: list[Message]) -> int:
        """Tokens of the prompt these messages render to, generation prompt included."""
        ...

    def generate(self, messages: list[Message], *, chat_key: int | str, sampling: Sampling,
                 on_text: OnText | None = None) -> Completion:
        """Complete the assistant's next message, streaming text pieces to `on_text`."""
        ...

    def forget(self, chat_key: int | str) -> None:
        """Drop any cached state of this chat (after /reset)."""
        ...

    def close(self) -> None:
        ...
