"""The packaged SmolLM2 GGUF through real llama.cpp (marked `model`; runs in CI)."""

from __future__ import annotations

import json

import llama_cpp
import pytest

from config.settings import load_settings
from core.errors import OuroError
from core.files import sha256_file
from engine.gguf import check_gguf
from engine.protocol import Sampling
from lineage.generations import Lineage, packaged_base_gguf
from serving.conversation import Speaker
from serving.runtime import load_engine, open_runtime, open_store, register_base

pytestmark = pytest.mark.model
GREEDY = Sampling(temperature=0.0, top_k=1, max_tokens=24)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    # one reply at a time (LlamaEngine, whose one-sequence states these tests read);
    # tests/test_parallel.py holds the same guarantees for the batched engine
    settings = load_settings(data_dir=tmp_path_factory.mktemp("real"), reply_max_tokens=24, seed=7, max_parallel=1)
    rt = open_runtime(settings)
    yield rt
    rt.close()


def test_generation_zero_is_registered_once_from_the_packaged_gguf(runtime):
    lineage: Lineage = runtime.lineage
    gen = lineage.active()
    assert gen.id == "gen-0000" and lineage.active_id() == "gen-0000"
    assert gen.sha256 == sha256_file(packaged_base_gguf()) == sha256_file(gen.gguf)
    meta = json.loads((gen.folder / "meta.json").read_text())
    assert meta["parent_id"] is None and meta["status"] == "base"
    assert [(r["GEN_ID"], r["gen_folder"], r["parent_sha"]) for r in lineage.ledger()] == [("0", "gen-0000", "base_model")]
    assert runtime.store.generation("gen-0000")["gguf_sha256"] == gen.sha256
    # a second start registers nothing new
    register_base(runtime.settings, runtime.store)
    assert len(lineage.ledger()) == 1 and len(lineage.generations()) == 1


def test_prompt_uses_the_gguf_template_and_counts_real_tokens(runtime):
    engine = runtime.worker.engine
    msgs = [{"role": "system", "content": "You are Ouro."}, {"role": "user", "content": "hi 👋"}]
    rendered = engine.render(msgs)
    assert rendered == ("<|im_start|>system\nYou are Ouro.<|im_end|>\n<|im_start|>user\nhi 👋<|im_end|>\n"
                        "<|im_start|>assistant\n")
    tokens = engine.tokenize(msgs)
    assert engine.count_tokens(msgs) == len(tokens)
    assert tokens.count(1) == 3 and tokens.count(2) == 2  # <|im_start|> / <|im_end|> are single tokens


def test_greedy_reply_streams_cleanly_and_ends_the_turn(runtime):
    engine = runtime.worker.engine
    pieces: list[str] = []
    msgs = [{"role": "system", "content": "You are Ouro."}, {"role": "user", "content": "Say hello with an emoji 😀"}]
    c = runtime.worker.run_sync(lambda e: e.generate(msgs, chat_key="t1", sampling=GREEDY, on_text=pieces.append))
    assert c.text and "".join(pieces).strip() == c.text
    assert "<|im_" not in c.text and c.finish_reason in ("stop", "length")
    assert 0 < c.completion_tokens <= GREEDY.max_tokens and c.prompt_tokens == engine.count_tokens(msgs)
    again = runtime.worker.run_sync(lambda e: e.generate(msgs, chat_key="t1", sampling=GREEDY))
    assert again.text == c.text  # greedy is deterministic


def test_one_seeded_reply_does_not_seed_the_replies_after_it(runtime):
    """llama-cpp-python keeps the last seed it was given: a 🔁 or an API client's `seed` made every
    later unseeded reply of the one-chat engine a draw from that seed (the same prompt, the same words)."""
    msgs = [{"role": "user", "content": "Write one sentence about the moon."}]
    free = Sampling(temperature=1.0, top_k=100, top_p=1.0, max_tokens=24)
    seeded = Sampling(temperature=1.0, top_k=100, top_p=1.0, max_tokens=24, seed=42)

    def draw(sampling: Sampling) -> str:   # after the first, each reads the prompt the same way (cached)
        return runtime.worker.run_sync(lambda e: e.generate(msgs, chat_key="seeds", sampling=sampling)).text

    draw(seeded)
    assert draw(seeded) == draw(seeded)                            # a seed gives the same words
    unseeded = {draw(free) for _ in range(3)}
    assert len(unseeded) > 1                                       # none asked: fresh draws, not seed 42's


