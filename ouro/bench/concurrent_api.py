"""`ouro bench serve --concurrent N`: N people at once through the OpenAI-compatible API, beside N
people at once through Telegram, on the same model in one run.

The API side: N real `openai` clients (AsyncOpenAI), each with its own key — its own person and
chat, as N apps would be — each sending ROUNDS prompts one after another (waiting for each reply,
as a person does; each request carries the conversation so far, as chat clients send it, so both
sides answer with the same context), all N at the same time; non-streaming, temperature 0, the
bot's max tokens. The Telegram side: N emulated users (the local Bot API emulator, python-telegram-bot, the store, the
streaming edits) sending the same prompts the same way; a reply counts once its final message shows
the rating buttons. Each side reports replies per minute and completion tokens per second over its
wall time, and the p50/p95 of one reply's latency (send → whole reply). One worker serves both, one
reply at a time, so N people mostly measure queueing; the comparison says what each transport adds
on top. A failed or refused reply is counted, never dropped from the figures silently.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

from tqdm import tqdm

ROUNDS = 2


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method: never beyond the largest value); the one value of one."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summary(side: str, latencies: list[float], tokens: int, wall_s: float, failed: int) -> dict:
    done = len(latencies)
    return {f"{side}_replies": done, f"{side}_failed": failed, f"{side}_wall_s": round(wall_s, 3),
            f"{side}_replies_per_min": round(60 * done / wall_s, 2) if wall_s > 0 else 0.0,
            f"{side}_tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
            f"{side}_p50_s": round(percentile(latencies, 50), 4) if latencies else None,
            f"{side}_p95_s": round(percentile(latencies, 95), 4) if latencies else None}


def prompts_for(n: int, rounds: int, messages: list[str]) -> list[list[str]]:
    """Client i's prompts, the same on both sides."""
    return [[messages[(i * rounds + r) % len(messages)] for r in range(rounds)] for i in range(n)]


async def measure_concurrent(rt, n: int, *, messages: list[str], quiet: bool, rounds: int = ROUNDS,
                             telegram: bool = True) -> dict:
    """Both sides, API first; `telegram` False leaves the emulator out (the API side alone)."""
    if n < 1:
        raise ValueError("the number of concurrent clients must be at least 1")
    prompts = prompts_for(n, rounds, messages)
    result: dict = {"concurrent_clients": n, "concurrent_rounds": rounds}
    result.update(await _api_side(rt, prompts, quiet=quiet))
    if telegram:
        result.update(await _telegram_side(rt, prompts, quiet=quiet))
    return result


async def _api_side(rt, prompts: list[list[str]], *, quiet: bool) -> dict:
    try:
        from openai import AsyncOpenAI
    except ImportError as exc:   # the dev extra
        raise RuntimeError("`ouro bench serve --concurrent` needs the openai client: pip install openai") from exc
    from api.app import build_api
    from api.keys import create_key
    from api.server import HttpServer

    max_tokens = rt.settings.reply_max_tokens
    server = HttpServer(build_api(rt.settings, rt.conversation), "127.0.0.1", 0, grace_s=1.0)
    await server.start()
    latencies: list[float] = []
    tokens = failed = 0
    bar = tqdm(total=sum(map(len, prompts)), desc=f"{len(prompts)} API clients at once", disable=quiet)

    async def client(i: int, texts: list[str]) -> None:
        nonlocal tokens, failed
        key, _user = create_key(rt.store, f"bench-concurrent-{i}")
        async with AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=key, max_retries=0,
                               timeout=600) as api:
            history: list[dict] = []   # the conversation so far, sent with each request as clients do
            for text in texts:
                history.append({"role": "user", "content": text})
                started = time.perf_counter()
                try:
                    reply = await api.chat.completions.create(model="ouro", temperature=0, max_tokens=max_tokens,
                                                              messages=history)
                except Exception:   # an API error (busy, limited, …): counted, not timed
                    failed += 1
                    history.pop()
                else:
                    latencies.append(time.perf_counter() - started)
                    tokens += reply.usage.completion_tokens if reply.usage else 0
                    history.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
                bar.update(1)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, texts) for i, texts in enumerate(prompts)))
        wall = time.perf_counter() - started
    finally:
        bar.close()
        await server.stop()
    return summary("api", latencies, tokens, wall, failed)


async def _telegram_side(rt, prompts: list[list[str]], *, quiet: bool) -> dict:
    from bot.app import build_application, running
    from ouro.demo.emulator import Emulator

    latencies: list[float] = []
    failed = 0
    users = [70_000 + i for i in range(len(prompts))]
    bar = tqdm(total=sum(map(len, prompts)), desc=f"{len(prompts)} Telegram chats at once", disable=quiet)
    with Emulator() as emu:
        app = build_application(rt.settings, rt.store, rt.conversation, token=emu.token, base_url=emu.api_url)
        async with running(app, poll_timeout=5):

            async def person(i: int, texts: list[str]) -> None:
                nonlocal failed
                user = emu.client(users[i], f"concurrent{i}")
                for text in texts:
                    started = time.perf_counter()
                    try:
                        mid = await user.asend_text(text)
                        await user.await_for(lambda m: bool(m.callback_data), after=mid, timeout=600)
                    except Exception:   # no reply with its buttons (busy, timed out): counted, not timed
                        failed += 1
                    else:
                        latencies.append(time.perf_counter() - started)
                    bar.update(1)

            try:
                started = time.perf_counter()
                await asyncio.gather(*(person(i, texts) for i, texts in enumerate(prompts)))
                wall = time.perf_counter() - started
            finally:
                bar.close()
    tokens = rt.store.database.scalar(   # what the bot generated for these people, as the store recorded it
        "SELECT COALESCE(SUM(completion_tokens), 0) FROM turns WHERE status = 'answered' "
        "AND user_id IN (SELECT value FROM json_each(?))", (json.dumps(users),))
    return summary("telegram", latencies, int(tokens or 0), wall, failed)


def report_lines(r: dict) -> list[str]:
    """The printed report's lines for this part."""
    lines = [f"  {r['concurrent_clients']} clients at once, {r['concurrent_rounds']} prompts each "
             "(replies/min · tokens/s · p50 / p95 latency):"]
    for side, name in (("api", "OpenAI-compatible API"), ("telegram", "Telegram (emulator)")):
        if f"{side}_replies" not in r:
            continue
        p50, p95 = r[f"{side}_p50_s"], r[f"{side}_p95_s"]
        timing = f"{p50:.2f} s / {p95:.2f} s" if p50 is not None else "no reply"
        failed = f"  ({r[f'{side}_failed']} failed)" if r[f"{side}_failed"] else ""
        lines.append(f"    {name:24} {r[f'{side}_replies_per_min']:7.1f} · {r[f'{side}_tokens_per_s']:6.1f} · "
                     f"{timing}{failed}")
    return lines
