"""engine = openai against llama.cpp's own llama-server in router mode over the bot's models
folder (marked `model`): built from the llama.cpp source llama-cpp-python vendors, once, into the
user's cache (tests/helpers/llama_server.py; `OURO_LLAMA_SERVER` names a build instead).

Router mode is the server kind whose hot-swap needs nothing from the owner: every generation
folder is a model named by its id, a generation trained after the server started is found when
the bot lists the models again, and the first request for it loads it (`--models-max 1`: the old
one is unloaded).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from config.settings import load_settings
from engine.openai_server import OpenAIServerEngine
from engine.protocol import Sampling
from lineage.generations import packaged_base_gguf
from serving.conversation import Speaker
from serving.loop import LearningLoop
from serving.runtime import open_runtime, open_store, register_base
from tests.helpers.lineages import make_generation
from tests.helpers.llama_server import LlamaCppServer, llama_server_binary

pytestmark = pytest.mark.model
GREEDY = Sampling(temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=16)
HELLO = [{"role": "system", "content": "You are Ouro, a cheerful sea otter."},
         {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = tmp_path_factory.mktemp("llama-server")
    base = load_settings(data_dir=data, reply_max_tokens=24, seed=7, cycle_schedule="off")
    store = open_store(base)
    register_base(base, store)
    store.close()
    with LlamaCppServer(llama_server_binary(), base.models_dir, data / "server.log") as server:
        yield base.model_copy(update={"engine": "openai", "engine_base_url": server.url}), server


async def test_router_mode_serves_each_generation_and_finds_a_new_one_at_the_swap(world):
    settings, server = world
    runtime = open_runtime(settings)
    try:
        engine = runtime.worker.engine
        assert isinstance(engine, OpenAIServerEngine) and engine.generation_id == "gen-0000"
        assert engine.placement.startswith(f"the server at {server.url}")       # /status: "Runs on"
        pieces: list[str] = []
        out = runtime.worker.run_sync(lambda e: e.generate(HELLO, chat_key=1, sampling=GREEDY,
                                                           on_text=pieces.append))
        assert len(pieces) > 3 and "".join(pieces).strip() == out.text and out.text
        usage = httpx.post(server.url + "/chat/completions", timeout=120,
                           json={"model": "gen-0000", "messages": HELLO, "max_tokens": 1}).json()["usage"]
        assert usage["prompt_tokens"] == engine.count_tokens(HELLO)    # the budget counts what the server reads

        who = Speaker(chat_id=601, user_id=601)
        first = await runtime.conversation.handle_text(who, "hi! what do you like?")
        assert first.kind == "answered" and runtime.store.turn(first.turn_id).generation_id == "gen-0000"

        # trained after the server started: the swap finds it, and the server loads it on first use
        make_generation(settings.models_dir, "gen-0001", "gen-0000", payload=packaged_base_gguf().read_bytes())
        loop = LearningLoop(settings, runtime.store, runtime.worker, warmup=runtime.conversation.warmup_plan)
        result = await loop.promote("gen-0001", actor="test", why="router mode loads it")
        assert result is not None and result.ok, result
        assert runtime.worker.engine.generation_id == "gen-0001"
        second = await runtime.conversation.handle_text(who, "and now?")
        assert second.kind == "answered" and runtime.store.turn(second.turn_id).generation_id == "gen-0001"
        listed = {m["id"]: m for m in httpx.get(server.url + "/models", timeout=10).json()["data"]}
        assert set(listed) >= {"gen-0000", "gen-0001"}
        assert listed["gen-0001"]["status"]["value"] == "loaded"
        assert listed["gen-0000"]["status"]["value"] != "loaded"     # --models-max 1: the old one made room
        await asyncio.sleep(0)
    finally:
        runtime.close()
