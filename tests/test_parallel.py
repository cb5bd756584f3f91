"""Parallel decoding (engine/batched.py) on the packaged SmolLM2 GGUF through real llama.cpp.

The reference everywhere is the one-reply-at-a-time engine (`LlamaEngine`): a chat decoded in a
batch beside others must get exactly the text it gets alone, greedy or sampled with its seed.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from config.settings import load_settings
from core.errors import OuroError
from engine.batched import BatchedEngine
from engine.llama import LlamaEngine
from engine.protocol import Sampling
from engine.worker import Abandoned, InferenceWorker
from lineage.generations import packaged_base_gguf
from serving.conversation import Speaker
from serving.runtime import open_runtime
from tests.helpers.concurrency import DecodeWatch, built_on_a_niced_thread, nice_of, thread_named

pytestmark = pytest.mark.model
GREEDY = Sampling(temperature=0.0, top_k=1, max_tokens=32)
N_CTX = 1024

CHATS = [
    [{"role": "system", "content": "You are a friendly pirate."}, {"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "What is the capital of France? Explain briefly."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "List three fruits."}],
    [{"role": "user", "content": "Write a haiku about rain on a tin roof."}],
    [{"role": "system", "content": "You love trains."}, {"role": "user", "content": "What's your favourite train?"}],
]


@pytest.fixture(scope="module")
def alone():
    """A chat's reply from the one-at-a-time engine serving that chat alone (an engine of its own,
    so no other chat's cells are reused for its prompt), cached per (chat, sampling, messages)."""
    engines: dict = {}
    cache: dict = {}

    def reply(i: int, sampling: Sampling = GREEDY, messages=None, chat_key=None):
        """`chat_key`: go on with that chat (its state holds its earlier turns' own ids, as a chat's
        next prompt does in serving); none: a chat of its own."""
        key = (i, sampling, repr(messages), chat_key)
        if key not in cache:
            engine_key = chat_key or f"alone-{len(cache)}"
            if engine_key not in engines:
                engines[engine_key] = LlamaEngine(packaged_base_gguf(), generation_id="alone", n_ctx=N_CTX)
            cache[key] = engines[engine_key].generate(messages or CHATS[i], chat_key=engine_key, sampling=sampling)
            if chat_key is None:
                engines.pop(engine_key).close()
        return cache[key]

    yield reply
    for engine in engines.values():
        engine.close()


def batched(slots: int) -> BatchedEngine:
    return BatchedEngine(packaged_base_gguf(), generation_id="batched", slots=slots, n_ctx=N_CTX)


def at_once(engine: BatchedEngine, jobs: list[tuple[int | str, list, Sampling]], *, on_text=None,
            stagger: int = 0) -> list:
    """Run `engine.generate` for every (chat key, messages, sampling) on its own thread, all at once
    (or, with `stagger`, job n once `n * stagger` pieces have streamed in all: its prompt is read
    while the others generate); returns (completion or exception, streamed pieces) per job."""
    results: list = [None] * len(jobs)
    go = threading.Barrier(len(jobs))
    count = [0]
    count_lock = threading.Condition()

    def run(n: int) -> None:
        key, messages, sampling = jobs[n]
        pieces: list[str] = []

        def collect(piece: str) -> None:
            pieces.append(piece)
            with count_lock:
                count[0] += 1
                count_lock.notify_all()
            if on_text is not None:
                on_text(key, piece)

        go.wait()
        with count_lock:
            count_lock.wait_for(lambda: count[0] >= n * stagger, timeout=120)
        try:
            results[n] = (engine.generate(messages, chat_key=key, sampling=sampling, on_text=collect), pieces)
        except Exception as exc:   # handed to the test
            results[n] = (exc, pieces)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


@pytest.mark.parametrize("stagger", [0, 3])
def test_chats_decoded_together_get_exactly_the_text_each_gets_alone(alone, stagger):
    engine = batched(4)
    try:
        results = at_once(engine, [(i, CHATS[i], GREEDY) for i in range(4)], stagger=stagger)
        assert engine.peak_active >= 3                 # they really shared batches
        for i, (completion, pieces) in enumerate(results):
            assert completion.text == alone(i).text and completion.text
            assert completion.completion_tokens == alone(i).completion_tokens
            # what streamed to this chat is this chat's reply and nothing else
            assert "".join(pieces).strip() == completion.text
        assert engine.active == 0
    finally:
        engine.close()


