"""Where the model runs (engine/placement.py): llama.cpp ignores `n_gpu_layers` without a word in a
build without GPU support, so the engine, /status and `ouro status` say so. On this CPU build with
the real packaged model; tests/test_cuda.py checks the offload itself on an NVIDIA GPU."""

from __future__ import annotations

import json
import logging

from engine.llama import LlamaEngine
from engine.placement import Placement, gpu_backends, gpu_devices, placement
from lineage.generations import packaged_base_gguf
from ouro.cli import main

H100 = ("NVIDIA H100 80GB HBM3",)


def test_the_engine_says_where_its_layers_are_and_warns_when_gpu_layers_are_ignored(caplog):
    with caplog.at_level(logging.WARNING):
        default = LlamaEngine(packaged_base_gguf(), generation_id="gen-0000")
        asked = LlamaEngine(packaged_base_gguf(), generation_id="gen-0000", n_gpu_layers=-1)
    try:
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        if gpu_devices():                     # a CUDA build on a GPU machine (tests/test_cuda.py checks more)
            assert default.placement.startswith("CPU; ") and asked.placement.endswith(": 31 of 31 layers")
            assert warned == []
            return
        # this project's CI and this machine: llama.cpp built for the CPU
        assert gpu_backends() == () and default.placement == "CPU"
        assert asked.placement.startswith("CPU — n_gpu_layers = all is ignored: this llama.cpp was built without "
                                          "GPU support") and "make clean-venv setup" in asked.placement
        assert warned == [f"{packaged_base_gguf().name}: {asked.placement}"]    # once, for the engine that asked
    finally:
        default.close()
        asked.close()


def test_layers_on_the_gpu_count_the_output_layer_and_never_exceed_the_model():
    assert placement(0, 31).layers_on_gpu == 0 and not placement(0, 31).ignored
    assert Placement(-1, 31, True, H100).describe() == "GPU (NVIDIA H100 80GB HBM3): 31 of 31 layers"
    assert Placement(99, 31, True, H100).layers_on_gpu == 31
    assert Placement(12, 31, True, H100).describe() == "GPU (NVIDIA H100 80GB HBM3): 12 of 31 layers, the rest on the CPU"
    assert Placement(-1, None, True, H100).describe() == "GPU (NVIDIA H100 80GB HBM3): all layers"
    assert Placement(0, 31, True, H100).describe() == "CPU; NVIDIA H100 80GB HBM3 is free for it (n_gpu_layers = -1)"
    gone = Placement(-1, 31, False, (), ("CUDA",))            # a CUDA build on a machine whose GPU is gone
    assert gone.ignored and gone.describe() == ("CPU — n_gpu_layers = all is ignored: llama.cpp finds no GPU on "
                                                "this machine (built with CUDA)")
    cpu_build = Placement(-1, 31, False, (), ())
    assert cpu_build.ignored and "built without GPU support" in cpu_build.describe()
    unknown = Placement(-1, 31, True, None, None)             # the registry unreadable: llama.cpp's word counts
    assert unknown.describe() == "GPU (device unknown): 31 of 31 layers"


def test_ouro_status_says_where_the_model_would_run_without_a_running_bot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OURO_N_GPU_LAYERS", "-1")
    assert main(["--data-dir", str(tmp_path / "fresh"), "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = "GPU (" if gpu_devices() else "CPU — n_gpu_layers = all is ignored"
    assert report["runs_on"].startswith(expected) and report["runs_on"].endswith("(when serving)")
    assert main(["--data-dir", str(tmp_path / "fresh"), "status"]) == 0
    assert f"Runs on: {expected}" in capsys.readouterr().out


def test_the_cycles_own_models_go_on_the_gpu_only_whole_and_where_they_fit_now():
    from engine.placement import offload_fits

    gb = 10**9
    assert offload_fits(8 * gb, 24 * gb, True)             # a 7B's Q8_0 beside nothing else
    assert not offload_fits(8 * gb, 9 * gb, True)          # the served model took most of the card
    assert not offload_fits(1 * gb, 24 * gb, False)        # a CPU build
    assert not offload_fits(1 * gb, None, True)            # free memory unknown: the CPU, never a guess


def test_evals_and_the_cycles_writers_load_where_the_setting_and_the_card_say(tmp_path):
    from config.settings import load_settings
    from engine.placement import side_job_gpu_layers
    from evals.scoring import EvalModel, cycle_gpu_layers

    gguf = packaged_base_gguf()
    on = load_settings(data_dir=tmp_path)
    assert on.cycle_gpu_offload is True
    assert cycle_gpu_layers(on.model_copy(update={"cycle_gpu_offload": False}), gguf) == 0
    layers = cycle_gpu_layers(on, gguf)
    assert layers == side_job_gpu_layers(gguf) == (-1 if gpu_devices() else 0)      # here: 0, a CPU build
    model = EvalModel(gguf, generation_id="gen-0000", n_gpu_layers=layers)
    try:
        if layers:
            assert model.engine.placement.startswith("GPU (")
        else:
            assert model.engine.placement == "CPU"
    finally:
        model.close()
