"""The real Application with Telegram answered from memory, for fuzzing and security tests.

`OfflineTelegram` stands in for the Bot API. Patched over `HTTPXRequest.do_request` (the one
method that touches the network), it answers every call as Telegram would: sent messages get
ids and keep their buttons; an edit of a message that does not exist, or one that changes
nothing, gets Telegram's 400, and so does a reply to a message marked `deleted`; a callback
query marked old cannot be answered any more. Every call is recorded. Updates go straight into
`Application.process_update`, so thousands of them run in seconds through every handler, filter
and error handler exactly as `ouro serve` builds them (`bot.app.build_application`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from telegram import Update
from telegram.request import HTTPXRequest

from bot.app import build_application
from bot.edits import too_old
from config.settings import Settings, load_settings
from engine.worker import InferenceWorker
from lineage.generations import Lineage
from memory.store import Store
from serving.conversation import Conversation
from serving.loop import LearningLoop
from tests.helpers.fakes import FakeEngine

BOT = {"id": 5550001, "is_bot": True, "first_name": "Ouro", "username": "ouro_test_bot"}
TOKEN = "5550001:AAHfakeTOKENfor0ffline-tests_DoNotLeak42"   # shaped like a real one, easy to grep
ADMIN, ANN, BOB, EVE = 4242, 1001, 1002, 6666
GROUP = -100777
NAMES = {ADMIN: "Ada", ANN: "Ann", BOB: "Bob", EVE: "Eve"}


def user_json(uid: int) -> dict:
    return {"id": uid, "is_bot": False, "first_name": NAMES.get(uid, f"U{uid}"), "username": f"u{uid}"}


def chat_json(chat_id: int) -> dict:
    if chat_id > 0:
        return {"id": chat_id, "type": "private", "first_name": NAMES.get(chat_id, f"U{chat_id}")}
    return {"id": chat_id, "type": "supergroup", "title": "Hostile group"}


def _ok(result) -> tuple[int, bytes]:
    return 200, json.dumps({"ok": True, "result": result}).encode()


def _refused(description: str) -> tuple[int, bytes]:
    return 400, json.dumps({"ok": False, "error_code": 400, "description": description}).encode()


class OfflineTelegram:
    """The Bot API in memory: what the bot sent, what it shows now, every call it made."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.messages: dict[tuple[int, int], dict] = {}        # (chat, message id) → the message as shown now
        self.shown_buttons: set[tuple[int, int, str]] = set()   # every (chat, message, data) ever on screen
        self.old_queries: set[str] = set()                      # callback query ids too old to answer
        self.blocked: set[int] = set()                          # chats whose people blocked the bot
        self.deleted: set[tuple[int, int]] = set()              # (chat, message) deleted by their author
        self._message_ids = itertools.count(100_000)
        self._update_ids = itertools.count(1)
        self._query_ids = itertools.count(1)

    @contextlib.contextmanager
    def patched(self) -> Iterator[OfflineTelegram]:
        fake = self

        async def do_request(request, url, method, request_data=None, *args, **kwargs):
            return fake.answer(url.rsplit("/", 1)[-1], request_data.parameters if request_data else {})

        with mock.patch.object(HTTPXRequest, "do_request", do_request):
            yield self

    # --- the Bot API --------------------------------------------------------------------------
    def answer(self, method: str, p: dict) -> tuple[int, bytes]:
        self.calls.append((method, dict(p)))
        if method == "getMe":
            return _ok(BOT)
        if method.startswith("send") and int(p.get("chat_id", 0)) in self.blocked:
            return 403, json.dumps({"ok": False, "error_code": 403,
                                    "description": "Forbidden: bot was blocked by the user"}).encode()
        if method.startswith("send") and self._replies_to_deleted(p):
            return _refused("Bad Request: message to be replied not found")
        if method == "sendMessageDraft":   # ephemeral: recorded in `calls` only; private chats only
            return _ok(True) if int(p["chat_id"]) > 0 else _refused("Bad Request: TEXTDRAFT_PEER_INVALID")
        if method.startswith("send") and method != "sendChatAction":
            chat = int(p["chat_id"])
            msg = {"message_id": next(self._message_ids), "date": int(time.time()), "chat": chat_json(chat),
                   "from": BOT}
            for key in ("text", "caption"):
                if key in p:
                    msg[key] = p[key]
            if p.get("message_thread_id") is not None:   # sent into a forum topic
                msg.update(message_thread_id=int(p["message_thread_id"]), is_topic_message=True)
            if method == "sendPhoto":
                msg["photo"] = [{"file_id": "p", "file_unique_id": "p", "width": 1, "height": 1}]
            self._show(chat, msg, p.get("reply_markup"))
            return _ok(msg)
        if method in ("editMessageText", "editMessageReplyMarkup"):
            key = (int(p["chat_id"]), int(p["message_id"]))
            if key not in self.messages:
                return _refused("Bad Request: message to edit not found")
            old = self.messages[key]
            new = {k: v for k, v in old.items() if k != "reply_markup"}
            if method == "editMessageText":
                new["text"] = p["text"]
            if self._markup(p.get("reply_markup")) == old.get("reply_markup") and new.get("text") == old.get("text"):
                return _refused("Bad Request: message is not modified: specified new message content and reply "
                                "markup are exactly the same as a current content and reply markup of the message")
            self._show(key[0], new, p.get("reply_markup"))
            return _ok(new)
        if method == "answerCallbackQuery" and p.get("callback_query_id") in self.old_queries:
            return _refused("Bad Request: query is too old and response timeout expired or query ID is invalid")
        return _ok(True)

    def _replies_to_deleted(self, p: dict) -> bool:
        """A reply to a deleted message, which Telegram refuses unless the send allows it."""
        to = p.get("reply_parameters")
        to = json.loads(to) if isinstance(to, str) else to
        return bool(to) and (int(p["chat_id"]), to.get("message_id")) in self.deleted \
            and not to.get("allow_sending_without_reply")

    @staticmethod
    def _markup(markup) -> dict | None:
        if isinstance(markup, str):
            markup = json.loads(markup)
        return markup or None

    def _show(self, chat: int, msg: dict, markup) -> None:
        markup = self._markup(markup)
        if markup and "inline_keyboard" in markup:   # a message shows only inline buttons (a ForceReply is
            msg["reply_markup"] = markup             # the reader's client's business, recorded in `calls`)
        self.messages[(chat, msg["message_id"])] = msg
        for row in (markup or {}).get("inline_keyboard", []):
            for button in row:
                if "callback_data" in button:
                    self.shown_buttons.add((chat, msg["message_id"], button["callback_data"]))

    # --- what the bot did ------------------------------------------------------------------------
    def sent(self, method: str | None = None, chat: int | None = None) -> list[dict]:
        return [p for m, p in self.calls if (method is None or m == method)
                and (chat is None or int(p.get("chat_id", 0)) == chat)]

    def texts_to(self, chat: int) -> list[str]:
        """Everything the bot wrote in a chat: messages, captions and edits, in order."""
        return [p.get("text") or p.get("caption") or "" for m, p in self.calls
                if m in ("sendMessage", "sendPhoto", "editMessageText") and int(p.get("chat_id", 0)) == chat]

    def visible_buttons(self, chat: int | None = None) -> list[tuple[int, int, str]]:
        """(chat, message, data) of every button on screen now, oldest message first."""
        out = []
        for (c, mid), msg in sorted(self.messages.items(), key=lambda kv: kv[0][1]):
            if chat is not None and c != chat:
                continue
            for row in (msg.get("reply_markup") or {}).get("inline_keyboard", []):
                out += [(c, mid, b["callback_data"]) for b in row if "callback_data" in b]
        return out

    def answers(self) -> list[dict]:
        return self.sent("answerCallbackQuery")

    # --- updates ----------------------------------------------------------------------------------
    def message(self, uid: int | None, chat: int, text: str | None = None, **extra) -> dict:
        msg = {"message_id": next(self._message_ids), "date": int(time.time()), "chat": chat_json(chat), **extra}
        if uid is not None:
            msg["from"] = user_json(uid)
        if text is not None:
            msg["text"] = text
        return {"update_id": next(self._update_ids), "message": msg}

    def command(self, uid: int, chat: int, name: str, args: str = "") -> dict:
        head = f"/{name}" + (f"@{BOT['username']}" if chat < 0 else "")
        return self.message(uid, chat, head + (f" {args}" if args else ""),
                            entities=[{"type": "bot_command", "offset": 0, "length": len(head)}])

    def press(self, uid: int, chat: int, message_id: int, data: str | None, *, old: bool = False,
              inaccessible: bool = False) -> dict:
        qid = f"q{next(self._query_ids)}"
        if old:
            self.old_queries.add(qid)
        shown = self.messages.get((chat, message_id))
        if inaccessible:
            message = {"chat": chat_json(chat), "message_id": message_id, "date": 0}
        else:
            message = dict(shown) if shown else {"message_id": message_id, "date": int(time.time()),
                                                 "chat": chat_json(chat), "from": BOT, "text": "…"}
        query = {"id": qid, "from": user_json(uid), "chat_instance": f"ci{chat}", "message": message}
        if data is not None:
            query["data"] = data
        return {"update_id": next(self._update_ids), "callback_query": query}

    def raw(self, kind: str, body: dict) -> dict:
        return {"update_id": next(self._update_ids), kind: body}


