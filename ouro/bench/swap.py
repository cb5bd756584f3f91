"""`ouro bench swap`: what a hot-swap and a training cycle cost the people chatting, in one run.

1. Pause: four chats take turns talking to the bot's conversation stack without a break (each
   starting a new conversation every 8 turns) while the learning loop hot-swaps between two
   generations 10 times (each swap reads the active chats into the new model first, in short
   pieces whenever the model is free and between the tokens of replies, see serving/hotswap.py).
   The pause is the longest stretch with no reply text flowing (the gap between consecutive
   streamed pieces, across replies) during a swap (and the 3 s after it), ÷ the median reply
   time without swaps (goal ≤ 1.0: a swap costs less than one reply). After each swap the same
   chats go on for as long again with no swap: the control. Its longest pause is the floor this
   machine sets by itself; on a shared VM it is not zero, because the host now and then takes
   most of the CPU for seconds (steal, sampled 4x a second). Both are reported raw, and again
   leaving out the pauses across which the host took ≥ `HOST_BUSY` of the CPU — never instead
   of the raw figure. Also: each swap's own longest gap and what ended it, and how long replies
   asked during a swap took (the warm-up shares the model with them).
2. Memory: resident memory after 20 swaps ÷ after 1 (goal ≤ 1.10: no leaked models), over 20
   more swaps once the chats have stopped, so both ends are measured alike and the figure is
   not the conversations' own growth (each swap still reads the chats' histories ahead).
3. Contention: p95 time to first token of fresh chats while a real learning cycle
   (trainer/cycle_job.py, its own process, niced, one core left to llama.cpp) is in its
   training stage ÷ the same chats idle (goal ≤ 2.0).
Default model (the packaged SmolLM2) on this machine; nothing is compared across runs.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from config.settings import Settings, load_settings
from core.files import atomic_write_text, now, sha256_file
from lineage.generations import Lineage
from ouro.bench import cpu_steal
from ouro.bench.serve import MESSAGES
from serving.conversation import Speaker
from serving.loop import LearningLoop
from serving.runtime import open_runtime


def _settings(base: Settings, data_dir: Path) -> Settings:
    values = base.model_dump()
    # learn_from "everyone": the last figure needs a cycle that trains; under the default trust rules the
    # seeded strangers' turns teach nothing and the cycle ends before its training stage (as in the soak)
    values.update(data_dir=data_dir, seed=1234, temperature=0.0, top_k=1, reply_max_tokens=32,
                  cycle_schedule="off", log_level="WARNING", train_epochs=50, dpo_steps=0, max_seq_len=256,
                  train_batch=2, learn_from="everyone")
    return load_settings(**values)


# Each chat starts a new conversation (/reset) every 8 turns. Without that, four chats talking
# non-stop for twenty minutes run into their context limit again and again, and each trim makes
# that chat re-read its kept history (seconds) — with or without a swap, which would blur what
# this measures. Conversations of ≤ 8 turns also keep each swap's warm-up (≤ ~2000 tokens) short.
TURNS_PER_SESSION = 8

# A pause across which the VM's host took at least this share of the CPU (on 2 cores: half of
# one) is one the host disturbed. With one of two cores shared, a two-thread
# prompt read took 2.8x as long at worst (960 vs 341 ms). Reported beside the raw figure, never
# instead of it.
HOST_BUSY = 0.25


def _second_generation(lineage: Lineage) -> None:
    base = lineage.generation("gen-0000")
    folder = lineage.dir / "gen-0001"
    folder.mkdir()
    shutil.copyfile(base.gguf, folder / "model.gguf")
    meta = {"id": "gen-0001", "parent_id": "gen-0000", "gguf": "model.gguf", "created_at": now("seconds"),
            "gguf_sha256": sha256_file(folder / "model.gguf"), "status": "promoted", "note": "bench copy"}
    atomic_write_text(folder / "meta.json", json.dumps(meta))


async def _chat_loop(rt, stop: asyncio.Event, stamps: list[float], replies: list[tuple[float, float]],
                     firsts: dict[float, str]) -> None:
    """`firsts`: the time of each reply's first piece of text → what that reply had to do first
    (seconds since it was asked, prompt tokens it read, the generation), to name the longest pauses."""
    chats = [Speaker(chat_id=100 + i, user_id=100 + i) for i in range(4)]
    n = 0
    while not stop.is_set():
        who = chats[n % 4]
        if n % (4 * TURNS_PER_SESSION) < 4 and n >= 4:
            rt.conversation.reset(who)    # a new conversation now and then, as people do
        t = time.perf_counter()
        first: list[float] = []

        def on_text(piece: str, first=first) -> None:
            stamps.append(time.perf_counter())
            if not first:
                first.append(stamps[-1])

        out = await rt.conversation.handle_text(who, MESSAGES[n % len(MESSAGES)], on_text=on_text)
        if out.kind != "answered":
            raise RuntimeError(f"a reply failed during the benchmark: {out.text}")
        replies.append((t, time.perf_counter() - t))          # (asked at, seconds to the whole reply)
        stamps.append(time.perf_counter())
        if first and out.completion is not None:
            c = out.completion
            firsts[first[0]] = (f"a reply's first word ({first[0] - t:.2f}s after it was asked; "
                                f"{c.prompt_tokens - c.cached_tokens} prompt tokens read, on "
                                f"{rt.store.turn(out.turn_id).generation_id})")
        n += 1


async def _sample_steal(samples: list, stop: asyncio.Event) -> None:
    """/proc/stat's steal counter four times a second until the chats stop: a pause that the
    VM's host caused shows up as a burst of steal across it."""
    while not stop.is_set():
        samples.append((time.perf_counter(), cpu_steal.snapshot()))
        await asyncio.sleep(0.25)
    samples.append((time.perf_counter(), cpu_steal.snapshot()))


