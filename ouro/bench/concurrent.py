"""`ouro bench serve --concurrent N`: N chats talking at once, decoded together vs one at a time.

Each of the N people sends TURNS_EACH messages through the conversation (store, rolling context,
worker, engine), the next as soon as the reply to the last one is complete; all N start together.
The same run is made in one process, each on a fresh data folder: with `max_parallel` slots
(`BatchedEngine`), with `max_parallel = 1` (one reply at a time, `LlamaEngine`), and against
llama.cpp's own `llama-server` with as many slots on the same GGUF, its clients sending the persona
and the whole history each turn as OpenAI clients do (ouro/bench/llama_server.py). Replies are
greedy, so the two embedded sides write the same words (checked: `same_replies`) and the ratio is
like for like; the server is held to the same number of tokens per reply (it would write other
words: ouro/bench/llama_server.py says why), so it does the same work. Figures: replies per minute over the whole run, generated tokens per second, and time to
first token measured from the moment a message is handed to the conversation to its first piece
of text (queue wait included: that is what a person waits), p50 and p95 over every turn.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from config.settings import Settings, load_settings
from core.errors import OuroError
from serving.conversation import Speaker
from serving.runtime import open_runtime

TURNS_EACH = 3


SIDES = ("serial", "llama-server")   # what the parallel engine is compared with (`--compare`)


def run_bench_concurrent(base: Settings, messages: list[str], *, chats: int, quiet: bool,
                         compare: tuple[str, ...] = SIDES, repeat: int = 1, sampled: bool = False,
                         server_prompt_cache: bool = True) -> dict:
    """`repeat` rounds, each side once per round in turn (parallel, llama-server, one at a time): a
    shared VM's speed drifts by ±10% between minutes, so each round's ratio is taken side by side
    and the figures reported are the medians over the rounds (each round's ratios are listed too).
    `sampled`: every side samples as the bot does by default (the owner's temperature, top-p, top-k,
    seed 1234) instead of greedily. `server_prompt_cache` False runs llama-server with `--cache-ram 0`."""
    if chats < 1:
        raise ValueError("--concurrent needs at least one chat")
    if repeat < 1:
        raise ValueError("--repeat needs at least one round")
    slots = min(chats, base.parallel_slots)
    binary = None
    if "llama-server" in compare:
        from ouro.bench.llama_server import llama_server_binary

        binary = llama_server_binary(build=False)
        if not binary.is_file():
            raise OuroError(f"no llama-server at {binary}",
                            hint="`make llama-server` builds llama.cpp's own server once (minutes), or set "
                                 "OURO_LLAMA_SERVER; or leave it out: --compare serial")
    rounds = []
    for n in range(repeat):
        if not quiet and repeat > 1:
            print(f"  round {n + 1} of {repeat}", flush=True)
        rounds.append(_round(base, messages, chats, slots, compare, binary, quiet, sampled, server_prompt_cache))
    result = {"concurrent_chats": chats, "slots": slots, "turns_each": TURNS_EACH,
              "reply_max_tokens": base.reply_max_tokens, "rounds": len(rounds),
              "sampling": f"temperature {base.temperature}, top-p {base.top_p}, top-k {base.top_k}" if sampled
              else "greedy", "server_prompt_cache": server_prompt_cache}
    for side in ("parallel", "one_at_a_time", "llama_server"):
        if side in rounds[0]:
            result[side] = _median_figures([r[side] for r in rounds])
    ratios = ("throughput_ratio", "ttft_p95_ratio", "vs_server_throughput", "vs_server_tokens_per_s",
              "vs_server_ttft_p95")
    for key in ratios:
        if key in rounds[0]:
            result[key] = round(statistics.median(r[key] for r in rounds), 3)
            if repeat > 1:
                result[f"{key}_by_round"] = [r[key] for r in rounds]
    if "same_replies" in rounds[0]:
        result["same_replies"] = all(r["same_replies"] for r in rounds)
    return result


def _round(base: Settings, messages: list[str], chats: int, slots: int, compare: tuple[str, ...],
           binary: Path | None, quiet: bool, sampled: bool, server_prompt_cache: bool = True) -> dict:
    """Every side once, on fresh data folders; the ratios of this round."""
    runs = [("parallel", slots)] + ([("one_at_a_time", 1)] if "serial" in compare else [])
    sides = {}
    for name, parallel in runs:
        with tempfile.TemporaryDirectory(prefix="ouro-bench-concurrent-") as tmp:
            settings = _settings(base, Path(tmp), parallel, sampled)
            rt = open_runtime(settings)
            try:
                sides[name] = asyncio.run(_chats_at_once(rt, messages, chats))
                if not quiet:
                    print(f"  {name}: {sides[name]['figures']}", flush=True)
                if name == "parallel" and binary is not None:
                    sides["llama_server"] = _server_side(binary, settings, rt.lineage.active().gguf, slots,
                                                         messages, chats, Path(tmp), sides[name]["lengths"],
                                                         prompt_cache=server_prompt_cache)
                    if not quiet:
                        print(f"  llama_server: {sides['llama_server']['figures']}", flush=True)
            finally:
                rt.close()
    texts = {name: side.pop("texts") for name, side in sides.items()}
    par = sides["parallel"]["figures"]
    result = {"parallel": par}
    if "one_at_a_time" in sides:
        one = sides["one_at_a_time"]["figures"]
        result.update(one_at_a_time=one,
                      throughput_ratio=round(par["replies_per_min"] / one["replies_per_min"], 3),
                      ttft_p95_ratio=round(par["ttft_p95_s"] / one["ttft_p95_s"], 3),
                      same_replies=texts["one_at_a_time"] == texts["parallel"])
    if "llama_server" in sides:
        server = sides["llama_server"]["figures"]
        result.update(llama_server=server,
                      vs_server_throughput=round(par["replies_per_min"] / server["replies_per_min"], 3),
                      vs_server_tokens_per_s=round(par["tokens_per_s"] / server["tokens_per_s"], 3),
                      vs_server_ttft_p95=round(par["ttft_p95_s"] / server["ttft_p95_s"], 3))
    return result


def _median_figures(runs: list[dict]) -> dict:
    """Each figure's median over the rounds (one round: that round's figures)."""
    return {key: (round(statistics.median(r[key] for r in runs), 3) if isinstance(runs[0][key], float)
                  else runs[0][key]) for key in runs[0]}


def _server_side(binary: Path, settings: Settings, gguf: Path, slots: int, messages: list[str], chats: int,
                 folder: Path, lengths: dict[int, list[int]], prompt_cache: bool = True) -> dict:
    """llama.cpp's llama-server on the same GGUF, `slots` slots, the same chats, each reply as many
    tokens long as the embedded engine's (ouro/bench/llama_server.py says why)."""
    from ouro.bench.llama_server import chats_through_server, free_port, running_server, server_argv

    port = free_port()
    argv = server_argv(binary, gguf, settings, slots, port, clients=chats) + ([] if prompt_cache else ["--cache-ram", "0"])
    with running_server(argv, port, folder / "llama-server.log") as url:
        return asyncio.run(chats_through_server(url, settings, messages, chats, TURNS_EACH, lengths))


