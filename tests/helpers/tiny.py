"""A tiny generation 0 built by the tests themselves: a 2-layer random Llama with SmolLM2's
real tokenizer and chat template, as full-precision weights and as a GGUF. No downloads."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from core.files import atomic_write_text, now, sha256_file
from lineage.generations import GEN_ZERO, Lineage, packaged_base_gguf


@functools.cache
def _tokenizer_dir(cache: Path) -> Path:
    """SmolLM2's tokenizer, loaded once from the packaged GGUF and saved as HF files."""
    from transformers import AutoTokenizer

    out = cache / "tokenizer"
    if not (out / "tokenizer_config.json").exists():
        gguf = packaged_base_gguf()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(out)
    return out


def build_tiny_base(models_dir: Path, cache: Path, *, seed: int = 1234) -> Lineage:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.convert import write_gguf

    gen = models_dir / GEN_ZERO
    (gen / "hf").mkdir(parents=True)
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(gen / "hf")
    AutoTokenizer.from_pretrained(_tokenizer_dir(cache)).save_pretrained(gen / "hf")
    write_gguf(gen / "hf", packaged_base_gguf(), gen / "model.gguf", dtype="f32", name="tiny gen-0000")
    meta = {"id": GEN_ZERO, "parent_id": None, "gguf": "model.gguf", "gguf_sha256": sha256_file(gen / "model.gguf"),
            "created_at": now("seconds"), "status": "base", "source": "tests/helpers/tiny.py"}
    atomic_write_text(gen / "meta.json", json.dumps(meta))
    lineage = Lineage(models_dir)
    lineage.set_active(GEN_ZERO)
    lineage.append_ledger({"GEN_ID": GEN_ZERO, "child_sha": meta["gguf_sha256"], "event": "base", "actor": "test"})
    return lineage
