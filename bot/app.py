"""Building the Telegram application: every handler registered here, dependencies injected.

`build_application` takes ready-made settings, store and conversation (the model already
loaded), so tests can pass fakes and the CLI decides where things come from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from typing import Protocol

from telegram import BotCommand, BotCommandScopeChat, BotCommandScopeDefault, Update
from telegram.constants import ChatType
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    MessageHandler,
    SimpleUpdateProcessor,
    TypeHandler,
    filters,
)

from bot import keyboards
from bot.admin import AdminHandlers, loop_not_running
from bot.commands import COMMANDS
from bot.handlers import Handlers
from bot.interview import InterviewHandlers, PersonaHandlers
from bot.privacy import PrivacyHandlers
from bot.recovery import recover_interrupted
from bot.retry import call_with_retry
from bot.review import ReviewHandlers
from bot.webhook import Webhook, run_webhook, start_webhook
from config.settings import Settings
from engine.worker import InferenceWorker
from memory.store import Store
from serving.conversation import Conversation
from serving.interview import Interviewer
from serving.loop import LearningLoop
from serving.status import write_runtime

log = logging.getLogger(__name__)
HEARTBEAT_S = 5.0


class Companion(Protocol):
    """Something served from the bot's process and event loop beside Telegram (the HTTP API, api/):
    started once the bot is up, stopped as it shuts down."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


UPDATES_AT_ONCE = 256   # python-telegram-bot's own number for concurrent_updates(True)


class PressesFirst(SimpleUpdateProcessor):
    """Updates handled at once, at most `max_concurrent_updates` — except button presses, which never
    wait for a place: a message's handler keeps its place while it waits for its chat and the model,
    so with enough chats talking a press could wait behind whole replies, and Telegram gives up on a
    press not answered within seconds. A press does little (a row in the store, an answer); the one
    that writes, 🔁, is bounded by the flood limit and its chat's queue."""

    async def process_update(self, update: object, coroutine) -> None:
        if isinstance(update, Update) and update.callback_query is not None:
            await self.do_process_update(update, coroutine)
        else:
            await super().process_update(update, coroutine)