def _settings(base: Settings, data_dir: Path, parallel: int, sampled: bool) -> Settings:
    """Greedy unless `sampled`, seed 1234 either way, so both embedded sides write the same replies;
    everything else as the owner set it."""
    values = base.model_dump()
    values.update(data_dir=data_dir, seed=1234, max_parallel=parallel, max_backlog=max(base.max_backlog, 4 * TURNS_EACH))
    if not sampled:
        values.update(temperature=0.0, top_k=1)
    return load_settings(**values)


async def _chats_at_once(rt, messages: list[str], chats: int) -> dict:
    # first use of the model (allocations, first graph) is not part of either figure
    await rt.conversation.handle_text(Speaker(chat_id=1, user_id=1), "hello")
    ttfts: list[float] = []
    tokens = read = 0
    texts: dict[int, list[str]] = {}
    lengths: dict[int, list[int]] = {}

    async def person(i: int) -> None:
        nonlocal tokens, read
        who = Speaker(chat_id=1000 + i, user_id=1000 + i)
        texts[i], lengths[i] = [], []
        for turn in range(TURNS_EACH):
            sent = time.perf_counter()
            first: list[float] = []

            def seen(_piece: str, first=first) -> None:
                if not first:
                    first.append(time.perf_counter())

            out = await rt.conversation.handle_text(who, messages[(i + turn) % len(messages)], on_text=seen)
            if out.kind != "answered":
                raise RuntimeError(f"chat {i} turn {turn} was not answered: {out.kind}")
            ttfts.append((first[0] if first else time.perf_counter()) - sent)
            tokens += out.completion.completion_tokens
            read += out.completion.prompt_tokens - out.completion.cached_tokens
            texts[i].append(out.text)
            lengths[i].append(out.completion.completion_tokens)

    started = time.perf_counter()
    await asyncio.gather(*(person(i) for i in range(chats)))
    wall = time.perf_counter() - started
    return {"figures": side_figures(ttfts, tokens, wall, read), "texts": texts, "lengths": lengths}


