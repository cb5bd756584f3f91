"""Drive the local Telegram Bot API emulator (``emulator/server.js``) from tests.

The emulator is ``telegram-test-api`` 4.2.1 behind a small Node launcher that
bridges what python-telegram-bot 22.x needs (see ``emulator/README.md``).
A bot under test talks to it exactly as to Telegram::

    with Emulator() as emu:
        app = (Application.builder().token(emu.token)
               .base_url(emu.api_url).base_file_url(emu.file_url).build())
        ...                                   # start polling the emulator
        alice = emu.client(user_id=1001, first_name="Alice")
        mid = alice.send_text("hello")
        reply = alice.wait_for(lambda m: m.text is not None, after=mid)
        alice.press(reply.callback_data[0], reply.message_id)
        alice.wait_for(lambda m: m.message_id == reply.message_id and m.edit_count > 0)

Every blocking method has an ``a``-prefixed coroutine twin (``asend_text``,
``apress``, ``await_for`` ...). Use those when the bot's ``Application`` runs in
the same event loop as the test; the blocking ones would freeze that loop.

Message ids come from one counter shared by all chats and by user and bot
messages, so "the bot's reply to my message" is ``after=<my message_id>``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = ["DEFAULT_TOKEN", "BotMessage", "Button", "EmulatedUser", "Emulator", "EmulatorError"]

EMULATOR_DIR = Path(__file__).resolve().parents[2] / "emulator"
DEFAULT_TOKEN = "123456789:TEST-emulator-token"
"""Bot token used when none is given; the emulator derives the bot id (123456789) from it."""

_JSON = dict[str, Any]


class EmulatorError(RuntimeError):
    """The emulator could not be installed/started, or refused a user-side request."""


# --------------------------------------------------------------------------- views
@dataclass(frozen=True)
class Button:
    """One inline keyboard button."""

    text: str
    callback_data: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class BotMessage:
    """The current state of one message in a chat, as the user would see it.

    ``text``/``caption`` are what Telegram displays: with a ``parse_mode`` the
    markup is stripped (approximately); the bot's original is ``raw_text``.
    ``reply_markup`` is the inline keyboard currently attached (Telegram drops it
    when a message is edited without one); ``sent_reply_markup`` is whatever the
    last send/edit passed, which also covers reply keyboards and ForceReply.
    """

    message_id: int
    chat_id: int | str
    from_bot: bool
    message: _JSON
    deleted: bool = False
    raw_text: str | None = None
    parse_mode: str | None = None
    sent_reply_markup: _JSON | None = None
    edits: tuple[_JSON, ...] = field(default=())

    @classmethod
    def from_view(cls, view: _JSON) -> BotMessage:
        return cls(
            message_id=int(view["message_id"]),
            chat_id=view["chat_id"],
            from_bot=bool(view["from_bot"]),
            message=view["message"],
            deleted=bool(view.get("deleted")),
            raw_text=view.get("raw_text"),
            parse_mode=view.get("parse_mode"),
            sent_reply_markup=view.get("sent_reply_markup"),
            edits=tuple(view.get("edits") or ()),
        )

    @property
    def text(self) -> str | None:
        return self.message.get("text")

    @property
    def caption(self) -> str | None:
        return self.message.get("caption")

    @property
    def content(self) -> str:
        """``text`` or ``caption``, whichever the message has ('' if neither)."""
        return self.message.get("text") or self.message.get("caption") or ""

    @property
    def kind(self) -> str:
        """'text', 'photo', 'document', 'sticker', ... (first media field present)."""
        for key in (
            "text",
            "photo",
            "document",
            "audio",
            "video",
            "animation",
            "voice",
            "video_note",
            "sticker",
        ):
            if key in self.message:
                return key
        return "other"

    @property
    def file_id(self) -> str | None:
        """file_id of the media (largest photo size for photos)."""
        media = self.message.get(self.kind)
        if isinstance(media, list) and media:
            media = media[-1]
        return media.get("file_id") if isinstance(media, dict) else None

    @property
    def reply_markup(self) -> _JSON | None:
        return self.message.get("reply_markup")

    @property
    def buttons(self) -> list[list[Button]]:
        rows = (self.reply_markup or {}).get("inline_keyboard") or []
        return [
            [Button(b.get("text", ""), b.get("callback_data"), b.get("url")) for b in row] for row in rows
        ]

    @property
    def button_texts(self) -> list[str]:
        return [b.text for row in self.buttons for b in row]

    @property
    def callback_data(self) -> list[str]:
        return [b.callback_data for row in self.buttons for b in row if b.callback_data is not None]

    @property
    def edit_count(self) -> int:
        return len(self.edits)

    @property
    def reply_to_message_id(self) -> int | None:
        reply = self.message.get("reply_to_message")
        return int(reply["message_id"]) if reply else None


Predicate = Callable[[BotMessage], bool]


def _async_client() -> httpx.AsyncClient:
    # Local plain HTTP: skip loading the CA bundle (~80 ms per client) and ignore *_PROXY variables.
    return httpx.AsyncClient(timeout=30, verify=False, trust_env=False)


def _check(resp: httpx.Response) -> Any:
    try:
        body = resp.json()
    except ValueError as exc:
        raise EmulatorError(
            f"emulator answered {resp.status_code} with non-JSON: {resp.text[:200]!r}"
        ) from exc
    if not body.get("ok"):
        raise EmulatorError(f"emulator refused {resp.request.url.path}: {body.get('description', body)}")
    return body


# --------------------------------------------------------------------------- user
class EmulatedUser:
    """A Telegram user talking to the bot in one chat (private by default)."""

    def __init__(
        self,
        emulator: Emulator,
        user_id: int,
        first_name: str,
        chat_id: int | None = None,
        chat_type: str = "private",
        bot_token: str = DEFAULT_TOKEN,
        *,
        username: str | None = None,
        last_name: str | None = None,
        language_code: str | None = "en",
        chat_title: str | None = None,
    ) -> None:
        if chat_type == "private" and chat_id is not None and chat_id != user_id:
            raise ValueError("a private chat's id is the user's id")
        self.emulator = emulator
        self.user_id = user_id
        self.first_name = first_name
        self.chat_id = user_id if chat_id is None else chat_id
        self.chat_type = chat_type
        self.bot_token = bot_token
        self.user: _JSON = {"id": user_id, "is_bot": False, "first_name": first_name}
        if last_name:
            self.user["last_name"] = last_name
        if username:
            self.user["username"] = username
        if language_code:
            self.user["language_code"] = language_code
        if chat_type == "private":
            self.chat: _JSON = {"id": self.chat_id, "type": "private", "first_name": first_name}
            if last_name:
                self.chat["last_name"] = last_name
            if username:
                self.chat["username"] = username
        else:
            self.chat = {
                "id": self.chat_id,
                "type": chat_type,
                "title": chat_title or f"Test {chat_type} {self.chat_id}",
            }

    # ---- payload builders (shared by the sync and async API)
    def _message(self, **fields: Any) -> _JSON:
        return {
            "botToken": self.bot_token,
            "from": self.user,
            "chat": self.chat,
            "date": int(time.time()),
            **fields,
        }

    def _text_payload(self, text: str, reply_to: int | None) -> _JSON:
        fields: _JSON = {"text": text}
        if reply_to is not None:
            fields["reply_to_message"] = self._reply_stub(reply_to)
        return self._message(**fields)

    def _command_payload(self, command: str, args: str) -> tuple[str, _JSON]:
        if not command.startswith("/"):
            command = "/" + command
        text = f"{command} {args}".strip() if args else command
        entities = [{"offset": 0, "length": len(command), "type": "bot_command"}]
        return "/sendCommand", self._message(text=text, entities=entities)

    def _reply_stub(self, message_id: int) -> _JSON:
        """The replied-to message as Telegram embeds it: the bot's own message when it is one."""
        for m in self.bot_messages():
            if m.message_id == message_id:
                return dict(m.message)
        return {"message_id": message_id, "chat": self.chat, "date": int(time.time())}

    def _callback_payload(self, data: str, message_id: int, force: bool) -> _JSON:
        return {
            "botToken": self.bot_token,
            "from": self.user,
            "chat_id": self.chat_id,
            "message_id": message_id,
            "data": data,
            "force": force,
        }

    def _pick_message(self, messages: list[BotMessage], data: str) -> int:
        for m in reversed(messages):
            if m.from_bot and not m.deleted and data in m.callback_data:
                return m.message_id
        raise EmulatorError(f"no bot message in chat {self.chat_id} has a button with callback_data {data!r}")

    def _query(self) -> dict[str, str]:
        return {"token": self.bot_token, "chat_id": str(self.chat_id)}

    @staticmethod
    def _views(body: _JSON, include_user: bool, include_deleted: bool) -> list[BotMessage]:
        out = [BotMessage.from_view(v) for v in body["result"]]
        return [m for m in out if (include_user or m.from_bot) and (include_deleted or not m.deleted)]

    # ---- sync API
    def send_text(self, text: str, *, reply_to: int | None = None) -> int:
        """Send a text message; returns its message_id."""
        return int(
            self.emulator._post("/sendMessage", self._text_payload(text, reply_to))["result"]["message_id"]
        )

    def send_message(self, **fields: Any) -> int:
        """Send a message with arbitrary Bot-API fields (e.g. ``location=...``); returns its message_id."""
        return int(self.emulator._post("/sendMessage", self._message(**fields))["result"]["message_id"])

    def send_sticker(self, emoji: str = "👍") -> int:
        f = self.emulator.upload_file(b"RIFF\x00\x00\x00\x00WEBP", "sticker.webp", "image/webp")
        sticker = {
            "file_id": f["file_id"],
            "file_unique_id": f["file_unique_id"],
            "width": 512,
            "height": 512,
            "is_animated": False,
            "is_video": False,
            "type": "regular",
            "emoji": emoji,
        }
        return self.send_message(sticker=sticker)

    def edit_text(self, message_id: int, text: str) -> None:
        """Edit one of this user's messages (delivers an ``edited_message`` update)."""
        msg = {**self._message(text=text), "message_id": message_id, "edit_date": int(time.time())}
        msg.pop("botToken")
        self.emulator.send_update({"edited_message": msg}, self.bot_token)

    def press(self, callback_data: str, message_id: int | None = None, *, force: bool = False) -> str:
        """Press the inline button carrying ``callback_data``; returns the callback query id.

        ``message_id`` defaults to the newest bot message with such a button. The
        emulator refuses a press on a button the message does not (any longer)
        show, unless ``force``.
        """
        if message_id is None:
            message_id = self._pick_message(self.bot_messages(), callback_data)
        body = self.emulator._post("/sendCallback", self._callback_payload(callback_data, message_id, force))
        return str(body["result"]["callback_query_id"])

    def bot_messages(self, *, include_user: bool = False, include_deleted: bool = False) -> list[BotMessage]:
        """Messages in this chat, oldest first, in their current (edited) state."""
        body = _check(self.emulator._http.get(self.emulator.base_url + "/_messages", params=self._query()))
        return self._views(body, include_user, include_deleted)

    def wait_for(
        self,
        predicate: Predicate = lambda m: True,
        timeout: float = 10.0,
        *,
        after: int | None = None,
        include_user: bool = False,
    ) -> BotMessage:
        """Block until a bot message (newer than message_id ``after``) satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        version = -1
        while True:
            params, left = self._poll_params(version, deadline)
            body = _check(self.emulator._http.get(
                self.emulator.base_url + "/_messages", params=params, timeout=left + 5))
            version, found = self._poll_result(body, predicate, after, include_user, deadline, timeout)
            if found is not None:
                return found

    def chat_actions(self) -> list[str]:
        """Actions (``typing`` ...) the bot sent to this chat, oldest first."""
        return [
            c["params"].get("action")
            for c in self.emulator.calls("sendChatAction", self.bot_token)
            if str(c["params"].get("chat_id")) == str(self.chat_id) and c["status"] == 200
        ]

    def callback_answer(self, callback_query_id: str) -> _JSON | None:
        """The bot's answerCallbackQuery for that press (text, show_alert ...), or None if unanswered."""
        for a in self.emulator.callback_answers(self.bot_token):
            if a["callback_query_id"] == callback_query_id:
                answer = a.get("answer")
                return dict(answer) if answer else None
        return None

    # ---- async twins
    async def asend_text(self, text: str, *, reply_to: int | None = None) -> int:
        body = await self.emulator._apost("/sendMessage", self._text_payload(text, reply_to))
        return int(body["result"]["message_id"])

    async def asend_command(self, command: str, args: str = "") -> int:
        path, payload = self._command_payload(command, args)
        return int((await self.emulator._apost(path, payload))["result"]["message_id"])

    async def apress(self, callback_data: str, message_id: int | None = None, *, force: bool = False) -> str:
        if message_id is None:
            message_id = self._pick_message(await self.abot_messages(), callback_data)
        body = await self.emulator._apost(
            "/sendCallback", self._callback_payload(callback_data, message_id, force)
        )
        return str(body["result"]["callback_query_id"])

    async def abot_messages(
        self, *, include_user: bool = False, include_deleted: bool = False
    ) -> list[BotMessage]:
        async with _async_client() as http:
            body = _check(await http.get(self.emulator.base_url + "/_messages", params=self._query()))
        return self._views(body, include_user, include_deleted)

    async def await_for(
        self,
        predicate: Predicate = lambda m: True,
        timeout: float = 10.0,
        *,
        after: int | None = None,
        include_user: bool = False,
    ) -> BotMessage:
        """Async ``wait_for`` (does not block the event loop the bot may be running in)."""
        deadline = time.monotonic() + timeout
        version = -1
        async with _async_client() as http:
            while True:
                params, left = self._poll_params(version, deadline)
                body = _check(await http.get(
                    self.emulator.base_url + "/_messages", params=params, timeout=left + 5))
                version, found = self._poll_result(body, predicate, after, include_user, deadline, timeout)
                if found is not None:
                    return found

    def _poll_params(self, version: int, deadline: float) -> tuple[dict[str, str], float]:
        """One long-poll of /_messages: wait (server side) for anything newer than ``version``."""
        left = max(deadline - time.monotonic(), 0.0)
        return {**self._query(), "since_version": str(version), "wait_ms": str(int(left * 1000))}, left

    def _poll_result(self, body: _JSON, predicate: Predicate, after: int | None, include_user: bool,
                     deadline: float, timeout: float) -> tuple[int, BotMessage | None]:
        """(new version, the first matching message or None); TimeoutError once past the deadline."""
        seen = self._views(body, include_user, False)
        for m in seen:
            if (after is None or m.message_id > after) and predicate(m):
                return body["version"], m
        if time.monotonic() >= deadline:
            raise TimeoutError(self._timeout_message(timeout, seen))
        return body["version"], None

    def _timeout_message(self, timeout: float, seen: list[BotMessage]) -> str:
        tail = "; ".join(
            f"#{m.message_id}{'*' if m.edit_count else ''}: {m.content[:60]!r}" for m in seen[-5:]
        )
        return (
            f"no matching bot message in chat {self.chat_id} within {timeout}s (last seen: {tail or 'none'})"
        )


