"""The floors of the code base and a checker that no module imports upwards or another's private name.

Run it to count: `python -m tests.helpers.layers` prints every upward import and every private
name imported from another module (exit 1 when there is any); tests/test_layers.py asserts none.
Imports inside functions count too: a lazy import up the floors is still a dependency up them.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Bottom first; a module may import from its own floor and any floor below it. bot/ and api/ are
# sibling transports over serving/: neither imports the other (tests/test_api.py checks api/ never
# imports bot/ or telegram; the list order keeps bot/ from importing api/).
FLOORS = ["core", "config", "memory", "engine", "lineage", "evals", "trainer", "serving", "bot", "api", "ouro"]


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def project_modules(root: Path = ROOT, floors: list[str] = FLOORS) -> list[Path]:
    """Every module of the floors, and the tests (held to the private-name rule only)."""
    return sorted(p for folder in [*floors, "tests"] for p in (root / folder).rglob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[int, str, list[str]]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, []) for a in node.names)
    return found


def violations(root: Path = ROOT, floors: list[str] = FLOORS) -> list[Violation]:
    rank = {name: i for i, name in enumerate(floors)}
    out = []
    for path in project_modules(root, floors):
        rel = path.relative_to(root)
        own = rank.get(rel.parts[0], len(floors))   # tests sit above every floor
        for line, module, names in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            top = module.split(".")[0]
            if top not in rank:
                continue
            if rank[top] > own:
                out.append(Violation(str(rel), line, f"{rel.parts[0]}/ imports upwards from {module}"))
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                out.append(Violation(str(rel), line, f"imports private {', '.join(private)} from {module}"))
    return out


def main(argv: list[str]) -> int:
    floors = argv[0].split(",") if argv else FLOORS
    found = violations(ROOT, floors)
    for v in found:
        print(v)
    print(f"{sum('upwards' in v.what for v in found)} upward imports, "
          f"{sum('private' in v.what for v in found)} private names imported across modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
