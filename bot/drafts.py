"""Which chats stream a reply as a native draft (Bot API 9.5 `sendMessageDraft`), and which fell back.

A draft shows the reply growing in a private chat without a message being edited every second;
the finished reply is then sent as one ordinary message, so its id and buttons work as always
(bot/streaming.py). Telegram allows drafts only in private chats, and an older or self-hosted Bot
API server may not know the method at all: a chat whose draft was refused streams by editing
again, and is not offered drafts for `retry_after_s`, so no reply keeps waiting on a failing call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

RETRY_AFTER_S = 3600.0   # an hour: a server upgrade is noticed the same day, a refusal costs one call an hour


class DraftChats:
    def __init__(self, *, retry_after_s: float = RETRY_AFTER_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_after_s = retry_after_s
        self.clock = clock
        self._refused: dict[int, float] = {}   # chat → when drafts may be tried again

    def allowed(self, chat_id: int) -> bool:
        until = self._refused.get(chat_id)
        if until is None:
            return True
        if self.clock() >= until:
            del self._refused[chat_id]
            return True
        return False

    def refused(self, chat_id: int) -> None:
        """A draft in this chat failed for good (not a timeout or flood wait): edits for a while."""
        now = self.clock()
        self._refused = {c: t for c, t in self._refused.items() if t > now}   # bounded by recent refusals
        self._refused[chat_id] = now + self.retry_after_s
