"""Stop sequences: a reply ends where one of them begins, and none of it is ever shown.

An API client may ask for them (`stop` in a chat completion: a ReAct agent's "Observation:"). The
watch sits between the engine's text pieces and whoever streams them: it passes on only text that
cannot be the start of a stop sequence, holds back the rest until the next piece decides, and on a
match raises `StopSequence`, which ends the engine's generation as any exception from `on_text`
does (its slot freed, the external server's stream closed). Works the same for every engine, so a
stop costs nothing of the parallel engine's exactness.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from engine.protocol import Completion


class StopSequence(Exception):
    """The reply reached one of its stop sequences (control flow: the reply ends there)."""


class StopWatch:
    def __init__(self, stops: Sequence[str], emit: Callable[[str], None] | None) -> None:
        self.stops = tuple(s for s in stops if s)
        self.emit = emit
        self.text = ""          # everything written so far; once stopped, what comes before the stop
        self.sent = 0           # how much of it has been passed on
        self.pieces = 0         # text pieces the engine produced (about one a token)
        self.first_at: float | None = None
        self.longest = max((len(s) for s in self.stops), default=0)

    def feed(self, piece: str) -> None:
        """One piece from the engine: pass on what is safe, or raise StopSequence at a match."""
        if self.first_at is None:
            self.first_at = time.perf_counter()
        self.pieces += 1
        start = max(0, len(self.text) - self.longest)   # a match must end in the new piece
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self._pass_on(len(self.text))
            raise StopSequence
        self._pass_on(len(self.text) - self._held())

    def completion(self, *, prompt_tokens: int, began: float) -> Completion:
        """The reply as it stopped, timed from `began` (the engine call) as the engines time theirs."""
        total = time.perf_counter() - began
        return Completion(text=self.text.strip(), prompt_tokens=prompt_tokens, completion_tokens=self.pieces,
                          finish_reason="stop", total_s=total,
                          ttft_s=(self.first_at - began) if self.first_at is not None else total)

    def finish(self) -> None:
        """The reply ended without a stop: pass on what was held back."""
        self._pass_on(len(self.text))

    def _held(self) -> int:
        """The longest end of the text that a stop sequence begins with (it may yet complete)."""
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _pass_on(self, upto: int) -> None:
        if upto > self.sent:
            if self.emit is not None:
                self.emit(self.text[self.sent:upto])
            self.sent = upto
