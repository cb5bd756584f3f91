"""Merge-and-convert stage: HF <-> GGUF round trips on a tiny random Llama with SmolLM2's real tokenizer.

The tiny model (2 layers, hidden 64, 4 heads / 2 KV heads, tied embeddings like SmolLM2, vocab
49152) is written as a GGUF whose metadata parent is the packaged SmolLM2 file, so tokenizer and
chat template are the real ones while every weight and shape is the tiny model's. Tests that run
llama.cpp are marked `model`.
"""

from __future__ import annotations

import errno
import functools
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from core.errors import OuroError
from engine.gguf import check_gguf, scan_gguf
from lineage.generations import packaged_base_gguf
from trainer import convert
from trainer.convert import (
    QUANT_TYPES,
    compare_logits,
    dequantize_gguf_to_hf,
    logit_agreement,
    quantize_gguf,
    write_gguf,
)

# "<|im_start|>system\nYou are Ouro.<|im_end|>\n<|im_start|>user\nHello! Who are you? 👋<|im_end|>\n
#  <|im_start|>assistant\n" through the packaged GGUF's tokenizer
PROMPT_IDS = [1, 9690, 198, 2683, 359, 492, 1392, 30, 2, 198, 1, 4093, 198, 19556, 17, 6244, 359, 346, 47,
              15107, 235, 229, 2, 198, 1, 520, 9531, 198]
N_LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 2, 64, 4, 2, 128


@functools.cache
def _fields(path: Path) -> dict:
    """Every key/value and tensor type, read back with gguf-py's own reader (slow: cached per file)."""
    reader = gguf.GGUFReader(str(path))
    out = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    out["__tensors__"] = {t.name: t.tensor_type for t in reader.tensors}
    return out


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny HF Llama, and its F32 GGUF whose metadata comes from the packaged SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gguf_export")
    torch.manual_seed(1234)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=N_LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=100000.0,
                         rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norms, so a norm written to the wrong slot would show
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(root / "hf")
    parent = root / "parent-f32.gguf"
    write_gguf(root / "hf", packaged_base_gguf(), parent, dtype="f32")
    return {"root": root, "hf": root / "hf", "parent": parent, "model": model}


@pytest.fixture(scope="module")
def child_f16(tiny):
    out = tiny["root"] / "child-f16.gguf"
    write_gguf(tiny["hf"], tiny["parent"], out, dtype="f16", name="ouro gen-0001")
    return out


# --- metadata -------------------------------------------------------------------------------

def test_shapes_come_from_the_child_and_tokenizer_and_template_from_the_parent(tiny):
    base, parent = _fields(packaged_base_gguf()), _fields(tiny["parent"])
    # architecture keys describe the tiny child, not SmolLM2's 30 x 576
    assert parent["llama.block_count"] == N_LAYERS and base["llama.block_count"] == 30
    assert parent["llama.embedding_length"] == HIDDEN
    assert parent["llama.feed_forward_length"] == FFN
    assert parent["llama.attention.head_count"] == HEADS
    assert parent["llama.attention.head_count_kv"] == KV_HEADS
    assert parent["llama.rope.dimension_count"] == HIDDEN // HEADS
    assert parent["llama.context_length"] == 4096 and parent["llama.vocab_size"] == 49152
    assert parent["llama.rope.freq_base"] == pytest.approx(100000.0)
    assert parent["general.file_type"] == 0 and base["general.file_type"] == 3
    # everything about text is inherited byte for byte
    for key in ("tokenizer.chat_template", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "general.name"):
        assert parent[key] == base[key], key
    # tied embeddings: no output.weight; norms F32, matrices in the requested dtype
    tensors = parent["__tensors__"]
    assert "output.weight" not in tensors and len(tensors) == 2 + 9 * N_LAYERS
    assert set(tensors.values()) == {gguf.GGMLQuantizationType.F32}

    info = check_gguf(tiny["parent"])
    assert info.architecture == "llama" and info.tensor_count == 2 + 9 * N_LAYERS
    assert info.chat_template == base["tokenizer.chat_template"]
    assert info.context_length == 4096


def test_f16_child_keeps_norms_in_f32_and_takes_a_new_name(tiny, child_f16):
    fields = _fields(child_f16)
    parent = _fields(tiny["parent"])
    assert fields["general.file_type"] == 1 and fields["general.name"] == "ouro gen-0001"
    assert fields["tokenizer.ggml.tokens"] == parent["tokenizer.ggml.tokens"]
    assert fields["tokenizer.chat_template"] == parent["tokenizer.chat_template"]
    types = fields["__tensors__"]
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.1.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert _leftovers(tiny["root"]) == []


