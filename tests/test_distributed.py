"""Training in several processes (trainer/distributed.py, trainer/train_job.py) equals training in one.

The same tiny model, the same rows and settings: `train` in this process, then the same job in two
CPU processes over gloo, launched for real through torch.distributed.run. Each process reads half
of every batch; the adapters (as merged weights minus the base) and the step losses must agree
within float rounding. And a machine that cannot run the processes asked for says so clearly.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest
import torch

from config.settings import load_settings
from core.errors import OuroError
from lineage.generations import Lineage
from memory.store import Store
from tests.helpers.lineages import LENIENT, add_reviewed
from trainer import train_job
from trainer.cycle import run_cycle
from trainer.dataset import DPOPair
from trainer.distributed import SINGLE, Group, check_processes
from trainer.finetune import TrainConfig, train
from trainer.kto import KTOItem
from trainer.pretrain import PretrainConfig, continue_pretraining

PERSONA = "You are Mia 🌸: warm, playful, brief."


def chats(n: int, seed: int = 5) -> list[list[dict]]:
    rng = random.Random(seed)
    topics = ["tea 🍵", "rain 🌧️", "cats 🐈", "pizza 🍕", "guitar 🎸", "books 📚"]
    out = []
    for i in range(n):
        topic = rng.choice(topics)
        reply = f"{topic} is the best, obviously 😄" + " truly" * rng.randint(0, 6)   # rows of unequal length
        out.append([{"role": "system", "content": PERSONA},
                    {"role": "user", "content": f"what do you think about {topic}? #{i}"},
                    {"role": "assistant", "content": reply}])
    return out


def weights_of(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_two_gloo_processes_train_the_adapter_one_process_trains(tiny_models, tmp_path):
    base = tiny_models / "gen-0000" / "hf"
    examples = chats(10)
    weights = [1.0, 3.0] * 5      # tier weights: label_weights in the batches
    kto = [KTOItem(c[:2], c[2]["content"], i % 2 == 0, 1.0 + i % 3) for i, c in enumerate(chats(5, seed=9))]
    # a global batch of 4 rows (2 a process), the KL term on, a KTO pass in batches of 3 (2 + 1 a process)
    cfg = TrainConfig(rank=4, alpha=8, lr=5e-3, batch=4, epochs=1, min_steps=1, max_epochs=1, max_steps=3,
                      max_seq_len=64, kl_beta=0.5, lr_schedule="cosine", kto_steps=2, kto_batch=3, kto_lr=5e-3,
                      seed=7)
    one = train(base, examples, [], tmp_path / "one", cfg, progress=False, weights=weights, kto_items=kto)
    steps: list[tuple[int, int]] = []
    two = train_job.finetune(2, base, examples, [], tmp_path / "two", cfg, tmp_path / "job",
                             weights=weights, kto_items=kto, on_step=lambda k, n: steps.append((k, n)))

    assert (one.steps, one.batch, one.rows, one.tokens) == (two.steps, two.batch, two.rows, two.tokens) == \
        (3, 4, one.rows, one.tokens)
    assert steps == [(1, 3), (2, 3), (3, 3)]          # the main process's progress reached the launcher
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    assert two.kto_steps == one.kto_steps == 2
    assert two.kto_loss_end == pytest.approx(one.kto_loss_end, rel=1e-4)
    assert two.kto_margin_end == pytest.approx(one.kto_margin_end, rel=1e-3, abs=1e-5)
    parent, a, b = weights_of(base), weights_of(tmp_path / "one"), weights_of(tmp_path / "two")
    moved = max((a[k] - parent[k]).abs().max().item() for k in parent)
    apart = max((a[k] - b[k]).abs().max().item() for k in parent)
    assert moved > 1e-3                                # training did change the weights…
    assert apart <= 1e-3 * moved                       # …and two processes changed them the same way (6.6e-5 seen)
    assert not (tmp_path / "job" / "error-rank0.json").exists()


def test_with_preference_pairs_the_main_process_finishes_alone_and_equal(tiny_models, tmp_path):
    """trl's DPOTrainer cannot share the group's steps: SFT runs in both processes, then the main one
    leaves the group and runs DPO alone — the same DPO a single process runs on the same adapter."""
    base = tiny_models / "gen-0000" / "hf"
    examples = chats(6)
    pairs = [DPOPair([{"role": "user", "content": f"how are you? #{i}"}], f"great, you? 😄 #{i}",
                     f"As an AI, I'd be happy to help. #{i}") for i in range(2)]
    cfg = TrainConfig(rank=4, alpha=8, lr=5e-3, batch=4, epochs=1, min_steps=1, max_epochs=1, max_steps=2,
                      max_seq_len=64, kl_beta=0.0, dpo_steps=1, dpo_lr=5e-3, seed=7)
    one = train(base, examples, pairs, tmp_path / "one", cfg, progress=False)
    two = train_job.finetune(2, base, examples, pairs, tmp_path / "two", cfg, tmp_path / "job")

    assert two.dpo_steps == one.dpo_steps == 1
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    assert two.dpo_margin_start == pytest.approx(one.dpo_margin_start, rel=1e-4)
    assert two.dpo_margin_end == pytest.approx(one.dpo_margin_end, rel=1e-4)
    parent, a, b = weights_of(base), weights_of(tmp_path / "one"), weights_of(tmp_path / "two")
    moved = max((a[k] - parent[k]).abs().max().item() for k in parent)
    assert max((a[k] - b[k]).abs().max().item() for k in parent) <= 1e-3 * moved


def test_the_documents_pass_in_two_processes_equals_one(tiny_models, tmp_path):
    """The continued-pretraining pass: the same SFT loop, and its before/after losses read in shares."""
    base = tiny_models / "gen-0000" / "hf"
    docs = ["The blue tomatoes of plot 17 ripen late, never before the first week of September. "
            "Mulch them with straw and water at the roots.",
            "Nettle soup: pick the top four leaves of young nettles in April, simmer with one potato."]
    replay = chats(3)
    cfg = PretrainConfig(epochs=3, lr=1e-2, batch=2, max_seq_len=64, rank=4, alpha=8, seed=3)
    one = continue_pretraining(base, docs, replay, tmp_path / "one", cfg)
    two = train_job.pretrain(2, base, docs, replay, tmp_path / "two", cfg, tmp_path / "job")
    assert one.steps == two.steps >= 3 and one.tokens == two.tokens and one.replay_examples >= 1
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    assert (two.loss_start, two.loss_end) == pytest.approx((one.loss_start, one.loss_end), rel=1e-5)
    assert (two.chat_loss_start, two.chat_loss_end) == pytest.approx((one.chat_loss_start, one.chat_loss_end), rel=1e-5)
    parent, a, b = weights_of(base), weights_of(tmp_path / "one"), weights_of(tmp_path / "two")
    moved = max((a[k] - parent[k]).abs().max().item() for k in parent)
    assert moved > 1e-3 and max((a[k] - b[k]).abs().max().item() for k in parent) <= 1e-3 * moved


def test_a_process_count_this_machine_cannot_run_is_a_clear_error(tiny_models, tmp_path):
    cores = os.cpu_count() or 1
    with pytest.raises(OuroError, match=f"{cores} CPU core") as info:
        train_job.finetune(cores + 1, tiny_models / "gen-0000" / "hf", chats(2), [], tmp_path / "out",
                           TrainConfig(), tmp_path / "job")
    assert "OURO_TRAIN_PROCESSES" in info.value.hint
    assert not (tmp_path / "out").exists()
    with pytest.raises(OuroError, match="gloo"):
        check_processes(2, cores=8, cuda_devices=0, gloo=False)
    with pytest.raises(OuroError, match="1 GPU"):
        check_processes(2, cores=8, cuda_devices=1, gloo=True)
    assert check_processes(1) == "single"
    assert check_processes(2, cores=2, cuda_devices=0, gloo=True) == "gloo"
    assert check_processes(4, cores=2, cuda_devices=4, gloo=False) == "nccl"


@pytest.mark.model   # the candidate's GGUF goes through llama.cpp's evals
def test_a_cycle_with_two_training_processes_trains_in_them_and_cleans_up(tiny_models, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_models, data / "models")
    settings = load_settings(data_dir=data, **{**LENIENT, "train_processes": 2, "train_max_steps": 4})
    store = Store.open(settings.db_path)
    try:
        add_reviewed(store, 6)
        stages: list[str] = []
        report = run_cycle(settings, store, progress=False, on_stage=stages.append)
        assert report.status == "promoted", report.reasons
        assert report.train["steps"] == 4 and report.train["dpo_steps"] >= 1
        child = Lineage(settings.models_dir).generation("gen-0001")
        assert {p.name for p in child.folder.iterdir()} >= {"hf", "model.gguf", "data"}
        assert not (child.folder / "train-job").exists()     # the job folder (a copy of the data) is gone

        bad = load_settings(data_dir=data, **{**LENIENT, "train_processes": (os.cpu_count() or 1) + 1})
        add_reviewed(store, 3, start=50)
        with pytest.raises(OuroError, match="failed during train: train_processes="):
            run_cycle(bad, store, progress=False)
        assert Lineage(settings.models_dir).active_id() == "gen-0001"
    finally:
        store.close()


def test_one_process_shards_nothing():
    rows = list(range(7))
    assert SINGLE.shard(rows) == rows and not SINGLE.active and SINGLE.main
    assert [Group(rank=r, world=3).shard(rows) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert Group(rank=2, world=3).shard(rows[:2]) == []     # a batch smaller than the world
