"""`ouro bench soak`: many people at once, through the local Telegram emulator, while a cycle trains.

Simulated people (default 50) each send messages (default 20) to the real bot over HTTP: one
at a time, waiting for the answer, sometimes two in a row without waiting (double texting);
after an answer some press 👍 or 👎, a few press 🔁 and then keep one of the two replies. A
real learning cycle (trainer/cycle_job.py, its own process) trains on 200 seeded reviewed
turns in the background meanwhile, started through the bot's own learning loop; if it is
still running when the people are done, it is stopped. The per-chat KV cache is sized to the
number of people (unless OURO_KV_CACHE_CHATS says otherwise), replies are 24 tokens.

What must hold, checked against the database and what the emulator shows each person:
every message sent is stored (lost = 0); every stored message got its reply with the rating
buttons, or a visible "busy, try again" and is stored as busy (or, past the flood limit, is
stored as limited); every press is recorded; no unhandled error was logged. Reported: reply
latency (send → final reply with its buttons visible, from the emulator's own call log), the
worker's queue wait (job submitted → started), peak backlog and per-chat queue, resident
memory, the cycle's stages, wall time.

The same driver (`run_soak`) runs in tests/test_soak.py against the fake engine with a
tiny backlog, so overload happens there on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bot import keyboards
from bot.buttons import REGEN_BUSY, REGEN_FLOOD
from bot.chat import FLOOD_NOTICE, QUEUE_FULL
from config.settings import Settings, load_settings
from core.errors import OuroError
from ouro.bench import cpu_steal
from ouro.bench.serve import MESSAGES
from serving.conversation import BUSY, FAILED

FIRST_USER = 700_000
FRESH_KEYBOARD = ["👍", "👎", "🔁", "✏️"]
BUSY_TEXTS = {BUSY, QUEUE_FULL}
FAILURE_TEXTS = {FAILED, "Sorry, something went wrong on my side. Please try again.",
                 "I couldn't come up with another take just now, sorry."}


@dataclass
class SoakPlan:
    users: int = 50
    messages: int = 20
    seed: int = 1234
    double_p: float = 0.15      # a second message right behind the first, without waiting
    rate_p: float = 0.3         # 👍 / 👎 after an answer
    regen_p: float = 0.05       # 🔁 after an answer, then keep one of the two
    think_s: float = 0.5        # pause before the next message: uniform in [0, think_s]
    outcome_timeout_s: float = 900.0


@dataclass
class Seen:
    """Something a person can see in their chat, from the bot's API calls."""

    kind: str                   # reply | pick | busy | flood | regen_busy | failed
    time: float                 # when the emulator handled the call (epoch seconds)
    message_id: int | None = None
    callback_data: list[str] = field(default_factory=list)


@dataclass
class _Tally:
    sent: list[tuple[int, int]] = field(default_factory=list)   # (user id, message id)
    outcomes: Counter = field(default_factory=Counter)
    reply_latency: list[float] = field(default_factory=list)
    notice_latency: list[float] = field(default_factory=list)
    timeouts: int = 0
    rating_presses: int = 0
    regen_presses: int = 0
    pick_presses: int = 0
    press_ids: list[str] = field(default_factory=list)