# --- logits: the two runtimes compute the same function -------------------------------------

@pytest.mark.model
def test_f32_gguf_logits_match_transformers(tiny):
    agreement = logit_agreement(tiny["hf"], tiny["parent"], PROMPT_IDS)
    # measured ~6e-7: only float summation order differs
    assert agreement.max_rel_diff < 1e-3 and agreement.correlation > 0.99999 and agreement.same_argmax
    assert compare_logits(tiny["hf"], tiny["parent"], PROMPT_IDS) == pytest.approx(agreement.max_rel_diff)


@pytest.mark.model
def test_f16_gguf_logits_match_transformers_within_f16_rounding(tiny, child_f16):
    agreement = logit_agreement(tiny["hf"], child_f16, PROMPT_IDS)
    # F16 weights (and llama.cpp's F16 activations in those matmuls) cost precision: measured
    # ~1e-3 relative on this model, so the honest bound is 5e-3, not the F32 case's 1e-3
    assert agreement.max_rel_diff < 5e-3 and agreement.correlation > 0.9999 and agreement.same_argmax


@pytest.mark.model
def test_q8_0_is_smaller_and_still_correlates(tiny, child_f16):
    q8 = tiny["root"] / "child-q8_0.gguf"
    quantize_gguf(tiny["parent"], q8, "Q8_0")
    assert q8.stat().st_size < child_f16.stat().st_size < tiny["parent"].stat().st_size
    info = check_gguf(q8)
    assert info.tensor_count == 2 + 9 * N_LAYERS and info.chat_template
    types = {name: gguf.GGMLQuantizationType(t) for name, (_, t) in scan_gguf(q8).tensors.items()}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32
    agreement = logit_agreement(tiny["hf"], q8, PROMPT_IDS)
    assert agreement.correlation > 0.99, agreement
    assert _leftovers(tiny["root"]) == []


# --- GGUF -> HF ---------------------------------------------------------------------------------