def test_several_chats_generate_with_all_threads_unless_a_cycle_trains_beside(alone):
    """Quiet, a step of several generating chats reads with the prompt threads (llama.cpp's own rule
    for batches); while the bot's cycle trains, with the generation threads. The text is the same."""
    from engine.neighbours import training, training_beside

    engine = BatchedEngine(packaged_base_gguf(), generation_id="batched", slots=2, n_ctx=N_CTX, n_threads=1)
    try:
        prompt_threads = engine.llm.context_params.n_threads_batch
        assert prompt_threads > 1, "needs a machine of at least two cores"
        quiet = at_once(engine, [(i, CHATS[i], GREEDY) for i in range(2)])
        assert (True, prompt_threads) in engine.step_threads and (True, 1) not in engine.step_threads
        engine.step_threads.clear()
        with training_beside():
            assert training()
            beside = at_once(engine, [(f"b{i}", CHATS[i], GREEDY) for i in range(2)])
        assert not training()
        assert (True, 1) in engine.step_threads and (True, prompt_threads) not in engine.step_threads
        for i in range(2):
            assert quiet[i][0].text == beside[i][0].text == alone(i).text
    finally:
        engine.close()


def test_a_threads_setting_for_reading_ahead_holds_for_its_own_calls_only(alone):
    """The hot-swap's warm-up reads its pieces with one thread (`set_batch_threads(1)`); a reply
    read meanwhile for another caller keeps the engine's prompt threads."""
    engine = BatchedEngine(packaged_base_gguf(), generation_id="batched", slots=2, n_ctx=N_CTX, n_threads=1)
    try:
        prompt_threads = engine.llm.context_params.n_threads_batch
        assert prompt_threads > 1, "needs a machine of at least two cores"
        engine.set_batch_threads(1)
        assert engine.prefill(CHATS[0], chat_key="ahead") > 0
        assert engine.step_threads == {(False, 1)}
        other = at_once(engine, [(1, CHATS[1], GREEDY)])[0][0]     # another thread, while the setting stands
        assert (False, prompt_threads) in engine.step_threads and other.text == alone(1).text
        engine.set_batch_threads(None)
    finally:
        engine.close()


def test_a_read_ahead_never_reads_more_than_it_asked_for_when_the_cells_it_expected_are_gone(monkeypatch):
    """`prefill(max_tokens=8)` sizes its read from the cells it expects the chat to hold; when they
    went before the read started (another chat took the slot), it still reads 8 tokens, not
    everything up to where it expected to start (a hot-swap warm-up piece read 238 tokens at once,
    one thread for 1.5 s, a reply waiting behind it)."""
    engine = BatchedEngine(packaged_base_gguf(), generation_id="batched", slots=1, n_ctx=N_CTX, kv_cache_chats=0)
    try:
        chat = CHATS[0] + [{"role": "assistant", "content": "Arr, the sea be wide and deep and full of fish. " * 4},
                           {"role": "user", "content": "And the storms?"}]
        monkeypatch.setattr(engine.states, "cached_prefix", lambda key, tokens: 40)   # a stale expectation
        assert engine.prefill(chat, chat_key="ahead", max_tokens=8) == 8
        assert len(engine.states.held("ahead")) == 8
        monkeypatch.undo()
        assert engine.prefill(chat, chat_key="ahead", max_tokens=8) == 8    # and on from there
        assert len(engine.states.held("ahead")) == 16
    finally:
        engine.close()


def test_an_engine_loaded_on_a_niced_thread_decodes_at_its_callers_priority(alone):
    """The hot-swap loads the next model on a niced thread. A thread takes its creator's nice (per
    thread on Linux), so a decode thread started while loading read prompts at nice 19 — beside the
    niced training cycle, 7 s for 14 tokens instead of 0.06 s. It starts with its first caller."""
    engine = built_on_a_niced_thread(
        lambda: BatchedEngine(packaged_base_gguf(), generation_id="niced-load", slots=2, n_ctx=N_CTX))
    try:
        assert engine.generate(CHATS[1], chat_key=1, sampling=GREEDY).text == alone(1).text
        mine = nice_of()
        assert mine < 19 and nice_of(thread_named("decode-niced-load")) == mine
    finally:
        engine.close()