def _steal_share(samples: list, start: float, end: float) -> float | None:
    """Share of the CPU the VM's host took across [start, end] (the samples around it), or None."""
    before = [snap for t, snap in samples if t <= start]
    after = [snap for t, snap in samples if t >= end]
    return cpu_steal.share(before[-1], after[0]) if before and after else None


def stolen(samples: list, start: float, end: float) -> str:
    """', host stole N% of the CPU meanwhile' for [start, end] (samples around it), or ''."""
    got = _steal_share(samples, start, end)
    return "" if got is None else f"; the VM's host stole {got:.0%} of the CPU meanwhile"


def loop_lag(samples: list, start: float, end: float) -> str:
    """The sampler runs on the event loop: a long gap between its samples across [start, end] is
    the loop itself held up (a synchronous call that blocked), not the model."""
    lag, _ = longest([t for t, _ in samples], start, end)
    return f"; the event loop went {lag:.1f}s without a turn" if lag > 1.0 else ""


def gaps(stamps: list[float], start: float, end: float) -> list[tuple[float, float]]:
    """(stretch between consecutive pieces of text, the time it ended) for every stretch that
    touches [start, end]: the one running into the window and the one running out of it count."""
    inside = [s for s in stamps if start <= s <= end]
    before = [s for s in stamps if s < start]
    after = [s for s in stamps if s > end]
    points = ([before[-1]] if before else []) + inside + ([after[0]] if after else [])
    return [(b - a, b) for a, b in zip(points, points[1:], strict=False)]


def longest(stamps: list[float], start: float, end: float) -> tuple[float, float]:
    """(longest stretch between consecutive pieces of text in [start, end], the time it ended)."""
    return max(gaps(stamps, start, end), default=(0.0, end))


def longest_host_quiet(stamps: list[float], steal: list, start: float, end: float) -> float:
    """The longest stretch in [start, end] across which the VM's host took less than
    `HOST_BUSY` of the CPU (unknown steal counts as quiet): what the code itself cost."""
    for gap, ended in sorted(gaps(stamps, start, end), reverse=True):
        if (_steal_share(steal, ended - gap, ended) or 0.0) < HOST_BUSY:
            return gap
    return 0.0


