"""Helpers that tests/test_faults_cycle.py runs in a process of their own.

    python -m tests.helpers.fault_helpers cycle-writer DB SECONDS

does what a learning cycle does to the database, as fast as it can, for SECONDS: read the reviewed
turns (the export, every tenth round), record progress events and generation rows. It prints one JSON line with what
it wrote, or the error that stopped it.

    python -m tests.helpers.fault_helpers cycle-paused-at STAGE -- <the cycle process's arguments>

is the learning cycle's own process (trainer.cycle_job.run_child) that stops at the start of
STAGE, once its status file says so, and waits there to be killed.
"""

from __future__ import annotations

import json
import sys
import time


def cycle_writer(db: str, seconds: float) -> dict:
    from memory.export import reviewed_since
    from memory.store import Store

    store = Store.open(db)
    events = generations = exports = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if events % 10 == 0:   # the export reads everything reviewed: slow on a big table, so not always
                reviewed_since(store, persona="", since=None, budget=50)
                exports += 1
            store.log_event("cycle_progress", detail={"i": events})
            events += 1
            store.upsert_generation(gen_id=f"gen-{generations + 1:04d}", parent_id=None, gguf_path="x",
                                    gguf_sha256="0" * 64, status="candidate", meta={"i": generations})
            generations += 1
    except Exception as exc:   # reported, so the test can show it
        return {"error": f"{type(exc).__name__}: {exc}", "events": events, "generations": generations}
    finally:
        store.close()
    return {"events": events, "generations": generations, "exports": exports}


def paused_cycle_command(stage: str) -> tuple[str, ...]:
    """A CycleRunner command whose cycle process waits at the start of `stage`."""
    return (sys.executable, "-m", "tests.helpers.fault_helpers", "cycle-paused-at", stage, "--")


def cycle_paused_at(stage: str, argv: list[str]) -> int:
    from trainer.cycle_job import run_child

    def hold(current: str) -> None:
        while current == stage:   # until the test kills this process
            time.sleep(1.0)

    return run_child(argv, at_stage=hold)


if __name__ == "__main__":
    if sys.argv[1] == "cycle-writer":
        sys.stdout.write(json.dumps(cycle_writer(sys.argv[2], float(sys.argv[3]))) + "\n")
    elif sys.argv[1] == "cycle-paused-at":
        sys.exit(cycle_paused_at(sys.argv[2], sys.argv[4:]))
