"""Chats' KV states survive a restart (engine/kv_files.py) on the packaged SmolLM2 GGUF through real llama.cpp.

The reference is the same conversation on one engine that never stopped: after a restart the
returning chat's next turn must read exactly as many prompt tokens as there (`Completion.cached_tokens`,
the engine's own count) and write exactly the same greedy text. Time is never asserted here;
`ouro bench serve --only restart` measures what the restore saves.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from config.settings import load_settings
from core.files import sha256_file
from engine.batched import BatchedEngine
from engine.kv_files import KVFiles, file_stem
from engine.llama import LlamaEngine
from engine.protocol import Sampling
from lineage.generations import packaged_base_gguf
from serving.conversation import Speaker
from serving.runtime import open_runtime

pytestmark = pytest.mark.model
GREEDY = Sampling(temperature=0.0, top_k=1, max_tokens=16)
N_CTX = 1024
PERSONA = "You are Ouro, a cheerful sailor who loves the sea, old ships and long stories about the weather."
TURNS = ["Hi! Where did you sail last summer?", "What was the worst storm you saw?", "And what did you eat on board?"]


@pytest.fixture(scope="module")
def sha() -> str:
    return sha256_file(packaged_base_gguf())


def engine(kind: str, kv: KVFiles | None, *, kv_cache_chats: int = 8, slots: int = 2):
    if kind == "batched":
        return BatchedEngine(packaged_base_gguf(), generation_id="g", slots=slots, n_ctx=N_CTX,
                             kv_cache_chats=kv_cache_chats, kv_files=kv)
    return LlamaEngine(packaged_base_gguf(), generation_id="g", n_ctx=N_CTX, kv_cache_chats=kv_cache_chats,
                       kv_files=kv)


def kv_files(root, sha: str) -> KVFiles:
    return KVFiles(root, sha, max_files=16, max_bytes=512 << 20)


class Chat:
    """One conversation as serving builds it: the persona, then each turn with the engine's reply."""

    def __init__(self, key: int | str) -> None:
        self.key = key
        self.messages = [{"role": "system", "content": PERSONA}]

    def turn(self, eng, text: str):
        self.messages.append({"role": "user", "content": text})
        done = eng.generate(self.messages, chat_key=self.key, sampling=GREEDY)
        self.messages.append({"role": "assistant", "content": done.text})
        return done


@pytest.fixture(scope="module")
def cold_third(reference):
    """Turn 3's reply when the whole history (turns 1–2 as the reference answered them) is read anew by
    an engine that holds nothing: what a chat whose state cannot be used gets. Not the reference's own
    turn 3: reading 150 tokens at once or a few at a time may round differently (on some CPUs the
    greedy reply then differs), and a chat read again is read at once."""
    out = {}
    for kind in ("llama", "batched"):
        eng = engine(kind, None)
        chat = Chat(1)
        for text, done in zip(TURNS[:2], reference[kind][:2], strict=True):
            chat.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": done.text}]
        out[kind] = chat.turn(eng, TURNS[2])
        eng.close()
    return out


@pytest.fixture(scope="module")
def reference():
    """The conversation on an engine that never stopped (one per engine kind): its turns' completions."""
    out = {}
    for kind in ("llama", "batched"):
        eng = engine(kind, None)
        chat = Chat(1)
        out[kind] = [chat.turn(eng, text) for text in TURNS]
        eng.close()
    return out


@pytest.mark.parametrize("kind", ["llama", "batched"])
def test_a_returning_chat_after_a_restart_reads_only_its_new_tokens(tmp_path, sha, reference, kind):
    before = engine(kind, kv_files(tmp_path, sha))
    chat = Chat(1)
    for text in TURNS[:2]:
        chat.turn(before, text)
    assert before.save_states() == 1
    before.close()
    assert [p.name for p in (tmp_path / sha).iterdir()] == [f"{file_stem(1)}.bin"]

    after = engine(kind, kv_files(tmp_path, sha))          # the restart: a new process would do the same
    third = chat.turn(after, TURNS[2])
    ref = reference[kind][2]
    assert third.text == ref.text and third.text
    assert third.prompt_tokens == ref.prompt_tokens
    assert third.cached_tokens == ref.cached_tokens        # exactly what the engine that never stopped reads
    assert third.prompt_tokens - third.cached_tokens < 30 < third.cached_tokens
    assert after.states.restores if kind == "llama" else after.restores == 1
    assert list((tmp_path / sha).iterdir()) == []          # the state is in memory again
    after.close()


@pytest.mark.parametrize("kind", ["llama", "batched"])
def test_a_state_pushed_out_of_memory_goes_to_disk_and_comes_back(tmp_path, sha, reference, kind):
    # llama: one chat's state kept in memory besides the live one; batched: one slot, none kept
    eng = engine(kind, kv_files(tmp_path, sha), kv_cache_chats=1 if kind == "llama" else 0, slots=1)
    try:
        chat, others = Chat(1), [Chat(2), Chat(3)]
        chat.turn(eng, TURNS[0])
        chat.turn(eng, TURNS[1])
        for other in others:
            other.turn(eng, "Tell me a joke about fish.")
        eng.kv_files.flush()
        assert file_stem(1) in eng.kv_files.files()        # pushed out of memory: on disk
        third = chat.turn(eng, TURNS[2])
        assert third.text == reference[kind][2].text
        assert third.cached_tokens == reference[kind][2].cached_tokens
        assert file_stem(1) not in eng.kv_files.files()
    finally:
        eng.close()


