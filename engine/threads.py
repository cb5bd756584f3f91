"""Threads that start with their first caller, not where their owner is built.

A thread takes its creator's CPU priority (Linux nice is per thread), and the hot-swap builds the
next model on a thread niced to 19 (serving/hotswap.py `_low_priority`) so that loading it does
not slow the replies. A thread started in a constructor there would run at nice 19 for good: the
batched engine's decode thread did, and beside the niced training cycle a 14-token prompt took
7 s instead of 0.06 s (docs/design-notes.md, "Hot-swap on the parallel engine"). Objects that may
be built there start their threads from whoever uses them first.
"""

from __future__ import annotations

import threading


class FirstUseThread(threading.Thread):
    """A daemon thread its owner starts on first use (`start_once`, under the owner's own lock,
    which also orders it against stopping) and joins only if it ever started."""

    def __init__(self, target, name: str) -> None:
        super().__init__(target=target, name=name, daemon=True)

    def start_once(self) -> None:
        if self.ident is None:
            self.start()

    def join_if_started(self) -> None:
        if self.ident is not None:
            self.join()
