"""What the rest of the project needs from a loaded model: the whole contract, nothing more.

Everything the worker, the hot-swap and the conversation call is declared here, so the test
fake (tests/helpers/fakes.py) implements all of it and takes the same paths as llama.cpp.
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

    @classmethod
    def serving(cls, settings, *, seed: int | None = None, max_tokens: int | None = None,
                temperature: float | None = None) -> Sampling:
        """How users are answered (config.settings: temperature, top-p, top-k, repeat penalty, seed,
        reply_max_tokens); a caller may ask for another temperature or seed, or fewer tokens."""
        budget = settings.reply_max_tokens if max_tokens is None else max(1, min(max_tokens, settings.reply_max_tokens))
        return cls(temperature=settings.temperature if temperature is None else temperature, top_p=settings.top_p,
                   top_k=settings.top_k, repeat_penalty=settings.repeat_penalty,
                   seed=seed if seed is not None else settings.seed, max_tokens=budget)


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
    """A loaded model; the InferenceWorker is its only caller. `LlamaEngine` is not thread-safe (a
    worker with one job thread); `BatchedEngine` is (the worker runs `max_parallel` jobs at once)."""

    generation_id: str
    model_path: Path
    model_sha256: str
    n_ctx: int
    generating: bool          # True while generate() streams (background reads must wait)
    placement: str            # where the model runs, one line for /status (engine/placement.py)

    def count_tokens(self, messages: list[Message]) -> int:
        """Tokens of the prompt these messages render to, generation prompt included."""
        ...

    def generate(self, messages: list[Message], *, chat_key: int | str, sampling: Sampling,
                 on_text: OnText | None = None) -> Completion:
        """Complete the assistant's next message, streaming text pieces to `on_text`."""
        ...

    def unread(self, messages: list[Message], *, chat_key: int | str) -> int:
        """Prompt tokens generate() would read now for this chat (the rest is cached)."""
        ...

    def prefill(self, messages: list[Message], *, chat_key: int | str, max_tokens: int | None = None) -> int:
        """Read a chat's conversation so far into its cached state (at most `max_tokens` more);
        tokens read. Never called while `generating`."""
        ...

    def set_batch_threads(self, n: int | None) -> None:
        """Threads used to read prompt tokens (None: the engine's own default)."""
        ...

    def forget(self, chat_key: int | str) -> None:
        """Drop any cached state of this chat, in memory and on disk (after /forget)."""
        ...

    def save_states(self) -> int:
        """Write the chats' cached states to the data folder, so the same model loaded again (after a
        restart) reads only their new tokens; states written (0 without a KV folder). At a clean
        shutdown, with no reply under way; `close` alone does not save (an old model after a swap)."""
        ...

    def close(self) -> None:
        ...
