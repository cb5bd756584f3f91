"""Merge-and-convert stage: full-precision HF weights in, a servable GGUF out, and a logit check between them.

The learning cycle trains on transformers weights but serves GGUF through llama.cpp, so every
generation crosses that border twice:

    parent GGUF --dequantize_gguf_to_hf--> HF folder --(LoRA, merge)--> child HF folder
    child HF folder --write_gguf(parent)--> F16/F32 GGUF --quantize_gguf--> Q8_0 / Q4_K_M GGUF

The child GGUF inherits everything that is *not* about its weights (tokenizer, chat template,
general.* names) from its parent's file, so the bot renders prompts exactly as before; every
architecture hyper-parameter is taken from the child's own config, because that is what its
weights were trained with. `logit_agreement` is the gate's proof that the two runtimes compute the
same function.

Architectures (`ARCHITECTURES`): Llama (with Mistral, SmolLM, Llama 3.x), Qwen2/2.5, Qwen3,
Gemma 2, Gemma 3 (text) and Phi-3. HF -> GGUF uses gguf-py's per-architecture tensor name maps
(`gguf.get_tensor_name_map`, the same tables llama.cpp's converter uses) plus the few transforms
that converter applies per family, read from its classes in conversion/{llama,qwen,gemma,phi}.py:
llama's q/k row permutation, Gemma's `1 + w` norms (transformers' GGUF loader subtracts the 1
again), Phi-3's fused qkv/gate_up (kept fused: llama.cpp's phi3 reads them so), Qwen2's q/k/v
biases and Qwen3/Gemma 3's q/k norms (plain renames). Why not llama.cpp's convert_hf_to_gguf.py
itself: the llama-cpp-python wheel does not install it (only its source distribution carries
vendor/llama.cpp), and its `conversion` package needs the gguf-py vendored beside it, which
differs from the released gguf 0.19.0 this project (and transformers) import; loading both
means shadowing `gguf` process-wide or vendoring ~10k lines. Its vocabulary code would also
rebuild the tokenizer from HF files, while the child must copy its parent's tokenizer and
template byte for byte. The per-family code here is ~60 lines of tables, and every family is
proven by logit parity in tests/test_architectures.py.

`dequantize_gguf_to_hf` completes transformers' GGUF config with what its loader leaves at
defaults (`_config_from_gguf`: Gemma's query scale, soft-capping and sliding window, Gemma 3's
local RoPE base, Qwen3's head_dim, Phi-3's window, Llama 3.1+'s RoPE scaling recovered from its
rope_freqs tensor), so HF computes what llama.cpp computes; `write_gguf` writes that tensor back.

Every writer here builds its output under a hidden temporary name in the destination folder and
renames it into place at the end, so a reader never sees a half-written model; on failure the
temporary is removed and an `OuroError` says why.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import OuroError
from engine.gguf import scan_gguf

log = logging.getLogger(__name__)

# Parent keys that describe the parent's tensors or encoding, never the child's.
_NOT_INHERITED = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}

# llama.cpp ftype for each GGUF dtype write_gguf can produce (values of enum llama_ftype).
_WRITE_DTYPES = {"f32": 0, "f16": 1, "bf16": 32}

# quantize_gguf targets -> llama_ftype enum value names in llama_cpp.
QUANT_TYPES = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
}


# --- shared helpers -------------------------------------------------------------------------

def _write_error(exc: BaseException, target: Path) -> OuroError:
    """Turn an OSError into a message a person can act on (disk full is the common one)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return OuroError(f"disk full while writing {target}; nothing was written",
                         hint=f"free space on the disk that holds {target.parent}")
    if isinstance(exc, OSError):
        return OuroError(f"could not write {target}: {exc.strerror or exc}")
    return OuroError(f"could not write {target}: {exc}")


def _temp_path_for(target: Path) -> Path:
    """A unique hidden file next to `target` (same filesystem, so os.replace is atomic)."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def _atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temp path; on success fsync it and rename it to `target`, on any failure delete it."""
    target = Path(target)
    if not target.parent.is_dir():
        raise OuroError(f"cannot write {target}: folder {target.parent} does not exist")
    try:
        tmp = _temp_path_for(target)
    except OSError as exc:
        raise _write_error(exc, target) from exc
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OuroError) or not isinstance(exc, Exception):
            raise
        raise _write_error(exc, target) from exc


# --- 1. GGUF -> HF (generation 0's trainable weights) ----------------------------------------

