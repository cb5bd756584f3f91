"""One turn of conversation, independent of where it came from (Telegram, the terminal, the HTTP API).

The order is the contract: store the user's message, decide whether the model may see it,
build the rolling context on the inference thread (token counts need the model's
tokenizer), generate, then store the reply and its metadata in one transaction.

A client that sends the conversation so far with each message (the OpenAI API) reads that
history instead of the stored one (`follow`); its turns are stored all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from config.settings import Settings
from core.errors import OuroError
from engine.protocol import Completion, Engine, Sampling
from engine.worker import Abandoned, Busy, Cancelled, InferenceWorker, loop_callback
from lineage.constitution import own_constitution
from lineage.generations import Lineage
from memory.store import Exchange, Store, TurnRef
from serving.context import ContextTooLong, build_context, to_messages
from serving.stops import StopSequence, StopWatch

log = logging.getLogger(__name__)

TERMINAL_CHAT_ID = -1   # `ouro chat`; a chat id Telegram never uses for private chats

# What people are told. Short and kind; never an exception text.
TOO_LONG = "That message is too long for me to read in one go — could you send a shorter version?"
EMPTY = "I only read text messages — send me a few words and I'll answer."
BUSY = "I'm answering a lot of people right now — please try again in a minute."
FAILED = "Something went wrong on my side while answering. Please send that again."
STOPPING = "Sorry — I'm restarting and had to stop before finishing this answer. Please send it again in a minute."
LEFT = "The reply was stopped: its reader left before it was finished."


@dataclass
class Outcome:
    """What happened to a message, for the transport to show."""

    kind: str                      # answered | correction | refused | busy | failed | pending (stored, not yet answered)
    #                                | gone (forgotten by /forget meanwhile: text is what was written, if anything)
    turn_id: int | None = None
    text: str = ""                 # the reply (answered) or what to tell the user
    completion: Completion | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Speaker:
    chat_id: int
    user_id: int
    chat_type: str = "private"
    chat_title: str | None = None
    username: str | None = None
    first_name: str | None = None


class Conversation:
    def __init__(self, settings: Settings, store: Store, worker: InferenceWorker) -> None:
        self.settings = settings
        self.store = store
        self.worker = worker
        self._draft = settings.persona()
        self._personas: dict[str, str] = {}      # generation id → its constitution, read once
        self._answering: Counter = Counter()   # chat → replies asked for and not finished (see warmup_plan)

    @property
    def persona(self) -> str:
        """The constitution of the generation serving now (lineage/constitution.py): each generation
        speaks with the text it was trained with; generation 0 and older ones with the draft as it
        was when the bot started."""
        return self.persona_of(self.worker.engine.generation_id)

    def persona_of(self, generation_id: str) -> str:
        text = self._personas.get(generation_id)
        if text is None:
            try:
                text = own_constitution(Lineage(self.settings.models_dir).generation(generation_id))
            except OuroError as exc:   # not a generation of this lineage (a test's engine), or a damaged file
                log.warning("serving %s with the persona file's text: %s", generation_id, exc)
            text = self._personas[generation_id] = text if text is not None else self._draft
        return text

    def sampling(self, *, seed: int | None = None, max_tokens: int | None = None,
                 temperature: float | None = None) -> Sampling:
        """The settings' sampling; a caller may ask for fewer tokens than reply_max_tokens, or another temperature."""
        return Sampling.serving(self.settings, seed=seed, max_tokens=max_tokens, temperature=temperature)

    async def handle_text(self, who: Speaker, text: str, *, message_id: int | None = None,
                          on_text: Callable[[str], None] | None = None) -> Outcome:
        """Everything that happens to one text message; never raises for bad input."""
        received = self.receive(who, text, message_id=message_id)
        if received.kind != "pending":
            return received
        return await self.answer(received.turn_id, on_text=on_text)

    def receive(self, who: Speaker, text: str, *, message_id: int | None = None) -> Outcome:
        """Store the message the moment it arrives — before it waits for its chat's turn or the
        model — and settle what needs no model: a correction, an empty or too-long message. Kind
        "pending" means: stored, to be answered with `answer(turn_id)` (or marked busy/limited).
        A crash while it waits leaves it pending, so the restarted bot asks its author to resend."""
        corrected = self.store.take_correction(who.chat_id, who.user_id, text)
        if corrected is not None:
            return Outcome(kind="correction", turn_id=corrected, text=text)
        turn_id = self.store.add_user_turn(
            chat_id=who.chat_id, user_id=who.user_id, text=text, user_message_id=message_id,
            chat_type=who.chat_type, chat_title=who.chat_title, username=who.username, first_name=who.first_name)
        if not text.strip():
            self.store.mark_turn(turn_id, "refused", EMPTY)
            return Outcome(kind="refused", turn_id=turn_id, text=EMPTY)
        if len(text) > self.settings.max_input_chars:
            self.store.mark_turn(turn_id, "refused", TOO_LONG)
            return Outcome(kind="refused", turn_id=turn_id, text=TOO_LONG)
        return Outcome(kind="pending", turn_id=turn_id)

    async def answer(self, turn_id: int, *, on_text: Callable[[str], None] | None = None,
                     history: Sequence[Exchange] | None = None, max_tokens: int | None = None,
                     temperature: float | None = None, seed: int | None = None,
                     cancelled: threading.Event | None = None, stop: Sequence[str] = ()) -> Outcome:
        """Generate the reply to a stored pending turn; every failure is stored on the turn.

        `history`: the conversation the client sent (see `follow`) instead of the stored session.
        `max_tokens` (at most reply_max_tokens), `temperature` and `seed` override the settings' for
        this reply. `cancelled`, once set (its reader left), stops the reply at its next piece: the
        turn is closed as failed with LEFT, no admin told. `stop`: the reply ends where one of these
        begins, none of it shown or stored (serving/stops.py)."""
        turn = self.store.turn(turn_id)
        if turn is None:   # forgotten (/forget) while it waited its chat's turn: nothing left to answer
            return Outcome(kind="gone", turn_id=turn_id)
        sampling = self.sampling(max_tokens=max_tokens, temperature=temperature, seed=seed)
        with self._replying(turn.chat_id):
            return await self._answer(turn, on_text, history, sampling, cancelled, tuple(stop))

    def follow(self, who: Speaker, exchanges: Sequence[tuple[str, str]]) -> list[Exchange]:
        """For a client that sends the whole conversation with each message: the (user, reply) pairs
        before its new message, as the history to answer with. When they are the stored session's
        latest exchanges, the session goes on and they keep their turn ids (training then reads
        exactly what was served); otherwise (a new or someone else's conversation) a new session
        starts, and they get turn id 0: not stored, the new turn begins its own context."""
        session = self.store.current_session(who.chat_id)
        stored = self.store.history(session, last=max(len(exchanges), 1)) if session is not None else []
        tail = stored[len(stored) - len(exchanges):] if exchanges else []
        if exchanges and len(tail) == len(exchanges) and all(
                ex.user_text == user and ex.reply_text == reply.strip()   # stored stripped, streamed as written
                for ex, (user, reply) in zip(tail, exchanges, strict=True)):
            return tail
        if stored:
            self.reset(who)
        return [Exchange(0, user, reply) for user, reply in exchanges]

    @contextlib.contextmanager
    def _replying(self, chat_id: int):
        self._answering[chat_id] += 1
        try:
            yield
        finally:
            self._answering[chat_id] -= 1
            if self._answering[chat_id] <= 0:
                del self._answering[chat_id]

    async def _answer(self, turn, on_text: Callable[[str], None] | None, given: Sequence[Exchange] | None,
                      sampling: Sampling, cancelled: threading.Event | None = None,
                      stop: tuple[str, ...] = ()) -> Outcome:
        turn_id = turn.id
        if given is None:   # the window from its anchor on: build_context never reads before it
            anchor = self.store.context_start(turn.session_id)
            history = self.store.history(turn.session_id, before_turn_id=turn_id, since_turn_id=anchor)
        else:
            history, anchor = list(given), None
        started = time.perf_counter()
        on_text = _on_loop(on_text)

        def job(engine: Engine):
            began = time.perf_counter()   # as the engines measure: from the call, not the wait for the model
            self.worker.check(cancelled)   # its reader left (or the bot stops) while it waited: not even read
            ctx = build_context(persona=self.persona, history=history, user_text=turn.user_text,
                                count=engine.count_tokens, budget=engine.n_ctx - sampling.max_tokens,
                                anchor=anchor, trim_to=self.settings.context_trim_to, turn_id=turn_id,
                                speaker=turn.speaker, said_at=turn.created_at)
            engine = self.worker.route(turn.chat_id, ctx.messages)   # during a hot-swap, maybe the new model
            watch = StopWatch(stop, on_text) if stop else None
            try:
                completion = engine.generate(ctx.messages, chat_key=turn.chat_id, sampling=sampling,
                                             on_text=self.worker.guard(watch.feed if watch else on_text, cancelled))
            except StopSequence:
                assert watch is not None
                completion = watch.completion(prompt_tokens=engine.count_tokens(ctx.messages), began=began)
            else:
                if watch is not None:
                    watch.finish()
            return ctx, completion, engine.generation_id

        try:
            ctx, completion, generation_id = await self.worker.run(job)
        except Abandoned:   # the bot is stopping (SIGTERM) and this reply ran past the grace period
            self.store.mark_turn(turn_id, "failed", STOPPING)
            return Outcome(kind="failed", turn_id=turn_id, text=STOPPING)
        except Busy:
            self.store.mark_turn(turn_id, "busy", BUSY)
            return Outcome(kind="busy", turn_id=turn_id, text=BUSY)
        except Cancelled:
            self.store.mark_turn(turn_id, "failed", LEFT)
            return Outcome(kind="failed", turn_id=turn_id, text=LEFT)
        except ContextTooLong:
            self.store.mark_turn(turn_id, "refused", TOO_LONG)
            return Outcome(kind="refused", turn_id=turn_id, text=TOO_LONG)
        except Exception as exc:  # a model failure must not lose the turn; admins get the traceback
            log.exception("generation failed for turn %s", turn_id)
            self.store.mark_turn(turn_id, "failed", FAILED)
            return Outcome(kind="failed", turn_id=turn_id, text=FAILED, error=exc)
        if self.store.turn(turn_id) is None:   # forgotten (/forget) while it was written: nothing to keep
            return Outcome(kind="gone", turn_id=turn_id, text=completion.text)
        self.store.complete_turn(
            turn_id, reply_text=completion.text, generation_id=generation_id,
            prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
            latency_s=time.perf_counter() - started, ttft_s=completion.ttft_s,
            context_start_turn_id=ctx.start_turn_id or turn_id)   # 0: the client's history, not stored turns
        return Outcome(kind="answered", turn_id=turn_id, text=completion.text, completion=completion)

    async def regenerate(self, turn_id: int, *, on_text: Callable[[str], None] | None = None,
                         seed: int | None = None) -> tuple[int | None, str]:
        """A second sample for the same context; returns (alternative id, text). The id is None when
        the turn was forgotten (/forget) meanwhile: the sample is not kept, and that is no error."""
        turn = self.store.turn(turn_id)
        if turn is None:
            return None, ""
        if turn.status != "answered":
            raise ValueError(f"turn {turn_id} has no reply to regenerate")
        anchor = turn.context_start_turn_id
        history = self.store.history(turn.session_id, before_turn_id=turn_id, since_turn_id=anchor)
        sampling = self.sampling(seed=seed if seed is not None else int(time.time() * 1000) % 2**31)
        on_text = _on_loop(on_text)

        def job(engine: Engine):
            ctx = build_context(persona=self.persona, history=history, user_text=turn.user_text,
                                count=engine.count_tokens, budget=engine.n_ctx - sampling.max_tokens,
                                anchor=anchor, trim_to=self.settings.context_trim_to, turn_id=turn_id,
                                speaker=turn.speaker, said_at=turn.created_at)
            engine = self.worker.route(turn.chat_id, ctx.messages)
            return engine.generate(ctx.messages, chat_key=turn.chat_id, sampling=sampling,
                                   on_text=self.worker.guard(on_text)), \
                engine.generation_id

        with self._replying(turn.chat_id):
            completion, generation_id = await self.worker.run(job)
        return self.store.add_alternative(turn_id, completion.text, generation_id), completion.text

    def warmup_plan(self, limit: int) -> list[tuple[int, list[dict], bool]]:
        """The conversations so far of the `limit` most recently active chats, newest first —
        what a freshly loaded model reads ahead of a hot-swap (`LlamaEngine.prefill`) — each with
        whether a reply in it is under way (its words are not here yet: the hot-swap waits for them
        rather than hand the chat over a turn behind). Read here, on the event loop's thread, so
        the loading thread never touches the store. Read with the new generation's constitution: what
        it will be asked with once the chat is handed over."""
        plan = []
        incoming = self.worker.incoming   # the model being read into speaks with its own constitution
        persona = self.persona_of(incoming.generation_id) if incoming is not None else self.persona
        for chat_id, session in self.store.recent_chats(limit):
            history = self.store.history(session, since_turn_id=self.store.context_start(session))
            if history:
                plan.append((chat_id, to_messages(persona, history, "")[:-1], chat_id in self._answering))
        return plan

    def reset(self, who: Speaker) -> None:
        self.store.reset_session(who.chat_id, chat_type=who.chat_type, user_id=who.user_id,
                                 username=who.username, first_name=who.first_name)
        self.store.cancel_correction(who.chat_id, who.user_id)

    # --- the rest of a turn's life: what the transport reports back, what its buttons ask ----------
    def refuse_non_text(self, who: Speaker, kind: str, told: str | None, *, message_id: int | None = None) -> int:
        """A sticker, photo, voice note…: kept as a turn "[kind]", refused with what its author was told
        (None: nothing, past the flood limit)."""
        turn_id = self.store.add_user_turn(chat_id=who.chat_id, user_id=who.user_id, text=f"[{kind}]",
                                           user_message_id=message_id, chat_type=who.chat_type,
                                           username=who.username, first_name=who.first_name, status="pending")
        self.store.mark_turn(turn_id, "refused", told)
        return turn_id

    def mark_busy(self, turn_id: int, told: str) -> None:
        """A pending turn its chat had no room to wait for: kept, never shown to the model."""
        self.store.mark_turn(turn_id, "busy", told)

    def mark_limited(self, turn_id: int, told: str | None) -> None:
        """A pending turn over its author's flood limit: kept, never shown to the model (`told` is
        None when they were already told in this window)."""
        self.store.mark_turn(turn_id, "limited", told)

    def delivered(self, turn_id: int, message_ids: list[int]) -> None:
        """The reply reached the chat as these messages (an empty list: sending it was given up);
        the buttons under it are checked against them."""
        self.store.set_reply_message_ids(turn_id, message_ids)

    def alternative_delivered(self, alternative_id: int, message_ids: list[int]) -> None:
        """A second take reached the chat as these messages; its pick buttons are checked against them."""
        self.store.set_alternative_message_ids(alternative_id, message_ids)

    def turn(self, turn_id: int) -> TurnRef | None:
        """The stored turn a button names; None when there is none."""
        return self.store.turn(turn_id)

    def is_latest_reply(self, chat_id: int, turn_id: int) -> bool:
        """Whether `turn_id` is the chat's newest answered turn (only that one can be regenerated)."""
        return self.store.latest_answered_turn(chat_id) == turn_id

    def alternative(self, alternative_id: int) -> dict | None:
        return self.store.alternative(alternative_id)

    def rate(self, turn_id: int, user_id: int, value: int) -> str:
        """👍 (+1) or 👎 (-1), one per person per reply; returns 'new', 'changed' or 'same'."""
        return self.store.rate(turn_id, user_id, value)

    def give_reason(self, turn_id: int, user_id: int, reason: str) -> bool:
        """Why this person 👎'd `turn_id` (memory/feedback.py REASONS); False if their rating is not a 👎."""
        return self.store.give_reason(turn_id, user_id, reason)

    def ask_for_correction(self, chat_id: int, user_id: int, turn_id: int) -> None:
        """✏️: this person's next message in this chat is their better answer to `turn_id` (see receive)."""
        self.store.await_correction(chat_id, user_id, turn_id)

    def keep(self, turn_id: int, alternative_id: int, user_id: int, *, keep_alternative: bool) -> bool:
        """Which of the reply and its second take this person kept; False when already decided."""
        return self.store.pick(turn_id, alternative_id, user_id, keep_alternative=keep_alternative)

    def interrupted_turns(self) -> list[dict]:
        """Turns left pending by a crash: being answered, or waiting their chat's turn."""
        return self.store.pending_turns()

    def undelivered_replies(self, *, since: str) -> list[dict]:
        """Replies written and stored since `since` but cut off while being sent."""
        return self.store.undelivered_turns(since=since)

    def mark_failed(self, turn_id: int, told: str) -> None:
        """Close a turn that will not be answered with what its author was told."""
        self.store.mark_turn(turn_id, "failed", told)


def _on_loop(fn: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Streamed pieces are produced on the inference thread; deliver them on the event loop."""
    if fn is None:
        return None
    return loop_callback(asyncio.get_running_loop(), fn)
