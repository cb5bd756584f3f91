"""Lineage and store set-ups shared by the cycle, loop and fault tests."""

from __future__ import annotations

import json
from pathlib import Path

from core.files import atomic_write_text, now, sha256_file
from lineage.generations import Generation, Lineage
from tests.helpers.fakes import FakeEngine

# Gate thresholds and run sizes that let a tiny model pass through a whole cycle in seconds.
LENIENT = dict(learn_from="everyone", min_recall=0.0, min_generalization=0.0, max_style_drift=10.0, min_format=0.0,
               max_contamination=1.0, new_account_window_s=0, max_share_per_source=1.0,
               train_epochs=1, train_batch=2, max_seq_len=256, dpo_steps=2, eval_max_items=4, replay_size=4,
               eval_reply_tokens=12)


def add_reviewed(store, n: int, *, start: int = 0, with_pairs: bool = True) -> None:
    for i in range(start, start + n):
        t = store.add_user_turn(chat_id=1000 + i, user_id=1000 + i, text=f"hey, tell me about topic {i}")
        store.complete_turn(t, reply_text=f"ooh topic {i}! totally my favourite thing ✨", generation_id="gen-0000",
                            prompt_tokens=10, completion_tokens=8, latency_s=0.1, ttft_s=0.01, context_start_turn_id=t)
        store.rate(t, 1000 + i, 1)
        if with_pairs and i % 3 == 0:
            store.await_correction(1000 + i, 1000 + i, t)
            store.take_correction(1000 + i, 1000 + i, f"topic {i}? love it, let's dig in 🌊")


def rate_replies(store, gen_id: str, values: list[int], start: int, *, user_id: int | None = None) -> None:
    """One turn per value written by `gen_id`, rated so by its own person (user `start + i`), or
    all by `user_id`."""
    for i, v in enumerate(values):
        uid = user_id if user_id is not None else start + i
        t = store.add_user_turn(chat_id=start + i, user_id=uid, text="hello")
        store.complete_turn(t, reply_text="hi", generation_id=gen_id, prompt_tokens=1, completion_tokens=1,
                            latency_s=0.1, ttft_s=0.01, context_start_turn_id=t)
        store.rate(t, uid, v)


class Loader:
    """Builds fake engines for generations; a set of ids fails to load or returns empty replies."""

    def __init__(self, broken: set[str] = frozenset(), empty: set[str] = frozenset()) -> None:
        self.broken, self.empty, self.engines = set(broken), set(empty), []

    def __call__(self, gen: Generation) -> FakeEngine:
        if gen.id in self.broken:
            raise RuntimeError(f"cannot load {gen.id}")
        engine = FakeEngine([""] if gen.id in self.empty else None, generation_id=gen.id)
        engine.model_sha256 = gen.sha256
        self.engines.append(engine)
        return engine


def make_generation(models_dir: Path, gen_id: str, parent_id: str | None, payload: bytes = b"",
                    status: str = "promoted") -> Generation:
    """A finished generation folder around `payload` (a real GGUF's bytes, or anything when fake
    engines serve it: they never read it)."""
    folder = models_dir / gen_id
    folder.mkdir(parents=True)
    (folder / "model.gguf").write_bytes(payload or gen_id.encode() * 100)
    meta = {"id": gen_id, "parent_id": parent_id, "gguf": "model.gguf",
            "gguf_sha256": sha256_file(folder / "model.gguf"), "created_at": now("seconds"), "status": status}
    atomic_write_text(folder / "meta.json", json.dumps(meta))
    return Lineage(models_dir).generation(gen_id)


def damage_file(path: Path, *, rerecord: bool) -> None:
    """Truncate a GGUF to half; with `rerecord` its meta.json is made to match, so only the GGUF
    check can tell (a file 'placed' in the models folder, not a bit-rotted one)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    if rerecord:
        meta_path = path.parent / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["gguf_sha256"] = sha256_file(path)
        atomic_write_text(meta_path, json.dumps(meta))


def give_constitution(models_dir: Path, gen_id: str, text: str) -> str:
    """Make `gen_id` a generation trained with `text`, as a cycle leaves it: the file, its SHA in meta."""
    from lineage.constitution import write_constitution

    folder = models_dir / gen_id
    sha = write_constitution(folder, text)
    meta = json.loads((folder / "meta.json").read_text())
    atomic_write_text(folder / "meta.json", json.dumps({**meta, "constitution_sha256": sha}))
    return sha
