"""Wiring: settings → store → generation 0 → engine → worker → conversation.

One place decides how the pieces are built, so `serve`, `chat` and the benchmarks run the
exact same stack.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from config.settings import Settings
from core.files import ensure_private_dir
from engine.gguf import check_gguf
from engine.worker import InferenceWorker
from lineage.fallback import servable_generation
from lineage.generations import Generation, Lineage
from memory import language
from memory.store import Store
from serving.conversation import Conversation

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    store: Store
    lineage: Lineage
    worker: InferenceWorker
    conversation: Conversation
    notices: list[str] = field(default_factory=list)   # for the admins once the bot is up (e.g. a fallback)

    def close(self) -> None:
        self.worker.close()
        self.store.close()


def open_store(settings: Settings) -> Store:
    ensure_private_dir(settings.data_dir)
    return Store.open(settings.db_path)


def register_base(settings: Settings, store: Store) -> Lineage:
    """Make sure generation 0 exists on disk, in the ledger and in the database."""
    ensure_private_dir(settings.models_dir)
    lineage = Lineage(settings.models_dir)
    gen = lineage.ensure_base(settings.base_model)
    if store.generation(gen.id) is None:
        store.upsert_generation(gen_id=gen.id, parent_id=None, gguf_path=str(gen.gguf), gguf_sha256=gen.sha256,
                                status="base", meta=gen.meta)
    return lineage


def load_engine(settings: Settings, gen: Generation):
    """The engine that serves `gen`: llama.cpp in this process — one reply at a time (`LlamaEngine`) or
    `parallel_slots` at once (`BatchedEngine`) — or (engine = openai) the owner's inference server,
    told to serve `gen` by its name and checked to have it."""
    check_gguf(gen.gguf)
    if settings.engine == "openai":
        from engine.openai_server import OpenAIServerEngine, ServerClient

        assert settings.engine_base_url is not None    # the settings refuse openai without one
        key = settings.engine_api_key.get_secret_value() if settings.engine_api_key else None
        client = ServerClient(settings.engine_base_url, api_key=key, timeout_s=settings.engine_timeout_s)
        return OpenAIServerEngine(client, gen.gguf, generation_id=gen.id, n_ctx=settings.n_ctx,
                                  model_sha256=gen.sha256)
    from engine.batched import BatchedEngine
    from engine.llama import LlamaEngine

    slots = settings.parallel_slots
    if slots > 1:
        return BatchedEngine(gen.gguf, generation_id=gen.id, slots=slots, n_ctx=settings.n_ctx,
                             n_threads=settings.n_threads, n_gpu_layers=settings.n_gpu_layers,
                             kv_cache_chats=settings.kv_cache_chats, model_sha256=gen.sha256,
                             extra_buffers=settings.llama_extra_buffers)
    return LlamaEngine(gen.gguf, generation_id=gen.id, n_ctx=settings.n_ctx, n_threads=settings.n_threads,
                       n_gpu_layers=settings.n_gpu_layers, kv_cache_chats=settings.kv_cache_chats,
                       model_sha256=gen.sha256, extra_buffers=settings.llama_extra_buffers)


def open_runtime(settings: Settings) -> Runtime:
    store = open_store(settings)
    try:
        lineage = register_base(settings, store)
        gen, notices = servable_generation(settings, store, lineage)   # never a damaged GGUF (lineage/fallback.py)
        log.info("loading %s (%s)", gen.id, gen.gguf)
        engine = load_engine(settings, gen)
        language.load()          # each turn's language is stored with it: not a second's wait on the first one
    except BaseException:
        store.close()
        raise
    worker = InferenceWorker(engine, max_backlog=settings.max_backlog, parallel=settings.parallel_slots)
    return Runtime(settings, store, lineage, worker, Conversation(settings, store, worker), notices)
