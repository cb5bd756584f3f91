"""The train_precision setting: what auto picks on each kind of machine, the refusals and their fixes, and
that a cycle refuses before any work (trainer/precision.py, trainer/cycle.py)."""

from __future__ import annotations

import pytest

from config.settings import load_settings
from core.errors import OuroError
from trainer.cycle import run_cycle, train_config
from trainer.precision import choose


@pytest.mark.parametrize("has_cuda, has_bnb, expected, noted", [
    (False, False, "float32", False),
    (False, True, "float32", False),     # bitsandbytes imports on a CPU machine; 4-bit training needs CUDA
    (True, True, "nf4", False),
    (True, False, "bf16", True),         # a CUDA torch without the [cuda] extra: bf16, and the log says why
])
def test_auto_picks_what_the_machine_can_run(has_cuda, has_bnb, expected, noted):
    chosen = choose("auto", has_cuda=has_cuda, has_bnb=has_bnb)
    assert chosen.name == expected
    assert (chosen.note is not None) == noted
    if noted:
        assert "pip install '.[cuda]'" in chosen.note and "make setup" in chosen.note


@pytest.mark.parametrize("requested", ["bf16", "float32"])
@pytest.mark.parametrize("has_cuda, has_bnb", [(False, False), (True, False), (True, True)])
def test_bf16_and_float32_are_taken_as_asked_anywhere(requested, has_cuda, has_bnb):
    assert choose(requested, has_cuda=has_cuda, has_bnb=has_bnb).name == requested


def test_nf4_on_cuda_with_bitsandbytes_is_taken():
    assert choose("nf4", has_cuda=True, has_bnb=True).name == "nf4"


def test_nf4_without_cuda_is_refused_with_the_fix():
    with pytest.raises(OuroError) as err:
        choose("nf4", has_cuda=False, has_bnb=True)
    text = str(err.value) + " " + (err.value.hint or "")
    assert "needs an NVIDIA GPU with CUDA" in text
    assert "OURO_TRAIN_PRECISION=auto" in text and "pip install '.[cuda]'" in text


def test_nf4_without_bitsandbytes_is_refused_with_the_fix():
    with pytest.raises(OuroError) as err:
        choose("nf4", has_cuda=True, has_bnb=False)
    text = str(err.value) + " " + (err.value.hint or "")
    assert "needs bitsandbytes" in text and "pip install '.[cuda]'" in text and "make setup" in text


def test_the_setting_accepts_the_four_values_and_refuses_others(tmp_path, monkeypatch):
    assert load_settings(data_dir=tmp_path).train_precision == "auto"
    monkeypatch.setenv("OURO_TRAIN_PRECISION", "bf16")
    assert load_settings(data_dir=tmp_path).train_precision == "bf16"
    monkeypatch.setenv("OURO_TRAIN_PRECISION", "fp8")
    with pytest.raises(OuroError):
        load_settings(data_dir=tmp_path)


def test_the_cycles_train_config_carries_the_resolved_precision(tmp_path):
    import torch

    settings = load_settings(data_dir=tmp_path, train_precision="bf16")
    assert train_config(settings).precision == "bf16"
    auto = train_config(load_settings(data_dir=tmp_path))
    assert auto.precision == ("float32" if not torch.cuda.is_available() else auto.precision)