@dataclass
class OfflineBot:
    settings: Settings
    store: Store
    engine: FakeEngine
    tg: OfflineTelegram
    app: object
    loop: LearningLoop | None = None
    errors: list[BaseException] = field(default_factory=list)
    cycles: list[str] = field(default_factory=list)     # actors of /train (no cycle process is started)

    async def send(self, update: dict) -> None:
        await self.app.process_update(Update.de_json(update, self.app.bot))

    async def say(self, uid: int, text: str, chat: int | None = None) -> None:
        await self.send(self.tg.message(uid, uid if chat is None else chat, text))

    async def command(self, uid: int, name: str, args: str = "", chat: int | None = None) -> None:
        await self.send(self.tg.command(uid, uid if chat is None else chat, name, args))

    async def press(self, uid: int, chat: int, message_id: int, data: str | None, **kw) -> str:
        update = self.tg.press(uid, chat, message_id, data, **kw)
        await self.send(update)
        return update["callback_query"]["id"]

    def answer_to(self, query_id: str) -> list[dict]:
        return [a for a in self.tg.answers() if a.get("callback_query_id") == query_id]


def lineage_models(models_dir: Path) -> None:
    """gen-0000 (base, served) and gen-0001 (a promoted child) — promotable, roll-back-able."""
    from tests.helpers.lineages import make_generation

    make_generation(models_dir, "gen-0000", None, status="base")
    make_generation(models_dir, "gen-0001", "gen-0000")
    Lineage(models_dir).set_active("gen-0000")


