"""`ouro base scratch`: a tiny model trained from nothing on a corpus written here lowers its held-out
loss, its Q8_0 GGUF answers a chat in llama.cpp with the ChatML template, a killed run continues from
its checkpoint, and nothing is written when there is no corpus or a lineage already exists."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace

import pytest
import torch

from core.errors import OuroError
from engine.template import CHATML, render_chat
from lineage.generations import GEN_ZERO, Lineage
from memory.importers.docs import import_docs
from ouro.cli import main
from trainer import scratch
from trainer.scratch import SIZES, build_base

TINY = SIZES["tiny"]
TOPICS = ["the garden", "the river", "the kitchen", "the old bicycle", "the market", "the library"]


def seed_corpus(store, tmp_path) -> None:
    """Six short documents (the real docs importer) and eight chat windows, one held out."""
    folder = tmp_path / "writing"
    folder.mkdir()
    for i, topic in enumerate(TOPICS):
        lines = [f"In the morning I walked to {topic} and counted {n} birds on the fence." for n in range(3, 15)]
        lines += [f"I'm sure {topic} looks better in spring; isn't it lovely? {i}"]
        (folder / f"note-{i}.md").write_text("\n\n".join(lines), encoding="utf-8")
    import_docs(store, folder)
    examples = []
    for i in range(8):
        messages = [{"role": "user", "content": f"how was {TOPICS[i % 6]} today?"},
                    {"role": "assistant", "content": f"quiet, I counted {i + 3} birds there 🙂"},
                    {"role": "user", "content": "nice!"},
                    {"role": "assistant", "content": "see you tomorrow"}]
        sha = hashlib.sha256(json.dumps(messages).encode()).hexdigest()
        examples.append({"messages": messages, "split": "heldout" if i == 7 else "train",
                         "ended_at": f"2026-01-0{i + 1}T10:00:00", "sha256": sha})
    store.add_import(kind="whatsapp", file="chat.txt", file_sha256="0" * 64, owner="Ann", summary={},
                     examples=examples)


class Killed(Exception):
    """Stands in for a kill: raised from the step hook, after that step's checkpoint logic ran."""


def kill_at(step_to_die: int, seen: list[int]):
    def on_step(step: int, total: int) -> None:
        seen.append(step)
        if step == step_to_die:
            raise Killed
    return on_step