def test_a_cycle_asking_for_nf4_where_it_cannot_run_stops_before_any_work(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same answer on a GPU machine
    settings = load_settings(data_dir=tmp_path, train_precision="nf4")
    with pytest.raises(OuroError, match="nf4"):
        run_cycle(settings, store=None, progress=False)   # refused before the store or the models are touched
    assert not settings.models_dir.exists()


def test_bf16_training_on_the_cpu_keeps_a_bf16_checkpoint_whose_gguf_matches(tiny_models, tmp_path):
    import json

    from trainer.convert import logit_agreement, write_gguf
    from trainer.finetune import TrainConfig, train

    chats = [[{"role": "user", "content": f"tea or coffee? #{i}"}, {"role": "assistant", "content": "tea, always 🍵"}]
             for i in range(4)]
    pairs = [([{"role": "user", "content": f"hi #{i}"}], "hiii 👋", "Hello. How may I assist you today?")
             for i in range(2)]
    cfg = TrainConfig(rank=8, alpha=16, lr=2e-3, epochs=1, min_steps=3, batch=2, max_seq_len=128, dpo_steps=2,
                      dpo_lr=1e-3, dpo_epochs=2, seed=3, precision="bf16")
    out = tmp_path / "child"
    result = train(tiny_models / "gen-0000" / "hf", chats, pairs, out, cfg, progress=False)
    assert result.precision == "bf16" and result.trained_tensors_changed > 0.9 and result.dpo_steps == 2
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    write_gguf(out, tiny_models / "gen-0000" / "model.gguf", tmp_path / "child.gguf", dtype="f32")
    assert logit_agreement(out, tmp_path / "child.gguf", [1, 2, 3, 4, 5, 6, 7, 8]).correlation > 0.999


GB = 10**9


@pytest.mark.parametrize("params, free, has_bnb, expected", [
    (0.5e9, 24 * GB, True, "bf16"),      # 1 GB of bf16 weights on a 24 GB card: room to spare, no 4-bit rounding
    (7.2e9, 80 * GB, True, "bf16"),      # a 7B on an 80 GB card
    (7.2e9, 24 * GB, True, "nf4"),       # a 7B on a 24 GB card: 4-bit
    (7.2e9, 24 * GB, False, "bf16"),     # without bitsandbytes: bf16 still fits (14.4 of 24 GB), with the note
    (3.0e9, 7 * GB, True, "nf4"),
])
def test_auto_picks_what_fits_the_card(params, free, has_bnb, expected):
    assert choose("auto", has_cuda=True, has_bnb=has_bnb, params=int(params), card_free=free).name == expected


def test_a_model_too_big_for_the_card_in_bf16_is_refused_before_any_work_with_the_fix():
    with pytest.raises(OuroError) as err:                 # auto, no bitsandbytes: 16.0 GB of bf16 on a 12 GB card
        choose("auto", has_cuda=True, has_bnb=False, params=8_000_000_000, card_free=12 * GB)
    assert "8.0B parameters take 16.0 GB in bf16" in str(err.value) and "12.0 GB free" in str(err.value)
    assert "4-bit QLoRA would fit" in err.value.hint and "pip install '.[cuda]'" in err.value.hint
    with pytest.raises(OuroError) as err:                 # bf16 asked for on the same card
        choose("bf16", has_cuda=True, has_bnb=True, params=8_000_000_000, card_free=12 * GB)
    assert "OURO_TRAIN_PRECISION=auto or nf4" in err.value.hint
    assert choose("nf4", has_cuda=True, has_bnb=True, params=8_000_000_000, card_free=12 * GB).name == "nf4"


def test_the_parameter_count_comes_from_the_gguf_header():
    from lineage.generations import packaged_base_gguf
    from trainer.precision import gguf_parameters

    assert 134_000_000 < gguf_parameters(packaged_base_gguf()) < 136_000_000    # SmolLM2-135M


def test_a_model_too_big_for_the_card_even_in_4_bit_is_refused_before_any_work():
    for requested in ("auto", "nf4"):
        with pytest.raises(OuroError) as err:             # 7.2B: ~4.3 GB in 4-bit, 4 GB free
            choose(requested, has_cuda=True, has_bnb=True, params=7_200_000_000, card_free=4 * GB)
        assert "even in 4-bit" in str(err.value) and "4.0 GB free" in str(err.value)
        assert "OURO_N_GPU_LAYERS" in err.value.hint
    assert choose("nf4", has_cuda=True, has_bnb=True, params=7_200_000_000, card_free=8 * GB).name == "nf4"
