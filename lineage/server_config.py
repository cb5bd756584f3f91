"""A config file for llama-cpp-python's OpenAI-compatible server that lists every generation.

With `engine = openai` the bot asks its inference server for a generation by name (its id,
`gen-0003`; engine/openai_server.py). llama-cpp-python's server (`python -m llama_cpp.server
--config_file FILE`) serves every model its config lists, one loaded at a time, and loads
another when a request names it: so a hot-swap to any listed generation needs nothing from the
owner. It reads the file only at start, though: a generation trained after that is refused
by the hot-swap (the old one keeps serving) until the file is written again and the server
restarted. The active generation is listed first: the server loads it at start.
"""

from __future__ import annotations

import json
from pathlib import Path

from config.settings import Settings
from core.files import atomic_write_text
from lineage.generations import Lineage


def server_config(settings: Settings, lineage: Lineage, *, host: str = "127.0.0.1", port: int = 8080) -> dict:
    """The config (llama-cpp-python's `ConfigFileSettings`): one model per generation that still has
    its GGUF (`keep_gguf` prunes old ones), named by its id."""
    gens = [g for g in lineage.generations() if g.pruned is None]
    active = lineage.active_id()
    gens.sort(key=lambda g: g.id != active)          # stable: the active one first, then in lineage order
    threads = {"n_threads": settings.n_threads} if settings.n_threads else {}   # the file takes no nulls
    return {"host": host, "port": port,
            "models": [{"model": str(g.gguf.resolve()), "model_alias": g.id, "n_ctx": settings.n_ctx,
                        "n_gpu_layers": settings.n_gpu_layers, **threads} for g in gens]}


def write_server_config(settings: Settings, lineage: Lineage, out: Path, *, host: str = "127.0.0.1",
                        port: int = 8080) -> dict:
    """Write it (atomically) and return the export's report."""
    config = server_config(settings, lineage, host=host, port=port)
    atomic_write_text(out, json.dumps(config, indent=2) + "\n")
    return {"format": "llama-cpp-python", "path": str(out.resolve()),
            "generations": [m["model_alias"] for m in config["models"]],
            "run": f"python -m llama_cpp.server --config_file {out.resolve()}",
            "engine_base_url": f"http://{host}:{port}/v1"}