# --------------------------------------------------------------------------- emulator
class Emulator:
    """Runs ``node emulator/server.js`` for the lifetime of a ``with`` block.

    ``port=0`` lets the OS choose. ``node`` defaults to ``$OURO_EMULATOR_NODE`` or
    the ``node`` on PATH. When ``emulator/node_modules`` is missing it runs
    ``npm ci`` (or ``npm install``) first unless ``install=False``.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        token: str = DEFAULT_TOKEN,
        node: str | None = None,
        install: bool = True,
        startup_timeout: float = 30.0,
        install_timeout: float = 300.0,
    ) -> None:
        self.token = token
        self._requested_port = port
        self._node = node or os.environ.get("OURO_EMULATOR_NODE") or shutil.which("node")
        self._install = install
        self._startup_timeout = startup_timeout
        self._install_timeout = install_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._port: int | None = None
        self._http = httpx.Client(timeout=30, trust_env=False)

    # ---- discovery / install
    @staticmethod
    def is_available() -> bool:
        """True when node is on PATH and the package is installed or npm can install it."""
        if not (os.environ.get("OURO_EMULATOR_NODE") or shutil.which("node")):
            return False
        return (EMULATOR_DIR / "node_modules" / "telegram-test-api").is_dir() or shutil.which(
            "npm"
        ) is not None

    @staticmethod
    def ensure_installed(timeout: float = 300.0) -> None:
        """Install emulator's node_modules if missing (safe across parallel test workers)."""
        marker = EMULATOR_DIR / "node_modules" / "telegram-test-api" / "package.json"
        if marker.exists():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise EmulatorError(
                "npm not found: cannot install emulator/node_modules (install Node.js >= 18)"
            )
        lock_name = "ouro-emulator-" + hashlib.sha1(str(EMULATOR_DIR).encode()).hexdigest()[:12] + ".lock"
        with open(Path(tempfile.gettempdir()) / lock_name, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if marker.exists():
                return
            verb = "ci" if (EMULATOR_DIR / "package-lock.json").exists() else "install"
            cmd = [npm, verb, "--no-audit", "--no-fund", "--loglevel=error"]
            try:
                done = subprocess.run(cmd, cwd=EMULATOR_DIR, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise EmulatorError(f"`npm {verb}` in {EMULATOR_DIR} timed out after {timeout}s") from exc
            if done.returncode != 0 or not marker.exists():
                raise EmulatorError(
                    f"`npm {verb}` in {EMULATOR_DIR} failed ({done.returncode}):\n{done.stderr[-2000:]}"
                )

    # ---- lifecycle
    def start(self) -> Emulator:
        if self._proc is not None:
            return self
        if not self._node:
            raise EmulatorError("node not found on PATH (set OURO_EMULATOR_NODE to a Node.js >= 18 binary)")
        if self._install:
            self.ensure_installed(self._install_timeout)
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [
                self._node,
                str(EMULATOR_DIR / "server.js"),
                "--port",
                str(self._requested_port),
                "--exit-on-stdin-close",
            ],
            cwd=EMULATOR_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self._proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(self._startup_timeout)
        if not line or not line[0].strip():
            if line:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(2)
                why = f"it exited with code {self._proc.poll()} before printing its ready line"
            else:
                why = f"no ready line within {self._startup_timeout}s"
            err = self._stderr_tail()
            self.stop()
            raise EmulatorError(f"emulator did not start: {why}; stderr: {err or '(empty)'}")
        try:
            ready = json.loads(line[0])
            self._port = int(ready["port"])
        except (ValueError, KeyError) as exc:
            self.stop()
            raise EmulatorError(f"unexpected emulator ready line: {line[0]!r}") from exc
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            for stream in (proc.stdin, proc.stdout):
                with contextlib.suppress(Exception):
                    stream.close()  # type: ignore[union-attr]
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def close(self) -> None:
        """Stop the process and release the HTTP client."""
        self.stop()
        self._http.close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        data: bytes = self._stderr.read()
        return data[-2000:].decode(errors="replace").strip()

    # ---- addresses
    @property
    def port(self) -> int:
        if self._port is None:
            raise EmulatorError("emulator is not running")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        """Value for PTB's ``ApplicationBuilder.base_url``."""
        return f"{self.base_url}/bot"

    @property
    def file_url(self) -> str:
        """Value for PTB's ``ApplicationBuilder.base_file_url``."""
        return f"{self.base_url}/file/bot"

    # ---- users
    def client(
        self,
        user_id: int,
        first_name: str,
        chat_id: int | None = None,
        chat_type: str = "private",
        bot_token: str | None = None,
        **kwargs: Any,
    ) -> EmulatedUser:
        """A simulated user. For groups pass a negative ``chat_id`` and ``chat_type="group"``/``"supergroup"``."""
        return EmulatedUser(self, user_id, first_name, chat_id, chat_type, bot_token or self.token, **kwargs)

    # ---- test hooks
    def inject_fault(
        self,
        method: str,
        status: int | None = 429,
        *,
        count: int = 1,
        retry_after: int | None = None,
        description: str | None = None,
        delay_ms: int | None = None,
        token: str | None = None,
        drop: bool = False,
    ) -> None:
        """Make the next ``count`` bot calls of ``method`` ("*" = any) fail in Bot-API shape.

        429 gets ``parameters.retry_after`` (default 1). ``status=None`` with
        ``delay_ms`` only delays those calls, which then succeed. ``drop=True``
        (with ``status=None``) closes the connection without any answer (after
        ``delay_ms`` if given); the call is not carried out.
        """
        payload: _JSON = {"method": method, "count": count}
        for key, value in (
            ("status", status),
            ("retry_after", retry_after),
            ("description", description),
            ("delay_ms", delay_ms),
            ("token", token),
            ("drop", drop or None),
        ):
            if value is not None:
                payload[key] = value
        if status is None and not delay_ms and not drop:
            raise ValueError("a fault needs a status, a delay_ms or drop")
        self._post("/_faults", payload)

    def clear_faults(self) -> None:
        _check(self._http.delete(self.base_url + "/_faults"))

    def calls(self, method: str | None = None, token: str | None = None) -> list[_JSON]:
        """Bot API calls received so far (``{seq, time, token, method, params, status, description}``).

        Empty long-poll answers of getUpdates are not logged.
        """
        params = {k: v for k, v in (("method", method), ("token", token)) if v}
        return list(_check(self._http.get(self.base_url + "/_calls", params=params))["result"])

    def bot_commands(
        self, token: str | None = None, scope_type: str = "default", language_code: str = ""
    ) -> list[_JSON]:
        """The commands the bot registered via set_my_commands for that scope/language."""
        for entry in _check(
            self._http.get(self.base_url + "/_commands", params={"token": token or self.token})
        )["result"]:
            if entry["scope"].get("type") == scope_type and entry["language_code"] == language_code:
                return list(entry["commands"])
        return []

    def callback_answers(self, token: str | None = None) -> list[_JSON]:
        return list(
            _check(
                self._http.get(self.base_url + "/_callbackAnswers", params={"token": token or self.token})
            )["result"]
        )

    def drafts(self, chat_id: int | None = None, token: str | None = None) -> list[_JSON]:
        """Every ``sendMessageDraft`` the bot made (``{chat_id, draft_id, text, time}``), oldest first."""
        params = {"token": token or self.token, **({} if chat_id is None else {"chat_id": str(chat_id)})}
        return list(_check(self._http.get(self.base_url + "/_drafts", params=params))["result"])

    def upload_file(self, data: bytes, file_name: str, mime_type: str = "application/octet-stream") -> _JSON:
        """Store bytes in the emulator; returns ``{file_id, file_unique_id, file_size, ...}``."""
        payload = {
            "content_base64": base64.b64encode(data).decode(),
            "file_name": file_name,
            "mime_type": mime_type,
        }
        return dict(self._post("/_files", payload)["result"])

    def send_update(self, update: _JSON, token: str | None = None) -> _JSON:
        """Queue a raw Update (without update_id) for the bot, e.g. ``{"my_chat_member": {...}}``."""
        return dict(self._post("/_sendUpdate", {"botToken": token or self.token, "update": update})["result"])

    def reset(self) -> None:
        """Forget all messages, chats, files, commands, faults and calls (ids keep counting up)."""
        self._post("/_reset", {})

    # ---- transport
    def _post(self, path: str, payload: _JSON) -> _JSON:
        return dict(_check(self._http.post(self.base_url + path, json=payload)))

    async def _apost(self, path: str, payload: _JSON) -> _JSON:
        async with _async_client() as http:
            return dict(_check(await http.post(self.base_url + path, json=payload)))
