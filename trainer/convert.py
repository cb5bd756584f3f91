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

Every writer here builds its output under a hidden temporary name in the destination folder and
renames it into place at the end, so a reader never sees a half-written model; on failure the
temporary is removed and an `OuroError` says why.
"""

from __future__ import annotations

import contextlib
import errno
import json
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

def dequantize_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Write the GGUF's weights (dequantized, float32) and tokenizer as an HF folder (safetensors).

    Why: training needs full-precision transformers weights, and generation 0 exists only as a
    (quantized) GGUF. transformers' GGUF loader dequantizes it and undoes llama.cpp's q/k
    permutation; the tokenizer and chat template are rebuilt from the same file's metadata.

    The loader leaves a `GgufHfQuantizer` and a `quantization_config` on the model although the
    weights are plain dense tensors (llama goes through its legacy, dequantize-everything path);
    `save_pretrained` refuses such a model, and a config.json carrying that block would send a
    later `from_pretrained` looking for a GGUF file. Both are removed before saving.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    scan_gguf(gguf_path)
    if out_dir.exists():
        raise OuroError(f"{out_dir} already exists; refusing to overwrite it",
                        hint="remove it, or choose another folder")
    if not out_dir.parent.is_dir():
        raise OuroError(f"cannot write {out_dir}: folder {out_dir.parent} does not exist")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise OuroError(f"transformers could not load {gguf_path}: {exc}") from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        packed = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
        if packed:  # a future loader kept blocks packed: saving would write something else
            raise OuroError(f"transformers kept {len(packed)} tensors of {gguf_path.name} quantized "
                            f"(e.g. {packed[0]}); cannot save full-precision weights")
        quantizer.remove_quantization_config(model)
    model.config.name_or_path = ""  # the loader puts general.name here; it is no path

    try:
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    except OSError as exc:
        raise _write_error(exc, out_dir) from exc
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for written in tmp.iterdir():
            if written.is_file():
                _fsync(written)
        os.replace(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise
        raise _write_error(exc, out_dir) from exc


# --- 2. HF -> GGUF ----------------------------------------------------------------------------

def _child_hparams(config: Any) -> dict[str, tuple[Any, Any]]:
    """llama.* keys for the child, from its own HF config: {key: (value, GGUFValueType)}."""
    from gguf import GGUFValueType as T

    if getattr(config, "model_type", None) != "llama":
        raise OuroError(f"write_gguf handles Llama checkpoints only, not {getattr(config, 'model_type', '?')!r}")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise OuroError(f"rope scaling {rope_type!r} is not supported by write_gguf (only plain RoPE)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    keys: dict[str, tuple[Any, Any]] = {
        "llama.vocab_size": (config.vocab_size, T.UINT32),
        "llama.context_length": (config.max_position_embeddings, T.UINT32),
        "llama.embedding_length": (hidden, T.UINT32),
        "llama.block_count": (config.num_hidden_layers, T.UINT32),
        "llama.feed_forward_length": (config.intermediate_size, T.UINT32),
        "llama.attention.head_count": (heads, T.UINT32),
        "llama.attention.head_count_kv": (config.num_key_value_heads or heads, T.UINT32),
        "llama.rope.dimension_count": (head_dim, T.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), T.FLOAT32),
    }
    if theta is not None:
        keys["llama.rope.freq_base"] = (float(theta), T.FLOAT32)
    if head_dim != hidden // heads:
        keys["llama.attention.key_length"] = (head_dim, T.UINT32)
        keys["llama.attention.value_length"] = (head_dim, T.UINT32)
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


def _plan_tensors(model_dir: Path, config: Any) -> list[_TensorPlan]:
    import gguf
    from safetensors import safe_open

    n_layers = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
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
                    raise OuroError(f"{model_dir}: tensor {hf_name!r} has no llama.cpp name "
                                    "(is this an unmerged LoRA adapter?)")
                kind, gguf_name = found
                permute = {gguf.MODEL_TENSOR.ATTN_Q: heads, gguf.MODEL_TENSOR.ATTN_K: kv_heads}.get(kind)
                plan.append(_TensorPlan(hf_name, gguf_name, file, tuple(f.get_slice(hf_name).get_shape()), permute))
    names = {p.gguf_name for p in plan}
    if len(names) != len(plan):
        raise OuroError(f"{model_dir}: two tensors map to the same llama.cpp name")
    required = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(n_layers)
        for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
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


def write_gguf(model_dir: Path, parent_gguf: Path, out_path: Path, *, dtype: str = "f16",
               name: str | None = None) -> None:
    """Write the HF Llama checkpoint in `model_dir` (the merged child) as a GGUF llama.cpp serves.

    Metadata: every key/value of `parent_gguf` is copied (tokenizer, chat template, general.*),
    except those that describe the parent's tensors (file type, quantization version, alignment)
    and the llama.* architecture keys, which come from the child's config.json (layer count,
    widths, head counts, rope base and dims, norm epsilon, context length) so the file always
    matches its own weights. `name` optionally replaces general.name.

    Tensors: HF names are mapped with gguf-py's llama name map; q_proj/k_proj rows are permuted
    the way llama.cpp's converter does (the inverse of what transformers' GGUF loader undoes);
    1-D tensors (norms) stay F32, matrices are written in `dtype` ("f32", "f16" or "bf16").
    With tied embeddings (SmolLM2) no output.weight is written: llama.cpp then reuses token_embd.

    Tensors are streamed one at a time into a temp file beside `out_path`, renamed into place
    at the end; on any failure the temp file is removed and OuroError raised.
    """
    import gguf
    import torch  # noqa: F401  (safetensors' pt framework needs it)
    from safetensors import safe_open
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
    hparams = _child_hparams(config)
    plan = _plan_tensors(model_dir, config)

    parent = scan_gguf(parent_gguf)
    if parent.text("general.architecture") != "llama":
        raise OuroError(f"parent {parent_gguf.name} is a {parent.text('general.architecture')!r} model; "
                        "write_gguf needs a llama parent")
    tokens = parent.kv.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise OuroError(f"parent {parent_gguf.name} carries no tokenizer; the child would be unusable")
    if len(tokens[0]) != config.vocab_size:
        raise OuroError(f"the child's vocabulary ({config.vocab_size}) differs from its parent's tokenizer "
                        f"({len(tokens[0])} tokens); the parent's tokenizer cannot be reused")

    with _atomic_file(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        try:
            for key, (value, vtype, sub) in parent.kv.items():
                if key in _NOT_INHERITED or key in hparams or key.startswith("llama.rope.scaling."):
                    continue
                writer.add_key_value(key, value, gguf.GGUFValueType(vtype),
                                     sub_type=None if sub is None else gguf.GGUFValueType(sub))
            if "general.alignment" in parent.kv:
                writer.add_custom_alignment(int(parent.kv["general.alignment"][0]))
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
            with contextlib.ExitStack() as stack:
                open_files: dict[Path, Any] = {}
                for p in plan:
                    if p.file not in open_files:
                        open_files[p.file] = stack.enter_context(safe_open(str(p.file), framework="pt"))
                    data = open_files[p.file].get_tensor(p.hf_name).float().numpy()
                    if p.permute_heads is not None:
                        data = _permute(data, p.permute_heads)
                    encoded, _ = _encode(p, data, dtype)
                    writer.write_tensor_data(encoded)
                    del data, encoded
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
    with _atomic_file(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise OuroError(f"llama.cpp could not quantize {src.name} to {qtype} (return code {rc})",
                            hint="check free disk space and that the source is an F32/F16 GGUF")


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


def _hf_last_logits(hf_model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_model_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return logits.double().numpy()


def logit_agreement(hf_model_dir: Path, gguf_path: Path, prompt_token_ids: list[int]) -> LogitAgreement:
    """Compare transformers and llama.cpp on `prompt_token_ids` (fed verbatim: no BOS is added).

    llama.cpp runs with an F32 KV cache so the figure measures the conversion (weights and their
    storage type), not the runtime's default F16 cache.
    """
    ids = [int(t) for t in prompt_token_ids]
    if not ids:
        raise OuroError("a logit comparison needs at least one token id")
    hf = _hf_last_logits(Path(hf_model_dir), ids)
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
