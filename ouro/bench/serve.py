"""`ouro bench serve`: serving speed as ratios measured side by side in one run.

1. Time to first token (TTFT) at turn 20 of one conversation ÷ at turn 2 (goal ≤ 1.5):
   KV reuse means a long history costs little once it has been read. Beside it the same ratio in
   bare llama.cpp (one `Llama` context reusing the common prefix) on the same prompts, and the bot's
   ratio ÷ bare llama.cpp's (goal ≤ 1.1).
2. Four chats interleaved: TTFT of a chat returning after the other three ÷ its warm TTFT
   (goal ≤ 2.0): the per-chat KV cache restores its state instead of re-reading history.
3. A reply through the whole bot (Telegram emulator over HTTP, python-telegram-bot, store,
   streaming edits) ÷ the bare model generating the same reply for the same prompt
   (goal ≤ 1.15).
4. A reply through the OpenAI-compatible API (api/, a real uvicorn server on loopback, the
   `openai` client, non-streaming, temperature 0, the same max tokens) ÷ the bare model on the
   same prompt: the ratio of the median latencies over API_PROMPTS prompts (goal ≤ 1.10).
5. A returning chat's TTFT after a restart ÷ warm (goal ≤ 1.5), beside a cold read of the same
   turn: the chats' KV states saved at shutdown come back from the data folder (ouro/bench/restart.py).
6. With `concurrent` (`--concurrent N`): N API clients at once beside N Telegram chats at once,
   replies/min, tokens/s and p50/p95 latency of each (ouro/bench/concurrent_api.py).
Every figure uses the default model on this machine; nothing is compared across runs.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from config.settings import Settings, load_settings
from serving.conversation import Speaker
from serving.runtime import open_runtime

MESSAGES = [
    "hey! how's your day going?", "I just got back from a long walk by the river.",
    "do you like rain or sunshine more?", "what would you cook for a rainy evening?",
    "I tried making soup once and burned it, haha", "any tips for not burning things?",
    "what's a book you'd recommend?", "why that one?", "I'm more of a sci-fi person honestly",
    "have you heard of the three-body problem?", "what do you think about space travel?",
    "would you go to mars if you could?", "what would you miss most about earth?",
    "tell me something that made you laugh recently", "haha that's good",
    "I have a cat named Pixel", "she sleeps 18 hours a day", "do you prefer cats or dogs?",
    "what's your favourite time of day?", "ok one last question: tea or coffee?",
    "and why?", "fair enough!",
]


def _bench_settings(base: Settings, data_dir: Path) -> Settings:
    """Greedy decoding, so both sides of every ratio generate exactly the same tokens."""
    values = base.model_dump()
    values.update(data_dir=data_dir, seed=1234, temperature=0.0, top_k=1, reply_max_tokens=48,
                  kv_cache_chats=max(base.kv_cache_chats, 4))
    return load_settings(**values)


async def _turns(rt, who: Speaker, texts: list[str]) -> list:
    out = []
    for text in texts:
        outcome = await rt.conversation.handle_text(who, text)
        out.append(outcome)
    return out


API_PROMPTS = 5
PARTS = ("chat", "api", "bot", "restart")


def run_bench_serve(base: Settings, *, turns: int = 20, json_output: bool = False,
                    parts: tuple[str, ...] = PARTS, concurrent: int = 4) -> dict:
    """`parts`: which measurements to run (chat: 1 and 2; api: 4; bot: 3, which needs the emulator;
    restart: 5, on a data folder of its own; concurrent: 6, with `concurrent` clients on each side, which needs the emulator too)."""
    turns = max(3, min(turns, len(MESSAGES)))
    with tempfile.TemporaryDirectory(prefix="ouro-bench-") as tmp:
        settings = _bench_settings(base, Path(tmp))
        rt = open_runtime(settings)
        result: dict = {"model": rt.worker.engine.generation_id}
        try:
            if "chat" in parts:
                result.update(asyncio.run(_measure(rt, turns, quiet=json_output)))
            if "api" in parts:
                result.update(asyncio.run(measure_api(rt, quiet=json_output)))
            if "bot" in parts:
                result.update(asyncio.run(_measure_bot(rt, quiet=json_output)))
            if "concurrent" in parts:
                from ouro.bench.concurrent_api import measure_concurrent

                result.update(asyncio.run(measure_concurrent(rt, concurrent, messages=MESSAGES, quiet=json_output)))
        finally:
            rt.close()
        if "restart" in parts:
            from ouro.bench.restart import run_bench_restart

            result.update(run_bench_restart(_bench_settings(base, Path(tmp) / "restart"), MESSAGES,
                                            quiet=json_output))
    if not json_output:
        print_report(result)
    return result


async def _measure(rt, turns: int, *, quiet: bool) -> dict:
    # 1. one long conversation
    ttft = []
    me = Speaker(chat_id=1, user_id=1)
    prompts: list[list[int]] = []
    history = [{"role": "system", "content": rt.conversation.persona}]
    for text in tqdm(MESSAGES[:turns], desc="turns of one chat", disable=quiet):
        out = await rt.conversation.handle_text(me, text)
        ttft.append(out.completion.ttft_s)
        history.append({"role": "user", "content": text})
        prompts.append(await rt.worker.run(lambda e, m=list(history): e.tokenize(m)))
        history.append({"role": "assistant", "content": out.text})
    long_ratio = ttft[turns - 1] / ttft[1]
    bare = bare_llama_ttfts(rt.settings, rt.lineage.active().gguf, prompts, quiet=quiet)
    bare_ratio = bare[turns - 1] / bare[1]

    # 2. four chats interleaved: warm (same chat twice in a row) vs returning after three others
    chats = [Speaker(chat_id=10 + i, user_id=10 + i) for i in range(4)]
    for who in tqdm(chats, desc="warming four chats", disable=quiet):
        await _turns(rt, who, MESSAGES[:6])
    warm, returning = [], []
    a = chats[0]
    await rt.conversation.handle_text(a, "hello again")  # chat A holds the context now
    for round_ in tqdm(range(3), desc="interleaved rounds", disable=quiet):
        out = await rt.conversation.handle_text(a, MESSAGES[6 + 2 * round_])
        warm.append(out.completion.ttft_s)       # the previous call was chat A too: warm
        for other in chats[1:]:
            await rt.conversation.handle_text(other, MESSAGES[6 + 2 * round_])
        out = await rt.conversation.handle_text(a, MESSAGES[7 + 2 * round_])
        returning.append(out.completion.ttft_s)  # three other chats used the context since
    interleave_ratio = statistics.median(returning) / statistics.median(warm)
    return {
        "model": rt.worker.engine.generation_id,
        "turn_2_ttft_s": round(ttft[1], 4),
        f"turn_{turns}_ttft_s": round(ttft[turns - 1], 4),
        "long_conversation_ratio": round(long_ratio, 3),
        "long_conversation_goal": 1.5,
        "bare_turn_2_ttft_s": round(bare[1], 4),
        f"bare_turn_{turns}_ttft_s": round(bare[turns - 1], 4),
        "bare_long_conversation_ratio": round(bare_ratio, 3),
        "long_vs_bare": round(long_ratio / bare_ratio, 3),
        "long_vs_bare_goal": 1.1,
        "warm_ttft_s": round(statistics.median(warm), 4),
        "returning_ttft_s": round(statistics.median(returning), 4),
        "interleaved_ratio": round(interleave_ratio, 3),
        "interleaved_goal": 2.0,
    }


def bare_llama_ttfts(settings: Settings, gguf: Path, prompts: list[list[int]], *, quiet: bool,
                     reads: list[int] | None = None) -> list[float]:
    """The same conversation in bare llama.cpp (llama-cpp-python's `Llama`, one context that keeps what
    it read and reuses the longest common prefix): each turn's prompt tokens as the bot rendered them,
    the reply generated greedily to its end (so the next turn finds it cached, as the bot does), the
    first token timed. Same model, threads, context and buffer choice as the embedded engine.
    `reads`, when given, gets the prompt tokens llama.cpp read on each turn (its perf counters)."""
    import llama_cpp
    from llama_cpp import Llama

    from engine.llama import model_params

    with model_params(extra_buffers=settings.llama_extra_buffers):
        llm = Llama(model_path=str(gguf), n_ctx=settings.n_ctx, n_threads=settings.n_threads, verbose=False)
    out = []
    try:
        for tokens in tqdm(prompts, desc="the same chat in bare llama.cpp", disable=quiet):
            started, first = time.perf_counter(), None
            llama_cpp.llama_perf_context_reset(llm.ctx)
            for _chunk in llm.create_completion(tokens, max_tokens=settings.reply_max_tokens, temperature=0.0,
                                                top_k=1, repeat_penalty=settings.repeat_penalty, stream=True):
                if first is None:
                    first = time.perf_counter()
            out.append((first or time.perf_counter()) - started)
            if reads is not None:
                reads.append(int(llama_cpp.llama_perf_context(llm.ctx).n_p_eval))
    finally:
        llm.close()
    return out


async def _measure_bot(rt, *, quiet: bool, reps: int = 3) -> dict:
    """Send → final reply visible to the user (through PTB and the emulator) vs bare generate()."""
    from bot.app import build_application, running
    from ouro.demo.emulator import Emulator
    from serving.context import to_messages

    persona = rt.conversation.persona
    sampling = rt.conversation.sampling()
    bare, through_bot = [], []
    with Emulator() as emu:
        app = build_application(rt.settings, rt.store, rt.conversation, token=emu.token, base_url=emu.api_url)
        async with running(app, poll_timeout=5):
            for i in tqdm(range(reps), desc="bot vs bare model", disable=quiet):
                text = MESSAGES[i * 3]
                # the same starting KV for both sides: another chat ran last
                await rt.worker.run(lambda e: e.generate([{"role": "user", "content": "unrelated"}], chat_key="z",
                                                         sampling=sampling))
                msgs = to_messages(persona, [], text)
                c = await rt.worker.run(lambda e, m=msgs, k=f"bare{i}": e.generate(m, chat_key=k, sampling=sampling))
                bare.append(c.total_s)
                await rt.worker.run(lambda e: e.generate([{"role": "user", "content": "unrelated"}], chat_key="z",
                                                         sampling=sampling))
                user = emu.client(50_000 + i, f"bench{i}")
                started = time.perf_counter()
                mid = await user.asend_text(text)
                reply = await user.await_for(lambda m: bool(m.callback_data), after=mid, timeout=120)
                through_bot.append(time.perf_counter() - started)
                if reply.text.strip() != c.text.strip():  # greedy on the same prompt: must match
                    raise RuntimeError("bot and bare model produced different replies; the ratio would be unfair")
    ratio = statistics.median(b / m for b, m in zip(through_bot, bare, strict=True))
    return {"bare_reply_s": round(statistics.median(bare), 4), "bot_reply_s": round(statistics.median(through_bot), 4),
            "bot_vs_bare_ratio": round(ratio, 3), "bot_vs_bare_goal": 1.15}


async def measure_api(rt, *, quiet: bool, prompts: int = API_PROMPTS) -> dict:
    """The same prompt through the API (openai client, non-streaming, temperature 0, the same max
    tokens) and to the bare model; each prompt from a new key (a new person, a new chat, as the bot
    part uses a new user) after another chat used the context, so both sides start alike."""
    try:
        from openai import AsyncOpenAI
    except ImportError as exc:   # the dev extra
        raise RuntimeError("the API part of `ouro bench serve` needs the openai client: pip install openai") from exc
    from api.app import build_api
    from api.keys import create_key
    from api.server import HttpServer
    from serving.context import to_messages

    persona = rt.conversation.persona
    sampling = rt.conversation.sampling(temperature=0.0)
    max_tokens = rt.settings.reply_max_tokens
    server = HttpServer(build_api(rt.settings, rt.conversation), "127.0.0.1", 0, grace_s=1.0)
    await server.start()
    bare, through_api, same = [], [], True

    async def other_chat() -> None:
        await rt.worker.run(lambda e: e.generate([{"role": "user", "content": "unrelated"}], chat_key="z",
                                                 sampling=sampling))
    try:
        for i in tqdm(range(prompts), desc="API vs bare model", disable=quiet):
            text = MESSAGES[(i * 4 + 1) % len(MESSAGES)]
            await other_chat()
            msgs = to_messages(persona, [], text)
            c = await rt.worker.run(lambda e, m=msgs, k=f"bare-api{i}": e.generate(m, chat_key=k, sampling=sampling))
            bare.append(c.total_s)
            await other_chat()
            key, _user = create_key(rt.store, f"bench{i}")
            async with AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0,
                                   timeout=300) as client:
                started = time.perf_counter()
                reply = await client.chat.completions.create(model="ouro", temperature=0, max_tokens=max_tokens,
                                                             messages=[{"role": "user", "content": text}])
                through_api.append(time.perf_counter() - started)
            same = same and (reply.choices[0].message.content or "").strip() == c.text.strip()
    finally:
        await server.stop()
    ratio = statistics.median(through_api) / statistics.median(bare)
    return {"api_bare_reply_s": round(statistics.median(bare), 4), "api_reply_s": round(statistics.median(through_api), 4),
            "api_vs_bare_ratio": round(ratio, 3), "api_vs_bare_goal": 1.10, "api_prompts": prompts,
            "api_same_replies": same}


def print_report(r: dict) -> None:
    print("\nouro bench serve")
    if "long_conversation_ratio" in r:
        print(f"  TTFT at the last turn ÷ turn 2:        {r['long_conversation_ratio']:.2f}  (goal ≤ 1.5)")
        print(f"  … ÷ bare llama.cpp's own ratio ({r['bare_long_conversation_ratio']:.2f}):  {r['long_vs_bare']:.2f}  "
              f"(goal ≤ 1.1)")
        print(f"  returning chat ÷ warm chat TTFT:       {r['interleaved_ratio']:.2f}  (goal ≤ 2.0)")
    if "bot_vs_bare_ratio" in r:
        print(f"  reply through the bot ÷ bare model:    {r['bot_vs_bare_ratio']:.2f}  (goal ≤ 1.15)")
    if "api_vs_bare_ratio" in r:
        note = "" if r["api_same_replies"] else "  (replies differed: not a like-for-like ratio)"
        print(f"  reply through the API ÷ bare model:    {r['api_vs_bare_ratio']:.2f}  (goal ≤ 1.10; median "
              f"{r['api_reply_s']:.3f} s vs {r['api_bare_reply_s']:.3f} s, {r['api_prompts']} prompts){note}")
    if "restart_ratio" in r:
        from ouro.bench.restart import report_lines as restart_lines

        print("\n".join(restart_lines(r)))
    if "concurrent_clients" in r:
        from ouro.bench.concurrent_api import report_lines

        print("\n".join(report_lines(r)))