def _config_from_gguf(config: Any, scan: Any, path: Path) -> None:
    """Complete the config transformers' GGUF loader builds with the facts it leaves at defaults.

    transformers maps only the common keys (widths, heads, rope base); for the rest it keeps its
    config class's defaults, which are right for the published checkpoints but not for every
    GGUF (a tiny or fine-tuned Gemma has another head_dim, and llama.cpp's query scale follows
    head_dim, not `query_pre_attn_scalar`'s default of 256). Each fact set here is one llama.cpp
    reads from the same file (or hard-codes), so HF computes what llama.cpp computes.
    """
    arch = scan.text("general.architecture")

    def kv(key: str, default: Any = None) -> Any:
        item = scan.kv.get(f"{arch}.{key}")
        return default if item is None else item[0]

    heads, hidden = config.num_attention_heads, config.hidden_size
    if arch == "llama":
        from engine.gguf import llama3_rope

        rope = llama3_rope(path, scan)   # Llama 3.1+: the loader drops rope_freqs and with it the scaling
        if rope is not None:
            config.rope_parameters = rope
    if kv("attention.key_length") is not None and hasattr(config, "head_dim"):
        config.head_dim = int(kv("attention.key_length"))
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if arch in ("gemma2", "gemma3"):
        big = config.num_hidden_layers == (46 if arch == "gemma2" else 62)   # llama.cpp's 27B rule
        config.query_pre_attn_scalar = hidden // heads if big else head_dim
        config.final_logit_softcapping = kv("final_logit_softcapping")
        if kv("attention.sliding_window") is not None:
            config.sliding_window = int(kv("attention.sliding_window"))
    if arch == "gemma2":
        config.attn_logit_softcapping = kv("attn_logit_softcapping")
    if arch == "gemma3":
        rope = config.rope_parameters
        rope["full_attention"]["rope_theta"] = float(kv("rope.freq_base", 1_000_000.0))
        rope["sliding_attention"]["rope_theta"] = float(kv("rope.freq_base_swa", 10_000.0))
        scaling = kv("rope.scaling.type")
        if scaling is not None and bytes(scaling) == b"linear":
            rope["full_attention"].update(rope_type="linear", factor=float(kv("rope.scaling.factor", 1.0)))
    if arch == "phi3":
        config.sliding_window = int(kv("attention.sliding_window", 0)) or None
        if kv("rope.scaling.original_context_length") is not None:
            config.original_max_position_embeddings = int(kv("rope.scaling.original_context_length"))


# llama.cpp (llama-vocab.cpp) right-strips whitespace after Phi-3's special tokens, except these
_PHI3_NO_RSTRIP = {"<unk>", "<s>", "<|endoftext|>"}


def _tokenizer_as_served(folder: Path, scan: Any) -> None:
    """Make the saved tokenizer split text exactly as llama.cpp does for this GGUF.

    Two things the saved files would otherwise get wrong: (1) tokenizer_config.json names a
    family class (GemmaTokenizer, LlamaTokenizer…) that rebuilds its own normalizer and
    pre-tokenizer on load, ignoring the tokenizer.json converted from the GGUF — for a BPE
    vocabulary under a Gemma architecture that turns "\n" into <pad>; the generic
    `TokenizersBackend` loads tokenizer.json verbatim. (2) llama.cpp right-strips whitespace after
    Phi-3's special tokens (keyed on general.name, see `child_name`); transformers' GGUF tokenizer
    does not, so serving and training would split "<|user|>\nhi" differently.
    """
    config_path, tokenizer_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "TokenizersBackend"
    name = (scan.text("general.name") or "").lower()
    if scan.text("general.architecture") == "phi3" and ("phi3" in name or "phi-3" in name):
        data = json.loads(tokenizer_path.read_text(encoding="utf-8"))
        for entry in data.get("added_tokens", []):
            if entry.get("special"):
                entry["rstrip"] = entry["content"] not in _PHI3_NO_RSTRIP
        tokenizer_path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        for entry in config.get("added_tokens_decoder", {}).values():
            if entry.get("special"):
                entry["rstrip"] = entry["content"] not in _PHI3_NO_RSTRIP
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


SHARD_BYTES = 1 << 30     # the dequantized weights are written in safetensors files of about this size


