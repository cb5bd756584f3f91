"""Is this file a complete, loadable GGUF? Answered before anything serves or promotes it.

The scanner walks every key/value and tensor descriptor, so a truncated file or a wrong
magic fails here with a clear reason instead of inside llama.cpp (which may crash on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    chat_template: str | None
    tensor_count: int
    context_length: int | None


def check_gguf(path: Path) -> GGUFInfo:
    """Magic, parseable metadata, every tensor inside the file; raises OuroError otherwise.

    Uses the project's struct-based scanner (trainer/gguf_export.py): gguf-py's GGUFReader
    needs ~5 s for SmolLM2's tokenizer arrays on two cores, the scanner ~0.2 s.
    """
    from trainer.gguf_export import _scan_gguf

    scan = _scan_gguf(Path(path))
    arch = scan.text("general.architecture") or "unknown"
    ctx = scan.kv.get(f"{arch}.context_length")
    return GGUFInfo(path=Path(path), architecture=arch, chat_template=scan.text("tokenizer.chat_template"),
                    tensor_count=len(scan.tensors), context_length=int(ctx[0]) if ctx else None)
