"""A bot served by a recording fake over a copy of the tiny lineage, with reviewed turns to learn
from: the set-up the tests of the cycle as a process share (tests/test_cycle_process.py,
tests/test_faults_cycle.py), so what they differ in stands out."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from engine.worker import InferenceWorker
from lineage.generations import Lineage
from memory.store import Store
from tests.helpers.fakes import FakeEngine
from tests.helpers.lineages import add_reviewed


@dataclass
class FakeServedBot:
    data: Path
    lineage: Lineage
    store: Store
    serving: FakeEngine
    worker: InferenceWorker
    told: list[str] = field(default_factory=list)   # what admins were told, in order

    async def notify(self, text: str) -> None:
        self.told.append(text)

    def close(self) -> None:
        self.worker.close()
        self.store.close()


def fake_served_bot(tmp_path: Path, tiny_models: Path, *, reviewed: int, with_pairs: bool = True) -> FakeServedBot:
    """gen-0000 (the tiny model) active and served by a FakeEngine that claims its SHA-256."""
    data = tmp_path / "data"
    shutil.copytree(tiny_models, data / "models")
    lineage = Lineage(data / "models")
    store = Store.open(data / "ouro.db")
    add_reviewed(store, reviewed, with_pairs=with_pairs)
    serving = FakeEngine(generation_id="gen-0000")
    serving.model_sha256 = lineage.active().sha256
    return FakeServedBot(data, lineage, store, serving, InferenceWorker(serving))