def test_dequantize_round_trip_gives_back_the_exact_weights(tiny):
    out = tiny["root"] / "dequantized"
    dequantize_gguf_to_hf(tiny["parent"], out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == N_LAYERS and config["num_key_value_heads"] == KV_HEADS
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    original = tiny["model"].state_dict()
    for name, tensor in back.state_dict().items():
        # F32 GGUF: the q/k permutation written by write_gguf is undone exactly by transformers
        assert torch.equal(tensor, original[name]), name
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template == _fields(tiny["parent"])["tokenizer.chat_template"]
    assert len(tokenizer) == 49152
    assert _leftovers(tiny["root"]) == []
    with pytest.raises(OuroError, match="already exists"):
        dequantize_gguf_to_hf(tiny["parent"], out)


def test_a_quantized_gguf_is_dequantized_a_shard_at_a_time_as_transformers_loader_would(tiny):
    """The cycle's GGUF → HF reads one tensor at a time into shards (a 7B base no longer has to fit
    in RAM in float32 at once); each tensor equals what transformers' own GGUF loader gives."""
    from transformers import AutoModelForCausalLM

    q8 = tiny["root"] / "parent-q8.gguf"
    quantize_gguf(tiny["parent"], q8, "Q8_0")
    out = tiny["root"] / "dequantized-q8"
    dequantize_gguf_to_hf(q8, out, shard_bytes=1 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) >= 3 and files == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(str(tiny["root"]), gguf_file=q8.name,
                                                     dtype=torch.float32).state_dict()
    assert set(back) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(back[name], tensor), name
    assert not torch.equal(back["model.layers.0.mlp.up_proj.weight"],          # Q8_0 rounded them
                           tiny["model"].state_dict()["model.layers.0.mlp.up_proj.weight"])
    assert _leftovers(tiny["root"]) == []


def test_a_gguf_missing_weights_is_refused_naming_them_and_nothing_is_left(tiny, tmp_path):
    import shutil

    holed = tmp_path / "holed.gguf"
    shutil.copyfile(tiny["parent"], holed)
    reader = gguf.GGUFReader(str(holed), "r+")       # claims one more block than its tensors hold
    reader.fields["llama.block_count"].parts[-1][0] = N_LAYERS + 1
    del reader
    with pytest.raises(OuroError, match=rf"holds no tensor for 9 of the model's weights "
                                        rf"\(e\.g\. model\.layers\.{N_LAYERS}\."):
        dequantize_gguf_to_hf(holed, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holed.gguf"]    # no folder, no temp


# --- failures leave nothing behind --------------------------------------------------------------

def test_unknown_qtype_names_the_allowed_ones_and_writes_nothing(tiny, tmp_path):
    dst = tmp_path / "x.gguf"
    with pytest.raises(OuroError) as err:
        quantize_gguf(tiny["parent"], dst, "Q3_WHATEVER")
    assert all(q in str(err.value) for q in QUANT_TYPES)
    with pytest.raises(OuroError, match="f32, f16, bf16"):
        write_gguf(tiny["hf"], tiny["parent"], dst, dtype="q8")
    assert list(tmp_path.iterdir()) == []


def test_truncated_inputs_are_refused_before_anything_is_written(tiny, tmp_path):
    data = tiny["parent"].read_bytes()
    truncated = tmp_path / "in" / "truncated.gguf"
    truncated.parent.mkdir()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OuroError, match="truncated"):
        quantize_gguf(truncated, out / "q.gguf")
    with pytest.raises(OuroError, match="truncated"):
        write_gguf(tiny["hf"], truncated, out / "child.gguf")
    assert list(out.iterdir()) == []


def test_disk_full_mid_write_removes_the_temp_file(tiny, tmp_path, monkeypatch):
    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def fail_on_third(self, tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_on_third)
    with pytest.raises(OuroError, match="disk full"):
        write_gguf(tiny["hf"], tiny["parent"], tmp_path / "child.gguf")
    assert calls["n"] == 3 and list(tmp_path.iterdir()) == []


def test_failed_quantize_removes_its_partial_output(tiny, tmp_path, monkeypatch):
    import llama_cpp

    def half_written(src, dst, params):
        Path(dst.decode()).write_bytes(b"GGUF partial")
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", half_written)
    with pytest.raises(OuroError, match="could not quantize"):
        quantize_gguf(tiny["parent"], tmp_path / "q.gguf")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_are_never_exported(tiny, tmp_path, monkeypatch):
    real = convert._encode

    def poisoned(plan, data, dtype):
        if plan.gguf_name == "blk.1.ffn_down.weight":
            data = data.copy()
            data[0, 0] = np.nan
        return real(plan, data, dtype)

    monkeypatch.setattr(convert, "_encode", poisoned)
    with pytest.raises(OuroError, match="NaN"):
        write_gguf(tiny["hf"], tiny["parent"], tmp_path / "child.gguf")
    assert list(tmp_path.iterdir()) == []


def tiny_gguf(path: Path, arch: str, template: str | None) -> Path:
    """A small but complete GGUF of `arch` (one tensor), with or without a chat template."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    if template is not None:
        writer.add_chat_template(template)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,template,message", [
    ("falcon", "{{ messages }}", "'falcon' model; the learning loop supports: Llama"),
    ("gpt2", "{{ messages }}", "'gpt2' model"),
    ("llama", None, "carries no chat template"),
])
def test_registration_refuses_what_the_loop_cannot_train_before_anything_is_written(tmp_path, arch, template, message):
    from config.settings import load_settings
    from serving.runtime import open_store, register_base

    base = tiny_gguf(tmp_path / f"{arch}.gguf", arch, template)
    settings = load_settings(data_dir=tmp_path / "data", base_model=base)
    store = open_store(settings)
    try:
        with pytest.raises(OuroError, match=message):
            register_base(settings, store)
        assert not (settings.models_dir / "gen-0000").exists() and list(settings.models_dir.glob(".gen-*")) == []
        assert store.generation("gen-0000") is None
    finally:
        store.close()
    assert check_gguf(base).architecture == arch            # a readable file: refused for what it is, not as corrupt


def test_a_gpu_cycles_base_is_dequantized_in_bf16(tiny, tmp_path):
    """nf4 and bf16 training read the base in bf16 anyway: generation 0's copy is kept so (half the
    disk and reading of float32); a CPU cycle keeps float32."""
    from tests.helpers.lineages import make_generation
    from trainer.cycle import ensure_full_precision

    gen = make_generation(tmp_path / "models", "gen-0000", None, payload=tiny["parent"].read_bytes())
    hf = ensure_full_precision(gen, "nf4")
    assert json.loads((hf / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    weights = load_file(str(hf / "model.safetensors"))
    original = tiny["model"].state_dict()
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    for name, tensor in weights.items():       # the F32 file's exact weights, rounded to bf16
        assert torch.equal(tensor, original[name].to(torch.bfloat16)), name
    assert ensure_full_precision(gen, "float32") == hf          # made once per lineage, then reused