def side_figures(ttfts: list[float], tokens: int, wall: float, read: int = 0) -> dict:
    """One side's figures over all its replies: replies/min, tokens/s, TTFT p50 and p95, and the
    prompt tokens it read (decoded, not taken from a cached state) over the whole run."""
    ttfts = sorted(ttfts)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    return {"replies_per_min": round(60 * len(ttfts) / wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 3), "ttft_p95_s": round(p95, 3),
            "wall_s": round(wall, 2), "replies": len(ttfts), "tokens": tokens, "prompt_tokens_read": read}


def print_concurrent(r: dict) -> None:
    rounds = f"; median of {r['rounds']} rounds" if r["rounds"] > 1 else ""
    print(f"\nouro bench serve --concurrent {r['concurrent_chats']}  ({r['turns_each']} turns each, {r['sampling']}, "
          f"up to {r['reply_max_tokens']} tokens; {r['slots']} slots{rounds})")
    rows = [("parallel (embedded)", r["parallel"])]
    if "one_at_a_time" in r:
        rows.append(("one reply at a time", r["one_at_a_time"]))
    if "llama_server" in r:
        cache = "" if r["server_prompt_cache"] else ", no prompt cache"
        rows.append((f"llama-server, {r['slots']} slots{cache}", r["llama_server"]))
    width = max(len(name) for name, _ in rows)
    for name, side in rows:
        print(f"  {name:<{width}} {side['replies_per_min']:7.2f} replies/min  {side['tokens_per_s']:7.2f} tokens/s  "
              f"TTFT p50 {side['ttft_p50_s']:.3f} s  p95 {side['ttft_p95_s']:.3f} s  "
              f"prompt tokens read {side['prompt_tokens_read']}")
    if "one_at_a_time" in r:
        note = "" if r["same_replies"] else "  (replies differed: not a like-for-like ratio)"
        print(f"  throughput parallel ÷ one at a time: {r['throughput_ratio']:.2f}   "
              f"TTFT p95 parallel ÷ one at a time: {r['ttft_p95_ratio']:.2f}{note}")
    if "llama_server" in r:
        print(f"  throughput parallel ÷ llama-server: {r['vs_server_throughput']:.2f}   "
              f"TTFT p95 parallel ÷ llama-server: {r['vs_server_ttft_p95']:.2f}   "
              f"(the server's replies held to the bot's lengths: {r['llama_server']['tokens']} tokens against "
              f"{r['parallel']['tokens']})")
    for key, label in (("throughput_ratio_by_round", "parallel ÷ one at a time"),
                       ("vs_server_throughput_by_round", "parallel ÷ llama-server")):
        if key in r:
            print(f"  {label}, round by round: " + ", ".join(f"{x:.2f}" for x in r[key]))
