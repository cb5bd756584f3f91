"""Reading GGUF files: a fast scanner of their key/values and tensor table, and the check that a
file is complete and loadable, answered before anything serves or promotes it.

The scanner walks every key/value and tensor descriptor, so a truncated file or a wrong
magic fails here with a clear reason instead of inside llama.cpp (which may crash on it).
Values keep their GGUF types, so a child GGUF can copy its parent's metadata byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import OuroError

_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_FORMATS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
                  12: "<f8"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class GgufScan:
    """A GGUF's key/values (file order, with their exact types) and tensor table."""

    kv: dict[str, tuple[Any, int, int | None]]   # key -> (value, value type, array item type); strings as bytes
    tensors: dict[str, tuple[tuple[int, ...], int]]  # name -> (dims in GGUF order, ggml type)

    def text(self, key: str) -> str | None:
        item = self.kv.get(key)
        return item[0].decode("utf-8", errors="replace") if item and item[1] == STRING else None


def scan_gguf(path: Path) -> GgufScan:
    """Parse a GGUF's header and check that every tensor lies inside the file.

    Magic, parseable metadata, no tensor past the end, with `struct` on a memory map: gguf-py's GGUFReader builds a numpy view per
    array element, which for SmolLM2's ~98k tokenizer strings costs ~5 s on two cores, against
    ~0.2 s here. Values keep their GGUF types so the child's copy is byte-exact.
    """
    import mmap
    import struct

    import gguf

    path = Path(path)
    if not path.is_file():
        raise OuroError(f"model file {path} does not exist")
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                f.seek(0)
                raise OuroError(f"{path} is not a GGUF file (magic {f.read(4)!r})")
            blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise OuroError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    try:
        pos = 4

        def unpack(fmt: str) -> Any:
            nonlocal pos
            value = struct.unpack_from(fmt, blob, pos)[0]
            pos += struct.calcsize(fmt)
            return value

        def string() -> bytes:
            nonlocal pos
            n = unpack("<Q")
            if pos + n > len(blob):
                raise ValueError("a string runs past the end of the file")
            pos += n
            return bytes(blob[pos - n:pos])

        def value(vtype: int) -> Any:
            nonlocal pos
            if vtype == STRING:
                return string()
            if vtype in _SCALAR_FORMATS:
                return unpack(_SCALAR_FORMATS[vtype])
            raise ValueError(f"unknown metadata value type {vtype}")

        version = unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = unpack("<Q"), unpack("<Q")
        kv: dict[str, tuple[Any, int, int | None]] = {}
        for _ in range(n_kv):
            key = string().decode("utf-8")
            vtype = unpack("<I")
            if vtype != ARRAY:
                kv[key] = (value(vtype), vtype, None)
                continue
            sub, count = unpack("<I"), unpack("<Q")
            if sub in _NUMPY_FORMATS:
                width = np.dtype(_NUMPY_FORMATS[sub]).itemsize
                items = np.frombuffer(blob, dtype=_NUMPY_FORMATS[sub], count=count, offset=pos).tolist()
                pos += width * count
            elif sub == STRING:
                items = [string() for _ in range(count)]
            else:
                raise ValueError(f"metadata key {key} is a nested array")
            kv[key] = (items, vtype, sub)
        tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}
        for _ in range(n_tensors):
            name = string().decode("utf-8")
            dims = tuple(unpack("<Q") for _ in range(unpack("<I")))
            tensors[name] = (dims, unpack("<I"), unpack("<Q"))
        alignment = kv.get("general.alignment", (gguf.GGUF_DEFAULT_ALIGNMENT,))[0]
        data_start = -(-pos // alignment) * alignment
        for name, (dims, ggml_type, offset) in tensors.items():
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            nbytes = int(np.prod(dims)) // block * type_size
            if data_start + offset + nbytes > len(blob):
                raise ValueError(f"tensor {name} runs past the end of the file")
    except OuroError:
        raise
    except Exception as exc:
        raise OuroError(f"{path} is truncated or corrupt: {exc}") from exc
    finally:
        blob.close()
    return GgufScan(kv=kv, tensors={n: (d, t) for n, (d, t, _) in tensors.items()})



@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    chat_template: str | None
    tensor_count: int
    context_length: int | None


def check_gguf(path: Path) -> GGUFInfo:
    """Magic, parseable metadata, every tensor inside the file; raises OuroError otherwise.

    Uses `scan_gguf`: gguf-py's GGUFReader needs ~5 s for SmolLM2's tokenizer arrays on two
    cores, the scanner ~0.2 s.
    """
    return _info(Path(path), scan_gguf(Path(path)))


def _info(path: Path, scan: GgufScan) -> GGUFInfo:
    arch = scan.text("general.architecture") or "unknown"
    ctx = scan.kv.get(f"{arch}.context_length")
    return GGUFInfo(path=path, architecture=arch, chat_template=scan.text("tokenizer.chat_template"),
                    tensor_count=len(scan.tensors), context_length=int(ctx[0]) if ctx else None)


# What the whole loop handles — serve, train, convert back to GGUF, evaluate, hot-swap. Serving
# alone would take any architecture llama.cpp knows, but a base the cycle cannot write back
# would serve for weeks and then fail on its first night, so registration refuses it up front.
# trainer/convert.py's ARCHITECTURES writes exactly these (tests/test_architectures.py checks).
LOOP_ARCHITECTURES: dict[str, str] = {
    "llama": "Llama 2 and 3.x, SmolLM/SmolLM2, Mistral 7B, TinyLlama ('llama')",
    "qwen2": "Qwen2 and Qwen2.5 ('qwen2')",
    "qwen3": "Qwen3 dense ('qwen3')",
    "gemma2": "Gemma 2 ('gemma2')",
    "gemma3": "Gemma 3 text ('gemma3')",
    "phi3": "Phi-3 and Phi-3.5 mini without long-context RoPE ('phi3')",
}


def llama3_rope_factors(params: dict[str, float], head_dim: int) -> np.ndarray:
    """Llama 3.1+'s per-dimension RoPE frequency divisors, as llama.cpp's converter computes them
    (`LlamaModel.generate_extra_tensors`) and stores them in the `rope_freqs.weight` tensor."""
    import math

    freqs = 1.0 / (params["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def llama3_rope(path: Path, scan: GgufScan | None = None) -> dict[str, Any] | None:
    """The HF `rope_parameters` a llama GGUF's `rope_freqs.weight` encodes, or None if it has none.

    A GGUF keeps only the computed divisors, not the four numbers transformers needs; Llama 3.1
    (factor 8) and 3.2 (factor 32) use low/high 1/4 over an original 8,192 positions, so those
    candidates are recomputed and must match the stored tensor. Raises OuroError when none does.
    """
    import gguf

    scan = scan or scan_gguf(Path(path))
    if "rope_freqs.weight" not in scan.tensors:
        return None
    arch = scan.text("general.architecture")

    def kv(key: str, default: Any) -> Any:
        item = scan.kv.get(f"{arch}.{key}")
        return default if item is None else item[0]

    reader = gguf.GGUFReader(str(path))    # slow on big vocabularies; only for files that need it
    stored = next(np.array(t.data, dtype=np.float32) for t in reader.tensors if t.name == "rope_freqs.weight")
    head_dim = int(kv("rope.dimension_count", kv("embedding_length", 0) // max(1, kv("attention.head_count", 1))))
    theta = float(kv("rope.freq_base", 10000.0))
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
        params = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if stored.shape == (head_dim // 2,) and np.allclose(llama3_rope_factors(params, head_dim), stored, rtol=1e-5):
            return params
    raise OuroError(f"{Path(path).name} scales RoPE per dimension (rope_freqs.weight) in a way that is not "
                    "Llama 3.1/3.2's; the learning loop cannot reproduce it in training")


def _unsupported_variant(scan: GgufScan, arch: str) -> str | None:
    """Why a file of a supported architecture is still one the loop cannot train and write back."""
    def kv(key: str):
        item = scan.kv.get(f"{arch}.{key}")
        return None if item is None else item[0]

    if (kv("expert_count") or 0) > 0:
        return f"it is a mixture-of-experts model ({kv('expert_count')} experts)"
    scaling = kv("rope.scaling.type")
    scaling = scaling.decode("utf-8", "replace") if isinstance(scaling, bytes) else scaling
    if scaling not in (None, "none") and not (arch == "gemma3" and scaling == "linear"):
        return f"it uses {scaling!r} RoPE scaling"
    if any(name.startswith("rope_factors") for name in scan.tensors) or (
            arch != "llama" and "rope_freqs.weight" in scan.tensors):
        return "it uses per-dimension RoPE frequency factors (long-context RoPE)"
    return None


def check_base_model(path: Path) -> GGUFInfo:
    """`check_gguf`, then what generation 0 needs: an architecture the loop can train and write
    back, and a chat template (serving and training render the same one; guessing ChatML for a
    model trained on another format would teach it a format it was never served in)."""
    scan = scan_gguf(Path(path))
    info = _info(Path(path), scan)
    supported = "; ".join(LOOP_ARCHITECTURES.values())
    if info.architecture not in LOOP_ARCHITECTURES:
        raise OuroError(f"{Path(path).name} is a {info.architecture!r} model; the learning loop supports: {supported}",
                        hint="choose a GGUF of a supported family for OURO_BASE_MODEL (nothing was registered)")
    variant = _unsupported_variant(scan, info.architecture)
    if variant is None and info.architecture == "llama":
        try:
            llama3_rope(Path(path), scan)
        except OuroError:
            variant = "it scales RoPE per dimension (rope_freqs.weight) in a way that is not Llama 3.1/3.2's"
    if variant:
        raise OuroError(f"{Path(path).name} is a {info.architecture!r} model, but {variant}, which the learning "
                        f"loop cannot train and write back yet; it supports: {supported}",
                        hint="choose another GGUF for OURO_BASE_MODEL (nothing was registered)")
    if not (info.chat_template or "").strip():
        raise OuroError(f"{Path(path).name} carries no chat template (tokenizer.chat_template)",
                        hint="use the GGUF of a chat/instruct model, converted by a llama.cpp recent enough to "
                             "store its template (nothing was registered)")
    return info