def build_application(settings: Settings, store: Store, conversation: Conversation, *, token: str,
                      base_url: str | None = None, learning: bool | LearningLoop = False,
                      notices: list[str] | None = None, companions: Sequence[Companion] = ()) -> Application:
    """`learning`: True builds the learning loop (schedule, /train, hot-swap, live watch) around the
    conversation's worker; a LearningLoop uses that one (tests give it a fake loader); False leaves
    it out (the lineage commands then say so). `notices` are sent to the admins once the bot is up
    (e.g. the start-up fell back to an older generation: `Runtime.notices`). `companions` run in
    the same event loop, over the same conversation (`ouro serve` with OURO_HTTP_PORT: the API)."""
    h = Handlers(settings, store, conversation, started_at=time.time())
    privacy = PrivacyHandlers(settings, store, conversation.worker)
    review = ReviewHandlers(settings, store)   # works with or without the learning loop
    interview = InterviewHandlers(settings, store, Interviewer(settings, store, conversation))
    persona = PersonaHandlers(settings)
    builder: ApplicationBuilder = Application.builder().token(token).concurrent_updates(PressesFirst(UPDATES_AT_ONCE))
    if base_url:
        base = base_url.rstrip("/")
        builder = builder.base_url(base).base_file_url(base.replace("/bot", "/file/bot"))
    timeout = settings.telegram_timeout_s
    builder = builder.connect_timeout(10).read_timeout(timeout).write_timeout(timeout).pool_timeout(10)
    builder = builder.get_updates_read_timeout(40)
    app = builder.post_init(lambda a: _post_init(a, settings, h)).post_shutdown(_post_shutdown).build()
    app.bot_data["handlers"] = h
    app.bot_data["notices"] = list(notices or [])
    app.bot_data["companions"] = list(companions)
    loop = None
    if learning is True:
        loop = LearningLoop(settings, store, conversation.worker, warmup=conversation.warmup_plan)
    elif isinstance(learning, LearningLoop):
        loop = learning
    if loop is not None:
        loop.notify = lambda text: _tell_admins(app, settings, text)
        h.admin = AdminHandlers(settings, store, loop)
        app.bot_data["learning"] = loop

    admins = filters.User(user_id=settings.admin_ids, allow_empty=False)
    app.add_handler(TypeHandler(Update, h.gate.check), group=-1)
    app.add_handler(_command("start", h.commands.start))
    app.add_handler(_command("help", h.commands.help))
    app.add_handler(_command("reset", h.commands.reset))
    app.add_handler(_command("privacy", privacy.privacy))
    app.add_handler(_command("optout", privacy.optout))
    app.add_handler(_command("optin", privacy.optin))
    app.add_handler(_command("forget", privacy.forget))
    for cmd in COMMANDS:
        if cmd.admin:
            app.add_handler(_command(cmd.name, _admin_command(cmd.name, h, review, interview, persona), admins))
            app.add_handler(_command(cmd.name, h.gate.refuse_admin))
    app.add_handler(CallbackQueryHandler(review.press, pattern=keyboards.REVIEW_PATTERN))
    app.add_handler(CallbackQueryHandler(review.press_proposal, pattern=keyboards.PROPOSAL_PATTERN))
    app.add_handler(CallbackQueryHandler(privacy.confirm, pattern=keyboards.FORGET_PATTERN))
    app.add_handler(CallbackQueryHandler(interview.press, pattern=keyboards.INTERVIEW_PATTERN))
    if h.admin is not None:
        app.add_handler(CallbackQueryHandler(h.admin.confirm, pattern=keyboards.ADMIN_PATTERN))
    app.add_handler(CallbackQueryHandler(h.buttons.press))
    app.add_handler(MessageHandler(filters.UpdateType.EDITED, lambda u, c: _keep_edit(store, u)))
    app.add_handler(MessageHandler(filters.COMMAND, h.commands.unknown))
    app.add_handler(MessageHandler(filters.UpdateType.MESSAGE & filters.TEXT & admins & review.awaiting_edit,
                                   review.take_edit))   # an admin's edited reply after ✏️ Edit in /review
    app.add_handler(MessageHandler(filters.UpdateType.MESSAGE & filters.TEXT & admins & review.awaiting_proposal_edit,
                                   review.take_proposal_edit))   # the admin's reply after ✏️ on a proposal
    app.add_handler(MessageHandler(filters.UpdateType.MESSAGE & filters.TEXT & admins & interview.awaiting_answer,
                                   interview.take_answer))   # an admin's own answer after ✏️ Edit in /interview
    app.add_handler(MessageHandler(filters.UpdateType.MESSAGE & filters.TEXT, h.chat.text))
    app.add_handler(MessageHandler(filters.UpdateType.MESSAGE & ~filters.TEXT & ~filters.StatusUpdate.ALL, h.chat.non_text))
    app.add_error_handler(h.errors.on_error)
    return app


def _command(name: str, callback, only: filters.BaseFilter | None = None) -> CommandHandler:
    """A command in a new message only: PTB also runs commands on edited messages by default, and
    editing an old message into "/reset" must not reset the chat. Edits go to `_keep_edit`."""
    new = filters.UpdateType.MESSAGE
    return CommandHandler(name, callback, filters=new if only is None else new & only)


def _admin_command(name: str, h: Handlers, review: ReviewHandlers, interview: InterviewHandlers,
                   persona: PersonaHandlers):
    """The handler of an admin command: /status, /review, /interview, /persona, or a lineage one
    (bot/admin.py) — which only says the loop is elsewhere when it does not run in this process."""
    if name == "status":
        return h.status.status
    if name == "review":
        return review.review
    if name == "interview":
        return interview.interview
    if name == "persona":
        return persona.persona
    if h.admin is not None:
        return getattr(h.admin, name)
    return loop_not_running


async def _keep_edit(store: Store, update: Update) -> None:
    """An edited message: the original was already answered and is what stays in the conversation
    (and in training); the new text is kept as an event so nothing is silently lost, and never
    trains (an edit cannot smuggle a correction past the trust rules). /forget deletes it too.
    Only what was said to the bot is kept: a private chat's, or a group message stored as a turn —
    never the edits of group chatter the bot ignored (a bot that is admin receives them all)."""
    msg = update.edited_message or update.edited_channel_post
    if msg is None or update.effective_user is None:
        return
    if msg.chat.type != ChatType.PRIVATE and not store.is_turn_message(msg.chat_id, msg.message_id):
        return
    store.log_event("edited_message", user_id=update.effective_user.id, chat_id=msg.chat_id,
                    detail={"message_id": msg.message_id, "text": (msg.text or msg.caption or "")[:4096]})


