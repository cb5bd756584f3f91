"""A training stage in several processes: the launcher's side and each process's entry point.

With `train_processes > 1` the cycle (trainer/cycle.py) runs its documents pass and its fine-tune
here instead of in its own process: `run_job` writes the stage's inputs to `job.json` in a work
folder and starts

    python -m torch.distributed.run --standalone --nproc-per-node N -m trainer.train_job WORK_DIR

Every process loads the model, joins the group (trainer/distributed.py: gloo on CPU, nccl on
CUDA), trains its share of each batch, and the main process saves the merged model and writes
`result.json`; its progress comes back as `ouro-step K/N` lines on stdout. A process that fails
writes `error-rank<R>.json`, which becomes the OuroError the launcher raises.

Why torch.distributed.run rather than `accelerate launch`: it ships with torch, needs no
accelerate config file, and it is what `accelerate launch --multi_gpu` runs underneath. This
module reads only the environment both set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
so `accelerate launch --num_processes N -m trainer.train_job WORK_DIR` runs the same job by hand.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from core.errors import OuroError
from core.files import atomic_write_text

STEP_LINE = re.compile(r"ouro-step (\d+)/(\d+)")


# --- the launcher's side -----------------------------------------------------------------------
def launch_command(processes: int, work_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "trainer.train_job", str(work_dir)]


def run_job(processes: int, job: dict, work_dir: Path, *,
            on_step: Callable[[int, int], None] | None = None) -> dict:
    """Run `job` (see `main`) in `processes` processes and return the main process's result.

    Raises OuroError when this machine cannot run that many (trainer/distributed.py
    check_processes) or when a process fails (its own message when it wrote one)."""
    from trainer.distributed import check_processes

    backend = check_processes(processes)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work_dir / "job.json", json.dumps(job, ensure_ascii=False))
    env = dict(os.environ)
    if backend == "gloo":   # the cores this process was given, shared out: N processes × T threads
        import torch

        env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // processes))
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(launch_command(processes, work_dir), stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, env=env, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            m = STEP_LINE.search(line)
            if m and on_step is not None:
                on_step(int(m.group(1)), int(m.group(2)))
        code = proc.wait()
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    result = work_dir / "result.json"
    if code == 0 and result.exists():
        return json.loads(result.read_text(encoding="utf-8"))
    for path in sorted(work_dir.glob("error-rank*.json")):
        info = json.loads(path.read_text(encoding="utf-8"))
        raise OuroError(info["message"], hint=info.get("hint"))
    raise OuroError(f"the {processes} training processes failed (exit {code}): {tail.strip()[-600:]}",
                    hint="set OURO_TRAIN_PROCESSES=1 to train in one process")


def finetune(processes: int, base_dir: Path, sft_examples: Sequence[Sequence[dict]], dpo_pairs: Sequence,
             out_dir: Path, cfg, work_dir: Path, *, chat_format=None,
             on_step: Callable[[int, int], None] | None = None, weights: Sequence[float] | None = None,
             kto_items: Sequence = ()):
    """trainer.finetune.train in `processes` processes; the same arguments, the same TrainResult."""
    from trainer.finetune import TrainResult

    job = {"stage": "finetune", "base_dir": str(base_dir), "out_dir": str(out_dir), "config": asdict(cfg),
           "chat_format": asdict(chat_format) if chat_format is not None else None,
           "sft": [list(e) for e in sft_examples], "pairs": [list(p) for p in dpo_pairs],
           "weights": list(weights) if weights is not None else None, "kto": [list(k) for k in kto_items]}
    return TrainResult(**run_job(processes, job, work_dir, on_step=on_step))


def pretrain(processes: int, base_dir: Path, documents: Sequence[str], replay: Sequence[Sequence[dict]],
             out_dir: Path, cfg, work_dir: Path, *, chat_format=None,
             on_step: Callable[[int, int], None] | None = None):
    """trainer.pretrain.continue_pretraining in `processes` processes; the same PretrainResult."""
    from trainer.pretrain import PretrainResult

    job = {"stage": "pretrain", "base_dir": str(base_dir), "out_dir": str(out_dir), "config": asdict(cfg),
           "chat_format": asdict(chat_format) if chat_format is not None else None,
           "documents": list(documents), "replay": [list(c) for c in replay]}
    return PretrainResult(**run_job(processes, job, work_dir, on_step=on_step))


# --- each process ------------------------------------------------------------------------------
def _run(job: dict, group) -> dict:
    from engine.template import ChatFormat

    fmt = ChatFormat(**job["chat_format"]) if job["chat_format"] else None

    def on_step(step: int, total: int) -> None:
        sys.stdout.write(f"ouro-step {step}/{total}\n")
        sys.stdout.flush()

    if job["stage"] == "finetune":
        from trainer.dataset import DPOPair
        from trainer.finetune import TrainConfig, train
        from trainer.kto import KTOItem

        result = train(Path(job["base_dir"]), job["sft"], [DPOPair(*p) for p in job["pairs"]], Path(job["out_dir"]),
                       TrainConfig(**job["config"]), progress=False, chat_format=fmt, on_step=on_step,
                       weights=job["weights"], kto_items=[KTOItem(*k) for k in job["kto"]], group=group)
    elif job["stage"] == "pretrain":
        from trainer.pretrain import PretrainConfig, continue_pretraining

        result = continue_pretraining(Path(job["base_dir"]), job["documents"], job["replay"], Path(job["out_dir"]),
                                      PretrainConfig(**job["config"]), chat_format=fmt, on_step=on_step,
                                      group=group)
    else:
        raise OuroError(f"unknown training stage {job['stage']!r}")
    return asdict(result)


def main(argv: list[str]) -> int:
    """One process of a job: join the group, run the stage, the main process writes result.json."""
    from trainer.distributed import Group

    work_dir = Path(argv[0])
    rank = int(os.environ.get("RANK", "0"))
    try:
        job = json.loads((work_dir / "job.json").read_text(encoding="utf-8"))
        group = Group.from_env()
        try:
            result = _run(job, group)
        finally:
            group.close()
    except OuroError as exc:
        atomic_write_text(work_dir / f"error-rank{rank}.json",
                          json.dumps({"message": exc.args[0] if exc.args else str(exc), "hint": exc.hint}))
        return 1
    if rank == 0:
        atomic_write_text(work_dir / "result.json", json.dumps(result, ensure_ascii=False))
    return 0


def remove(work_dir: Path) -> None:
    """The job folder holds the stage's training data: gone once the stage is over."""
    shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