def dequantize_gguf_to_hf(gguf_path: Path, out_dir: Path, *, shard_bytes: int = SHARD_BYTES,
                          dtype: str = "float32") -> None:
    """Write the GGUF's weights (dequantized, float32 — or bfloat16 for a GPU cycle, which trains on
    bf16 or 4-bit weights anyway: half the disk and reading) and tokenizer as an HF folder.

    Why: training needs full-precision transformers weights, and generation 0 exists only as a
    (quantized) GGUF. The per-tensor work is transformers' own GGUF loader's — gguf-py's
    dequantizers, its name map and its per-family tensor processors (llama's q/k permutation
    undone, Gemma's norm offset) — but one tensor at a time, written out in shards of about
    `shard_bytes`: `from_pretrained(gguf_file=…)` holds every dequantized tensor in float32 at
    once (a 7B base: 28 GB of tensors, then the model built from them), so the first cycle of a
    big model could not fit a home machine's RAM. Peak here: one shard and one tensor. The config
    and the tokenizer come from the same loader (metadata only), completed by `_config_from_gguf`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in ("float32", "bfloat16"):
        raise OuroError(f"unknown dtype {dtype!r} for dequantized weights; float32 or bfloat16")
    scan = scan_gguf(gguf_path)
    if out_dir.exists():
        raise OuroError(f"{out_dir} already exists; refusing to overwrite it",
                        hint="remove it, or choose another folder")
    if not out_dir.parent.is_dir():
        raise OuroError(f"cannot write {out_dir}: folder {out_dir.parent} does not exist")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        _config_from_gguf(config, scan, gguf_path)
        config.name_or_path = ""  # the loader puts general.name here; it is no path
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        plan = _plan_dequantization(gguf_path, scan.text("general.architecture"), skeleton)
    except OuroError:
        raise
    except Exception as exc:
        raise OuroError(f"transformers could not load {gguf_path}: {exc}") from exc

    try:
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    except OSError as exc:
        raise _write_error(exc, out_dir) from exc
    try:
        _write_dequantized(plan, tmp, shard_bytes, getattr(torch, dtype))
        skeleton.config.architectures = [type(skeleton).__name__]
        skeleton.config.dtype = getattr(torch, dtype)
        skeleton.config.save_pretrained(tmp)
        if skeleton.can_generate():
            skeleton.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _tokenizer_as_served(tmp, scan)
        for written in tmp.iterdir():
            if written.is_file():
                _fsync(written)
        os.replace(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OuroError) or not isinstance(exc, Exception):
            raise
        raise _write_error(exc, out_dir) from exc


@dataclass
class _Dequantization:
    """Which GGUF tensors become which HF weights, checked before anything is written."""

    processor: Any
    names: dict[str, str]          # GGUF tensor name -> HF weight name
    wanted: dict[str, Any]         # HF weight name -> its meta tensor (shape)
    tensors: list[Any]             # the GGUF reader's tensors to write, in file order


def _plan_dequantization(gguf_path: Path, arch: str, skeleton: Any) -> _Dequantization:
    """Map the GGUF's tensors onto `skeleton`'s weights (a model on the meta device: names and
    shapes only) with transformers' own name map and the family's tensor processor; a weight the
    file has no tensor for is an error here, before minutes of dequantizing."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    # the processors read head counts by the HF config's own names (what the loader's parsed config holds)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=skeleton.config.get_text_config().to_dict())
    names = get_gguf_hf_weights_map(skeleton, processor)
    wanted = dict(skeleton.state_dict())
    if skeleton.config.get_text_config().tie_word_embeddings:
        for tied in {"lm_head.weight"} & set(wanted):
            del wanted[tied]                          # the embedding's own tensor, as save_pretrained writes it
    reader = GGUFReader(str(gguf_path))
    # the processors of these families change values, never names (only MoE ones rename)
    tensors = [t for t in reader.tensors if names.get(t.name) in wanted]
    missing = sorted(set(wanted) - {names[t.name] for t in tensors})
    if missing:
        raise OuroError(f"{gguf_path.name} holds no tensor for {len(missing)} of the model's weights "
                        f"(e.g. {missing[0]}); it cannot be trained as {type(skeleton).__name__}")
    left = [t.name for t in reader.tensors if names.get(t.name) not in wanted]
    if left:   # Llama 3.1's rope_freqs is a config fact here (_config_from_gguf); transformers drops the same
        log.info("%s: %d tensors with no weight in %s left out: %s", gguf_path.name, len(left),
                 type(skeleton).__name__, ", ".join(left[:8]))
    return _Dequantization(processor, names, wanted, tensors)


def _write_dequantized(plan: _Dequantization, folder: Path, shard_bytes: int, dtype: Any) -> None:
    """The planned tensors dequantized (to float32, then `dtype`) a tensor at a time, into
    `model-0000k-of-0000n.safetensors` files plus their index — or one `model.safetensors` when it
    fits one shard."""
    import torch
    from gguf import dequantize
    from safetensors.torch import save_file

    # shards planned up front from the element counts, so files are named k-of-n
    width = torch.empty(0, dtype=dtype).element_size()
    shards: list[list[Any]] = [[]]
    size = 0
    for t in plan.tensors:
        nbytes = width * int(t.n_elements)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map, total = {}, 0
    for file, shard in zip(files, shards, strict=True):
        out: dict[str, Any] = {}
        for t in shard:
            got = plan.processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                         tensor_key_mapping=plan.names, parsed_parameters={})
            hf_name = plan.names[t.name]
            tensor = torch.from_numpy(np.array(got.weights, dtype=np.float32)).to(dtype)   # a copy, off the file's pages
            if tuple(tensor.shape) != tuple(plan.wanted[hf_name].shape):
                raise OuroError(f"tensor {t.name} has shape {tuple(tensor.shape)} where the model's {hf_name} "
                                f"needs {tuple(plan.wanted[hf_name].shape)}")
            out[hf_name] = tensor
            weight_map[hf_name] = file
            total += tensor.numel() * width
        save_file(out, str(folder / file), metadata={"format": "pt"})
        del out
    if len(files) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")