def _chat_a(engine, *, interrupt: bool):
    """Three turns of chat A, optionally another chat in between, then A's next turn."""
    hist = [{"role": "system", "content": "You are Ouro, a cheerful friend who loves rivers and old bridges."}]
    for q in ["Tell me about the river in your town.", "What about the bridge?", "Who built it?"]:
        hist.append({"role": "user", "content": q})
        hist.append({"role": "assistant", "content": engine.generate(hist, chat_key="A", sampling=GREEDY).text})
    hist.append({"role": "user", "content": "Thanks!"})
    # the ids A's next prompt is read as: its state's own ids where they spell the same text (a reply's
    # ids are not always how the tokenizer would write it), then the new text
    warm_prefix = engine.states.common_prefix(engine.chat_tokens(engine.render(hist), "A"))
    if interrupt:
        engine.generate([{"role": "user", "content": "a different chat entirely"}], chat_key="B", sampling=GREEDY)
        assert engine.states.common_prefix(engine.chat_tokens(engine.render(hist), "A")) < warm_prefix  # B's KV now
    return hist, warm_prefix, engine.generate(hist, chat_key="A", sampling=GREEDY)


def test_kv_state_is_reused_within_a_chat_and_restored_after_another(runtime):
    interrupted = load_engine(runtime.settings, runtime.lineage.active())
    straight = load_engine(runtime.settings, runtime.lineage.active())
    try:
        hist, warm_prefix, back = _chat_a(interrupted, interrupt=True)
        _, same_prefix, warm = _chat_a(straight, interrupt=False)
        assert warm_prefix > 0.8 * interrupted.count_tokens(hist)   # within a chat only new tokens are read
        assert interrupted.states.restores == 1
        assert back.cached_tokens == warm_prefix == same_prefix == warm.cached_tokens
        assert back.text == warm.text   # the restored state is the state A left, bit for bit
    finally:
        interrupted.close()
        straight.close()


async def test_conversation_on_the_real_model_logs_the_turn(runtime):
    out = await runtime.conversation.handle_text(Speaker(chat_id=77, user_id=77), "Hi! What's your name?")
    assert out.kind == "answered" and out.text
    turn = runtime.store.turn(out.turn_id)
    assert turn.generation_id == "gen-0000" and turn.reply_text == out.text
    row = runtime.store.database.one("SELECT prompt_tokens, completion_tokens, ttft_s FROM turns WHERE id = ?",
                                     (out.turn_id,))
    assert row["prompt_tokens"] > 20 and row["completion_tokens"] > 0 and row["ttft_s"] > 0


def test_truncated_or_foreign_files_are_refused_before_llama_cpp(tmp_path):
    good = packaged_base_gguf()
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(OuroError, match="truncated or corrupt"):
        check_gguf(truncated)
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("hello")
    with pytest.raises(OuroError, match="not a GGUF"):
        check_gguf(foreign)
    info = check_gguf(good)
    assert info.architecture == "llama" and "im_start" in info.chat_template


def test_a_corrupt_base_model_is_refused_with_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    settings = load_settings(data_dir=tmp_path / "d", base_model=bad)
    store = open_store(settings)
    try:
        with pytest.raises(OuroError, match="truncated or corrupt"):
            register_base(settings, store)
        assert not (settings.models_dir / "gen-0000").exists()
        assert not (settings.models_dir / "ACTIVE").exists()
    finally:
        store.close()


