"""Every handler of the bot, built once from the same dependencies.

Each job has its own module — bot/gate.py (the allow-list), bot/user_commands.py, bot/chat.py
(messages), bot/buttons.py (under a reply), bot/status.py, bot/errors.py (the error sink) — and
bot/app.py registers them all. This bundle is what the application's start-up and shut-down hooks
reach (the status heartbeat, the uptime), and what `ouro bench soak` reads the chat bounds from.
"""

from __future__ import annotations

import time

from bot.admin import AdminHandlers
from bot.buttons import ButtonHandlers
from bot.chat import ChatHandlers
from bot.drafts import DraftChats
from bot.errors import ErrorSink
from bot.gate import Gate
from bot.status import StatusCommand
from bot.user_commands import UserCommands
from config.settings import Settings
from memory.store import Store
from serving.conversation import Conversation
from serving.limits import ChatQueues, FloodLimit


class Handlers:
    def __init__(self, settings: Settings, store: Store, conversation: Conversation, started_at: float) -> None:
        self.settings = settings
        self.store = store
        self.conversation = conversation
        self.started_at = started_at
        self.admin: AdminHandlers | None = None   # set when the learning loop runs in this process
        self.chat_queues = ChatQueues(settings.chat_queue_max)   # one reply at a time per chat, bounded
        self.flood = FloodLimit(settings.flood_messages, settings.flood_window_s)
        self.errors = ErrorSink(settings, store)
        self.gate = Gate(settings, store)
        self.commands = UserCommands(settings, conversation)
        self.drafts = DraftChats() if settings.stream_drafts else None   # which private chats stream as drafts
        self.chat = ChatHandlers(settings, conversation, self.errors, chat_queues=self.chat_queues, flood=self.flood,
                                 drafts=self.drafts)
        self.buttons = ButtonHandlers(settings, conversation, self.errors, chat_queues=self.chat_queues,
                                      flood=self.flood, drafts=self.drafts)
        self.status = StatusCommand(settings, store, self.runtime_info)

    def runtime_info(self) -> dict:
        """The live figures of this process: what /status shows and the heartbeat writes for `ouro status`."""
        engine = self.conversation.worker.engine
        info = {"started_at": self.started_at, "queue_depth": self.conversation.worker.backlog,
                "generation_id": engine.generation_id, "model_file": str(engine.model_path),
                "runs_on": engine.placement,
                "updated": time.time()}
        if self.admin is not None:
            info.update(self.admin.loop_info())
        return info