# --- 2. HF -> GGUF ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    """What writing one HF model family as a llama.cpp GGUF takes (see the module docstring).

    Each entry mirrors that family's class in llama.cpp's converter (conversion/llama.py
    `LlamaModel`, qwen.py `Qwen2Model`/`Qwen3Model`, gemma.py `Gemma2Model`/`Gemma3Model`, phi.py
    `Phi3MiniModel`): the GGUF architecture, the per-block tensors llama.cpp requires, and the two
    weight transforms the converter applies (q/k row permutation; Gemma's `1 + w` norms).
    """

    gguf_arch: str
    model_types: tuple[str, ...]        # HF config.model_type values written as this architecture
    block_tensors: tuple[str, ...]      # per-block GGUF tensors llama.cpp needs (".weight" unless given)
    permute_qk: bool = False            # llama: rotary halves interleaved per head
    norm_offset: float = 0.0            # Gemma: HF stores w, llama.cpp multiplies by the stored (1 + w)
    always_tied: bool = False           # Gemma: no output.weight, llama.cpp reuses token_embd


_LLAMA_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
_GEMMA_BLOCK = _LLAMA_BLOCK + ("post_attention_norm", "post_ffw_norm")

ARCHITECTURES: dict[str, Architecture] = {a.gguf_arch: a for a in (
    Architecture("llama", ("llama", "mistral"), _LLAMA_BLOCK, permute_qk=True),
    Architecture("qwen2", ("qwen2",), _LLAMA_BLOCK + ("attn_q.bias", "attn_k.bias", "attn_v.bias")),
    Architecture("qwen3", ("qwen3",), _LLAMA_BLOCK + ("attn_q_norm", "attn_k_norm")),
    Architecture("gemma2", ("gemma2",), _GEMMA_BLOCK, norm_offset=1.0, always_tied=True),
    Architecture("gemma3", ("gemma3_text",), _GEMMA_BLOCK + ("attn_q_norm", "attn_k_norm"),
                 norm_offset=1.0, always_tied=True),
    Architecture("phi3", ("phi3",), ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")),
)}


def architecture_for(config: Any) -> Architecture:
    """The `Architecture` an HF config is written as; OuroError naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    known = ", ".join(t for a in ARCHITECTURES.values() for t in a.model_types)
    raise OuroError(f"write_gguf cannot write a {model_type!r} checkpoint; supported model types: {known}")


def _rope(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """The config's RoPE parameters (Gemma 3 keeps one set per layer type)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(rope.get(layer_type), dict):
        rope = dict(rope[layer_type])
    return rope


def _child_hparams(config: Any, arch: Architecture) -> dict[str, tuple[Any, Any]]:
    """<arch>.* keys for the child, from its own HF config: {key: (value, GGUFValueType)}.

    The keys are those llama.cpp's converter writes for the family (`set_gguf_parameters`).
    """
    from gguf import GGUFValueType as T

    a = arch.gguf_arch
    rope = _rope(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    allowed_rope = {"gemma3": ("default", "linear"), "llama": ("default", "llama3")}.get(a, ("default",))
    if rope_type not in allowed_rope:
        raise OuroError(f"rope scaling {rope_type!r} is not supported by write_gguf for {a} "
                        f"(supported: {', '.join(allowed_rope)})")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    keys: dict[str, tuple[Any, Any]] = {
        f"{a}.vocab_size": (config.vocab_size, T.UINT32),
        f"{a}.context_length": (config.max_position_embeddings, T.UINT32),
        f"{a}.embedding_length": (hidden, T.UINT32),
        f"{a}.block_count": (config.num_hidden_layers, T.UINT32),
        f"{a}.feed_forward_length": (config.intermediate_size, T.UINT32),
        f"{a}.attention.head_count": (heads, T.UINT32),
        f"{a}.attention.head_count_kv": (config.num_key_value_heads or heads, T.UINT32),
        f"{a}.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), T.FLOAT32),
    }
    if theta is not None:
        keys[f"{a}.rope.freq_base"] = (float(theta), T.FLOAT32)
    if head_dim != hidden // heads or a in ("qwen3", "gemma2", "gemma3"):
        keys[f"{a}.attention.key_length"] = (head_dim, T.UINT32)
        keys[f"{a}.attention.value_length"] = (head_dim, T.UINT32)
    if a == "llama":
        keys[f"{a}.rope.dimension_count"] = (head_dim, T.UINT32)
    if a == "phi3":
        keys[f"{a}.rope.dimension_count"] = (int(rope.get("partial_rotary_factor", 1.0) * hidden) // heads, T.UINT32)
        original = rope.get("original_max_position_embeddings",
                            getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
        keys[f"{a}.rope.scaling.original_context_length"] = (int(original), T.UINT32)
        keys[f"{a}.attention.sliding_window"] = (int(getattr(config, "sliding_window", None) or 0), T.UINT32)
    if a == "gemma2":
        keys[f"{a}.attn_logit_softcapping"] = (float(config.attn_logit_softcapping), T.FLOAT32)
        keys[f"{a}.final_logit_softcapping"] = (float(config.final_logit_softcapping), T.FLOAT32)
        keys[f"{a}.attention.sliding_window"] = (int(config.sliding_window), T.UINT32)
    if a == "gemma3":
        if getattr(config, "final_logit_softcapping", None):
            keys[f"{a}.final_logit_softcapping"] = (float(config.final_logit_softcapping), T.FLOAT32)
        if getattr(config, "sliding_window", None):
            keys[f"{a}.attention.sliding_window"] = (int(config.sliding_window), T.UINT32)
        local = _rope(config, "sliding_attention").get("rope_theta")
        if local is not None:
            keys[f"{a}.rope.freq_base_swa"] = (float(local), T.FLOAT32)
        if rope_type == "linear":
            keys[f"{a}.rope.scaling.type"] = ("linear", T.STRING)
            keys[f"{a}.rope.scaling.factor"] = (float(rope["factor"]), T.FLOAT32)
    if a in ("gemma2", "gemma3"):
        # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B shapes);
        # a config that says otherwise would serve a different function than it trained
        scalar = getattr(config, "query_pre_attn_scalar", head_dim)
        if scalar not in (head_dim, hidden // heads):
            raise OuroError(f"{a}: query_pre_attn_scalar={scalar} is neither head_dim nor hidden/heads; "
                            "llama.cpp cannot compute this model")
    return keys


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, interleave the two rotary halves.

    The same reshape as convert_hf_to_gguf's `LlamaModel.permute` (with n_head already the KV
    head count for k_proj); transformers' `_reverse_permute_weights` is its exact inverse.
    Works on weights (2-D) and biases (1-D).
    """
    rows = weights.shape[0]
    if rows % (2 * n_head):
        raise OuroError(f"cannot permute a q/k tensor of {rows} rows over {n_head} heads")
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


@dataclass(frozen=True)
class _TensorPlan:
    hf_name: str
    gguf_name: str
    file: Path
    shape: tuple[int, ...]
    permute_heads: int | None  # q/k: heads to permute over
    offset: float = 0.0        # added to every value (Gemma norms)
    data: np.ndarray | None = None  # a tensor computed here (Llama 3.1+'s rope_freqs), not read from the folder


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise OuroError(f"{model_dir} holds no .safetensors weights",
                        hint="save the merged model with save_pretrained(..., safe_serialization=True)")
    return files


def _plan_tensors(model_dir: Path, config: Any, arch: Architecture) -> list[_TensorPlan]:
    import gguf
    from safetensors import safe_open

    n_layers = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch.upper()], n_layers)
    tied = arch.always_tied or bool(getattr(config, "tie_word_embeddings", False))
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    permute = {gguf.MODEL_TENSOR.ATTN_Q: heads, gguf.MODEL_TENSOR.ATTN_K: kv_heads} if arch.permute_qk else {}
    plan: list[_TensorPlan] = []
    for file in _safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                if tied and hf_name == "lm_head.weight":
                    continue  # llama.cpp reuses token_embd when output.weight is absent
                found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
                if found is None:
                    raise OuroError(f"{model_dir}: tensor {hf_name!r} has no llama.cpp {arch.gguf_arch} name "
                                    "(is this an unmerged LoRA adapter?)")
                kind, gguf_name = found
                offset = arch.norm_offset if hf_name.endswith("norm.weight") else 0.0
                plan.append(_TensorPlan(hf_name, gguf_name, file, tuple(f.get_slice(hf_name).get_shape()),
                                        permute.get(kind), offset))
    rope = _rope(config)
    if arch.gguf_arch == "llama" and rope.get("rope_type") == "llama3":
        from engine.gguf import llama3_rope_factors

        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        factors = llama3_rope_factors({**rope, "rope_theta": rope.get("rope_theta", 10000.0)}, head_dim)
        plan.append(_TensorPlan("(llama3 rope)", "rope_freqs.weight", Path(), factors.shape, None, data=factors))
    names = {p.gguf_name for p in plan}
    if len(names) != len(plan):
        raise OuroError(f"{model_dir}: two tensors map to the same llama.cpp name")
    required = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{t}" if t.endswith(".bias") else f"blk.{i}.{t}.weight"
        for i in range(n_layers) for t in arch.block_tensors}
    if not tied:
        required.add("output.weight")
    missing = sorted(required - names)
    if missing:
        raise OuroError(f"{model_dir} is missing {len(missing)} tensors, e.g. {missing[0]}")
    return plan


