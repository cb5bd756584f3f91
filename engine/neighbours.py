"""Whether the bot's own training shares the cores with its replies right now.

Decoding several chats at once is one llama_decode of several tokens, and llama.cpp (and its
server) reads any batch of more than one token with the prompt threads — all the cores. On a
quiet machine that is where parallel decoding's throughput comes from; beside a training process
on the other core two threads wait for each other at every step of the graph
(docs/design-notes.md, "Reading prompts with one thread during a swap"), so while a cycle runs
the batched engine steps its generating chats with the generation threads instead. The serving
loop marks the cycle (`training_beside`); the engine asks `training()` before each step.
"""

from __future__ import annotations

import contextlib
import threading

_cycles = 0
_lock = threading.Lock()


def training() -> bool:
    """True while a training cycle of this bot runs beside the serving engine."""
    return _cycles > 0


@contextlib.contextmanager
def training_beside():
    """Mark a training cycle for as long as the block runs (nested and concurrent uses count)."""
    global _cycles
    with _lock:
        _cycles += 1
    try:
        yield
    finally:
        with _lock:
            _cycles -= 1
