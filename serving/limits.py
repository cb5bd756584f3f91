"""Bounds on what one person or one chat can make the bot hold while it answers.

- `FloodLimit`: at most `messages` text messages per person in any `window_s` seconds. Past
  it a message is still stored (status `limited`, never shown to the model, so it is neither
  answered nor part of anyone's context) and the person gets one polite notice per window;
  the rest of that window passes in silence, so a flood cannot make the bot flood back.
  People are tracked only while they have been active within the last window, so the table
  stays as small as the set of recent writers.
- `ChatQueues`: one reply at a time per chat, in arrival order (each chat's context stays in
  order), with at most `max_waiting` messages waiting behind the one being answered. A message
  past that is stored as `busy` and its author told to send it again. A chat leaves the table
  as soon as nothing of it is queued. A 🔁 second take counts against both, like a message.

The worker's own bound (`max_backlog`, engine/worker.py) caps the jobs waiting for the model
across all chats; these two keep one chat or one person from filling it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

ADMIT, NOTICE, SILENT = "admit", "notice", "silent"


@dataclass
class _Tally:
    admitted: deque[float] = field(default_factory=deque)   # when each admitted message came, oldest first
    noticed: float | None = None                             # when the person was last told they are limited
    last: float = 0.0                                        # last message of any kind


class FloodLimit:
    def __init__(self, messages: int, window_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.messages = messages      # 0: no limit
        self.window_s = window_s
        self._clock = clock
        self._people: OrderedDict[int, _Tally] = OrderedDict()   # least recently active first

    def __len__(self) -> int:
        return len(self._people)

    def check(self, user_id: int) -> str:
        """ADMIT (answer it), NOTICE (limited: tell them once) or SILENT (limited, already told)."""
        if self.messages <= 0:
            return ADMIT
        now = self._clock()
        self._expire(now)
        tally = self._people.pop(user_id, None) or _Tally()
        self._people[user_id] = tally                            # now the most recently active
        tally.last = now
        while tally.admitted and now - tally.admitted[0] >= self.window_s:
            tally.admitted.popleft()
        if len(tally.admitted) < self.messages:
            tally.admitted.append(now)
            return ADMIT
        if tally.noticed is not None and now - tally.noticed < self.window_s:
            return SILENT
        tally.noticed = now
        return NOTICE

    def retry_after(self, user_id: int) -> int:
        """Whole seconds until `user_id` may send again (at least 1): when their oldest message still
        counted leaves the window."""
        tally = self._people.get(user_id)
        if self.messages <= 0 or tally is None or len(tally.admitted) < self.messages:
            return 1
        return max(1, math.ceil(tally.admitted[0] + self.window_s - self._clock()))

    def _expire(self, now: float) -> None:
        """Forget people quiet for a whole window: nothing of theirs could still count."""
        while self._people:
            user_id, tally = next(iter(self._people.items()))
            if now - tally.last < self.window_s:
                return
            del self._people[user_id]


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    count: int = 0                 # the message being answered plus those waiting


class ChatQueues:
    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._chats: dict[int, _Slot] = {}
        self.peak_waiting = 0

    def __len__(self) -> int:
        """Chats with a message being answered or waiting."""
        return len(self._chats)

    def waiting(self, chat_id: int) -> int:
        slot = self._chats.get(chat_id)
        return max(slot.count - 1, 0) if slot else 0

    def join(self, chat_id: int, *, alone: bool = False) -> AbstractAsyncContextManager[None] | None:
        """A place in the chat's queue (`async with` it right away), or None when it is full.
        `alone`: only when nothing of the chat is being answered or waiting (a 🔁 second take,
        which would be out of date behind the chat's next reply)."""
        if alone and chat_id in self._chats:
            return None
        slot = self._chats.get(chat_id)
        if slot is None:
            slot = self._chats[chat_id] = _Slot()
        if slot.count > self.max_waiting:
            return None
        slot.count += 1
        self.peak_waiting = max(self.peak_waiting, slot.count - 1)
        return self._hold(chat_id, slot)

    @contextlib.asynccontextmanager
    async def _hold(self, chat_id: int, slot: _Slot) -> AsyncIterator[None]:
        try:
            async with slot.lock:
                yield
        finally:                   # also when cancelled while waiting
            slot.count -= 1
            if slot.count == 0 and self._chats.get(chat_id) is slot:
                del self._chats[chat_id]
