"""`ouro bench serve --only restart`: a returning chat's time to first token after a restart, side by side.

CHATS chats each talk WARM_TURNS turns (greedy). Then, on the same chats, in one run:
- warm: each chat's next turn right after its previous one (its state is live in memory);
- after a restart: the runtime is closed (a clean shutdown writes the states to <data_dir>/kv)
  and opened again on the same data folder; each chat's next turn restores its state from disk;
- cold: the same turn once more, on the database as it was before that turn and with the KV
  folder emptied: the whole history is read again (the replies must be the same: checked).
Figures: the medians over the chats, the ratios after-restart ÷ warm (goal ≤ 1.5) and cold ÷
after-restart, prompt tokens read per turn, and what the shutdown save cost (seconds, bytes).
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
from serving.conversation import Speaker
from serving.runtime import open_runtime

CHATS = 3
WARM_TURNS = 10


def run_bench_restart(settings: Settings, messages: list[str], *, quiet: bool) -> dict:
    """`settings`: the bench's (greedy, a data folder of its own)."""
    chats = [Speaker(chat_id=100 + i, user_id=100 + i) for i in range(CHATS)]

    def text(chat: int, turn: int) -> str:
        return messages[(chat * 5 + turn) % len(messages)]

    rt = open_runtime(settings)
    try:
        for i, who in enumerate(tqdm(chats, desc="restart: warming chats", disable=quiet)):
            for turn in range(WARM_TURNS):
                asyncio.run(rt.conversation.handle_text(who, text(i, turn)))
        warm = [asyncio.run(rt.conversation.handle_text(who, text(i, WARM_TURNS))).completion
                for i, who in enumerate(chats)]
        t = time.perf_counter()
    finally:
        rt.close()                               # writes every chat's state
    save_s = time.perf_counter() - t
    kv_bytes = sum(p.stat().st_size for p in settings.kv_dir.rglob("*.bin"))
    kv_files = sum(1 for _ in settings.kv_dir.rglob("*.bin"))
    with tempfile.TemporaryDirectory(prefix="ouro-bench-db-") as keep:
        for path in settings.data_dir.glob(settings.db_path.name + "*"):   # the database before the next turn
            shutil.copy2(path, Path(keep) / path.name)
        restored = _next_turns(settings, chats, [text(i, WARM_TURNS + 1) for i in range(CHATS)])
        for path in settings.data_dir.glob(settings.db_path.name + "*"):
            path.unlink()
        for path in Path(keep).iterdir():
            shutil.copy2(path, settings.data_dir / path.name)
    shutil.rmtree(settings.kv_dir)
    cold = _next_turns(settings, chats, [text(i, WARM_TURNS + 1) for i in range(CHATS)])

    def median_ttft(completions) -> float:
        return statistics.median(c.ttft_s for c in completions)

    def read(completions) -> int:
        return round(statistics.median(c.prompt_tokens - c.cached_tokens for c in completions))

    return {
        "restart_chats": CHATS,
        "restart_prompt_tokens": round(statistics.median(c.prompt_tokens for c in restored)),
        "restart_warm_ttft_s": round(median_ttft(warm), 4),
        "restart_after_ttft_s": round(median_ttft(restored), 4),
        "restart_cold_ttft_s": round(median_ttft(cold), 4),
        "restart_ratio": round(median_ttft(restored) / median_ttft(warm), 3),
        "restart_goal": 1.5,
        "restart_cold_ratio": round(median_ttft(cold) / median_ttft(restored), 2),
        "restart_tokens_read": {"warm": read(warm), "after_restart": read(restored), "cold": read(cold)},
        "restart_same_replies": [c.text for c in restored] == [c.text for c in cold],
        "restart_save_s": round(save_s, 3),
        "restart_saved_files": kv_files,
        "restart_saved_mb": round(kv_bytes / 2**20, 1),
    }


def _next_turns(settings: Settings, chats: list[Speaker], texts: list[str]) -> list:
    """A fresh runtime on the data folder (a restart); each chat's next turn, one after another."""
    rt = open_runtime(settings)
    try:
        return [asyncio.run(rt.conversation.handle_text(who, text)).completion for who, text in zip(chats, texts,
                                                                                                   strict=True)]
    finally:
        rt.close()


def report_lines(r: dict) -> list[str]:
    read = r["restart_tokens_read"]
    note = "" if r["restart_same_replies"] else "  (replies differed: not like for like)"
    return [
        f"  after a restart ÷ warm TTFT:           {r['restart_ratio']:.2f}  (goal ≤ 1.5; median "
        f"{r['restart_after_ttft_s']:.3f} s vs {r['restart_warm_ttft_s']:.3f} s warm, {r['restart_cold_ttft_s']:.3f} s "
        f"cold = {r['restart_cold_ratio']:.1f}× after-restart; {r['restart_prompt_tokens']}-token prompts, tokens read "
        f"{read['warm']} / {read['after_restart']} / {read['cold']}){note}",
        f"  states saved at shutdown:              {r['restart_saved_files']} files, {r['restart_saved_mb']} MB in "
        f"{r['restart_save_s']:.2f} s",
    ]