def _encode(plan: _TensorPlan, data: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """Convert one float32 tensor for the file: (array to write, raw GGML type or None)."""
    import gguf

    if not np.isfinite(data).all():
        raise OuroError(f"tensor {plan.hf_name} holds NaN or infinite values; refusing to export a broken model")
    if data.ndim <= 1 or dtype == "f32":
        return np.ascontiguousarray(data, dtype=np.float32), None
    if dtype == "f16":
        out = data.astype(np.float16)
        if not np.isfinite(out).all():
            raise OuroError(f"tensor {plan.hf_name} has values beyond float16 range (max |x| = "
                            f"{float(np.abs(data).max()):.4g})", hint="export with dtype='f32' or 'bf16'")
        return out, None
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def _encoded_info(plan: _TensorPlan, dtype: str) -> tuple[tuple[int, ...], Any, int, Any]:
    """(shape as passed to the writer, numpy dtype, nbytes, raw type) without loading the tensor."""
    import gguf

    count = int(np.prod(plan.shape))
    if len(plan.shape) <= 1 or dtype == "f32":
        return plan.shape, np.dtype(np.float32), count * 4, None
    if dtype == "f16":
        return plan.shape, np.dtype(np.float16), count * 2, None
    byte_shape = (*plan.shape[:-1], plan.shape[-1] * 2)
    return byte_shape, np.dtype(np.uint8), count * 2, gguf.GGMLQuantizationType.BF16


def child_name(name: str, parent_name: str | None) -> str:
    """general.name for a child: `name`, keeping the parent's when llama.cpp reads the tokenizer off it.

    llama.cpp marks Phi-3's special tokens right-stripping only when general.name contains "phi3"
    or "phi-3" (llama-vocab.cpp); a child renamed without it would tokenize its prompts differently
    from its parent, so such a name is kept in parentheses.
    """
    lowered = (parent_name or "").lower()
    if any(t in lowered for t in ("phi3", "phi-3")) and not any(t in name.lower() for t in ("phi3", "phi-3")):
        return f"{name} ({parent_name})"
    return name


def write_gguf(model_dir: Path, parent_gguf: Path, out_path: Path, *, dtype: str = "f16",
               name: str | None = None) -> None:
    """Write the HF checkpoint in `model_dir` (the merged child) as a GGUF llama.cpp serves.

    Metadata: every key/value of `parent_gguf` is copied (tokenizer, chat template, general.*),
    except those that describe the parent's tensors (file type, quantization version, alignment)
    and the <arch>.* architecture keys, which come from the child's config.json (layer count,
    widths, head counts, rope base and dims, norm epsilon, context length, the family's extras)
    so the file always matches its own weights. `name` optionally replaces general.name. The
    parent must be of the child's architecture (`ARCHITECTURES`).

    Tensors: HF names are mapped with gguf-py's name map for the architecture; llama's
    q_proj/k_proj rows are permuted the way llama.cpp's converter does (the inverse of what
    transformers' GGUF loader undoes), Gemma's norms get their +1; 1-D tensors (norms, biases)
    stay F32, matrices are written in `dtype` ("f32", "f16" or "bf16"). With tied embeddings
    (SmolLM2, Qwen2.5 0.5B, every Gemma) no output.weight is written: llama.cpp reuses token_embd.

    Tensors are streamed one at a time into a temp file beside `out_path`, renamed into place
    at the end; on any failure the temp file is removed and OuroError raised.
    """
    from transformers import AutoConfig

    model_dir, parent_gguf, out_path = Path(model_dir), Path(parent_gguf), Path(out_path)
    if dtype not in _WRITE_DTYPES:
        raise OuroError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(_WRITE_DTYPES)}")
    if out_path.resolve() == parent_gguf.resolve():
        raise OuroError("write_gguf would overwrite its own parent file", hint="write the child to a new path")
    if not (model_dir / "config.json").is_file():
        raise OuroError(f"{model_dir} is not a saved HF model (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except Exception as exc:
        raise OuroError(f"cannot read {model_dir}/config.json: {exc}") from exc
    arch = architecture_for(config)
    hparams = _child_hparams(config, arch)
    plan = _plan_tensors(model_dir, config, arch)

    parent = scan_gguf(parent_gguf)
    parent_arch = parent.text("general.architecture")
    if parent_arch != arch.gguf_arch:
        raise OuroError(f"parent {parent_gguf.name} is a {parent_arch!r} model but the child is {arch.gguf_arch!r}; "
                        "a child inherits its tokenizer from a parent of its own architecture")
    tokens = parent.kv.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise OuroError(f"parent {parent_gguf.name} carries no tokenizer; the child would be unusable")
    if len(tokens[0]) != config.vocab_size:
        raise OuroError(f"the child's vocabulary ({config.vocab_size}) differs from its parent's tokenizer "
                        f"({len(tokens[0])} tokens); the parent's tokenizer cannot be reused")

    inherited = {key: item for key, item in parent.kv.items()
                 # <arch>.* keys describe the parent's shapes: the child's come from its own config
                 if key not in _NOT_INHERITED and not key.startswith(f"{parent_arch}.")
                 and not (name is not None and key == "general.name")}
    alignment = int(parent.kv["general.alignment"][0]) if "general.alignment" in parent.kv else None
    _write(out_path, arch, hparams, plan, inherited, dtype=dtype, alignment=alignment,
           name=None if name is None else child_name(name, parent.text("general.name")))


def write_gguf_with_metadata(model_dir: Path, out_path: Path, metadata: dict[str, tuple[Any, int, int | None]], *,
                             dtype: str = "f16") -> None:
    """Write the HF checkpoint in `model_dir` as a GGUF whose non-architecture keys are `metadata`
    ({key: (value, GGUFValueType, array sub-type)}: tokenizer, chat template, general.name).

    Why: a model trained from scratch (trainer/scratch.py) has no parent GGUF to inherit its
    tokenizer from; its own tokenizer's keys come from `trainer.bpe.gguf_metadata`. Tensors and
    architecture keys are written exactly as `write_gguf` writes them.
    """
    from transformers import AutoConfig

    model_dir, out_path = Path(model_dir), Path(out_path)
    if dtype not in _WRITE_DTYPES:
        raise OuroError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(_WRITE_DTYPES)}")
    if not (model_dir / "config.json").is_file():
        raise OuroError(f"{model_dir} is not a saved HF model (no config.json)")
    config = AutoConfig.from_pretrained(str(model_dir))
    arch = architecture_for(config)
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens[0]) != config.vocab_size:
        raise OuroError(f"the model's vocabulary ({config.vocab_size}) does not match the tokenizer metadata "
                        f"({0 if tokens is None else len(tokens[0])} tokens)")
    _write(out_path, arch, _child_hparams(config, arch), _plan_tensors(model_dir, config, arch), metadata,
           dtype=dtype, alignment=None, name=None)