async def _post_init(app: Application, settings: Settings, h: Handlers) -> None:
    """Register the command menu (admins see theirs too) and start the status heartbeat."""
    public = [BotCommand(c.name, c.description) for c in COMMANDS if not c.admin]
    everything = [BotCommand(c.name, c.description) for c in COMMANDS]
    try:
        await app.bot.set_my_commands(public, scope=BotCommandScopeDefault())
        for admin in settings.admin_ids:
            await app.bot.set_my_commands(everything, scope=BotCommandScopeChat(admin))
    except Exception:
        log.warning("could not register the command menu", exc_info=True)

    await recover_interrupted(h.conversation, app.bot)
    for notice in app.bot_data.get("notices", []):
        log.warning("admin notice: %s", notice)
        await _tell_admins(app, settings, notice)

    async def heartbeat() -> None:
        while True:
            try:
                write_runtime(settings, h.runtime_info())
            except OSError:
                log.warning("could not write the runtime status file", exc_info=True)
            await asyncio.sleep(HEARTBEAT_S)

    app.bot_data["heartbeat"] = asyncio.create_task(heartbeat())
    for companion in app.bot_data.get("companions", []):
        await companion.start()
    loop: LearningLoop | None = app.bot_data.get("learning")
    if loop is not None:
        await loop.start()


async def _tell_admins(app: Application, settings: Settings, text: str) -> None:
    for admin in settings.admin_ids:
        try:
            await call_with_retry(lambda a=admin: app.bot.send_message(a, text[:4096]), attempts=3)
        except Exception:
            log.warning("could not tell admin %s: %s", admin, text[:80])


async def _post_shutdown(app: Application) -> None:
    for companion in reversed(app.bot_data.get("companions", [])):
        try:
            await companion.stop()
        except Exception:
            log.warning("could not stop %r", companion, exc_info=True)
    loop: LearningLoop | None = app.bot_data.get("learning")
    if loop is not None:
        await loop.stop()
    task = app.bot_data.get("heartbeat")
    if task:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    h: Handlers = app.bot_data["handlers"]
    h.store.log_event("bot_stopped", detail={"uptime_s": round(time.time() - h.started_at, 1)})


@contextlib.asynccontextmanager
async def running(app: Application, *, poll_timeout: int = 10, webhook: Webhook | None = None):
    """Run `app` (polling, or `webhook`) inside an existing event loop — for tests, the demo and benchmarks.

    `run_polling` owns its loop and signals; this does the same steps by hand: initialize,
    post_init, start, poll (or listen); then the reverse, post_shutdown included.
    """
    await app.initialize()
    if app.post_init:
        await app.post_init(app)
    await app.start()
    if webhook is not None:
        await start_webhook(app, webhook)
    else:
        await app.updater.start_polling(timeout=poll_timeout, allowed_updates=Update.ALL_TYPES, poll_interval=0.0)
    try:
        yield app
    finally:
        await app.updater.stop()
        await app.stop()
        if app.post_shutdown:
            await app.post_shutdown(app)
        await app.shutdown()


def run_until_stopped(app: Application, worker: InferenceWorker, *, grace_s: float,
                      webhook: Webhook | None = None) -> None:
    """`run_polling` (or `run_webhook`, bot/webhook.py) for `ouro serve`, with our own handling of
    SIGTERM and SIGINT.

    PTB's default turns a stop signal into SystemExit and then waits, inside `Application.stop`,
    for every update being handled — a reply of a few hundred tokens included, however long it
    takes. Here a signal stops polling at once; replies being written get `grace_s` seconds to
    finish, after which the worker cuts them off (the reply in progress at its next piece, queued
    ones before they start): their authors are told to send again and their turns are closed, so
    nothing is left pending. Then post_shutdown (learning loop, cycle process) runs as usual. A
    second signal cuts the replies off at once.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stopping = []

    def stop(sig: signal.Signals) -> None:
        if stopping:
            worker.abandon()
            return
        stopping.append(sig)
        log.info("%s: stopping; replies being written get %.0fs to finish", sig.name, grace_s)
        loop.call_later(grace_s, worker.abandon)
        app.stop_running()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    try:
        if webhook is None:
            app.run_polling(allowed_updates=Update.ALL_TYPES, close_loop=False, stop_signals=None)
        else:
            run_webhook(app, webhook)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        loop.close()