def test_two_engines_of_one_process_take_turns_to_decode(alone, monkeypatch):
    """During a hot-swap two models decode in one process (the serving one's replies, the incoming
    one's warm-up); at once, their threads outnumber the cores and each waits for the other at
    every step of the graph. They take turns, one llama_decode at a time, and both get theirs."""
    decodes = DecodeWatch(monkeypatch)
    first, second = batched(2), batched(2)
    try:
        results: dict = {}

        def talk(engine, i):
            results[(id(engine), i)] = engine.generate(CHATS[i], chat_key=i, sampling=GREEDY)

        threads = [threading.Thread(target=talk, args=(engine, i)) for engine in (first, second) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert decodes.most == 1 and decodes.calls > 4 * 2
        for engine in (first, second):
            for i in (0, 1):
                assert results[(id(engine), i)].text == alone(i).text
    finally:
        first.close()
        second.close()


def test_the_engine_counts_the_chats_whose_cells_it_keeps(alone):
    engine = BatchedEngine(packaged_base_gguf(), generation_id="batched", slots=2, n_ctx=N_CTX, n_threads=1)
    try:
        assert len(engine.states) == 0
        at_once(engine, [(i, CHATS[i], GREEDY) for i in range(2)])
        assert len(engine.states) == 2
        at_once(engine, [("third", CHATS[2], GREEDY)])      # takes a slot; the chat it held is saved
        assert len(engine.states) == 3 and engine.saves >= 1
    finally:
        engine.close()


def test_sampled_replies_keep_their_own_seed_side_by_side(alone):
    engine = batched(4)
    samplings = [Sampling(temperature=0.9, top_p=0.9, top_k=40, seed=100 + i, max_tokens=32) for i in range(4)]
    try:
        results = at_once(engine, [(i, CHATS[i], samplings[i]) for i in range(4)])
        texts = [completion.text for completion, _ in results]
        assert texts == [alone(i, samplings[i]).text for i in range(4)]
        # the same prompt with another seed is another reply: the seed really is per sequence
        other = engine.generate(CHATS[0], chat_key="other", sampling=Sampling(temperature=0.9, seed=999, max_tokens=32))
        assert other.text != texts[0]
    finally:
        engine.close()


def test_chats_beyond_the_slots_wait_then_get_their_exact_text_and_keep_their_cache(alone):
    engine = batched(2)
    try:
        first = at_once(engine, [(i, CHATS[i], GREEDY) for i in range(5)])
        assert [c.text for c, _ in first] == [alone(i, chat_key=f"conv-{i}").text for i in range(5)]
        assert engine.saves >= 3                       # five chats went through two slots
        # every chat comes back for a second turn, all at once: its history is in a slot or saved
        seconds = [CHATS[i] + [{"role": "assistant", "content": first[i][0].text},
                               {"role": "user", "content": "Tell me more."}] for i in range(5)]
        second = at_once(engine, [(i, seconds[i], GREEDY) for i in range(5)])
        for i, (completion, pieces) in enumerate(second):
            assert completion.text == alone(i, GREEDY, seconds[i], chat_key=f"conv-{i}").text
            assert "".join(pieces).strip() == completion.text
            assert completion.cached_tokens >= engine.count_tokens(CHATS[i])   # its history was not read again
        assert engine.restores >= 3 and engine.active == 0
    finally:
        engine.close()


def test_a_reply_that_ends_early_leaves_no_gap_in_the_batch(alone):
    """Chats 0-3 take slots 0-3 in turn; chat 1's short reply ends first, and a step of slots
    {0, 2, 3} would be cut by llama.cpp into two micro-batches (one per run of consecutive ids).
    The engine moves a reply into the gap instead: every step stays one run, the texts stay exact,
    and the moved chat's next turn still starts from its cells."""
    engine = batched(4)
    short = Sampling(temperature=0.0, top_k=1, max_tokens=12)
    long = Sampling(temperature=0.0, top_k=1, max_tokens=48)
    jobs = [(i, CHATS[i], short if i == 1 else long) for i in range(4)]
    try:
        results = at_once(engine, jobs, stagger=2)
        for i, (completion, pieces) in enumerate(results):
            assert completion.text == alone(i, jobs[i][2], chat_key=f"gap-{i}").text
            assert "".join(pieces).strip() == completion.text
        assert engine.peak_active == 4 and engine.moves >= 1
        assert engine.peak_runs == 1
        seconds = [CHATS[i] + [{"role": "assistant", "content": results[i][0].text},
                               {"role": "user", "content": "Tell me more."}] for i in (0, 3)]
        again = at_once(engine, [(i, seconds[n], GREEDY) for n, i in enumerate((0, 3))])
        for n, i in enumerate((0, 3)):
            assert again[n][0].text == alone(i, GREEDY, seconds[n], chat_key=f"gap-{i}").text
            assert again[n][0].cached_tokens >= engine.count_tokens(CHATS[i])
    finally:
        engine.close()


def test_a_chat_forgotten_while_its_reply_moves_leaves_no_cells_behind(alone):
    """/forget during a reply drops the chat's cells once the reply ends — also when the reply is
    moved into another slot afterwards (the mark goes with it), and the chats beside it are untouched."""
    engine = batched(4)
    short = Sampling(temperature=0.0, top_k=1, max_tokens=12)
    long = Sampling(temperature=0.0, top_k=1, max_tokens=48)
    jobs = [(i, CHATS[i], short if i == 1 else long) for i in range(4)]
    forgotten = threading.Event()
    moves_then = []

    def forget_3_at_once(key, piece):
        if key == 3 and not forgotten.is_set():
            forgotten.set()
            moves_then.append(engine.moves)
            engine.forget(3)

    try:
        results = at_once(engine, jobs, stagger=2, on_text=forget_3_at_once)
        # forgotten before chat 1's reply ended, then moved into its slot
        assert moves_then == [0] and engine.moves >= 1
        for i in (0, 2):
            assert results[i][0].text == alone(i, long).text
        deadline = time.monotonic() + 30          # the decode thread clears a forgotten slot once idle
        while engine._stale and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(s.seq for s in engine.slots) == [0, 1, 2, 3]
        assert all(not s.tokens for s in engine.slots if s.key is None)
        assert 3 not in {s.key for s in engine.slots} and engine.stored(3) is None
        again = engine.generate(CHATS[3], chat_key=3, sampling=GREEDY)
        assert again.text == alone(3).text
        assert again.cached_tokens < engine.count_tokens(CHATS[3]) - 2   # read again, not restored
    finally:
        engine.close()


def test_a_failing_reply_frees_its_slot_and_the_others_go_on(alone):
    engine = batched(2)

    def fail_chat_0(key, piece):
        if key == 0:
            raise RuntimeError("the consumer went away")

    try:
        results = at_once(engine, [(0, CHATS[0], GREEDY), (1, CHATS[1], GREEDY)], on_text=fail_chat_0)
        assert isinstance(results[0][0], RuntimeError) and len(results[0][1]) == 1
        assert results[1][0].text == alone(1).text
        assert engine.active == 0
        # the failed chat's next reply starts from the cells it left and is still its exact text
        assert engine.generate(CHATS[0], chat_key=0, sampling=GREEDY).text == alone(0).text
        too_long = [{"role": "user", "content": "word " * 2000}]
        with pytest.raises(OuroError, match="does not fit"):
            engine.generate(too_long, chat_key=2, sampling=GREEDY)
        assert engine.active == 0
    finally:
        engine.close()


async def test_stopping_gives_up_every_reply_and_frees_the_slots():
    engine = batched(2)
    worker = InferenceWorker(engine, parallel=2)
    first_piece = asyncio.Event()
    loop = asyncio.get_running_loop()

    def job(i: int):
        def run(e):
            def seen(_piece: str) -> None:
                loop.call_soon_threadsafe(first_piece.set)
            return e.generate(CHATS[i], chat_key=i, sampling=Sampling(temperature=0.0, max_tokens=400),
                              on_text=worker.guard(seen))
        return run

    replies = [asyncio.ensure_future(worker.run(job(i))) for i in range(3)]   # the third waits for a slot
    await asyncio.wait_for(first_piece.wait(), 60)
    worker.abandon()
    outcomes = await asyncio.gather(*replies, return_exceptions=True)
    assert all(isinstance(o, Abandoned) for o in outcomes)
    assert engine.active == 0 and worker.backlog == 0
    await asyncio.to_thread(worker.close)          # closes the engine: its decode thread ends
    with pytest.raises(OuroError, match="closed"):
        engine.generate(CHATS[0], chat_key=0, sampling=GREEDY)


def test_closing_the_engine_tells_a_reply_that_waits_for_a_slot():
    engine = batched(1)
    started, results = threading.Event(), {}

    def long_reply():
        try:
            engine.generate(CHATS[0], chat_key=0, sampling=Sampling(temperature=0.0, max_tokens=600),
                            on_text=lambda piece: started.set())
        except OuroError as exc:
            results["long"] = exc

    def waiting():
        started.wait(60)
        try:
            engine.generate(CHATS[1], chat_key=1, sampling=GREEDY)
        except OuroError as exc:
            results["waiting"] = exc

    threads = [threading.Thread(target=long_reply), threading.Thread(target=waiting)]
    for t in threads:
        t.start()
    started.wait(60)
    engine.close()
    for t in threads:
        t.join(60)
    assert "closed" in str(results["long"]) and "closed" in str(results["waiting"])


async def test_conversations_at_once_answer_as_they_do_one_at_a_time(tmp_path):
    """Through the worker and the conversation: four people talking at once get, turn for turn,
    the replies they get from the one-at-a-time engine."""
    lines = ["hi! I'm Ann and I love sailing.", "what's a good first boat?"]
    people = [Speaker(chat_id=100 + i, user_id=100 + i) for i in range(4)]

    async def talk(rt, who, i):
        out = []
        for text in lines:
            reply = await rt.conversation.handle_text(who, f"{text} ({i})")
            out.append(reply.text)
        return out

    replies = {}
    for slots in (1, 4):
        settings = load_settings(data_dir=tmp_path / f"p{slots}", reply_max_tokens=24, temperature=0.0, top_k=1,
                                 seed=7, max_parallel=slots, n_ctx=N_CTX)
        rt = open_runtime(settings)
        try:
            assert isinstance(rt.worker.engine, BatchedEngine) == (slots > 1) and rt.worker.parallel == slots
            replies[slots] = await asyncio.gather(*(talk(rt, who, i) for i, who in enumerate(people)))
            if slots > 1:
                assert rt.worker.engine.peak_active >= 2
        finally:
            rt.close()
    assert replies[4] == replies[1] and all(all(r) for r in replies[1])


@pytest.mark.parametrize("slots", [1, 2])
async def test_a_stop_sequence_ends_a_reply_where_it_begins_and_frees_its_slot(tmp_path, slots):
    """An API client's `stop` (serving/stops.py) on either engine: the reply is the one the chat gets
    without it, cut where the stop begins; nothing from the stop on is streamed or stored; the next
    reply in that chat is answered."""
    settings = load_settings(data_dir=tmp_path / "d", reply_max_tokens=32, temperature=0.0, top_k=1, seed=7,
                             max_parallel=slots, n_ctx=N_CTX)
    rt = open_runtime(settings)
    try:
        conv = rt.conversation
        whole = await conv.handle_text(Speaker(chat_id=201, user_id=201), "Tell me about the sea.")
        words = whole.text.split()
        assert len(words) > 8, whole.text
        stop = " " + words[5]
        turn = conv.receive(Speaker(chat_id=202, user_id=202), "Tell me about the sea.").turn_id
        pieces: list[str] = []
        cut = await conv.answer(turn, stop=["never written", stop], on_text=pieces.append)
        await asyncio.sleep(0.05)   # pieces are handed to the loop
        expected = whole.text[:whole.text.index(stop)].strip()
        assert cut.kind == "answered" and cut.completion.finish_reason == "stop" and cut.text == expected
        assert "".join(pieces).strip() == expected and rt.store.turn(turn).reply_text == expected
        again = await conv.handle_text(Speaker(chat_id=202, user_id=202), "And the moon?")
        assert again.kind == "answered" and again.text
    finally:
        rt.close()


def test_the_numbers_behind_the_exactness():
    """What the engine relies on, in logits: with a KV stream per sequence, a prompt read in one
    decode gives the same logits bit for bit whether other sequences' prompts share that decode or
    not, and a generation step the same alone as beside other sequences' steps; a piece of one
    token (one-query attention) does not — which is why the engine never reads one out of a prompt."""
    import llama_cpp
    import numpy as np

    engine = batched(3)
    ctx, vocab = engine.llm.ctx, engine.llm.n_vocab()
    memory = llama_cpp.llama_get_memory(ctx)
    prompts = [engine.tokenize(CHATS[i]) for i in range(3)]
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(parts):
        """parts: (sequence, tokens, first position); the logits of each part's last token."""
        n, last = 0, []
        for seq, tokens, start in parts:
            for i, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, start + i, 1
                batch.seq_id[n][0], batch.logits[n] = seq, i == len(tokens) - 1
                n += 1
            last.append(n - 1)
        batch.n_tokens = n
        assert llama_cpp.llama_decode(ctx, batch) == 0
        return [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(vocab,)).copy() for i in last]

    def clear():
        for seq in range(3):
            llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)

    a = prompts[0]
    try:
        clear()
        alone_read = decode([(0, a, 0)])[0]
        clear()
        assert np.array_equal(alone_read, decode([(0, a, 0), (1, prompts[1], 0), (2, prompts[2], 0)])[0])
        clear()
        decode([(0, a[:-3], 0)])
        assert np.array_equal(alone_read, decode([(0, a[-3:], len(a) - 3)])[0])        # pieces of 2+: the same
        step_alone = decode([(0, [504], len(a))])[0]
        llama_cpp.llama_memory_seq_rm(memory, 0, len(a), -1)
        decode([(1, prompts[1], 0)])
        decode([(2, prompts[2], 0)])
        step_beside = decode([(0, [504], len(a)), (1, [504], len(prompts[1])), (2, [504], len(prompts[2]))])[0]
        assert np.array_equal(step_alone, step_beside)
        clear()
        decode([(0, a[:-1], 0)])
        assert not np.array_equal(alone_read, decode([(0, a[-1:], len(a) - 1)])[0])   # a piece of one: not
    finally:
        llama_cpp.llama_batch_free(batch)
        engine.close()


