"""engine = openai against a real OpenAI-compatible server: llama-cpp-python's own
(`python -m llama_cpp.server`) on the packaged SmolLM2 GGUF, never a mock (marked `model`).

One server for the module, started from the config `ouro export --format llama-cpp-python`
writes, listing gen-0000 and gen-0001 (a copy of its GGUF). The server's context (1024) is
smaller than the bot's (2048) on purpose: a prompt between the two gets an HTTP error.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from config.settings import load_settings
from core.errors import OuroError
from engine.llama import LlamaEngine
from engine.openai_server import OpenAIServerEngine, ServerClient
from engine.protocol import Sampling
from lineage.generations import Lineage, packaged_base_gguf
from ouro.exports import run_export
from serving.conversation import FAILED, Speaker
from serving.loop import LearningLoop
from serving.runtime import load_engine, open_runtime, open_store, register_base
from serving.status import format_status, status_report
from tests.helpers.lineages import make_generation
from tests.helpers.llama_server import LlamaServer, free_port

pytestmark = pytest.mark.model
ADMIN, ANN = 4242, 1001
GREEDY = Sampling(temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=24)
HELLO = [{"role": "system", "content": "You are Ouro, a cheerful sea otter."},
         {"role": "user", "content": "Say hello and tell me what you like to eat."}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data folder with gen-0000 and gen-0001 (same weights), and the server serving both."""
    data = tmp_path_factory.mktemp("openai-engine")
    port = free_port()
    base = load_settings(data_dir=data, reply_max_tokens=24, seed=7, cycle_schedule="off")
    store = open_store(base)
    register_base(base, store)
    store.close()
    make_generation(base.models_dir, "gen-0001", "gen-0000", payload=packaged_base_gguf().read_bytes())
    config = data / "llama-server.json"
    report = run_export(base.model_copy(update={"n_ctx": 1024, "n_threads": 1}), None, "llama-cpp-python",
                        out=config)
    assert report["generations"] == ["gen-0000", "gen-0001"]
    text = config.read_text().replace('"port": 8080', f'"port": {port}')
    config.write_text(text)
    with LlamaServer(config, data / "server.log") as server:
        assert server.url == report["engine_base_url"].replace("8080", str(port))
        settings = load_settings(data_dir=data, reply_max_tokens=24, seed=7, cycle_schedule="off",
                                 engine="openai", engine_base_url=server.url, engine_timeout_s=120,
                                 max_input_chars=20_000)
        yield settings, server


@pytest.fixture
def runtime(world):
    settings, _ = world
    rt = open_runtime(settings)
    yield rt
    rt.close()


