"""A reply that streams into Telegram: throttled edits (or a native draft), split past 4096 characters.

Telegram tolerates about one edit per second per chat, and about twenty a minute in a group, so
text produced by the model is buffered and shown at most every `interval` seconds (at least
GROUP_INTERVAL_S in a group). An update refused by flood control is skipped, not waited for: the
next comes once the wait is over, and only the final text and buttons wait out what Telegram asked.
Once a reply outgrows one message, the finished part stays as it is and the rest continues in a new
message; the keyboard goes on the last one. In a forum every message goes to the topic it answers (`thread_id`), even when the
message it replies to is gone.

With `drafts` (private chats, bot/drafts.py) the part still being written is shown as a draft
(`sendMessageDraft`, same throttle) instead of a message edited in place, and is sent as a message
only when finished: one final message, whose id the store records before its buttons appear, as
with edits. A draft the server refuses switches this reply, and its chat for a while, to edits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

from telegram import Bot, InlineKeyboardMarkup, Message, ReplyParameters
from telegram.constants import ChatType
from telegram.error import BadRequest, NetworkError, RetryAfter, TelegramError

from bot.addressing import topic_of
from bot.drafts import DraftChats
from bot.retry import MAX_FLOOD_WAIT_S, call_with_retry, flood_wait
from bot.splitting import TELEGRAM_LIMIT, split_text

log = logging.getLogger(__name__)
CURSOR = " ▌"
GROUP_INTERVAL_S = 3.0   # twenty updates a minute: Telegram's pace for a group


class StreamingReply:
    def __init__(self, bot: Bot, chat_id: int, *, reply_to: int | None = None, thread_id: int | None = None,
                 interval: float = 1.0, limit: int = TELEGRAM_LIMIT, drafts: DraftChats | None = None) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.reply_to = reply_to
        self.thread_id = thread_id   # a forum topic (bot/addressing.py topic_of): every piece lands there
        self.interval = max(interval, GROUP_INTERVAL_S) if chat_id < 0 else interval
        self.limit = limit - len(CURSOR)
        self.text = ""
        self.message_ids: list[int] = []
        self.drafts = drafts if drafts is not None and drafts.allowed(chat_id) else None
        self._draft_id = secrets.randbelow(2**31 - 2**16) + 1   # one per piece: draft_id + piece index
        self._drafted: tuple[int, str] | None = None            # (piece, text) the draft shows
        self._shown: list[str] = []
        self._changed = asyncio.Event()
        self._done = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_call = 0.0
        self._flood_until = 0.0   # when a flood wait an edit or a send of this reply ran into ends

    def push(self, piece: str) -> None:
        """Called on the event loop with each new piece of text."""
        self.text += piece
        self._changed.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._pump())

    @classmethod
    def answering(cls, bot: Bot, message: Message, *, interval: float, drafts: DraftChats | None) -> StreamingReply:
        """A reply about `message`: in a private chat a plain message (streamed as a draft where the
        chat takes drafts), in a group an answer to it, in a forum in its topic."""
        private = message.chat.type == ChatType.PRIVATE
        return cls(bot, message.chat_id, reply_to=None if private else message.message_id, thread_id=topic_of(message),
                   interval=interval, drafts=drafts if private else None)

    async def __aenter__(self) -> StreamingReply:
        """Streams while the block runs; its task ends with the block, however the block ends."""
        self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def stop(self) -> None:
        """End the streaming task (after the update it may be sending) and send nothing more."""
        self._done.set()
        self._changed.set()
        if self._task:
            await self._task

    async def _pump(self) -> None:
        # Never cancelled mid-request: a send cut off after Telegram got it would be sent twice.
        while True:
            await self._changed.wait()
            if self._done.is_set():
                return
            wait = self.interval - (time.monotonic() - self._last_call)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), wait)
                if self._done.is_set():
                    return
            self._changed.clear()
            try:
                await self._flush(streaming=True)
            except RetryAfter as exc:   # flood control: this update is skipped, the next waits it out
                self._last_call = self._flood_until = time.monotonic() + flood_wait(exc)
                log.info("chat %s: flood control, next update in %.0f s", self.chat_id, flood_wait(exc))
            except Exception:  # a failed intermediate edit is not worth a lost reply
                log.warning("intermediate edit failed", exc_info=True)

    async def finish(self, text: str | None = None, markup: InlineKeyboardMarkup | None = None,
                     before_markup: Callable[[list[int]], None] | None = None) -> list[int]:
        """Show the final text, then the keyboard on the last message; return all message ids.

        `before_markup(ids)` runs once the final messages exist and before any button is
        visible, so the store knows which messages carry the buttons before anyone can press one.
        """
        await self.stop()
        if text is not None:
            self.text = text
        pending = self._flood_until - time.monotonic()   # a flood wait an update ran into: sooner is refused
        if 0 < pending <= MAX_FLOOD_WAIT_S:   # (a longer one is given up by the final call, without the wait)
            await asyncio.sleep(pending)
        await self._flush(streaming=False)
        ids = list(self.message_ids)
        if before_markup is not None:
            before_markup(ids)
        if markup is not None and ids:
            await _unless_unchanged(lambda: self.bot.edit_message_reply_markup(
                chat_id=self.chat_id, message_id=ids[-1], reply_markup=markup), MAX_FLOOD_WAIT_S)
        return ids

    async def _flush(self, *, streaming: bool) -> None:
        body = self.text.strip() or ("…" if streaming else "🤔")
        pieces = split_text(body, self.limit)
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if streaming and last and self.drafts is not None \
                    and await self._draft(i, piece if self.text.strip() else ""):
                continue
            shown = piece + (CURSOR if streaming and last else "")
            flood = 0.0 if streaming else MAX_FLOOD_WAIT_S   # an update is not worth a flood wait: the next one is
            if i < len(self.message_ids):
                if i < len(self._shown) and self._shown[i] == shown:
                    continue
                await self._edit(self.message_ids[i], shown, flood)
                self._shown[i] = shown
            else:
                msg = await call_with_retry(lambda s=shown: self.bot.send_message(
                    self.chat_id, s, message_thread_id=self.thread_id, reply_parameters=self._reply_parameters()),
                    max_flood_wait=flood)
                self.message_ids.append(msg.message_id)
                self._shown.append(shown)
            self._last_call = time.monotonic()

    def _reply_parameters(self) -> ReplyParameters | None:
        """The first message answers `reply_to`; should that be deleted meanwhile (its author fixing a
        typo, an anti-spam bot), Telegram sends the reply all the same, just not as a reply."""
        if self.reply_to is None or self.message_ids:
            return None
        return ReplyParameters(self.reply_to, allow_sending_without_reply=True)

    async def _draft(self, piece: int, text: str) -> bool:
        """Show the piece being written as a draft (empty text: Telegram's "thinking" placeholder).
        False when the server refused it for good: this reply and chat stream by editing from now on.
        A flood wait or a timeout only skips this update (the next one follows within `interval`)."""
        if self._drafted == (piece, text):
            return True
        try:
            await self.bot.send_message_draft(self.chat_id, self._draft_id + piece, text,
                                              message_thread_id=self.thread_id)
        except RetryAfter as exc:
            self._last_call = time.monotonic() + flood_wait(exc)
            return True
        except BadRequest as exc:
            return self._refused(exc)
        except NetworkError:   # timeouts, 5xx, a dropped connection: not a refusal
            log.info("a draft update failed; the next one follows", exc_info=True)
            return True
        except TelegramError as exc:   # 401/403/404 (a server that lacks the method), 409…
            return self._refused(exc)
        self._drafted = (piece, text)
        self._last_call = time.monotonic()
        return True

    def _refused(self, exc: TelegramError) -> bool:
        log.info("chat %s: drafts refused (%s); streaming by editing instead", self.chat_id, exc)
        assert self.drafts is not None
        self.drafts.refused(self.chat_id)
        self.drafts = None
        return False

    async def _edit(self, message_id: int, text: str, max_flood_wait: float = MAX_FLOOD_WAIT_S) -> None:
        await _unless_unchanged(lambda: self.bot.edit_message_text(
            text, chat_id=self.chat_id, message_id=message_id), max_flood_wait)


async def _unless_unchanged(edit, max_flood_wait: float) -> None:
    """An edit, retried; "not modified" is no error — a retry after a timed-out call that Telegram had
    in fact applied, or an edit to what the message already shows."""
    try:
        await call_with_retry(edit, max_flood_wait=max_flood_wait)
    except BadRequest as exc:
        if "not modified" not in str(exc).lower():
            raise