PERSONA = ("You are Captain Mirela, the keeper of an old lighthouse on a windy northern island. You speak "
           "warmly and briefly, you love storms, tea with honey and the logbook your grandmother kept, and "
           "you answer every question as someone who has watched the sea for forty years.")


def test_a_new_chat_copies_the_persona_another_slot_read_instead_of_reading_it(alone):
    """Three chats with one long persona: the first reads it; the next two, each in an empty slot,
    start from a copy of the first one's cells (`_share`) and read only what is new — and their
    texts are the ones they get alone, where everything is read."""
    engine = batched(3)
    chats = [[{"role": "system", "content": PERSONA}, {"role": "user", "content": q}]
             for q in ("What do you do on a calm night?", "Tell me about your grandmother.", "Do you like tea?")]
    prompts = [engine.tokenize(chat) for chat in chats]
    common = [_common(prompts[0], prompts[n]) for n in (1, 2)]   # the persona and the user turn's opening
    assert min(common) > len(engine.tokenize(chats[0][:1])) - 8
    try:
        first = engine.generate(chats[0], chat_key="a", sampling=GREEDY)
        assert first.cached_tokens == 0 and engine.shared == 0
        results = at_once(engine, [("b", chats[1], GREEDY), ("c", chats[2], GREEDY)])
        assert engine.shared == 2
        for n, (completion, pieces) in enumerate(results, start=1):
            assert completion.cached_tokens == common[n - 1]
            assert completion.text == alone(n, GREEDY, chats[n]).text
            assert "".join(pieces).strip() == completion.text
    finally:
        engine.close()


@pytest.mark.parametrize("slots", [2, 1])
def test_only_cells_read_as_a_prompt_are_copied_to_another_chat(alone, slots):
    """A second chat whose history repeats the first chat's whole exchange, reply included: the reply's
    cells were decoded one token at a time (other numbers than reading the same tokens as a prompt),
    so the second chat takes the first one's cells only as far as its prompt went, and reads the rest —
    copied from the first chat's slot (2 slots), or kept in the one slot they take turns in (1)."""
    engine = batched(slots)
    a = [{"role": "system", "content": PERSONA}, {"role": "user", "content": "What do you do on a calm night?"}]
    try:
        reply = engine.generate(a, chat_key="a", sampling=GREEDY)
        prompt_a = engine.tokenize(a)
        b = a + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And on a stormy one?"}]
        assert _common(engine.tokenize(b), prompt_a) == len(prompt_a)   # b's prompt goes on into a's reply
        again = engine.generate(b, chat_key="b", sampling=GREEDY)
        assert engine.shared == (1 if slots == 2 else 0)
        assert again.cached_tokens == len(prompt_a)
        assert again.text == alone(0, GREEDY, b).text
    finally:
        engine.close()


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
