"""Documents in the cycle, end to end on the tiny Llama: the next cycle reads the imported documents in a
continued-pretraining pass before SFT, says how much it read, and the one after reads only newer ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from config.settings import load_settings
from lineage.generations import Lineage
from memory.importers.docs import import_docs
from memory.store import Store
from tests.helpers.lineages import LENIENT, add_reviewed
from trainer.cycle import run_cycle

pytestmark = pytest.mark.model
FIXTURES = Path(__file__).parent / "fixtures" / "docs"


@pytest.fixture
def world(tmp_path, tiny_models):
    data = tmp_path / "data"
    shutil.copytree(tiny_models, data / "models")
    store = Store.open(data / "ouro.db")
    yield load_settings(data_dir=data, **LENIENT, doc_pretrain_lr=3e-3, doc_pretrain_epochs=4), store
    store.close()


def doc_tokens(settings, store) -> list[int]:
    """Tokens of each stored chunk as the documents pass reads it (the parent's tokenizer)."""
    from engine.template import ChatFormat
    from trainer.finetune import load_base
    from trainer.pretrain import encode_documents

    hf = settings.models_dir / "gen-0000" / "hf"
    _, tokenizer = load_base(hf)
    fmt = ChatFormat.from_tokenizer(tokenizer)
    return [sum(map(len, encode_documents([c["text"]], tokenizer, fmt, 4096, 10**6)[0]))
            for c in store.document_chunks()]


def test_the_next_cycle_reads_the_documents_before_sft_within_its_budget_and_the_next_reads_the_rest(world):
    settings, store = world
    add_reviewed(store, 8)
    imported = import_docs(store, FIXTURES)
    assert imported["new_chunks"] == 3
    sizes = doc_tokens(settings, store)
    settings = load_settings(**{**settings.model_dump(), "doc_pretrain_tokens": sizes[0] + sizes[1]})
    stages: list[str] = []
    report = run_cycle(settings, store, progress=False, on_stage=stages.append)
    assert report.status == "promoted", report.reasons
    assert stages.index("documents") < stages.index("train")
    docs = report.data["documents"]
    assert docs["chunks"] == 2 and docs["tokens"] == sizes[0] + sizes[1] and docs["waiting"] == 1
    passed = report.train["documents"]
    assert passed["loss_end"] < passed["loss_start"] and passed["replay_examples"] > 0
    assert report.train["steps"] > 0 and report.scores["recall"] is not None     # SFT and the evals as always
    child = Lineage(settings.models_dir).generation("gen-0001")
    assert not (child.folder / "hf-docs").exists()                              # merged into the SFT base, gone
    first_upto = json.loads((child.folder / "meta.json").read_text())["data"]["documents"]["upto_chunk_id"]
    assert first_upto == store.document_chunks()[1]["id"]

    # the next cycle reads only the chunk left over
    add_reviewed(store, 8, start=8)
    stages.clear()
    report = run_cycle(settings, store, progress=False, on_stage=stages.append)
    assert report.status == "promoted", report.reasons
    assert "documents" in stages
    assert report.data["documents"] == {"chunks": 1, "tokens": sizes[2], "waiting": 0,
                                        "upto_chunk_id": store.document_chunks()[2]["id"]}
