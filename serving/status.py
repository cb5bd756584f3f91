"""The figures behind /status and `ouro status`: one function, two views.

The running bot rewrites `run/serve.json` every few seconds (uptime, backlog, model), so
`ouro status` in another process reports the same numbers without talking to the bot.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from config.settings import Settings
from core.files import atomic_write_text, ensure_private_dir
from lineage.generations import Lineage
from memory.store import Store

STALE_AFTER_S = 30.0


def runtime_file(settings: Settings) -> Path:
    return settings.data_dir / "run" / "serve.json"


def write_runtime(settings: Settings, info: dict) -> None:
    path = runtime_file(settings)
    ensure_private_dir(path.parent)
    atomic_write_text(path, json.dumps({**info, "pid": os.getpid(), "written_at": time.time()}))


def read_runtime(settings: Settings) -> dict | None:
    path = runtime_file(settings)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if time.time() - info.get("written_at", 0) > STALE_AFTER_S:
        return None
    return info


def status_report(settings: Settings, store: Store, runtime: dict | None) -> dict:
    """Everything an admin wants to see at a glance. `runtime` is the live bot's own view."""
    lineage = Lineage(settings.models_dir)
    active_id = lineage.active_id()
    model = {}
    if active_id:
        gen = lineage.generation(active_id)
        model = {"file": str(gen.gguf), "sha256": gen.sha256, "parent": gen.parent_id}
    return {
        "serving": runtime is not None,
        "active_generation": active_id,
        "uptime_s": round(time.time() - runtime["started_at"], 1) if runtime else None,
        "queue_depth": runtime.get("queue_depth", 0) if runtime else 0,
        "loaded_generation": runtime.get("generation_id") if runtime else None,
        "model": model,
        "engine": settings.engine if settings.engine == "embedded" else f"{settings.engine} {settings.engine_base_url}",
        "runs_on": runtime.get("runs_on") if runtime else _runs_on(settings),
        "training": runtime.get("training") if runtime else None,
        "cycle": runtime.get("cycle") if runtime else None,
        "data_trigger": runtime.get("data_trigger") if runtime else None,
        "live_watch": runtime.get("live_watch") if runtime else None,
        "disk": disk_report(settings, lineage),
        **store.stats(),
    }


def disk_report(settings: Settings, lineage: Lineage) -> dict:
    """What the lineage takes on disk and what is left: a daily cycle adds a model file a day, and an
    owner running the bot for months should see it coming (`keep_gguf` bounds it)."""
    used = 0
    if settings.models_dir.is_dir():
        for path in settings.models_dir.rglob("*"):
            with contextlib.suppress(OSError):   # a cycle may remove its scratch files meanwhile
                if path.is_file() and not path.is_symlink():
                    used += path.stat().st_size
    gens = lineage.generations() if settings.models_dir.is_dir() else []
    try:
        free = shutil.disk_usage(settings.data_dir if settings.data_dir.exists() else Path.cwd()).free
    except OSError:
        free = None
    return {"models_bytes": used, "generations": len(gens), "gguf_pruned": sum(g.pruned is not None for g in gens),
            "free_bytes": free, "keep_gguf": settings.keep_gguf}


def _runs_on(settings: Settings) -> str:
    """Where the model would run, with no bot running: this llama.cpp build, the machine's GPUs and
    `n_gpu_layers` (the model's layer count is known only once it is loaded)."""
    if settings.engine != "embedded":
        return f"the server at {settings.engine_base_url} (it decides where the model runs; when serving)"
    from engine.placement import placement

    return f"{placement(settings.n_gpu_layers).describe()} (when serving)"


def format_status(report: dict) -> str:
    up = report["uptime_s"]
    uptime = "not running" if up is None else f"{int(up // 3600)}h {int(up % 3600 // 60)}m {int(up % 60)}s"
    model = report.get("model") or {}
    tps = report.get("recent_tokens_per_s")
    loop = [f"{label}: {report[key]}" for key, label in (("training", "Training"), ("data_trigger", "Data trigger"),
                                                          ("cycle", "Cycle"), ("live_watch", "Live watch")) if report.get(key)]
    return "\n".join([
        f"Active generation: {report['active_generation']}"
        + (f" (parent {model['parent']})" if model.get("parent") else ""),
        f"Uptime: {uptime}",
        f"Chats: {report['chats']} · users: {report['users']} · turns: {report['turns']} "
        f"(answered {report['turns_answered']}, pending {report['turns_pending']})",
        f"Ratings: 👍 {report['ratings_up']} · 👎 {report['ratings_down']} · preferences {report['preferences']} "
        f"· corrections {report['corrections']}",
        f"Queue depth: {report['queue_depth']}",
        f"Engine: {report.get('engine', 'embedded')}",
        f"Runs on: {report.get('runs_on') or '—'}",
        f"Model file: {model.get('file', '—')}",
        f"SHA-256: {model.get('sha256', '—')}",
        f"Recent speed: {tps if tps is not None else '—'} tokens/s",
        *([_disk_line(report["disk"])] if report.get("disk") else []),
        *loop,
    ])


def _disk_line(disk: dict) -> str:
    kept = "all GGUFs kept" if not disk["keep_gguf"] else f"{disk['gguf_pruned']} GGUFs pruned (keep_gguf {disk['keep_gguf']})"
    free = "—" if disk["free_bytes"] is None else f"{disk['free_bytes'] / 1e9:.1f} GB free"
    return f"Disk: models {disk['models_bytes'] / 1e9:.2f} GB over {disk['generations']} generations, {kept} · {free}"
