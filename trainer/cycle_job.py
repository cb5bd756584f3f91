"""The learning cycle as its own process: what the bot's schedule and /train start.

Why a process and not a thread: training holds the GIL in long Python stretches and would
starve the event loop, a crash or an out-of-memory kill in torch must not take the bot with
it, and an admin must be able to stop a cycle outright. The child runs `run_cycle` with the
exact settings of the bot that started it (passed as a JSON file), lowers its own priority
and leaves one core to llama.cpp, writes where it is to `run/cycle.json` (stage, step) for
/status, and prints its report as the last line of stdout.

    python -m trainer.cycle_job --settings run/cycle-settings.json --actor scheduler
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from config.settings import Settings
from core.files import atomic_write_text, ensure_private_dir
from trainer.lock import pid_alive

log = logging.getLogger(__name__)
CHILD_COMMAND = (sys.executable, "-m", "trainer.cycle_job")


def status_path(settings: Settings) -> Path:
    return settings.data_dir / "run" / "cycle.json"


def read_cycle_status(settings: Settings) -> dict | None:
    """The cycle in progress, if its process is still alive."""
    try:
        info = json.loads(status_path(settings).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not info.get("running") or not pid_alive(int(info.get("pid", 0))):
        return None
    return info


# --- the child ---------------------------------------------------------------------------------
def run_child(argv: list[str], *, at_stage: Callable[[str], None] | None = None) -> int:
    """The cycle process's body: run one cycle, keep its status file current, print its report.

    `at_stage` is called at the start of each stage, once the status file names it (a process
    wrapping this one can stop there; tests/helpers/fault_helpers.py does, to be killed inside
    stages too short to catch otherwise)."""
    ap = argparse.ArgumentParser(prog="python -m trainer.cycle_job")
    ap.add_argument("--settings", type=Path, required=True)
    ap.add_argument("--actor", default="scheduler")
    args = ap.parse_args(argv)

    values = json.loads(args.settings.read_text(encoding="utf-8"))
    cores = os.cpu_count() or 1
    # leave a core to the bot's llama.cpp thread; must be set before torch is imported
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores - 1)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from config.settings import load_settings
    from memory.store import Store
    from trainer.cycle import run_cycle

    settings = load_settings(**values)
    with contextlib.suppress(OSError):
        os.nice(settings.cycle_nice)
    state = {"pid": os.getpid(), "running": True, "actor": args.actor, "started_at": time.time(),
             "stage": "start", "step": 0, "total": 0}
    path = status_path(settings)
    ensure_private_dir(path.parent)
    last_write = [0.0]

    def write(force: bool = False) -> None:
        now = time.time()
        if force or now - last_write[0] > 1.0:
            last_write[0] = now
            atomic_write_text(path, json.dumps({**state, "updated": now}))

    def on_stage(stage: str) -> None:
        state.update(stage=stage, step=0, total=0)
        write(force=True)
        if at_stage is not None:
            at_stage(stage)

    def on_step(step: int, total: int) -> None:
        state.update(step=step, total=total)
        write()

    write(force=True)
    store = Store.open(settings.db_path)
    try:
        from core.errors import OuroError

        try:
            report = run_cycle(settings, store, actor=args.actor, progress=False, on_stage=on_stage,
                               on_step=on_step).to_dict()
        except OuroError as exc:
            report = {"status": "failed", "reasons": [str(exc)]}
    finally:
        store.close()
        state.update(running=False, stage="done")
        write(force=True)
    sys.stdout.write(json.dumps(report, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    return 0 if report["status"] != "failed" else 1


# --- the parent side ---------------------------------------------------------------------------
@dataclass
class CycleOutcome:
    status: str                    # promoted | held | refused | skipped | failed | killed
    report: dict = field(default_factory=dict)
    returncode: int | None = None
    stderr_tail: str = ""

    @property
    def reasons(self) -> list[str]:
        return list(self.report.get("reasons") or [])


class CycleRunner:
    """Starts at most one cycle process at a time and awaits its report, without blocking the loop."""

    def __init__(self, settings: Settings, command: tuple[str, ...] = CHILD_COMMAND) -> None:
        self.settings = settings
        self.command = command           # the program that runs `run_child` (its arguments follow)
        self.proc: asyncio.subprocess.Process | None = None
        self.actor: str | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def run(self, actor: str) -> CycleOutcome:
        from core.errors import OuroError

        if self.running:
            raise OuroError(f"a learning cycle is already running (pid {self.proc.pid}, started by {self.actor})")
        run_dir = self.settings.data_dir / "run"
        ensure_private_dir(run_dir)
        settings_file = run_dir / "cycle-settings.json"
        # a persona file nobody named is found again by the child (an interview may have written
        # <data_dir>/persona.md since the bot started), not pinned to the one found at the bot's start
        unnamed = None if "persona_file" in self.settings.model_fields_set else {"persona_file"}
        atomic_write_text(settings_file, self.settings.model_dump_json(exclude=unnamed))
        os.chmod(settings_file, 0o600)
        self.actor = actor
        # Its own process group (so `kill` takes its helpers too) but NOT its own session: Linux's
        # scheduler autogroups give each session an equal share of the CPU whatever the nice value,
        # so with start_new_session the niced trainer took a full core from the bot, and llama.cpp's
        # two threads, one of them preempted at every barrier, made the first token 25x slower
        # (p95 0.29 s → 7.9 s on 2 cores; `ouro bench swap`). In the bot's session nice works.
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, "--settings", str(settings_file), "--actor", actor,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, process_group=0,
            env={k: v for k, v in os.environ.items() if k != "TELEGRAM_BOT_TOKEN"})   # training needs no token
        try:
            out, err = await self.proc.communicate()
        except asyncio.CancelledError:
            self.kill()
            raise
        code = self.proc.returncode
        tail = err.decode(errors="replace")[-3000:]
        report: dict = {}
        for line in reversed(out.decode(errors="replace").splitlines()):
            with contextlib.suppress(json.JSONDecodeError):
                report = json.loads(line)
                break
        if code is not None and code < 0:
            status = "killed"
            report.setdefault("reasons", [f"the cycle process was killed by signal {-code}; nothing served changed"])
        else:
            status = report.get("status", "failed")
            if not report:
                report = {"status": "failed", "reasons": [f"the cycle process exited {code} without a report"]}
        if status in ("killed", "failed"):
            log.warning("cycle %s (exit %s): %s", status, code, tail[-800:])
        return CycleOutcome(status=status, report=report, returncode=code, stderr_tail=tail)

    def kill(self) -> bool:
        if not self.running:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return True


if __name__ == "__main__":
    sys.exit(run_child(sys.argv[1:]))