@contextlib.asynccontextmanager
async def offline_bot(data_dir: Path, *, learning: bool = False, engine: FakeEngine | None = None,
                      tg: OfflineTelegram | None = None, token: str = TOKEN, **overrides) -> AsyncIterator[OfflineBot]:
    """The application as `ouro serve` builds it (with the learning loop when asked), started, offline."""
    from tests.helpers.lineages import Loader

    values = dict(data_dir=data_dir, admin_ids=[ADMIN], stream_edit_interval_s=0.2, cycle_schedule="off")
    values.update(overrides)
    settings = load_settings(**values)
    tg = tg or OfflineTelegram()
    store = Store.open(settings.db_path)
    engine = engine or FakeEngine()
    worker = InferenceWorker(engine, max_backlog=settings.max_backlog)
    conversation = Conversation(settings, store, worker)
    loop = None
    if learning:
        lineage_models(settings.models_dir)
        engine.model_sha256 = Lineage(settings.models_dir).generation("gen-0000").sha256
        loop = LearningLoop(settings, store, worker, load=Loader(), tick_s=3600)
    with tg.patched():
        app = build_application(settings, store, conversation, token=token, learning=loop or False)
        bot = OfflineBot(settings, store, engine, tg, app, loop)
        if loop is not None:
            loop.start_cycle = lambda actor: bot.cycles.append(actor) or True

        async def record(update, context) -> None:   # beside ErrorSink.on_error, which sees the same
            if not too_old(context.error):            # an expected condition, not a crash (bot/edits.py)
                bot.errors.append(context.error)

        app.add_error_handler(record)
        await app.initialize()
        await app.post_init(app)
        try:
            yield bot
        finally:
            await app.post_shutdown(app)
            await app.shutdown()
            worker.close()
            store.close()