def window(stamps, firsts, steal, start, end, phase=None) -> dict:
    """One window's longest pause, what ended it and what the host took across it."""
    gap, ended = longest(stamps, start, end)
    during = f", during {next(name for until, name in phase if ended - gap < until)}" if phase else ""
    return {"longest_s": gap, "host_steal": _steal_share(steal, ended - gap, ended),
            "longest_host_quiet_s": longest_host_quiet(stamps, steal, start, end),
            "ended_by": (f"{firsts.get(ended, 'the next piece of a reply already streaming')}{during}"
                         f"{stolen(steal, ended - gap, ended)}{loop_lag(steal, ended - gap, ended)}")}


async def _pause_and_memory(rt, loop: LearningLoop, *, quiet: bool) -> dict:
    stamps: list[float] = []
    replies: list[tuple[float, float]] = []
    firsts: dict[float, str] = {}
    stop = asyncio.Event()
    chat = asyncio.create_task(_chat_loop(rt, stop, stamps, replies, firsts))
    steal: list[tuple[float, tuple[int, int] | None]] = []
    sampler = asyncio.create_task(_sample_steal(steal, stop))
    await asyncio.sleep(8)                                      # the chats' first, cold replies: not counted
    windows: list[tuple[float, float]] = []   # per swap: from its start to 3 s after it ended
    controls: list[tuple[float, float]] = []  # after each: as long again with no swap, same chats
    phases: list[list[tuple[float, str]]] = []   # per swap: (until when, what the swap was doing)
    took: list[tuple[float, int, int]] = []   # (seconds the swap took, warm-up tokens, chats moved early), amid chats
    rss = []
    proc = psutil.Process()
    for i in range(30):
        if i == 10:                                             # swaps 11-30 only count memory
            stop.set()
            await chat
        target = "gen-0001" if i % 2 == 0 else "gen-0000"
        t0 = time.perf_counter()
        result = await loop.promote(target, actor="bench", why=f"swap {i}")
        if result is None or not result.ok:
            raise RuntimeError(f"swap {i} failed: {result}")
        t1 = time.perf_counter()
        if i < 10:
            took.append((t1 - t0, result.warm_tokens, result.moved))
            windows.append((t0, t1 + 3.0))                      # the swap and the first replies after it
            phases.append([(t0 + result.load_s, "loading the new model"),
                           (t0 + result.load_s + result.smoke_s, "the smoke test"),
                           (t0 + result.load_s + result.smoke_s + result.warm_s, "the read-ahead and handover"),
                           (t1, "the last step and closing the old model"), (float("inf"), "after the swap")])
            await asyncio.sleep(3.0)
            c0 = time.perf_counter()
            if not quiet:
                sys.stderr.write(f"\rswap {i + 1}/10 took {t1 - t0:.1f}s (warm-up {result.warm_tokens} tokens); "
                                 f"now {t1 + 3.0 - t0:.0f}s without a swap   ")
            await asyncio.sleep(t1 + 3.0 - t0)                  # the control: as long as the swap window
            controls.append((c0, time.perf_counter()))
        else:
            gc.collect()
            rss.append(proc.memory_info().rss)
            if not quiet:
                sys.stderr.write(f"\rquiet swaps {i - 9}/20 (memory)                                        ")
            await asyncio.sleep(0.2)
    if not quiet:
        sys.stderr.write("\n")
    await sampler
    # the median reply without swaps: replies asked and finished inside the no-swap windows
    median_reply = statistics.median(d for t, d in replies if any(a <= t and t + d <= b for a, b in controls))
    # replies asked while a swap was under way: the warm-up's pieces run between their tokens
    during = [d for t, d in replies if any(a <= t <= b - 3.0 for a, b in windows)]
    swaps = [window(stamps, firsts, steal, a, b, phase) for (a, b), phase in zip(windows, phases, strict=True)]
    calm = [window(stamps, firsts, steal, a, b) for a, b in controls]

    def worst(ws: list[dict], key: str = "longest_s") -> float:
        return max(w[key] for w in ws)

    return {"median_reply_s": round(median_reply, 4),
            "longest_pause_during_swap_s": round(worst(swaps), 4),
            "longest_pause_without_swap_s": round(worst(calm), 4),
            "longest_pause_per_swap_s": [round(w["longest_s"], 2) for w in swaps],
            "longest_pause_per_no_swap_window_s": [round(w["longest_s"], 2) for w in calm],
            "longest_pause_ended_by": [w["ended_by"] for w in swaps],
            "longest_pause_without_swap_ended_by": max(calm, key=lambda w: w["longest_s"])["ended_by"],
            "median_of_longest_pause_per_swap_s": round(statistics.median(w["longest_s"] for w in swaps), 4),
            "median_of_longest_pause_per_no_swap_window_s": round(
                statistics.median(w["longest_s"] for w in calm), 4),
            "swap_pause_ratio": round(worst(swaps) / median_reply, 3), "swap_pause_goal": 1.0,
            "no_swap_pause_ratio": round(worst(calm) / median_reply, 3),
            "host_busy_share": HOST_BUSY,
            "swap_pause_ratio_host_quiet": round(worst(swaps, "longest_host_quiet_s") / median_reply, 3),
            "no_swap_pause_ratio_host_quiet": round(worst(calm, "longest_host_quiet_s") / median_reply, 3),
            "pauses_the_host_disturbed": {
                "during_swaps": sum(1 for w in swaps if (w["host_steal"] or 0.0) >= HOST_BUSY),
                "without_swaps": sum(1 for w in calm if (w["host_steal"] or 0.0) >= HOST_BUSY)},
            "rss_after_1_swap_mb": round(rss[0] / 2**20, 1), "rss_after_20_swaps_mb": round(rss[-1] / 2**20, 1),
            "rss_ratio": round(rss[-1] / rss[0], 3),
            "rss_per_swap_mb": [round(r / 2**20) for r in rss], "rss_goal": 1.10, "replies_during_swaps": len(during),
            "median_reply_during_swaps_s": round(statistics.median(during), 4) if during else None,
            "swap_s_median": round(statistics.median(t for t, _, _ in took), 2),
            "swap_s_max": round(max(t for t, _, _ in took), 2),
            "warm_tokens_median": statistics.median(n for _, n, _ in took),
            "chats_moved_before_the_end_per_swap": [m for _, _, m in took]}