def _write(out_path: Path, arch: Architecture, hparams: dict[str, tuple[Any, Any]], plan: list[_TensorPlan],
           inherited: dict[str, tuple[Any, int, int | None]], *, dtype: str, alignment: int | None,
           name: str | None) -> None:
    """Stream the GGUF: `inherited` keys, then the architecture keys (`hparams`), then the tensors of `plan`."""
    import gguf
    import torch  # noqa: F401  (safetensors' pt framework needs it)
    from safetensors import safe_open

    with _atomic_file(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.gguf_arch)
        try:
            for key, (value, vtype, sub) in inherited.items():
                writer.add_key_value(key, value, gguf.GGUFValueType(vtype),
                                     sub_type=None if sub is None else gguf.GGUFValueType(sub))
            if alignment is not None:
                writer.add_custom_alignment(alignment)
            for key, (value, vtype) in hparams.items():
                writer.add_key_value(key, value, vtype)
            if name is not None:
                writer.add_name(name)
            writer.add_file_type(_WRITE_DTYPES[dtype])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for p in plan:
                shape, np_dtype, nbytes, raw = _encoded_info(p, dtype)
                writer.add_tensor_info(p.gguf_name, shape, np_dtype, nbytes, raw_dtype=raw)

            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            # a safetensors file is memory-mapped while open, and every page read stays in the
            # process's memory until it is closed: each file closes after its last tensor, so a
            # 7B checkpoint's 15 GB are never all mapped at once
            last_use = {p.file: i for i, p in enumerate(plan) if p.data is None}
            open_files: dict[Path, tuple[contextlib.ExitStack, Any]] = {}
            try:
                for i, p in enumerate(plan):
                    if p.data is not None:
                        writer.write_tensor_data(p.data)
                        continue
                    if p.file not in open_files:
                        stack = contextlib.ExitStack()
                        open_files[p.file] = (stack, stack.enter_context(safe_open(str(p.file), framework="pt")))
                    data = open_files[p.file][1].get_tensor(p.hf_name).float().numpy()
                    if p.permute_heads is not None:
                        data = _permute(data, p.permute_heads)
                    if p.offset:
                        data = data + np.float32(p.offset)
                    encoded, _ = _encode(p, data, dtype)
                    writer.write_tensor_data(encoded)
                    del data, encoded
                    if last_use[p.file] == i:
                        open_files.pop(p.file)[0].close()
            finally:
                for stack, _ in open_files.values():
                    stack.close()
        finally:
            writer.close()


