"""`ouro bench serve --only restart`: a returning chat's time to first token after a restart, side by side.

CHATS chats each talk WARM_TURNS turns (greedy). Then ROUNDS times: the runtime is closed (a clean
shutdown writes every chat's state to <data_dir>/kv) and opened again on the same data folder, and
each chat takes two turns in a row: the first restores its state from disk (after a restart), the
second goes on from the state the first left live (warm) — a pair of neighbouring turns per chat
and round. Last, cold: the last round's first turns once more, on the database as it was before
them and with the KV folder emptied, so the whole history is read again (`restart_same_replies`
says whether the replies matched: a history read in one go is cut into other batches than the
turns that built it, and greedy text can part on such rounding differences). After each opening, one short unrelated reply pays the new process's first decode
(buffers, threads), which any first reply pays with or without saved states.
Figures: medians over the turns, the ratios after-restart ÷ warm (goal ≤ 1.5) and cold ÷
after-restart, prompt tokens read per turn, and what a shutdown's save cost (seconds, bytes).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from config.settings import Settings
from engine.protocol import Sampling
from serving.conversation import Speaker
from serving.runtime import open_runtime

CHATS = 3
WARM_TURNS = 10
ROUNDS = 3


def run_bench_restart(settings: Settings, messages: list[str], *, quiet: bool) -> dict:
    """`settings`: the bench's (greedy, a data folder of its own)."""
    chats = [Speaker(chat_id=100 + i, user_id=100 + i) for i in range(CHATS)]
    turn_of = dict.fromkeys(range(CHATS), 0)

    def say(rt, i: int):
        text = messages[(i * 5 + turn_of[i]) % len(messages)]
        turn_of[i] += 1
        return asyncio.run(rt.conversation.handle_text(chats[i], text)).completion

    rt = open_runtime(settings)
    try:
        for i in tqdm(range(CHATS), desc="restart: warming chats", disable=quiet):
            for _ in range(WARM_TURNS):
                say(rt, i)
    finally:
        rt.close()
    warm, restored, saves = [], [], []
    with tempfile.TemporaryDirectory(prefix="ouro-bench-db-") as keep:
        for round_ in tqdm(range(ROUNDS), desc="restart: rounds", disable=quiet):
            if round_ == ROUNDS - 1:      # the database before this round's turns, for the cold side
                _copy_db(settings.data_dir, Path(keep), settings.db_path.name)
                last_turns = dict(turn_of)
            rt = _reopen(settings)
            try:
                for i in range(CHATS):
                    restored.append(say(rt, i))
                    warm.append(say(rt, i))
                t = time.perf_counter()
            finally:
                rt.close()               # writes every chat's state
            saves.append(time.perf_counter() - t)
        kv_bytes = sum(p.stat().st_size for p in settings.kv_dir.rglob("*.bin"))
        kv_files = sum(1 for _ in settings.kv_dir.rglob("*.bin"))
        for path in settings.data_dir.glob(settings.db_path.name + "*"):
            path.unlink()
        _copy_db(Path(keep), settings.data_dir, settings.db_path.name)
    shutil.rmtree(settings.kv_dir)
    turn_of.update(last_turns)
    rt = _reopen(settings)
    try:
        cold = [say(rt, i) for i in range(CHATS)]
    finally:
        rt.close()
    last_restored = restored[-2 * CHATS::2]

    def median_ttft(completions) -> float:
        return statistics.median(c.ttft_s for c in completions)

    def read(completions) -> int:
        return round(statistics.median(c.prompt_tokens - c.cached_tokens for c in completions))

    return {
        "restart_chats": CHATS,
        "restart_rounds": ROUNDS,
        "restart_prompt_tokens": round(statistics.median(c.prompt_tokens for c in restored)),
        "restart_warm_ttft_s": round(median_ttft(warm), 4),
        "restart_after_ttft_s": round(median_ttft(restored), 4),
        "restart_cold_ttft_s": round(median_ttft(cold), 4),
        "restart_ratio": round(median_ttft(restored) / median_ttft(warm), 3),
        "restart_pair_ratio": round(statistics.median(r.ttft_s / w.ttft_s for r, w in zip(restored, warm, strict=True)),
                                    3),
        "restart_goal": 1.5,
        "restart_cold_ratio": round(median_ttft(cold) / median_ttft(last_restored), 2),
        "restart_tokens_read": {"warm": read(warm), "after_restart": read(restored), "cold": read(cold)},
        "restart_same_replies": [c.text for c in last_restored] == [c.text for c in cold],
        "restart_save_s": round(statistics.median(saves), 3),
        "restart_saved_files": kv_files,
        "restart_saved_mb": round(kv_bytes / 2**20, 1),
    }


def _reopen(settings: Settings):
    """A restart: a fresh runtime on the data folder, its first decode paid by a short unrelated reply."""
    rt = open_runtime(settings)
    rt.worker.run_sync(lambda e: e.generate([{"role": "user", "content": "hi"}], chat_key="bench-first-decode",
                                            sampling=Sampling(temperature=0.0, top_k=1, max_tokens=2)))
    rt.worker.run_sync(lambda e: e.forget("bench-first-decode"))
    return rt


def _copy_db(source: Path, target: Path, name: str) -> None:
    for path in source.glob(name + "*"):
        shutil.copy2(path, target / path.name)


def report_lines(r: dict) -> list[str]:
    read = r["restart_tokens_read"]
    note = "" if r["restart_same_replies"] else "  (cold replies differed from the restored ones)"
    return [
        f"  after a restart ÷ warm TTFT:           {r['restart_ratio']:.2f}  (goal ≤ 1.5; median "
        f"{r['restart_after_ttft_s']:.3f} s vs {r['restart_warm_ttft_s']:.3f} s warm, {r['restart_cold_ttft_s']:.3f} s "
        f"cold = {r['restart_cold_ratio']:.1f}× after-restart; {r['restart_prompt_tokens']}-token prompts, tokens read "
        f"{read['warm']} / {read['after_restart']} / {read['cold']}; median of paired ratios "
        f"{r['restart_pair_ratio']:.2f}){note}",
        f"  a shutdown (states written):           {r['restart_saved_files']} files, {r['restart_saved_mb']} MB in "
        f"{r['restart_save_s']:.2f} s",
    ]