@pytest.mark.e2e
async def test_the_packaged_model_answers_through_telegram(runtime):
    from bot.app import build_application, running
    from ouro.demo.emulator import Emulator

    with Emulator() as emu:
        app = build_application(runtime.settings, runtime.store, runtime.conversation, token=emu.token,
                                base_url=emu.api_url)
        async with running(app, poll_timeout=1):
            user = emu.client(31337, "Real")
            mid = await user.asend_text("Hello! Who are you?")
            reply = await user.await_for(lambda m: bool(m.callback_data), after=mid, timeout=120)
    assert reply.text.strip() and "<|im_" not in reply.text
    assert reply.button_texts == ["👍", "👎", "🔁", "✏️"]
    turn = runtime.store.turn(runtime.store.latest_answered_turn(31337))
    assert turn.reply_text == reply.text and turn.generation_id == "gen-0000"


async def test_a_new_model_warmed_with_a_chat_answers_it_from_cache_with_the_same_words(runtime):
    """Hot-swap warm-up: the conversations read ahead make the first reply cheap, not different."""
    who = Speaker(chat_id=4711, user_id=4711)
    conv = runtime.conversation
    for text in ("hi! I'm Ann and I love sailing.", "what's a good first boat?", "and where should I sail first?"):
        await conv.handle_text(who, text)
    plan = conv.warmup_plan(4)
    assert plan and plan[0][0] == 4711 and plan[0][1][0]["role"] == "system"
    assert [m["role"] for m in plan[0][1][1:]] == ["user", "assistant"] * 3
    nxt = plan[0][1] + [{"role": "user", "content": "thanks! bye"}]
    gen = runtime.lineage.active()
    warm, cold = load_engine(runtime.settings, gen), load_engine(runtime.settings, gen)
    try:
        default = llama_cpp.llama_n_threads_batch(warm.llm.ctx)
        warm.set_batch_threads(1)                # the hot-swap reads ahead with one thread
        assert llama_cpp.llama_n_threads_batch(warm.llm.ctx) == 1
        whole = warm.count_tokens(nxt)
        assert warm.unread(nxt, chat_key=4711) == whole                       # nothing read yet
        read = warm.prefill(plan[0][1], chat_key=4711)
        assert read > 50 and warm.prefill(plan[0][1], chat_key=4711) == 0     # already read: nothing to do
        assert warm.unread(nxt, chat_key=4711) == whole - read                # only the new message is left
        warm.set_batch_threads(None)             # and serves with the loaded default
        assert llama_cpp.llama_n_threads_batch(warm.llm.ctx) == default
        refused = []

        def read_another_chat(piece):   # what a background piece between the reply's tokens could try
            try:
                warm.prefill([{"role": "user", "content": "someone else"}], chat_key=99)
            except RuntimeError as exc:
                refused.append(exc)

        a = warm.generate(nxt, chat_key=4711, sampling=GREEDY, on_text=read_another_chat)
        assert refused                  # refused, and the reply below is still word for word the cold one
        assert not warm.generating and warm.prefill([{"role": "user", "content": "someone else"}], chat_key=99) > 0
        assert warm.unread(nxt, chat_key=4711) == 0     # from its saved state: it read nxt and replied
        b = cold.generate(nxt, chat_key=4711, sampling=GREEDY)
        assert a.cached_tokens >= read and b.cached_tokens == 0
        assert a.text == b.text and a.text
    finally:
        warm.close()
        cold.close()


def test_a_reply_is_not_read_again_even_when_its_ids_are_not_the_tokenizers(runtime):
    """The model's own ids for a reply often differ from how the tokenizer writes the same text; the
    next prompt keeps the chat's ids where they spell it, so only the new message is read."""
    engine = load_engine(runtime.settings, runtime.lineage.active())
    try:
        hist = [{"role": "system", "content": "You are Ouro, a cheerful friend who loves rivers and old bridges."}]
        for i, q in enumerate(["Tell me about the river in your town.", "What about the bridge?", "Who built it?",
                               "When?"]):
            hist.append({"role": "user", "content": q})
            new = engine.count_tokens(hist) - engine.count_tokens(hist[:-1])   # roughly what is new
            assert i == 0 or engine.unread(hist, chat_key="R") <= new + 8, q
            hist.append({"role": "assistant", "content": engine.generate(hist, chat_key="R", sampling=GREEDY).text})
        text = engine.render(hist[:-1])
        assert engine.llm.detokenize(engine.chat_tokens(text, "R"), special=True).decode() == text
    finally:
        engine.close()
