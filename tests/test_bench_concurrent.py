"""`ouro bench serve --concurrent N`'s sides, small (marked `model`): the embedded engine with slots
and llama.cpp's own llama-server with as many slots on the same packaged GGUF, 2 chats × 3 turns of
8 tokens. Checks the bench's plumbing, not speed: every reply arrives, each side's figures are
counted over all of them (the median over two rounds), greedy replies of the two embedded engines agree, the server writes as
many tokens as the bot reply for reply, the server is started
with the embedded engine's threads and buffer choice and stopped afterwards, and a missing server
binary is a clear error before anything runs."""

from __future__ import annotations

import pytest

from config.settings import load_settings
from core.errors import OuroError
from ouro.bench.concurrent import TURNS_EACH, run_bench_concurrent
from ouro.bench.llama_server import server_argv
from tests.helpers.llama_server import llama_server_binary

pytestmark = pytest.mark.model
MESSAGES = ["hi! how are you?", "what do you like to eat?", "tell me a joke"]


def test_parallel_serial_and_llama_server_sides_answer_every_turn(tmp_path, monkeypatch):
    monkeypatch.setenv("OURO_LLAMA_SERVER", str(llama_server_binary()))
    base = load_settings(data_dir=tmp_path / "unused", reply_max_tokens=8, max_parallel=2, cycle_schedule="off")
    r = run_bench_concurrent(base, MESSAGES, chats=2, quiet=True, repeat=2)
    assert r["slots"] == 2 and r["rounds"] == 2
    for key in ("throughput_ratio", "vs_server_throughput"):     # the median of the two rounds' ratios
        low, high = sorted(r[f"{key}_by_round"])
        assert low <= r[key] <= high and low > 0
    for side in ("parallel", "one_at_a_time", "llama_server"):
        figures = r[side]
        assert figures["replies"] == 2 * TURNS_EACH and figures["tokens_per_s"] > 0, side
        assert 0 < figures["ttft_p50_s"] <= figures["ttft_p95_s"] < figures["wall_s"], side
    assert r["same_replies"] is True
    assert r["vs_server_throughput"] > 0 and r["vs_server_tokens_per_s"] > 0
    # the server wrote as many tokens as the bot, reply for reply (`ignore_eos` past its own stop)
    assert r["llama_server"]["tokens"] == r["parallel"]["tokens"] > 0


def test_the_bots_own_sampling_holds_the_server_to_the_same_work(tmp_path, monkeypatch):
    """`--sampled`: the owner's sampling on every side; the server still writes as many tokens as the bot."""
    monkeypatch.setenv("OURO_LLAMA_SERVER", str(llama_server_binary()))
    base = load_settings(data_dir=tmp_path / "unused", reply_max_tokens=8, max_parallel=2, cycle_schedule="off")
    r = run_bench_concurrent(base, MESSAGES, chats=2, quiet=True, compare=("llama-server",), sampled=True)
    assert r["sampling"] == f"temperature {base.temperature}, top-p {base.top_p}, top-k {base.top_k}"
    assert base.temperature > 0 and r["parallel"]["replies"] == 2 * TURNS_EACH
    assert r["llama_server"]["tokens"] == r["parallel"]["tokens"] > 0


def test_each_side_counts_the_prompt_tokens_it_read_and_the_server_can_run_without_its_prompt_cache(
        tmp_path, monkeypatch):
    """Two chats taking turns on one slot: the bot restores each chat's saved cells and reads only
    what is new. llama-server restores from its prompt cache in RAM, but only when a slot is about to
    lose more than half its cells (`f_keep < 0.5`; below that it keeps the shared prefix — the
    persona — and reads the rest again), so replies of up to 64 tokens make the histories long
    enough; with `--cache-ram 0` (`server_prompt_cache=False`) it reads them again every time."""
    monkeypatch.setenv("OURO_LLAMA_SERVER", str(llama_server_binary()))
    base = load_settings(data_dir=tmp_path / "unused", reply_max_tokens=64, max_parallel=1, cycle_schedule="off")
    read = {}
    for cache in (True, False):
        r = run_bench_concurrent(base, MESSAGES, chats=2, quiet=True, compare=("llama-server",),
                                 server_prompt_cache=cache)
        assert r["slots"] == 1 and r["server_prompt_cache"] is cache
        read[cache] = r["llama_server"]["prompt_tokens_read"]
        assert 0 < r["parallel"]["prompt_tokens_read"] <= read[cache]
    assert read[False] > read[True]


def test_the_server_runs_as_the_embedded_engine_does(tmp_path):
    settings = load_settings(data_dir=tmp_path, n_ctx=1024)
    argv = server_argv(tmp_path / "llama-server", tmp_path / "m.gguf", settings, 8, 5555)
    assert argv[argv.index("-np") + 1] == "8" and argv[argv.index("-c") + 1] == str(8 * 1024)
    assert "--no-repack" in argv                           # extra buffer types off, as engine/llama.py loads
    on = server_argv(tmp_path / "s", tmp_path / "m.gguf", settings.model_copy(update={"llama_extra_buffers": True}),
                     1, 5555)
    assert "--no-repack" not in on


def test_a_missing_server_is_a_clear_error_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("OURO_LLAMA_SERVER", str(tmp_path / "nowhere" / "llama-server"))
    base = load_settings(data_dir=tmp_path / "unused")
    with pytest.raises(OuroError, match="no llama-server at") as caught:
        run_bench_concurrent(base, MESSAGES, chats=2, quiet=True, compare=("llama-server",))
    assert "make llama-server" in caught.value.hint
    assert not (tmp_path / "unused").exists()


def test_bare_llama_cpp_times_each_turn_of_the_same_chat(tmp_path):
    """`ouro bench serve`'s bare llama.cpp side: every turn's first token is timed, and a turn whose
    prompt extends the last one (reply included) reads only the new tokens."""
    from engine.llama import LlamaEngine
    from lineage.generations import packaged_base_gguf
    from ouro.bench.serve import bare_llama_ttfts

    settings = load_settings(data_dir=tmp_path, reply_max_tokens=8)
    engine = LlamaEngine(packaged_base_gguf(), generation_id="bare")
    try:
        chat = [{"role": "system", "content": "You are Ouro. " * 60}, {"role": "user", "content": "hi"}]
        first = engine.tokenize(chat)
        again = engine.tokenize([*chat, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "ok"}])
    finally:
        engine.close()
    reads: list[int] = []
    ttfts = bare_llama_ttfts(settings, packaged_base_gguf(), [first, again], quiet=True, reads=reads)
    assert len(ttfts) == 2 and all(t > 0 for t in ttfts)
    # the long persona was read once, on the first turn (counted by llama.cpp, not timed: a second
    # turn's dozen new tokens once took 7.9 s against the first's ~300 in 3.8 s while a cycle trained)
    assert reads[0] == len(first) and 0 < reads[1] <= len(again) - len(first), (reads, len(first), len(again))
