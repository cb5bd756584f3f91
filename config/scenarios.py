"""Loading the self-refinement scenarios in `config/scenarios.toml` (or a file named by settings)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from core.errors import OuroError


def load_scenarios(path: Path) -> list[str]:
    """The scenario questions, in file order, blanks and duplicates left out."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise OuroError(f"cannot read scenarios from {path}: {exc}",
                        hint="set OURO_REFINE_SCENARIOS_FILE to a TOML file with `scenarios = [\"…\", …]`") from exc
    items = data.get("scenarios", [])
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise OuroError(f"{path}: `scenarios` must be a list of strings")
    return list(dict.fromkeys(x.strip() for x in items if x.strip()))
