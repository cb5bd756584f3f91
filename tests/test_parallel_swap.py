"""A hot-swap on the parallel engine (`max_parallel` > 1), through the serving stack on the packaged
GGUF: the chats keep their words across it, the two models never decode at once, and the new
model decodes at the bot's own CPU priority — not the niced loader's (`ouro bench swap` measured
what each of those cost when it was wrong: docs/design-notes.md, "Hot-swap on the parallel engine")."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading

import llama_cpp
import pytest

from config.settings import load_settings
from core.files import atomic_write_text, now, sha256_file
from serving.conversation import Speaker
from serving.loop import LearningLoop
from serving.runtime import open_runtime

pytestmark = pytest.mark.model


def _copy_of_the_base(lineage) -> None:
    """gen-0001: the same weights as gen-0000 under another name (so its replies must be the same)."""
    folder = lineage.dir / "gen-0001"
    folder.mkdir()
    shutil.copyfile(lineage.generation("gen-0000").gguf, folder / "model.gguf")
    meta = {"id": "gen-0001", "parent_id": "gen-0000", "gguf": "model.gguf", "created_at": now("seconds"),
            "gguf_sha256": sha256_file(folder / "model.gguf"), "status": "promoted", "note": "test copy"}
    atomic_write_text(folder / "meta.json", json.dumps(meta))


async def test_a_swap_keeps_the_chats_words_takes_turns_and_leaves_the_new_model_at_the_bots_priority(
        tmp_path, monkeypatch):
    settings = load_settings(data_dir=tmp_path, seed=5, temperature=0.0, top_k=1, reply_max_tokens=16,
                             max_parallel=2, cycle_schedule="off")
    real = llama_cpp.llama_decode
    lock = threading.Lock()
    inside = [0, 0]                     # decodes now, most at once

    def decode(ctx, batch):
        with lock:
            inside[0] += 1
            inside[1] = max(inside[1], inside[0])
        try:
            return real(ctx, batch)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    rt = open_runtime(settings)
    _copy_of_the_base(rt.lineage)
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
        assert inside[1] == 1                                    # never two decodes at once
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        decoders = [t for t in threading.enumerate() if t.name == "decode-gen-0001"]
        assert decoders and all(os.getpriority(os.PRIO_PROCESS, t.native_id) == mine for t in decoders)
    finally:
        await loop.stop()
        rt.close()