class CallWatcher:
    """Follows the bot's API calls in the emulator's call log (one small incremental poll for all
    chats, not a long-poll per person) and hands each chat what became visible in it."""

    def __init__(self, emu, *, interval_s: float = 0.05) -> None:
        self.emu = emu
        self.interval_s = interval_s
        self._seq = 0
        self._queues: dict[int, asyncio.Queue[Seen]] = {}
        self.presses: dict[str, int] = {}   # 🔁 press id → its chat: a refusal is the press's answer, not a message
        self._early: dict[str, Seen] = {}   # refusals seen before their press was named (`watch_press`)

    def queue(self, chat_id: int) -> asyncio.Queue[Seen]:
        return self._queues.setdefault(chat_id, asyncio.Queue())

    def _refused_press(self, call: dict) -> tuple[int, Seen] | None:
        """A 🔁 refused (its chat busy, or its person over the flood limit) is told on the button."""
        if call.get("status") != 200 or call["method"].lower() != "answercallbackquery":
            return None
        p = call.get("params") or {}
        if (p.get("text") or "") not in (REGEN_BUSY, REGEN_FLOOD):
            return None
        press, seen = str(p.get("callback_query_id")), Seen("regen_busy", call["time"])
        if press not in self.presses:
            self._early[press] = seen
            return None
        return self.presses[press], seen

    def watch_press(self, press: str, chat_id: int) -> None:
        """Hand a refusal of this 🔁 press to its chat, also one answered before it was named here."""
        self.presses[press] = chat_id
        if press in self._early:
            self.queue(chat_id).put_nowait(self._early.pop(press))

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            while True:
                last = stop.is_set()
                resp = await http.get(self.emu.base_url + "/_calls",
                                      params={"since_seq": str(self._seq), "token": self.emu.token})
                for call in resp.json()["result"]:
                    self._seq = max(self._seq, int(call["seq"]))
                    seen = self._refused_press(call) or _classify(call)
                    if seen is not None:
                        self.queue(seen[0]).put_nowait(seen[1])
                if last:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval_s)


def _classify(call: dict) -> tuple[int, Seen] | None:
    if call.get("status") != 200:
        return None
    method, p = call["method"].lower(), call.get("params") or {}
    try:
        chat_id = int(p.get("chat_id"))
    except (TypeError, ValueError):
        return None
    if method == "editmessagereplymarkup":
        markup = p.get("reply_markup")
        if isinstance(markup, str):
            markup = json.loads(markup)
        buttons = [b for row in (markup or {}).get("inline_keyboard", []) for b in row]
        texts = [b.get("text") for b in buttons]
        data = [b.get("callback_data") for b in buttons]
        if texts == FRESH_KEYBOARD:
            return chat_id, Seen("reply", call["time"], int(p["message_id"]), data)
        if texts[:1] == ["Keep the first"]:
            return chat_id, Seen("pick", call["time"], int(p["message_id"]), data)
        return None
    if method in ("sendmessage", "editmessagetext"):
        text = p.get("text") or ""
        kind = ("busy" if text in BUSY_TEXTS else "flood" if text == FLOOD_NOTICE
                else "regen_busy" if "try 🔁 again" in text else "failed" if text in FAILURE_TEXTS else None)
        if kind:
            return chat_id, Seen(kind, call["time"])
    return None


async def _next(events: asyncio.Queue[Seen], timeout: float, kinds: set[str]) -> Seen | None:
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        try:
            seen = await asyncio.wait_for(events.get(), left)
        except TimeoutError:
            return None
        if seen.kind in kinds:
            return seen
    return None


async def _person(emu, watcher: CallWatcher, plan: SoakPlan, i: int, tally: _Tally, flood_window_s: float) -> None:
    rng = random.Random(plan.seed * 1_000_003 + i)
    uid = FIRST_USER + i
    user = emu.client(uid, f"Soak{i}")
    events = watcher.queue(uid)
    outcome_kinds = {"reply", "busy", "flood", "failed"}
    n = 0
    while n < plan.messages:
        burst = 2 if plan.messages - n >= 2 and rng.random() < plan.double_p else 1
        stamps = []
        for _ in range(burst):
            t = time.time()
            mid = await user.asend_text(MESSAGES[(i + n) % len(MESSAGES)])
            tally.sent.append((uid, mid))
            stamps.append(t)
            n += 1
        last, wait, flooded = None, plan.outcome_timeout_s, False
        for t in stamps:
            seen = await _next(events, wait, outcome_kinds)
            if seen is None:   # past the flood limit the bot stays silent after its one notice
                tally.timeouts += 1
                continue
            tally.outcomes[seen.kind] += 1
            if seen.kind == "reply":
                tally.reply_latency.append(seen.time - t)
                last = seen
            else:
                tally.notice_latency.append(seen.time - t)
            if seen.kind == "flood":
                wait, flooded = 2.0, True
        if flooded:        # told to slow down: a polite person waits for the window to pass
            await asyncio.sleep(flood_window_s)
        if last is not None and burst == 1:
            roll = rng.random()
            if roll < plan.regen_p:
                await _reroll(user, events, plan, rng, last, tally, watcher, uid)
            elif roll < plan.regen_p + plan.rate_p:
                tally.press_ids.append(await user.apress(last.callback_data[rng.choice((0, 0, 1))], last.message_id))
                tally.rating_presses += 1
        if plan.think_s:
            await asyncio.sleep(rng.uniform(0, plan.think_s))


