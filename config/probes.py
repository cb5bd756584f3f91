"""Loading the fixed probes in `config/probes.toml` (or a file named by settings)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import OuroError

DEFAULT_PROBES = Path(__file__).resolve().parent / "probes.toml"


@dataclass(frozen=True)
class Probes:
    tone: list[str]
    format: list[list[dict]]
    recall: list[list[dict]]
    refusal: list[str] = field(default_factory=list)   # requests a persona should turn down (evals/refusal_style.py)


def load_probes(path: Path | None = None) -> Probes:
    path = Path(path or DEFAULT_PROBES)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise OuroError(f"cannot read probes from {path}: {exc}") from exc
    tone = [str(t) for t in data.get("tone", [])]
    if len(tone) < 10:
        raise OuroError(f"{path} has {len(tone)} tone probes; style drift needs at least 10")
    fmt = [list(item["messages"]) for item in data.get("format", [])]
    recall = [list(item["messages"]) for item in data.get("recall", [])]
    for conv in fmt + recall:
        for m in conv:
            if m.get("role") not in ("user", "assistant", "system") or not isinstance(m.get("content"), str):
                raise OuroError(f"{path}: every message needs a role (user/assistant/system) and a content")
    refusal = [str(t) for t in data.get("refusal", [])]
    return Probes(tone=tone, format=fmt, recall=recall, refusal=refusal)