# --- 3. quantize ------------------------------------------------------------------------------

def quantize_gguf(src: Path, dst: Path, qtype: str = "Q8_0") -> None:
    """Quantize an F32/F16 GGUF with llama.cpp's own quantizer (what the bot will serve).

    Why llama.cpp and not gguf-py: its k-quant mixes (Q4_K_M picks per-tensor types) exist only
    there, and it is the same code llama.cpp's tools use, in about a second for 135M parameters.
    """
    import ctypes

    import llama_cpp

    src, dst = Path(src), Path(dst)
    if qtype not in QUANT_TYPES:
        raise OuroError(f"unknown quantization type {qtype!r}; allowed: {', '.join(QUANT_TYPES)}")
    if src.resolve() == dst.resolve():
        raise OuroError("quantize_gguf needs a destination different from its source")
    scan_gguf(src)  # llama.cpp may abort the process on a broken file; fail here instead
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[qtype])
    params.nthread = max(1, os.cpu_count() or 1)
    # llama.cpp logs a line per tensor through llama-cpp-python's logger, which prints everything
    # until some Llama(verbose=False) quiets it: quiet it here too (errors still show)
    cpp_log = logging.getLogger("llama-cpp-python")
    level = cpp_log.level
    cpp_log.setLevel(max(level, logging.ERROR))
    try:
        with _atomic_file(dst) as tmp:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise OuroError(f"llama.cpp could not quantize {src.name} to {qtype} (return code {rc})",
                                hint="check free disk space and that the source is an F32/F16 GGUF")
    finally:
        cpp_log.setLevel(level)