async def _reroll(user, events, plan: SoakPlan, rng: random.Random, last: Seen, tally: _Tally,
                  watcher: CallWatcher, chat_id: int) -> None:
    tally.press_ids.append(await user.apress(last.callback_data[2], last.message_id))
    watcher.watch_press(tally.press_ids[-1], chat_id)
    tally.regen_presses += 1
    seen = await _next(events, plan.outcome_timeout_s, {"pick", "regen_busy", "failed"})
    kind = seen.kind if seen else "lost"
    tally.outcomes[kind if kind == "regen_busy" else f"regen_{kind}"] += 1
    if seen is not None and seen.kind == "pick":
        tally.press_ids.append(await user.apress(seen.callback_data[rng.choice((0, 1))], seen.message_id))
        tally.pick_presses += 1


class _ErrorCount(logging.Handler):
    """Every ERROR logged anywhere while the soak runs (the bot's error handler logs each
    unhandled exception there, asyncio its unretrieved task exceptions)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}"[:300])


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, round(q * (len(values) - 1)))], 3)


async def run_soak(emu, app, plan: SoakPlan, *, progress: Callable[[str], None] | None = None,
                   sample: Callable[[], dict] | None = None) -> dict:
    """Run the people of `plan` against `app` (already polling `emu`); return the figures and checks.
    `sample()` is called about once a second; its numeric values are reported as peaks."""
    h = app.bot_data["handlers"]
    store, worker = h.store, h.conversation.worker
    tally = _Tally()
    watcher = CallWatcher(emu)
    errors = _ErrorCount()
    logging.getLogger().addHandler(errors)
    worker.reset_stats()
    first_event = store.database.scalar("SELECT COALESCE(MAX(id), 0) FROM events")
    peaks: Counter = Counter()
    stop = asyncio.Event()
    started = time.perf_counter()

    async def sampler() -> None:
        while not stop.is_set():
            values = {"chat_queues": len(h.chat_queues), "flood_table": len(h.flood)}
            values.update(sample() if sample else {})
            for key, value in values.items():
                if isinstance(value, int | float):
                    peaks[key] = max(peaks[key], value)
            if progress:
                done = sum(tally.outcomes[k] for k in ("reply", "busy", "flood", "failed"))
                progress(f"{done}/{plan.users * plan.messages} messages answered, backlog {worker.backlog}, "
                         f"{time.perf_counter() - started:.0f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    watch = asyncio.create_task(watcher.run(stop))
    sampling = asyncio.create_task(sampler())
    try:
        await asyncio.gather(*(_person(emu, watcher, plan, i, tally, h.settings.flood_window_s)
                               for i in range(plan.users)))
        wall = time.perf_counter() - started
        await _presses_answered(emu, tally.press_ids)
    finally:
        stop.set()
        for failed in await asyncio.gather(watch, sampling, return_exceptions=True):
            if isinstance(failed, Exception):   # a dead sampler stops every peak: say so, never drop it
                errors.messages.append(f"soak monitor failed: {failed!r}")
        logging.getLogger().removeHandler(errors)
    result = await _reconcile(emu, store, plan, tally)
    waits = worker.wait_stats()
    error_events = store.database.scalar("SELECT COUNT(*) FROM events WHERE id > ? AND kind = 'error'",
                                         (first_event,))
    result.update({
        "wall_s": round(wall, 1), "replies_per_min": round(result["replied"] / wall * 60, 1),
        "unhandled_errors": len(errors.messages) + error_events, "errors_sample": errors.messages[:5],
        "reply_p50_s": _pct(tally.reply_latency, 0.5), "reply_p95_s": _pct(tally.reply_latency, 0.95),
        "reply_max_s": _pct(tally.reply_latency, 1.0), "busy_notice_p50_s": _pct(tally.notice_latency, 0.5),
        "queue_wait_p50_s": waits["p50_s"], "queue_wait_p95_s": waits["p95_s"], "queue_wait_max_s": waits["max_s"],
        "model_jobs": waits["jobs"], "peak_backlog": worker.peak_backlog, "max_backlog": worker.max_backlog,
        "peak_chat_waiting": h.chat_queues.peak_waiting, "chat_queue_max": h.chat_queues.max_waiting,
        "outcomes_seen": dict(tally.outcomes), "outcome_timeouts": tally.timeouts,
        **{f"peak_{k}": round(v, 1) for k, v in peaks.items()},
    })
    result["ok"] = (result["lost"] == 0 and result["unreplied"] == 0 and result["unhandled_errors"] == 0
                    and result["failed"] == 0 and result["presses_unrecorded"] == 0
                    and result["peak_backlog"] <= result["max_backlog"])
    return result


async def _presses_answered(emu, press_ids: list[str], timeout: float = 60.0) -> None:
    """Wait until the bot has answered every button press (so its records are written)."""
    wanted = set(press_ids)
    end = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
        while wanted and time.monotonic() < end:
            body = (await http.get(emu.base_url + "/_callbackAnswers", params={"token": emu.token})).json()
            wanted -= {str(a["callback_query_id"]) for a in body["result"] if a.get("answered")}
            if wanted:
                await asyncio.sleep(0.2)


async def _reconcile(emu, store, plan: SoakPlan, tally: _Tally) -> dict:
    """What the database holds and what each person's chat shows, against what was sent."""
    last_user = FIRST_USER + plan.users - 1
    rows = store.database.query(
        "SELECT id, chat_id, user_message_id, status, reply_text, reply_message_ids FROM turns "
        "WHERE chat_id BETWEEN ? AND ?", (FIRST_USER, last_user))
    stored_ids = {(r["chat_id"], r["user_message_id"]) for r in rows}
    status = Counter(r["status"] for r in rows)
    unreplied = 0
    for i in range(plan.users):
        uid = FIRST_USER + i
        views = {m.message_id: m for m in await emu.client(uid, f"Soak{i}").abot_messages()}
        shown = Counter(m.text for m in views.values())
        mine = [r for r in rows if r["chat_id"] == uid]
        for r in mine:
            if r["status"] == "answered":
                ids = json.loads(r["reply_message_ids"] or "[]")
                view = views.get(ids[-1]) if ids else None
                if view is None or keyboards.reply_data(keyboards.RATE_UP, r["id"]) not in view.callback_data:
                    unreplied += 1
        for status_, texts in (("busy", BUSY_TEXTS), ("limited", {FLOOD_NOTICE})):
            told = sum(shown[t] for t in texts)
            expected = sum(1 for r in mine if r["status"] == status_ and r["reply_text"])
            unreplied += max(0, expected - told)
        unreplied += sum(1 for r in mine if r["status"] == "pending")
    lo, hi = FIRST_USER, last_user
    ratings = store.database.scalar("SELECT COUNT(*) FROM ratings WHERE user_id BETWEEN ? AND ?", (lo, hi))
    alternatives = store.database.scalar(
        "SELECT COUNT(*) FROM alternatives a JOIN turns t ON t.id = a.turn_id WHERE t.chat_id BETWEEN ? AND ?", (lo, hi))
    picks = store.database.scalar(
        "SELECT COUNT(*) FROM preferences WHERE source = 'regenerate' AND user_id BETWEEN ? AND ?", (lo, hi))
    sent = len(tally.sent)
    stored = sum(1 for key in tally.sent if key in stored_ids)
    return {
        "users": plan.users, "messages_per_user": plan.messages, "sent": sent, "stored": stored,
        "lost": sent - stored, "extra_turns": len(rows) - stored,
        "replied": status["answered"], "busy": status["busy"], "limited": status["limited"],
        "refused": status["refused"], "failed": status["failed"], "pending": status["pending"],
        "unreplied": unreplied,
        "rating_presses": tally.rating_presses, "ratings_stored": ratings,
        "regenerate_presses": tally.regen_presses, "alternatives_stored": alternatives,
        "regenerate_busy": tally.outcomes["regen_busy"],
        "pick_presses": tally.pick_presses, "picks_stored": picks,
        "presses_unrecorded": (tally.rating_presses - ratings) + (tally.pick_presses - picks)
                              + (tally.regen_presses - tally.outcomes["regen_busy"] - alternatives),
    }