def test_a_reply_streams_from_the_server_as_the_embedded_engine_writes_it(world, runtime):
    settings, server = world
    engine = runtime.worker.engine
    assert isinstance(engine, OpenAIServerEngine) and engine.generation_id == "gen-0000"
    pieces: list[str] = []
    remote = runtime.worker.run_sync(lambda e: e.generate(HELLO, chat_key=1, sampling=GREEDY,
                                                          on_text=pieces.append))
    assert len(pieces) > 3 and "".join(pieces).strip() == remote.text and remote.text
    assert remote.completion_tokens == 24 and remote.finish_reason == "length"
    assert 0 < remote.ttft_s < remote.total_s
    # the same generation, greedy, in this process: the same words
    local = LlamaEngine(packaged_base_gguf(), generation_id="gen-0000", n_ctx=1024)
    try:
        assert local.generate(HELLO, chat_key=1, sampling=GREEDY).text == remote.text
        # the context budget counts what the server reads: its own usage says so
        assert engine.count_tokens(HELLO) == local.count_tokens(HELLO) == remote.prompt_tokens
    finally:
        local.close()
    usage = httpx.post(server.url + "/chat/completions", timeout=30,
                       json={"model": "gen-0000", "messages": HELLO, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == remote.prompt_tokens


async def test_a_turn_through_the_conversation_is_stored_like_the_embedded_ones(runtime):
    who = Speaker(chat_id=501, user_id=501, first_name="Ada")
    shown: list[str] = []
    out = await runtime.conversation.handle_text(who, "hi! what's your favourite colour?", on_text=shown.append)
    await asyncio.sleep(0)          # the last streamed piece is handed to the loop with call_soon
    assert out.kind == "answered" and out.text and "".join(shown).strip() == out.text
    row = runtime.store.database.one("SELECT * FROM turns WHERE id = ?", (out.turn_id,))
    assert row["status"] == "answered" and row["reply_text"] == out.text and row["generation_id"] == "gen-0000"
    assert row["prompt_tokens"] == out.completion.prompt_tokens > 10 and row["completion_tokens"] > 0
    assert row["context_start_turn_id"] == out.turn_id and row["ttft_s"] > 0
    second = await runtime.conversation.handle_text(who, "and your favourite food?")
    assert second.kind == "answered" and second.completion.prompt_tokens > out.completion.prompt_tokens
    report = status_report(runtime.settings, runtime.store, None)
    assert report["engine"] == f"openai {runtime.settings.engine_base_url}"
    assert f"Engine: openai {runtime.settings.engine_base_url}" in format_status(report).splitlines()


async def test_hot_swap_tells_the_server_to_serve_the_new_generation(world, runtime):
    settings, server = world
    told: list[str] = []

    async def notify(text):
        told.append(text)

    loop = LearningLoop(settings, runtime.store, runtime.worker, notify=notify,
                        warmup=runtime.conversation.warmup_plan)
    gen1 = str(Lineage(settings.models_dir).generation("gen-0001").gguf.resolve())
    assert gen1 not in server.log()                    # the server has not loaded it yet
    result = await loop.promote("gen-0001", actor="test", why="swap to the server's other model")
    assert result is not None and result.ok, result
    assert runtime.worker.engine.generation_id == "gen-0001"
    out = await runtime.conversation.handle_text(Speaker(chat_id=502, user_id=502), "hello again")
    assert out.kind == "answered" and out.text
    row = runtime.store.database.one("SELECT generation_id FROM turns WHERE id = ?", (out.turn_id,))
    assert row["generation_id"] == "gen-0001"
    assert gen1 in server.log()                        # the server loaded gen-0001's file to answer

    # a generation the server was not started with: refused with what to do; gen-0001 keeps serving
    make_generation(settings.models_dir, "gen-0002", "gen-0001", payload=packaged_base_gguf().read_bytes())
    result = await loop.promote("gen-0002", actor="test", why="the server does not have it")
    assert result is not None and not result.ok
    assert "does not serve gen-0002" in result.reason and "--config_file" in result.reason
    assert runtime.worker.engine.generation_id == "gen-0001"
    assert Lineage(settings.models_dir).active_id() == "gen-0001"
    assert told and "gen-0002" in told[-1] and "restart the server" in told[-1]
    back = await runtime.conversation.handle_text(Speaker(chat_id=502, user_id=502), "still there?")
    assert back.kind == "answered"
    # an admin asks again (say, after restarting the server): tried again, not skipped as failed before
    again = await loop.promote("gen-0002", actor="test", why="try again")
    assert again is not None and not again.ok and "does not serve gen-0002" in again.reason


async def test_a_hung_server_fails_the_turn_keeps_it_and_the_next_one_is_answered(world, runtime):
    settings, server = world
    who = Speaker(chat_id=503, user_id=503)
    quick = open_runtime(settings.model_copy(update={"engine_timeout_s": 3}))
    server.pause()          # SIGSTOP: connections are accepted, nothing is answered
    try:
        out = await quick.conversation.handle_text(who, "are you awake?")
    finally:
        server.resume()
        quick.close()
    assert out.kind == "failed" and out.text == FAILED
    assert isinstance(out.error, OuroError) and "did not answer within 3 s" in str(out.error)
    turn = runtime.store.turn(out.turn_id)
    assert turn.status == "failed" and turn.user_text == "are you awake?"
    assert (await runtime.conversation.handle_text(who, "now?")).kind == "answered"


@pytest.mark.e2e
async def test_telegram_streams_the_servers_reply_and_a_hung_server_reaches_the_admins(world, emu, make_bot):
    settings, server = world
    gen = Lineage(settings.models_dir).active()

    def engine(timeout_s: float) -> OpenAIServerEngine:
        return OpenAIServerEngine(ServerClient(server.url, timeout_s=timeout_s), gen.gguf, generation_id=gen.id)

    async with make_bot(engine(120), stream_drafts=False, reply_max_tokens=48) as bot:
        ann = emu.client(ANN, "Ann")
        mid = await ann.asend_text("tell me a story about the sea")
        msg = await ann.await_for(lambda m: bool(m.callback_data), after=mid, timeout=120)
        turn = bot.store.turn(bot.store.latest_answered_turn(ANN))
        assert turn.reply_text and msg.text == turn.reply_text and turn.generation_id == gen.id
        assert msg.edit_count >= 2                   # streamed in: text edits, then the buttons
    async with make_bot(engine(3)) as bot:
        ann, admin = emu.client(ANN, "Ann"), emu.client(ADMIN, "Boss")
        server.pause()
        try:
            mid = await ann.asend_text("hello?")
            msg = await ann.await_for(lambda m: m.text is not None and "▌" not in m.text, after=mid, timeout=30)
        finally:
            server.resume()
        assert "went wrong" in msg.text and "inference server" not in msg.text
        alert = await admin.await_for(lambda m: "Traceback" in (m.text or ""), timeout=30)
        assert "did not answer within 3 s" in alert.text and server.url in alert.text
        assert bot.store.turn(bot.store.stats()["turns"]).status == "failed"


async def test_a_reply_the_server_breaks_off_fails_the_turn_with_its_words(runtime):
    # ~1200 tokens (600 otters) fit the bot's 2048-token context but not the server's 1024: this server
    # answers 200, starts the stream, then reads the prompt, fails and closes it
    out = await runtime.conversation.handle_text(Speaker(chat_id=504, user_id=504), "otter " * 600)
    assert out.kind == "failed" and out.text == FAILED
    assert isinstance(out.error, OuroError) and "without finishing it" in str(out.error)
    assert "n_ctx" in str(out.error) and runtime.store.turn(out.turn_id).status == "failed"


def test_http_errors_name_the_server_status_and_its_words(world, runtime):
    settings, server = world
    bad = Sampling(top_p=5.0, max_tokens=8)    # out of the server's range: refused before any text
    with pytest.raises(OuroError, match=r"answered HTTP 500 \(gen-000\d, chat 9\).*top_p"):
        runtime.worker.run_sync(lambda e: e.generate(HELLO, chat_key=9, sampling=bad))
    wrong = settings.model_copy(update={"engine_base_url": server.url.removesuffix("/v1") + "/api"})
    with pytest.raises(OuroError, match=r"/api/v1 answered HTTP 404 \(listing its models\)"):
        load_engine(wrong, Lineage(settings.models_dir).active())


async def test_a_server_that_is_down_fails_the_turn_and_keeps_it_and_refuses_to_start(world, tmp_path):
    settings, server = world
    runtime = open_runtime(settings)
    try:
        server.stop()
        out = await runtime.conversation.handle_text(Speaker(chat_id=505, user_id=505), "hello?")
        assert out.kind == "failed" and out.text == FAILED
        assert isinstance(out.error, OuroError) and "not reachable" in str(out.error)
        assert "engine_base_url" in str(out.error)           # the hint says what to check
        turn = runtime.store.turn(out.turn_id)
        assert turn.status == "failed" and turn.user_text == "hello?"
    finally:
        runtime.close()
    with pytest.raises(OuroError, match="not reachable"):
        open_runtime(settings)
    with pytest.raises(OuroError, match="not reachable"):
        load_engine(settings, Lineage(settings.models_dir).active())


def test_settings_refuse_openai_without_a_server_and_a_bad_url(tmp_path):
    with pytest.raises(OuroError, match="engine_base_url"):
        load_settings(data_dir=tmp_path, engine="openai")
    with pytest.raises(OuroError, match="engine_base_url"):
        load_settings(data_dir=tmp_path, engine="openai", engine_base_url="localhost:8080")
    with pytest.raises(OuroError, match="engine"):
        load_settings(data_dir=tmp_path, engine="vllm")
    for url in ("http://127.0.0.1:1", "http://127.0.0.1:1/v1/"):
        client = ServerClient(url)
        assert client.root == "http://127.0.0.1:1/v1"
        client.close()


def test_the_server_config_export_lists_every_generation_the_active_one_first(world, tmp_path, capsys):
    from ouro.cli import main

    settings, _ = world
    out = tmp_path / "server.json"
    assert main(["--data-dir", str(settings.data_dir), "export", "--format", "llama-cpp-python",
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    active = Lineage(settings.models_dir).active_id()
    config = json.loads(out.read_text())
    assert [m["model_alias"] for m in config["models"]][0] == active == report["generations"][0]
    assert set(report["generations"]) == {g.id for g in Lineage(settings.models_dir).generations()}
    assert all(Path(m["model"]).is_file() and m["n_ctx"] == settings.n_ctx for m in config["models"])
    assert report["run"].endswith(f"--config_file {out.resolve()}")
    assert main(["--data-dir", str(settings.data_dir), "export", "gen-0000", "--format", "llama-cpp-python"]) == 1
