"""The persona's constitution, versioned with the lineage.

The persona text (settings.persona_file: what `ouro interview` and /interview write) is the
*draft*: the next cycle trains with it. Each generation a cycle makes keeps the exact text it
was trained with in its folder (`constitution.md`, written before meta.json, so a finished
generation always has its own), with its SHA-256 in meta.json and in the ledger. Serving pins
the ACTIVE generation's text, so a persona and the weights trained for it change together;
generation 0 and generations made before constitutions were kept fall back to the draft.

`constitution_text` is the one answer to "which text, for which generation" — for the cycle,
serving, the self-refinement prompts and /persona alike.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

from config.settings import Settings
from core.errors import OuroError
from core.files import atomic_write_text
from lineage.generations import Generation, Lineage, gen_number

CONSTITUTION_NAME = "constitution.md"


@dataclass(frozen=True)
class Constitution:
    text: str
    source: str          # "gen-0003" (its own, kept in its folder) or "draft" (the configured persona file)
    path: Path

    @property
    def sha256(self) -> str:
        return text_sha256(self.text)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_constitution(folder: Path, text: str) -> str:
    """Keep `text` in a generation folder being assembled (before its meta.json); its SHA-256."""
    atomic_write_text(folder / CONSTITUTION_NAME, text)
    return text_sha256(text)


def own_constitution(gen: Generation) -> str | None:
    """The text `gen` was trained with, or None (generation 0, or made before constitutions were kept)."""
    path = gen.folder / CONSTITUTION_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OuroError(f"cannot read {path}: {exc.strerror}") from exc
    recorded = gen.meta.get("constitution_sha256")
    if recorded and recorded != text_sha256(text):
        raise OuroError(f"{path} does not match the SHA-256 recorded in {gen.id}'s meta.json",
                        hint="a generation folder is immutable: restore the file, or promote another generation")
    return text


def constitution_for(settings: Settings, gen_id: str | None = None) -> Constitution:
    """The constitution in force for generation `gen_id` (the text it was trained with, else the
    draft), or with `gen_id` None the draft itself: what the next cycle trains with."""
    if gen_id is not None:
        gen = Lineage(settings.models_dir).generation(gen_id)
        text = own_constitution(gen)
        if text is not None:
            return Constitution(text, gen.id, gen.folder / CONSTITUTION_NAME)
    return Constitution(settings.persona(), "draft", settings.persona_path())


def constitution_text(settings: Settings, gen_id: str | None = None) -> str:
    """The constitution text in force for generation `gen_id`; None: the one the next cycle trains with."""
    return constitution_for(settings, gen_id).text


def served_constitution(settings: Settings) -> Constitution:
    """The active generation's constitution (the draft when there is no lineage yet)."""
    active = Lineage(settings.models_dir).active_id()
    return constitution_for(settings, active)


def constitution_diff(settings: Settings, a: str, b: str) -> str:
    """A unified diff between the constitutions of generations `a` and `b` ("draft": the draft);
    empty when they are the same text."""
    for name in (a, b):
        if name != "draft" and gen_number(name) is None:
            raise OuroError(f"{name!r} is not a generation", hint="name generations as gen-0003, or draft")
    left = constitution_for(settings, None if a == "draft" else a)
    right = constitution_for(settings, None if b == "draft" else b)
    return "\n".join(difflib.unified_diff(left.text.splitlines(), right.text.splitlines(),
                                          fromfile=f"{a} ({left.source})", tofile=f"{b} ({right.source})", n=2,
                                          lineterm=""))


def persona_report(settings: Settings) -> dict:
    """What /persona and `ouro persona` show: the text in force, the draft, and each generation's SHA."""
    lineage = Lineage(settings.models_dir)
    served, draft = served_constitution(settings), constitution_for(settings)
    gens = [{"id": g.id, "constitution_sha256": g.meta.get("constitution_sha256")} for g in lineage.generations()]
    return {"active": lineage.active_id(),
            "served": {"source": served.source, "sha256": served.sha256, "path": str(served.path), "text": served.text},
            "draft": {"sha256": draft.sha256, "path": str(draft.path), "text": draft.text,
                      "in_force": draft.sha256 == served.sha256},
            "generations": gens}


def persona_text(report: dict) -> str:
    """The report as people read it."""
    served, draft = report["served"], report["draft"]
    own = "its own" if served["source"] != "draft" else \
        "none of its own, so the draft's, as read when the bot starts"
    lines = [f"Constitution in force — {report['active'] or 'no generation yet'} ({own}, sha {served['sha256'][:12]}):",
             "", served["text"] or "(empty)", ""]
    if draft["in_force"]:
        lines.append(f"The draft ({draft['path']}) is this same text.")
    else:
        lines.append(f"The draft ({draft['path']}, sha {draft['sha256'][:12]}) differs: the next cycle trains with it. "
                     f"Diff: /persona {report['active'] or 'gen-0000'} draft")
    kept = [g for g in report["generations"] if g["constitution_sha256"]]
    if kept:
        lines.append("Trained with: " + " · ".join(f"{g['id']} {g['constitution_sha256'][:8]}" for g in kept))
    return "\n".join(lines)