# --- the benchmark: the real model, the real learning loop --------------------------------------
def _bench_settings(base: Settings, data_dir: Path, users: int) -> Settings:
    values = base.model_dump()
    # learn_from "everyone": the soak measures serving beside a real cycle, not who may teach; under the
    # default trust rules its seeded strangers' turns teach nothing and the cycle was skipped (session 16)
    values.update(data_dir=data_dir, seed=1234, reply_max_tokens=24, cycle_schedule="off", log_level="WARNING",
                  learn_from="everyone")
    if "kv_cache_chats" not in base.model_fields_set:
        # Room for every person's chat state, as one would configure for this many people at once: with
        # the default 8, nearly every turn re-reads its whole history (~100 prompt tokens/s on 2 cores)
        # and the run takes hours. OURO_KV_CACHE_CHATS, when set, is kept.
        values["kv_cache_chats"] = min(max(base.kv_cache_chats, users), 256)
    return load_settings(**values)


def seed_reviewed_turns(store, n: int = 200) -> None:
    """Reviewed (👍) turns in chats of their own, for the background cycle to learn from."""
    for i in range(n):
        t = store.add_user_turn(chat_id=900_000 + i, user_id=900_000 + i, text=f"tell me about topic {i}")
        store.complete_turn(t, reply_text=f"topic {i} is lovely, let me tell you why ✨", generation_id="gen-0000",
                            prompt_tokens=10, completion_tokens=10, latency_s=0.1, ttft_s=0.01,
                            context_start_turn_id=t)
        store.rate(t, 900_000 + i, 1)


