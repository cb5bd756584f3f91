"""A real uvicorn server with the OpenAI-compatible API (api/) over a fake engine, on a free loopback
port, in a thread with its own event loop — so tests drive it with the real `openai` client."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from api.app import build_api
from api.keys import create_key
from api.server import HttpServer
from config.settings import Settings
from engine.worker import InferenceWorker
from memory.store import Store
from serving.conversation import Conversation
from tests.helpers.fakes import FakeEngine


@dataclass
class ApiServer:
    settings: Settings
    store: Store
    engine: FakeEngine
    worker: InferenceWorker
    conversation: Conversation
    base_url: str
    key: str
    user_id: int

    def client(self, key: str | None = None):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=key or self.key, max_retries=0, timeout=20)


class ServerThread:
    """Starts `HttpServer` on port 0 in a thread's event loop; `stop()` shuts it down and joins."""

    def __init__(self, settings: Settings, conversation: Conversation, *, learning=None) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = HttpServer(build_api(settings, conversation, learning=learning), "127.0.0.1", 0, grace_s=1.0)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="api-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:   # reported to the test thread
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.stop())
        self.loop.close()

    def start(self) -> int:
        self.thread.start()
        self.ready.wait(20)
        if self.error is not None:
            raise self.error
        return self.server.port

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(20)


def start_api_server(settings: Settings, engine: FakeEngine, *, key_name: str = "tester") -> tuple[ApiServer, ServerThread]:
    store = Store.open(settings.db_path)
    worker = InferenceWorker(engine, max_backlog=settings.max_backlog)
    conversation = Conversation(settings, store, worker)
    key, user_id = create_key(store, key_name)
    thread = ServerThread(settings, conversation)
    port = thread.start()
    return ApiServer(settings, store, engine, worker, conversation, f"http://127.0.0.1:{port}/v1", key, user_id), thread
