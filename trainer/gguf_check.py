"""Is this file a complete, loadable GGUF? Answered before anything serves or promotes it.

gguf-py's reader memory-maps the file and walks every key/value and tensor descriptor, so a
truncated file or a wrong magic fails here with a clear reason instead of inside llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ouro.errors import OuroError


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    chat_template: str | None
    tensor_count: int
    context_length: int | None


def _field_str(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # older gguf-py: decode the raw parts
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def check_gguf(path: Path) -> GGUFInfo:
    import gguf

    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise OuroError(f"cannot read model file {path}: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise OuroError(f"{path} is not a GGUF file (magic {magic!r})")
    try:
        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except Exception as exc:
        raise OuroError(f"{path} is truncated or corrupt: {exc}") from exc
    arch = _field_str(reader, "general.architecture") or "unknown"
    ctx_field = reader.fields.get(f"{arch}.context_length")
    ctx = int(ctx_field.contents()) if ctx_field is not None else None
    return GGUFInfo(path=path, architecture=arch, chat_template=_field_str(reader, "tokenizer.chat_template"),
                    tensor_count=len(reader.tensors), context_length=ctx)