async def _ttft(rt, tag: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        who = Speaker(chat_id=hash((tag, i)) % 10**9, user_id=7)
        o = await rt.conversation.handle_text(who, MESSAGES[i % len(MESSAGES)])
        out.append(o.completion.ttft_s)
    return out


def _p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


async def _contention(rt, loop: LearningLoop, *, quiet: bool, n: int = 20) -> dict:
    from ouro.bench.soak import seed_reviewed_turns
    from trainer.cycle_job import read_cycle_status

    idle = await _ttft(rt, "idle", n)
    seed_reviewed_turns(rt.store)                                # reviewed turns for the cycle to learn from
    task = asyncio.create_task(loop.run_cycle("bench"))
    t0 = time.monotonic()
    while True:
        info = read_cycle_status(rt.settings)
        if info and info.get("stage") == "train" and info.get("step", 0) >= 1:
            break
        if task.done() or time.monotonic() - t0 > 600:
            raise RuntimeError("the learning cycle never reached its training stage")
        await asyncio.sleep(0.5)
    if not quiet:
        sys.stderr.write("cycle is training; measuring time to first token\n")
    loaded = await _ttft(rt, "loaded", n)
    still = read_cycle_status(rt.settings)
    loop.runner.kill()
    await task
    return {"idle_ttft_p95_s": round(_p95(idle), 4), "training_ttft_p95_s": round(_p95(loaded), 4),
            "training_ttft_ratio": round(_p95(loaded) / _p95(idle), 3), "training_ttft_goal": 2.0,
            "cycle_stage_while_measuring": still and still.get("stage")}


def run_bench_swap(base: Settings, *, json_output: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="ouro-bench-swap-") as tmp:
        settings = _settings(base, Path(tmp))
        rt = open_runtime(settings)
        _second_generation(rt.lineage)
        steal = cpu_steal.snapshot()

        async def main() -> dict:
            loop = LearningLoop(settings, rt.store, rt.worker, warmup=rt.conversation.warmup_plan)
            await loop.start(schedule=False)
            try:
                result = await _pause_and_memory(rt, loop, quiet=json_output)
                await loop.promote("gen-0000", actor="bench", why="back to the base") \
                    if rt.lineage.active_id() != "gen-0000" else None
                result.update(await _contention(rt, loop, quiet=json_output))
                return result
            finally:
                await loop.stop()

        try:
            result = asyncio.run(main())
        finally:
            rt.close()
    result["cores"] = psutil.cpu_count()
    result["cpu_stolen_share"] = cpu_steal.share(steal, cpu_steal.snapshot())
    if not json_output:
        print_report(result)
    return result


def print_report(result: dict) -> None:
    """The human-readable report (`--json` prints the dict instead)."""
    print("\nouro bench swap")
    print(f"  longest pause during a swap ÷ median reply: {result['swap_pause_ratio']:.2f}  (goal ≤ 1.0; "
          f"{result['longest_pause_during_swap_s']:.2f}s vs {result['median_reply_s']:.2f}s; without swaps "
          f"{result['longest_pause_without_swap_s']:.2f}s; per swap, median "
          f"{result['median_of_longest_pause_per_swap_s']:.2f}s)")
    worst = max(range(len(result["longest_pause_per_swap_s"])), key=result["longest_pause_per_swap_s"].__getitem__)
    print(f"  the longest pause ended with {result['longest_pause_ended_by'][worst]}")
    print(f"  the same chats, as long again with no swap after each: longest pause ÷ median reply "
          f"{result['no_swap_pause_ratio']:.2f} (per window, median "
          f"{result['median_of_longest_pause_per_no_swap_window_s']:.2f}s); it ended with "
          f"{result['longest_pause_without_swap_ended_by']}")
    hit = result["pauses_the_host_disturbed"]
    print(f"  leaving out pauses across which the VM's host took ≥ {result['host_busy_share']:.0%} of the CPU "
          f"(each window's longest was such a pause in {hit['during_swaps']} of 10 swaps and "
          f"{hit['without_swaps']} of 10 windows without): with swaps {result['swap_pause_ratio_host_quiet']:.2f}, "
          f"without {result['no_swap_pause_ratio_host_quiet']:.2f}")
    print(f"  a swap while 4 chats talk took {result['swap_s_median']:.1f}s median, {result['swap_s_max']:.1f}s "
          f"max (load, smoke test, warm-up of ~{result['warm_tokens_median']:.0f} tokens between replies; "
          f"chats handed over before the end: {result['chats_moved_before_the_end_per_swap']})")
    if result["median_reply_during_swaps_s"] is not None:
        print(f"  a reply asked during a swap took {result['median_reply_during_swaps_s']:.2f}s median "
              f"({result['replies_during_swaps']} replies; {result['median_reply_s']:.2f}s without swaps): "
              f"the warm-up's pieces run between its tokens")
    print(f"  memory after 20 swaps ÷ after 1:            {result['rss_ratio']:.3f}  (goal ≤ 1.10; "
          f"{result['rss_after_1_swap_mb']:.0f} → {result['rss_after_20_swaps_mb']:.0f} MB)")
    if result["cpu_stolen_share"] is not None:
        print(f"  CPU time taken by the VM's host meanwhile (steal): {result['cpu_stolen_share']:.0%}")
    print(f"  p95 TTFT while a cycle trains ÷ idle:       {result['training_ttft_ratio']:.2f}  (goal ≤ 2.0; "
          f"{result['training_ttft_p95_s']:.3f}s vs {result['idle_ttft_p95_s']:.3f}s)")
