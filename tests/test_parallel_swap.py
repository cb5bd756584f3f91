"""A hot-swap on the parallel engine (`max_parallel` > 1), through the serving stack on the packaged
GGUF: the chats keep their words across it, the two models never decode at once, and the new
model decodes at the bot's own CPU priority — not the niced loader's (`ouro bench swap` measured
what each of those cost when it was wrong: docs/design-notes.md, "Hot-swap on the parallel engine")."""

from __future__ import annotations

import asyncio
import threading

import pytest

from config.settings import load_settings
from serving.conversation import Speaker
from serving.loop import LearningLoop
from serving.runtime import open_runtime
from tests.helpers.concurrency import DecodeWatch, nice_of
from tests.helpers.lineages import make_generation

pytestmark = pytest.mark.model


async def test_a_swap_keeps_the_chats_words_takes_turns_and_leaves_the_new_model_at_the_bots_priority(
        tmp_path, monkeypatch):
    settings = load_settings(data_dir=tmp_path, seed=5, temperature=0.0, top_k=1, reply_max_tokens=16,
                             max_parallel=2, cycle_schedule="off")
    decodes = DecodeWatch(monkeypatch)
    rt = open_runtime(settings)
    # gen-0001: the same weights as gen-0000 under another name (so its replies must be the same)
    make_generation(settings.models_dir, "gen-0001", "gen-0000",
                    payload=rt.lineage.generation("gen-0000").gguf.read_bytes())
    loop = LearningLoop(settings, rt.store, rt.worker, warmup=rt.conversation.warmup_plan)
    await loop.start(schedule=False)
    try:
        chats = [Speaker(chat_id=10 + i, user_id=10 + i) for i in range(2)]
        before = [await rt.conversation.handle_text(who, "Tell me about the sea.") for who in chats]
        swapped = asyncio.Event()
        meanwhile = []

        async def talk_during_the_swap() -> None:       # a third chat goes on talking throughout
            who = Speaker(chat_id=20, user_id=20)
            while not swapped.is_set() or not meanwhile:
                meanwhile.append(await rt.conversation.handle_text(who, "What else do you see out there?"))

        talking = asyncio.create_task(talk_during_the_swap())
        result = await loop.promote("gen-0001", actor="test", why="a swap on the parallel engine")
        swapped.set()
        await talking
        assert meanwhile and all(o.kind == "answered" for o in meanwhile)
        assert result is not None and result.ok and result.warm_tokens > 0
        after = [await rt.conversation.handle_text(who, "And the ships on it?") for who in chats]
        assert all(o.kind == "answered" for o in before + after)
        assert {rt.store.turn(o.turn_id).generation_id for o in after} == {"gen-0001"}
        # the new model read the chats ahead: their second turn reads only what is new
        assert all(o.completion.cached_tokens > before[i].completion.prompt_tokens for i, o in enumerate(after))
        # the same weights answer the same words as a chat of the old model would have
        fresh = await rt.conversation.handle_text(Speaker(chat_id=99, user_id=99), "Tell me about the sea.")
        assert fresh.text == before[0].text
        assert decodes.most == 1                                 # never two decodes at once
        mine = nice_of()
        decoders = [t for t in threading.enumerate() if t.name == "decode-gen-0001"]
        assert decoders and all(nice_of(t) == mine for t in decoders)
    finally:
        await loop.stop()
        rt.close()