async def _bench(rt, plan: SoakPlan, *, quiet: bool) -> dict:
    from bot.app import build_application, running
    from ouro.demo.emulator import Emulator
    from serving.loop import LearningLoop
    from trainer.cycle_job import read_cycle_status

    me = psutil.Process()
    rss_start = me.memory_info().rss
    seed_reviewed_turns(rt.store)
    loop = LearningLoop(rt.settings, rt.store, rt.worker, warmup=rt.conversation.warmup_plan)
    stages: list[str] = []

    def sample() -> dict:
        values = {"rss_mb": me.memory_info().rss / 2**20, "kv_states": len(rt.worker.engine.states)}
        info = read_cycle_status(rt.settings)
        if info:
            stage = f"{info.get('stage')}"
            if not stages or stages[-1] != stage:
                stages.append(stage)
            with contextlib.suppress(psutil.Error):
                values["cycle_rss_mb"] = psutil.Process(int(info["pid"])).memory_info().rss / 2**20
        return values

    def say(line: str) -> None:
        sys.stderr.write(f"\rsoak: {line}   ")

    with Emulator() as emu:
        app = build_application(rt.settings, rt.store, rt.conversation, token=emu.token, base_url=emu.api_url,
                                learning=loop)
        async with running(app, poll_timeout=5):
            cycle = asyncio.create_task(loop.run_cycle("soak"))
            result = await run_soak(emu, app, plan, progress=None if quiet else say, sample=sample)
            still_running = loop.runner.running
            loop.runner.kill()
            outcome = await cycle
    if not quiet:
        sys.stderr.write("\n")
    result.update({
        "cycle_stages_seen": stages, "cycle_outcome": "stopped at the end (still running)" if still_running
        else outcome.status, "kv_cache_chats": rt.settings.kv_cache_chats,
        "reply_max_tokens": rt.settings.reply_max_tokens, "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_end_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cores": psutil.cpu_count(),
    })
    result["ok"] = (result["ok"] and result.get("peak_kv_states", 0) <= rt.settings.kv_cache_chats
                    and result["cycle_outcome"] not in ("skipped", "failed"))   # a cycle really ran beside it
    return result


