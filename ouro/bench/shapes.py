"""Random-weight bases of the sizes people bring, for `ouro bench train --shape`.

The memory goals of a cycle are about size (a 7B cycle must fit 32 GB of RAM and a 24 GB card), and
no 7B file is downloaded here: the bench writes one. Each shape is a Llama-architecture model
(Mistral-7B's widths for `7b`, Llama 3.2 1B's for `1b`) with the packaged SmolLM2's tokenizer and
chat template, random weights, written as an F16 GGUF tensor by tensor and quantized to Q4_K_M —
the kind of file a user registers as generation 0. Random weights train and convert exactly as
real ones cost; only what they say is noise.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.peak import peak_rss_mb, reset_peak_rss


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int

    @property
    def parameters(self) -> int:
        """With SmolLM2's 49,152-token vocabulary, embeddings untied."""
        head = self.hidden // self.heads
        attn = 2 * self.hidden * self.heads * head + 2 * self.hidden * self.kv_heads * head
        block = attn + 3 * self.hidden * self.ffn + 2 * self.hidden
        return self.layers * block + 2 * VOCAB * self.hidden + self.hidden


VOCAB = 49152
SHAPES = {
    "tiny": Shape(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512),          # tests
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192),       # Llama 3.2 1B's widths
    "7b": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336),      # Mistral 7B's
}


def build_base(name: str, folder: Path, *, quantization: str = "Q4_K_M", progress: bool = True) -> tuple[Path, dict]:
    """Write the shape's base GGUF in `folder` (which must be empty or absent); returns its path and
    each build step's seconds and peak RSS. The bf16 safetensors and the F16 GGUF on the way are
    deleted as soon as the next step has read them (a 7B needs ~15 GB of disk for each)."""
    from lineage.generations import packaged_base_gguf
    from trainer.convert import quantize_gguf, write_gguf

    shape = SHAPES[name]
    folder.mkdir(parents=True, exist_ok=True)
    hf = folder / "hf"
    hf.mkdir()
    steps: dict[str, dict] = {}

    @contextlib.contextmanager
    def step(label: str):
        """Each step's seconds and its own peak RSS (trainer/peak.py)."""
        reset_peak_rss()
        t0 = time.perf_counter()
        yield
        steps[label] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}

    with step("weights"):
        _write_random_weights(name, shape, hf, progress)
    with step("f16_gguf"):
        f16 = folder / "base-f16.gguf"
        write_gguf(hf, packaged_base_gguf(), f16, dtype="f16", name=f"random {name}")
        shutil.rmtree(hf)
    with step("quantize"):
        base = folder / f"base-{quantization.lower()}.gguf"
        quantize_gguf(f16, base, quantization)
        f16.unlink()
    return base, steps


def _write_random_weights(name: str, shape: Shape, hf: Path, progress: bool) -> None:
    """The shape's config.json and bf16 weights in `hf`, a safetensors file per block."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    head = shape.hidden // shape.heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape.hidden,
              "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
              "num_key_value_heads": shape.kv_heads, "intermediate_size": shape.ffn, "vocab_size": VOCAB,
              "head_dim": head, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16"}
    (hf / "config.json").write_text(json.dumps(config), encoding="utf-8")
    generator = torch.Generator().manual_seed(1234)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) * 0.02).to(torch.bfloat16)

    files = shape.layers + 2
    weight_map = {}
    with tqdm(total=files, desc=f"random {name} weights", unit="file", disable=not progress) as bar:
        for k in range(files):
            if k == 0:
                tensors = {"model.embed_tokens.weight": matrix(VOCAB, shape.hidden)}
            elif k == files - 1:
                tensors = {"lm_head.weight": matrix(VOCAB, shape.hidden),
                           "model.norm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16)}
            else:
                p = f"model.layers.{k - 1}."
                tensors = {p + "self_attn.q_proj.weight": matrix(shape.heads * head, shape.hidden),
                           p + "self_attn.k_proj.weight": matrix(shape.kv_heads * head, shape.hidden),
                           p + "self_attn.v_proj.weight": matrix(shape.kv_heads * head, shape.hidden),
                           p + "self_attn.o_proj.weight": matrix(shape.hidden, shape.heads * head),
                           p + "mlp.gate_proj.weight": matrix(shape.ffn, shape.hidden),
                           p + "mlp.up_proj.weight": matrix(shape.ffn, shape.hidden),
                           p + "mlp.down_proj.weight": matrix(shape.hidden, shape.ffn),
                           p + "input_layernorm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16),
                           p + "post_attention_layernorm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16)}
            file = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
            save_file(tensors, str(hf / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            bar.update(1)
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}),
                                                     encoding="utf-8")