def test_another_generation_never_loads_the_old_files(tmp_path, sha, cold_third):
    before = engine("batched", kv_files(tmp_path, sha))
    chat = Chat(1)
    for text in TURNS[:2]:
        chat.turn(before, text)
    before.save_states()
    before.close()
    other_sha = "f" * 64        # another generation's GGUF (the same weights here: only the key tells them apart)
    after = engine("batched", kv_files(tmp_path, other_sha))
    assert not (tmp_path / sha).exists()                    # cleaned up when the new model loaded
    third = chat.turn(after, TURNS[2])
    assert third.cached_tokens == 0 and third.text == cold_third["batched"].text
    after.close()


# damaged files of every kind are turned away by the files themselves (tests/test_kv_files.py); here
# the engines go on from one: a flipped byte, and a file whose checks all pass but llama.cpp refuses
@pytest.mark.parametrize(("kind", "damage"), [("llama", "flipped"), ("batched", "refused by llama.cpp"),
                                              ("llama", "refused by llama.cpp")])
def test_a_corrupt_state_file_is_ignored_and_the_chat_read_again(tmp_path, sha, cold_third, caplog, kind, damage):
    before = engine(kind, kv_files(tmp_path, sha))
    chat = Chat(1)
    for text in TURNS[:2]:
        chat.turn(before, text)
    before.save_states()
    before.close()
    path = tmp_path / sha / f"{file_stem(1)}.bin"
    if damage == "refused by llama.cpp":
        # a file whose checks all pass, holding half a state: llama.cpp's own reader refuses it
        kv = kv_files(tmp_path, sha)
        state = kv.take(1)
        kv.put(1, state.tokens, state.blob, state.size // 2)
        kv.flush()
        kv.close()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    after = engine(kind, kv_files(tmp_path, sha))
    with caplog.at_level(logging.WARNING):
        third = chat.turn(after, TURNS[2])
    assert third.text == cold_third[kind].text              # the whole history read again, same reply
    assert third.cached_tokens < 3
    assert not path.exists()
    assert "ignored and deleted" in caplog.text or "could not be restored" in caplog.text
    after.close()


def test_the_whole_stack_saves_at_shutdown_and_forget_deletes_the_file(tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", reply_max_tokens=16, seed=7, temperature=0.0, top_k=1,
                             max_parallel=2, n_ctx=N_CTX)
    who = Speaker(chat_id=555, user_id=555)

    def restart(turns: list[str], then=None):
        rt = open_runtime(settings)
        try:
            outs = [asyncio.run(rt.conversation.handle_text(who, text)) for text in turns]
            if then is not None:
                then(rt)
            return rt.worker.engine.model_sha256, outs
        finally:
            rt.close()                                      # a clean shutdown saves the chats' states

    sha, _ = restart(TURNS[:2])
    path = settings.kv_dir / sha / f"{file_stem(555)}.bin"
    assert path.is_file()
    _, [out] = restart(TURNS[2:])
    assert out.kind == "answered" and out.completion.prompt_tokens - out.completion.cached_tokens < 30
    assert path.is_file()                                   # saved again at the second shutdown

    def forget(rt) -> None:                                 # /forget, as bot/privacy.py and the web page do it
        _counts, chats = rt.store.forget_user(555)
        rt.worker.run_sync(lambda e: rt.worker.forget(chats))
        assert not path.exists()

    restart([], then=forget)
    assert not list((settings.kv_dir / sha).iterdir())      # and nothing written back at shutdown


def test_a_chat_restored_after_a_restart_still_lends_its_persona_to_a_new_chat(tmp_path, sha):
    """How far a chat's cells were read as a prompt is kept in its file, so after a restart a new chat
    can start from the persona a restored chat holds instead of reading it (engine/batched.py `_share`)."""
    persona = PERSONA + (" Between voyages you mend sails in a small harbour town, keep a logbook of every"
                         " cloud you have named, and you never end a story without a lesson about patience.")
    before = engine("batched", kv_files(tmp_path, sha))
    first = Chat(1)
    first.messages[0]["content"] = persona
    first.turn(before, TURNS[0])
    assert before.save_states() == 1
    before.close()

    after = engine("batched", kv_files(tmp_path, sha))
    first.turn(after, TURNS[1])                          # restored from its file
    assert after.restores == 1 and after.shared == 0
    newcomer = Chat(2)
    newcomer.messages[0]["content"] = persona
    done = newcomer.turn(after, TURNS[2])                # an empty slot: the persona comes from chat 1's
    assert after.shared == 1
    assert done.cached_tokens >= after.count_tokens(newcomer.messages[:1]) - 8
    after.close()