def run_bench_soak(base: Settings, *, users: int = 50, messages: int = 20, json_output: bool = False) -> dict:
    from serving.runtime import open_runtime

    if users < 1 or messages < 1:
        raise OuroError("--users and --messages must be at least 1")
    plan = SoakPlan(users=users, messages=messages)
    with tempfile.TemporaryDirectory(prefix="ouro-bench-soak-") as tmp:
        settings = _bench_settings(base, Path(tmp), users)
        rt = open_runtime(settings)
        steal = cpu_steal.snapshot()
        try:
            result = asyncio.run(_bench(rt, plan, quiet=json_output))
        finally:
            rt.close()
        result["cpu_stolen_share"] = cpu_steal.share(steal, cpu_steal.snapshot())
    if not json_output:
        _print(result)
    return result


def _print(r: dict) -> None:
    print(f"\nouro bench soak — {r['users']} people × {r['messages_per_user']} messages, "
          f"{r['reply_max_tokens']}-token replies, a learning cycle in the background")
    print(f"  sent {r['sent']}, stored {r['stored']}, lost {r['lost']}  (goal: 0 lost)")
    print(f"  answered with buttons {r['replied']}, told busy {r['busy']}, flood-limited {r['limited']}, "
          f"unreplied {r['unreplied']}, failed {r['failed']}  (goal: 0 unreplied)")
    print(f"  unhandled errors {r['unhandled_errors']}  (goal: 0)")
    print(f"  presses: {r['rating_presses']} ratings ({r['ratings_stored']} stored), {r['regenerate_presses']} 🔁 "
          f"({r['alternatives_stored']} alternatives, {r['regenerate_busy']} busy), {r['pick_presses']} picks "
          f"({r['picks_stored']} stored)")
    print(f"  reply latency p50 {r['reply_p50_s']}s, p95 {r['reply_p95_s']}s (send → reply with buttons visible)")
    print(f"  queue wait p50 {r['queue_wait_p50_s']}s, p95 {r['queue_wait_p95_s']}s over {r['model_jobs']} model "
          f"jobs; peak backlog {r['peak_backlog']}/{r['max_backlog']}, peak waiting in one chat "
          f"{r['peak_chat_waiting']}/{r['chat_queue_max']}, KV states ≤ {r.get('peak_kv_states')}/"
          f"{r['kv_cache_chats']}")
    print(f"  memory: {r['rss_start_mb']:.0f} MB at start, {r['rss_end_mb']:.0f} MB at the end, peak "
          f"{r['peak_rss_mb']:.0f} MB (cycle process peak {r.get('peak_cycle_rss_mb', 0):.0f} MB)")
    print(f"  cycle: stages {' → '.join(r['cycle_stages_seen']) or '-'}; {r['cycle_outcome']}")
    if r.get("cpu_stolen_share") is not None:
        print(f"  CPU time taken by the VM's host meanwhile (steal): {r['cpu_stolen_share']:.0%}")
    print(f"  wall time {r['wall_s']:.0f}s ({r['replies_per_min']} replies/min) — {'OK' if r['ok'] else 'FAILED'}")
