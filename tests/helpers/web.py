"""The owner's web page (api/web.py) on a real server: a tiny fake lineage (gen-0000 → gen-0001 →
gen-0002 refused), answered turns waiting for review, a learning loop whose hot-swap loads fake
engines — no model inference anywhere."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from config.settings import Settings, load_settings
from core.files import atomic_write_text
from engine.worker import InferenceWorker
from lineage.generations import Lineage
from memory.store import Store
from serving.conversation import Conversation
from serving.loop import LearningLoop
from tests.helpers.api_server import ServerThread
from tests.helpers.fakes import FakeEngine
from tests.helpers.lineages import Loader, make_generation

ADMIN = 4242


@dataclass
class WebServer:
    settings: Settings
    store: Store
    lineage: Lineage
    worker: InferenceWorker
    learning: LearningLoop
    thread: ServerThread
    base_url: str
    turns: list[int]
    started: bool = False

    def in_server_loop(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.thread.loop).result(30)

    def close(self) -> None:
        if self.started:
            self.in_server_loop(self.learning.stop())
        self.thread.stop()
        self.worker.close()
        self.store.close()


def set_meta(lineage: Lineage, gen_id: str, **fields) -> None:
    path = lineage.dir / gen_id / "meta.json"
    meta = json.loads(path.read_text())
    meta.update(fields)
    atomic_write_text(path, json.dumps(meta))


def tiny_web_lineage(models: Path) -> Lineage:
    lineage = Lineage(models)
    make_generation(models, "gen-0000", None, status="base")
    make_generation(models, "gen-0001", "gen-0000")
    make_generation(models, "gen-0002", "gen-0001", status="refused")
    set_meta(lineage, "gen-0001", scores={"recall": 0.93, "generalization": 0.88, "style_drift": 1, "format": 1.0},
             parent_scores={"recall": 0.91, "generalization": 0.80, "style_drift": 2, "format": 0.9},
             data={"new_examples": 37, "new_pairs": 4, "contributors": 3}, train={"loss_end": 1.2},
             stage_s={"data": 1.5, "sft": 42.0, "convert": 6.0, "eval": 12.5})
    set_meta(lineage, "gen-0002", scores={"recall": 0.70, "generalization": 0.86, "style_drift": 4, "format": 1.0},
             parent_scores={"recall": 0.93, "generalization": 0.88, "style_drift": 1, "format": 1.0},
             data={"new_examples": 12}, reasons=["recall 0.70 < 0.90 <script>alert(1)</script>"])
    lineage.set_active("gen-0000")
    lineage.append_ledger({"GEN_ID": "gen-0000", "event": "base", "actor": "system"})
    return lineage


def add_waiting_turns(store: Store, people: list[tuple[int, str]]) -> list[int]:
    """One answered, unrated turn per person (they all wait for review)."""
    turns = []
    for i, (user_id, name) in enumerate(people):
        t = store.add_user_turn(chat_id=user_id, user_id=user_id, text=f"question {i} from {name}", first_name=name)
        store.complete_turn(t, reply_text=f"served answer {i} <b>bold?</b>", generation_id="gen-0000",
                            prompt_tokens=10, completion_tokens=8, latency_s=0.1, ttft_s=0.01,
                            context_start_turn_id=t)
        turns.append(t)
    return turns


def start_web(tmp_path: Path, *, people=((1001, "Ann"), (1002, "Bob")), scheduled: bool = False,
              with_loop: bool = True, **overrides) -> WebServer:
    """`scheduled`: the learning loop is started with its schedule, as under `ouro serve`; `with_loop`
    False: the app gets no learning loop (the page then moves the pointer as `ouro promote` does)."""
    settings = load_settings(data_dir=tmp_path / "data", admin_ids=[ADMIN], **overrides)
    lineage = tiny_web_lineage(settings.models_dir)
    store = Store.open(settings.db_path)
    turns = add_waiting_turns(store, list(people))
    engine = FakeEngine(generation_id="gen-0000")
    engine.model_sha256 = lineage.active().sha256
    worker = InferenceWorker(engine)
    learning = LearningLoop(settings, store, worker, load=Loader())
    thread = ServerThread(settings, Conversation(settings, store, worker), learning=learning if with_loop else None)
    port = thread.start()
    web = WebServer(settings, store, lineage, worker, learning, thread, f"http://127.0.0.1:{port}", turns)
    if scheduled:
        web.in_server_loop(learning.start())
        web.started = True
    return web