def test_a_tiny_model_learns_and_its_q8_gguf_answers_a_chat_in_llama_cpp(settings, store, tmp_path, capsys):
    from llama_cpp import Llama

    from engine.llama import model_params

    seed_corpus(store, tmp_path)
    assert main(["--data-dir", str(settings.data_dir), "base", "scratch", "--size", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["best_loss"] < report["loss_start"] - 1.0, report["curve"]
    assert report["steps"] == TINY.steps and report["resumed_from"] is None
    assert report["corpus"] == {"chat_windows": 8, "document_chunks": 6, "train_texts": 12, "heldout_texts": 2}
    lineage = Lineage(settings.models_dir)
    gen = lineage.active()
    assert gen.id == GEN_ZERO and gen.parent_id is None and gen.meta["source"] == "ouro base scratch --size tiny"
    assert store.generation(GEN_ZERO)["gguf_sha256"] == gen.sha256
    assert [r["event"] for r in lineage.ledger()] == ["base"] and lineage.ledger()[0]["steps"] == str(TINY.steps)
    for name in ("model.gguf", "model-f16.gguf", "model-f32.gguf", "hf/config.json", "scratch-loss.png"):
        assert (gen.folder / name).is_file(), name
    assert report["logit_correlation"] > 0.999
    assert "FROM " + str(gen.gguf.resolve()) in (settings.data_dir / "exports" / "gen-0000.Modelfile").read_text()
    assert not (settings.data_dir / "scratch").exists()   # finished: checkpoints cleaned up

    with model_params(extra_buffers=False):
        llm = Llama(model_path=str(gen.gguf), n_ctx=256, verbose=False, seed=1)
    try:
        assert llm.metadata["tokenizer.chat_template"] == CHATML
        # llama.cpp splits text exactly as the trainer's tokenizer did (same BPE, same pre-tokenizer)
        text = render_chat(CHATML, [{"role": "user", "content": "I'm 42, naïve 🙂 — isn't it?\n\tOK"}], True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == trained_ids(gen, text)
        messages = [{"role": "system", "content": "You are Ouro."}, {"role": "user", "content": "how was the river?"}]
        out = llm.create_chat_completion(messages=messages, max_tokens=24, temperature=0.0)
    finally:
        llm.close()
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and out["usage"]["completion_tokens"] >= 1
    assert choice["finish_reason"] in ("stop", "length") and "<|im_" not in choice["message"]["content"]
    prompt = render_chat(CHATML, messages, True)   # what the GGUF's template renders
    assert out["usage"]["prompt_tokens"] == len(trained_ids(gen, prompt))


def trained_ids(gen, text):
    from trainer.bpe import load_tokenizer

    return load_tokenizer(gen.folder / "hf" / "tokenizer.json").encode(text).ids


def test_a_killed_run_continues_from_its_checkpoint_not_from_the_start(settings, store, tmp_path, monkeypatch):
    size = replace(TINY, steps=30, eval_every=10, checkpoint_every=10)
    seed_corpus(store, tmp_path)
    first: list[int] = []
    with pytest.raises(Killed):
        build_base(settings, store, size=size, progress=False, on_step=kill_at(15, first))
    assert first == list(range(1, 16))
    saved = torch.load(settings.data_dir / "scratch" / "tiny" / scratch.CHECKPOINT, weights_only=True)
    assert json.loads(saved["state"])["step"] == 10
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {10}
    assert Lineage(settings.models_dir).active_id() is None   # nothing registered by a killed run

    second: list[int] = []
    report = build_base(settings, store, size=size, progress=False, on_step=kill_at(-1, second))
    assert report["resumed_from"] == 10 and second == list(range(11, 31)) and report["steps"] == 30

    # the same as a run never interrupted: weights, optimizer, schedule and data order all continued
    corpus = scratch.load_corpus(store, settings.persona())
    (tmp_path / "ref").mkdir()
    reference = scratch.train(size, tmp_path / "ref", corpus, progress=False)
    assert [c["heldout_loss"] for c in report["curve"]] == [c["heldout_loss"] for c in reference.curve]


def test_an_unfinished_run_on_another_corpus_is_refused_until_restarted(settings, store, tmp_path):
    size = replace(TINY, steps=30, checkpoint_every=1)
    seed_corpus(store, tmp_path)
    with pytest.raises(Killed):
        build_base(settings, store, size=size, progress=False, on_step=kill_at(2, []))
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "new.txt").write_text("A new page about the harbour.\n\nAnd another one.", encoding="utf-8")
    import_docs(store, tmp_path / "more")
    with pytest.raises(OuroError, match="another corpus") as err:
        build_base(settings, store, size=size, progress=False)
    assert "--restart" in err.value.hint
    seen: list[int] = []
    with pytest.raises(Killed):
        build_base(settings, store, size=size, progress=False, restart=True, on_step=kill_at(1, seen))
    assert seen == [1]


def test_no_corpus_is_an_error_that_writes_nothing(settings, capsys):
    assert main(["--data-dir", str(settings.data_dir), "base", "scratch", "--size", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "nothing to train on" in err and "ouro import docs" in err
    assert not (settings.data_dir / "scratch").exists() and not settings.models_dir.exists()


def test_an_existing_lineage_is_refused_unless_replaced(settings, store, tmp_path, tiny_models):
    shutil.copytree(tiny_models, settings.models_dir)
    old = Lineage(settings.models_dir).active()
    store.upsert_generation(gen_id=old.id, parent_id=None, gguf_path=str(old.gguf), gguf_sha256=old.sha256,
                            status="base")
    seed_corpus(store, tmp_path)
    with pytest.raises(OuroError, match="already has a lineage") as err:
        build_base(settings, store, size="tiny", progress=False)
    assert "--replace-lineage" in err.value.hint
    assert not (settings.data_dir / "scratch").exists() and Lineage(settings.models_dir).active().sha256 == old.sha256

    report = build_base(settings, store, size=replace(TINY, steps=10), progress=False, replace_lineage=True)
    new = Lineage(settings.models_dir).active()
    assert new.meta["source"].startswith("ouro base scratch") and new.sha256 != old.sha256
    moved = Lineage(settings.data_dir / report["old_lineage"].rsplit("/", 1)[1])
    assert moved.active().sha256 == old.sha256 and moved.ledger()   # set aside whole, nothing deleted
    assert store.generation(GEN_ZERO)["gguf_sha256"] == new.sha256
    replaced = store.events("lineage_replaced")
    assert len(replaced) == 1 and old.sha256 in replaced[0]["detail"]


def test_the_next_cycle_fine_tunes_a_scratch_base_like_any_other(tmp_path):
    from config.settings import load_settings
    from memory.store import Store
    from tests.helpers.lineages import LENIENT, add_reviewed
    from trainer.cycle import run_cycle

    settings = load_settings(data_dir=tmp_path / "data", **LENIENT)
    store = Store.open(settings.db_path)
    try:
        seed_corpus(store, tmp_path)
        build_base(settings, store, size=replace(TINY, steps=20), progress=False)
        add_reviewed(store, 6)
        report = run_cycle(settings, store, progress=False)
    finally:
        store.close()
    assert report.status == "promoted", report.reasons
    lineage = Lineage(settings.models_dir)
    child = lineage.active()
    assert child.parent_id == GEN_ZERO and report.train["trained_tensors_changed"] > 0
    # the child inherits the scratch tokenizer and template from its parent's GGUF
    from engine.gguf import scan_gguf

    parent_kv, child_kv = scan_gguf(lineage.generation(GEN_ZERO).gguf).kv, scan_gguf(child.gguf).kv
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert child_kv[key][0] == parent_kv[key][0]
