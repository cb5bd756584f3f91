"""`ouro demo`: the whole loop on one machine, nothing to configure, narrated as it goes.

A local Telegram emulator on loopback (emulator/server.js), the real bot polling it over
HTTP with the packaged SmolLM2 as generation 0, and three simulated people on its allow-list
who each hold a conversation and review through the real buttons, as `ouro experiment` does:
they want replies that open with "Ahoy!" — one in style gets 👍, most others ✏️ a correction,
a few 👍 anyway and one a bare 👎, and no reply in the assistant's voice is liked or kept
(`ouro.bench.experiment.review`). Then the admin, also simulated, sends /train; the cycle runs
in its own process, with the product's training defaults, while the bot keeps answering; the
admin gets the result; the next replies come from the new generation (hot-swap) and the demo
counts how many open with "Ahoy!"; finally /rollback with its confirmation button brings the
parent back. If the gate refuses the candidate, the admin promotes it by hand to show the
hot-swap — the narration says so. Everything lands in a fresh data folder that is kept, with
the ledger and a chart, for you to look at afterwards.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import datetime
from pathlib import Path

from ouro.bench.experiment import CONVERSATIONS, PROBE_PROMPTS, STYLE, STYLES, in_style, review

ADMIN_ID = 1
PEOPLE = [(101, "Ann"), (102, "Bo"), (103, "Cy")]
SHOWN_PROBES = 6


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def demo_settings(data_dir: Path):
    from config.settings import load_settings

    # the product's training defaults; only replies are kept short (48 tokens) so the chat part is quick
    return load_settings(data_dir=data_dir, admin_ids=[ADMIN_ID], allowed_user_ids=[uid for uid, _ in PEOPLE],
                         cycle_schedule="off", stream_edit_interval_s=0.5, reply_max_tokens=48, log_level="WARNING")


async def _until(user, predicate, after: int, timeout: float):
    return await user.await_for(predicate, after=after, timeout=timeout)


async def _chat_and_rate(emu, turns: int) -> dict:
    """Each person holds one conversation, turn by turn, and reviews each reply through the buttons."""
    counts = {"👍": 0, "✏️": 0, "👎": 0}
    for i in range(turns):
        for (uid, name), questions in zip(PEOPLE, CONVERSATIONS, strict=True):
            user = emu.client(uid, name)
            mid = await user.asend_text(questions[i])
            reply = await _until(user, lambda m: bool(m.callback_data), mid, 90)
            text = reply.text or ""
            action, edited = review(STYLES["ahoy"], text, i)
            if action == "like":
                await user.apress(reply.callback_data[0], reply.message_id)
                verdict = "👍"
            elif action == "dislike":
                await user.apress(reply.callback_data[1], reply.message_id)
                verdict = "👎"
            else:
                await user.apress(reply.callback_data[3], reply.message_id)
                ask = await _until(user, lambda m: "✏️" in (m.text or ""), reply.message_id, 30)
                sent = await user.asend_text(edited)
                await _until(user, lambda m: "noted" in (m.text or ""), max(sent, ask.message_id), 30)
                verdict = "✏️"
            counts[verdict] += 1
            say(f"  {name}: {questions[i]!r}\n    bot: {text[:70]!r}  {verdict}")
    return counts


async def _probe(emu, rt) -> tuple[int, list[str]]:
    """Ann starts a fresh conversation (/reset) with new questions; how many replies open with the style."""
    ann = emu.client(*PEOPLE[0])
    replies = []
    for prompt in PROBE_PROMPTS[:SHOWN_PROBES]:
        await _admin(emu, ann, "/reset", lambda m: True)
        mid = await ann.asend_text(prompt)
        reply = await _until(ann, lambda m: bool(m.callback_data), mid, 90)
        replies.append(reply.text or "")
        say(f"    Ann: {prompt!r} → {(reply.text or '')[:70]!r}")
    return sum(map(in_style, replies)), replies


async def _admin(emu, admin, command: str, predicate, timeout: float = 30):
    name, _, args = command.partition(" ")
    mid = await admin.asend_command(name, args)
    return await _until(admin, lambda m: m.text is not None and predicate(m), mid, timeout)


async def _confirm(admin, ask) -> str:
    await admin.apress(ask.callback_data[0], ask.message_id)
    done = await admin.await_for(lambda m: m.message_id == ask.message_id and "Now serving" in (m.text or ""),
                                 timeout=60)
    return done.text


async def _run(data_dir: Path, turns: int) -> dict:
    from bot.app import build_application, running
    from lineage.chart import lineage_chart
    from ouro.demo.emulator import Emulator
    from serving.runtime import open_runtime
    from trainer.cycle_job import read_cycle_status

    settings = demo_settings(data_dir)
    say(f"▶ Data folder: {data_dir}")
    say("▶ Starting a local Telegram emulator on 127.0.0.1 …")
    with Emulator() as emu:
        rt = open_runtime(settings)
        say(f"▶ The bot serves {rt.lineage.active_id()} (SmolLM2-135M-Instruct, packaged) over HTTP to the emulator.")
        app = build_application(settings, rt.store, rt.conversation, token=emu.token, base_url=emu.api_url,
                                learning=True)
        result: dict = {"data_dir": str(data_dir)}
        try:
            async with running(app, poll_timeout=1):
                admin = emu.client(ADMIN_ID, "Ada")
                say(f"\n▶ {len(PEOPLE)} people chat. They like replies that open with {STYLE!r}: those get 👍; most "
                    "others get ✏️ the same reply with the phrase in front (sentences that speak as an AI assistant deleted), "
                    "a few 👍 anyway, one a bare 👎.")
                say("\n▶ Before: Ann asks new questions in fresh conversations.")
                before, _ = await _probe(emu, rt)
                result["before"] = {"in_style": before, "of": SHOWN_PROBES}
                result["rated"] = await _chat_and_rate(emu, turns)

                say("\n▶ The admin sends /train. The cycle runs in its own process; the bot keeps answering.")
                started = await _admin(emu, admin, "/train", lambda m: "cycle" in m.text)
                t0, last = time.monotonic(), None
                while True:
                    done = [m for m in await admin.abot_messages() if m.message_id > started.message_id
                            and any(k in (m.text or "") for k in ("promoted and now", "refused by", "failed", "stopped"))]
                    if done:
                        break
                    info = read_cycle_status(settings)
                    stage = info and f"{info['stage']}" + (f" {info['step']}/{info['total']}" if info.get("total") else "")
                    if stage and stage != last:
                        say(f"    cycle: {stage}  ({time.monotonic() - t0:.0f}s)")
                        last = stage
                    await asyncio.sleep(1.0)
                report = done[0].text
                say("\n▶ The admin's message from the bot:\n" + "\n".join("    " + line for line in report.splitlines()))
                result["cycle"] = report.splitlines()[0]
                child = rt.lineage.generations()[-1].id
                if "promoted and now" not in report and child != "gen-0000":
                    say(f"\n▶ The gate kept {child} out. To show the hot-swap anyway, the admin promotes it by hand "
                        "(asks for confirmation; recorded with who and why).")
                    ask = await _admin(emu, admin, f"/promote {child} demo: show the hot-swap",
                                       lambda m: bool(m.callback_data))
                    say("    " + (await _confirm(admin, ask)))
                if rt.worker.engine.generation_id != "gen-0000":
                    say(f"\n▶ Hot-swapped without a restart: {rt.worker.engine.generation_id} answers. Ann asks the "
                        "same new questions again, in fresh conversations.")
                    after, replies = await _probe(emu, rt)
                    gen = rt.store.turn(rt.store.latest_answered_turn(PEOPLE[0][0])).generation_id
                    say(f"    {before} of {SHOWN_PROBES} opened with {STYLE!r} before; {after} of {SHOWN_PROBES} now.")
                    result["after_swap"] = {"generation": gen, "in_style": after, "of": SHOWN_PROBES,
                                            "reply": replies[0]}
                    ann = emu.client(*PEOPLE[0])

                    say("\n▶ The admin rolls back with /rollback (a confirmation button; nothing is deleted).")
                    ask = await _admin(emu, admin, "/rollback demo: back to the parent", lambda m: bool(m.callback_data))
                    say("    " + (await _confirm(admin, ask)))
                    mid = await ann.asend_text("hey there!")
                    reply = await _until(ann, lambda m: bool(m.callback_data), mid, 60)
                    gen = rt.store.turn(rt.store.latest_answered_turn(PEOPLE[0][0])).generation_id
                    say(f"    Ann: 'hey there!' → {gen}: {reply.text[:80]!r}")
                    result["after_rollback"] = {"generation": gen, "reply": reply.text}
        finally:
            rt.close()
    chart = lineage_chart(rt.lineage, data_dir / "lineage.png")
    result["chart"], result["ledger"] = str(chart), str(rt.lineage.ledger_path)
    say("\n▶ Where to look:")
    say(f"    ledger  {rt.lineage.ledger_path}")
    say(f"    chart   {chart}")
    say(f"    table   ouro --data-dir {data_dir} generations")
    say(f"    evals   ouro --data-dir {data_dir} eval {rt.lineage.generations()[-1].id}")
    say("    your own bot: TELEGRAM_BOT_TOKEN=… OURO_ADMIN_IDS=<your id> ouro serve")
    return result


def run_demo(*, data_dir: Path | None = None, turns: int = 9, home: Path | None = None) -> dict:
    """The narrated demo in `data_dir` (default: a new folder under `home`/demo/, `home` being the
    data folder of the settings)."""
    from config.settings import load_settings

    if data_dir is None:
        data_dir = (home or load_settings().data_dir) / "demo" / datetime.now().strftime("%Y%m%d-%H%M%S")
    data_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_run(data_dir.resolve(), turns))