# --- 4. do both runtimes compute the same function? -------------------------------------------

@dataclass(frozen=True)
class LogitAgreement:
    """Last-position logits of transformers (float32) vs llama.cpp for the same token ids."""

    max_rel_diff: float   # max |hf - cpp| / max |hf|
    max_abs_diff: float
    correlation: float    # Pearson, over the whole vocabulary
    same_argmax: bool


def _llama_cpp_last_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import GGML_TYPE_F32, Llama

    from engine.llama import model_params

    try:
        # extra buffers off: llama.cpp's AMX buffer type segfaults on these machines (see llama_engine)
        with model_params(extra_buffers=False):
            llm = Llama(model_path=str(gguf_path), n_ctx=max(64, len(ids) + 8), n_batch=max(64, len(ids)),
                        logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    except Exception as exc:
        raise OuroError(f"llama.cpp could not load {gguf_path}: {exc}") from exc
    try:
        if any(not 0 <= t < llm.n_vocab() for t in ids):
            raise OuroError(f"token ids outside the vocabulary of {gguf_path.name} ({llm.n_vocab()})")
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    finally:
        llm.close()


def hf_last_logits(hf_model_dir: Path, ids: list[int]) -> np.ndarray:
    """transformers' logits for the last of `ids`, in float32 on the CPU — except a bf16 checkpoint
    (a child trained on a GPU) where a GPU is: read straight onto the card in bf16 (a 7B child:
    ~15 GB there, where float32 in RAM would take ~29 GB of a 32 GB machine). bf16 arithmetic moves
    the figure a little (correlation 0.99999 against float32 on the same bf16 weights, tiny model),
    far inside the gate's 0.98; float32 checkpoints keep the exact check."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    stored = str(getattr(AutoConfig.from_pretrained(str(hf_model_dir)), "dtype", "") or "")
    cuda = torch.cuda.is_available() and "bfloat16" in stored
    if cuda:
        model = AutoModelForCausalLM.from_pretrained(str(hf_model_dir), dtype=torch.bfloat16, device_map={"": 0})
    else:
        model = AutoModelForCausalLM.from_pretrained(str(hf_model_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0, -1].double().cpu().numpy()
    del model
    if cuda:
        torch.cuda.empty_cache()
    return logits


def logit_agreement(hf_model_dir: Path, gguf_path: Path, prompt_token_ids: list[int]) -> LogitAgreement:
    """Compare transformers and llama.cpp on `prompt_token_ids` (fed verbatim: no BOS is added).

    llama.cpp runs with an F32 KV cache so the figure measures the conversion (weights and their
    storage type), not the runtime's default F16 cache.
    """
    ids = [int(t) for t in prompt_token_ids]
    if not ids:
        raise OuroError("a logit comparison needs at least one token id")
    hf = hf_last_logits(Path(hf_model_dir), ids)
    cpp = _llama_cpp_last_logits(Path(gguf_path), ids)
    if hf.shape != cpp.shape:
        raise OuroError(f"vocabulary sizes differ: transformers {hf.shape[0]}, llama.cpp {cpp.shape[0]}")
    diff = np.abs(hf - cpp)
    scale = float(np.abs(hf).max()) or 1.0
    return LogitAgreement(max_rel_diff=float(diff.max()) / scale, max_abs_diff=float(diff.max()),
                          correlation=float(np.corrcoef(hf, cpp)[0, 1]),
                          same_argmax=int(hf.argmax()) == int(cpp.argmax()))


def compare_logits(hf_model_dir: Path, gguf_path: Path, prompt_token_ids: list[int]) -> float:
    """Max relative difference (max |hf - cpp| / max |hf|) of the last-position logits; 0 is identical.

    Why: the gate must know the GGUF it promotes computes what the trained HF weights compute.
    Relative to the largest logit rather than element-wise, since logits near zero would make an
    element-wise ratio meaningless. See `logit_agreement` for correlation and argmax too.
    """
    return logit_agreement(hf_model_dir, gguf_path, prompt_token_ids).max_rel_diff
