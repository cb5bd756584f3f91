"""`ouro bench train --shape`: a random-weight base of a named size, built here (ouro/bench/shapes.py),
measured through the stages a CPU can run. The tiny shape stands in for 1b/7b, which take the same
code path and only more time and disk."""

from __future__ import annotations

import json

import torch

from ouro.bench.shapes import SHAPES
from ouro.cli import main
from trainer.precision import gguf_parameters


def test_a_shape_is_built_as_a_q4_base_and_its_stages_report_their_own_peaks(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))                 # the bench's scratch folder, checked below
    assert main(["--data-dir", str(tmp_path / "data"), "bench", "train", "--shape", "tiny", "--json"]) == 0
    captured = capfd.readouterr()                                # the children's output too
    report = json.loads(captured.out)
    assert "blk.0.attn_q.weight" not in captured.err             # llama.cpp's per-tensor quantize log stays quiet
    assert report["shape"] == "tiny" and report["model"].startswith("random tiny (0.03B parameters, base-q4_k_m.gguf")
    assert list(report["build"]) == ["weights", "f16_gguf", "quantize"]
    if not torch.cuda.is_available():                            # here: no trainer on the CPU for a shape
        assert report["trained"] is False and report["precision"] == "float32"
        assert [r["stage"] for r in report["stages"]] == ["dequantize", "convert"]
    assert all(r["peak_rss_mb"] > 100 and r["seconds"] > 0 for r in report["stages"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ouro-bench-train-")]   # scratch removed


def test_a_shapes_parameter_count_is_what_its_gguf_holds(tmp_path):
    from ouro.bench.shapes import build_base

    base, steps = build_base("tiny", tmp_path / "tiny", progress=False)
    assert gguf_parameters(base) == SHAPES["tiny"].parameters
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["base-q4_k_m.gguf"]   # bf16 and F16 gone
    assert 6.9e9 < SHAPES["7b"].parameters < 7.5e9 and 1.0e9 < SHAPES["1b"].parameters < 1.6e9
