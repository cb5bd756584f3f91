"""`ouro cycle`: one learning generation, end to end, restartable and all-or-nothing.

self-refinement proposals (trainer/refine.py) → export → hold-out + replay → LoRA fine-tune (+DPO on pairs, +KTO on lone ratings) → merge → GGUF → quantize → evals →
gate → record → promote. The child is assembled in a hidden staging folder and renamed into
`models/gen-NNNN` only after `meta.json` is written, so a crash at any stage leaves nothing
half-made visible and the active generation untouched; the next cycle notices the leftover
staging folder, records how the previous run died, and removes it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from config.settings import Settings
from core.errors import OuroError
from core.files import atomic_write_text, now, sha256_file
from evals.gate import Thresholds, decide, stop_rule
from lineage.constitution import constitution_text, write_constitution
from lineage.generations import GGUF_NAME, Generation, Lineage
from lineage.promote import POINTER_EVENTS, promote
from memory import language
from memory.export import Delta, Pair, Rated, reviewed_since, still_trainable
from memory.screens import Screens, screens_for
from memory.store import Store
from memory.trust import policy_for
from trainer.lock import CycleLock
from trainer.peak import peak_gpu_mb, peak_rss_mb, reset_peaks
from trainer.replay import ancestor_heldout, ancestors, make_split, write_jsonl
from trainer.trigger import carried_over

log = logging.getLogger(__name__)
HALT_FILE = "HALTED"


@dataclass
class CycleReport:
    status: str                       # promoted | held | refused | skipped | failed
    gen_id: str | None = None
    parent_id: str | None = None
    reasons: list[str] = field(default_factory=list)
    scores: dict = field(default_factory=dict)
    parent_scores: dict = field(default_factory=dict)
    stage_s: dict = field(default_factory=dict)
    stage_peak_rss_mb: dict = field(default_factory=dict)   # each stage's own peak (trainer/peak.py)
    stage_peak_gpu_mb: dict = field(default_factory=dict)   # the same for GPU memory, where CUDA is
    train: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)         # generations whose GGUF this cycle deleted (keep_gguf)

    def to_dict(self) -> dict:
        return asdict(self)


class _Stages:
    """Times each stage, measures its peak memory, and leaves a breadcrumb in the staging folder for
    post-mortems."""

    def __init__(self, on_stage: Callable[[str], None] | None) -> None:
        self.on_stage = on_stage
        self.current = "start"
        self.times: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self.peak_gpu_mb: dict[str, float] = {}
        self.staging: Path | None = None
        self._floor: tuple[float, float] = (0.0, 0.0)
        self._t = time.perf_counter()
        reset_peaks()

    def _finish(self, t: float) -> None:
        self.times[self.current] = round(t - self._t, 2)
        self.peak_mb[self.current] = round(max(peak_rss_mb(), self._floor[0]), 1)
        gpu = peak_gpu_mb()
        if gpu is not None:  # pragma: no cover - needs CUDA
            self.peak_gpu_mb[self.current] = round(max(gpu, self._floor[1]), 1)
        self._floor = (0.0, 0.0)

    def enter(self, name: str) -> None:
        t = time.perf_counter()
        self._finish(t)
        self.current, self._t = name, t
        reset_peaks()
        self.breadcrumb()
        if self.on_stage:
            self.on_stage(name)

    def absorb(self, peak_mb: dict[str, float], peak_gpu_mb: dict[str, float]) -> None:
        """The current stage measured its parts itself (resetting the high-water mark between them):
        its peak is at least theirs."""
        self._floor = (max(peak_mb.values(), default=0.0), max(peak_gpu_mb.values(), default=0.0))

    def breadcrumb(self) -> None:
        if self.staging is not None and self.staging.exists():
            atomic_write_text(self.staging / "STAGE", f"{os.getpid()} {self.current}\n")

    def close(self) -> dict:
        self._finish(time.perf_counter())
        for d in (self.times, self.peak_mb, self.peak_gpu_mb):
            d.pop("start", None)
        return self.times


def _scores(evals: dict) -> dict:
    return {k: (evals.get(k) or {}).get("score")
            for k in ("recall", "generalization", "style_drift", "format", "contamination", "refusal_style")}


def _ledger_row(gen_id, parent: Generation, *, child_sha="", data_sha="", train=None, scores=None,
                event="", gate="", reason="", actor="", data=None, constitution_sha="") -> dict:
    train, scores, data = train or {}, scores or {}, data or {}
    return {"gen_folder": gen_id, "parent_sha": parent.sha256, "child_sha": child_sha, "data_delta_sha": data_sha,
            "steps": train.get("steps", ""), "lr": train.get("lr", ""),
            "walltime_min": train.get("walltime_min", ""), "loss_start": train.get("loss_start", ""),
            "loss_end": train.get("loss_end", ""), "eval_recall": scores.get("recall", ""),
            "eval_generalization": scores.get("generalization", ""),
            "eval_style_drift": scores.get("style_drift", ""), "event": event, "parent_id": parent.id,
            "gate": gate, "reason": reason, "actor": actor, "contributors": data.get("contributors", ""),
            "largest_share": data.get("largest_share", ""),
            "screened": sum((data.get("screened") or {}).values()) if data else "",
            "eval_contamination": scores.get("contamination", ""),
            "kto_desirable": train.get("kto_desirable", ""), "kto_undesirable": train.get("kto_undesirable", ""),
            **{f"refine_{k}": (data.get("refine") or {}).get(k, "") for k in ("made", "kept", "dropped", "used")},
            "constitution_sha": constitution_sha}


def cleanup_stale(lineage: Lineage, store: Store) -> list[str]:
    """Remove staging folders of cycles that died, recording where each one died.

    Called under the cycle lock, which every process that stages a generation holds while it does
    (generation 0 is staged only while there is none, when no cycle can run): any staging folder
    found here is dead, whatever process now has the pid its breadcrumb names (after a reboot it may
    be the bot itself), and a breadcrumb cut short by a crash only loses the stage's name."""
    found = []
    for staging in lineage.dir.glob(".gen-*.tmp-*"):
        pid, stage = 0, "unknown"
        with contextlib.suppress(OSError, ValueError, IndexError):
            parts = (staging / "STAGE").read_text().split()
            stage = parts[1] if len(parts) > 1 else stage
            pid = int(parts[0])
        reason = f"previous cycle (pid {pid or '?'}) died during stage '{stage}'; its partial files were removed"
        store.log_event("cycle_died", detail={"staging": staging.name, "stage": stage})
        lineage.append_ledger({"gen_folder": staging.name.split(".tmp-")[0].lstrip("."), "event": "died",
                               "reason": reason, "actor": "system"})
        shutil.rmtree(staging, ignore_errors=True)
        found.append(reason)
    return found


def disk_full(exc: BaseException | None) -> bool:
    """Whether an error (or what caused it) is the disk running out of space."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def finish_interrupted(settings: Settings, lineage: Lineage, store: Store) -> str | None:
    """A generation its cycle renamed into place but died before finishing (stage 'promote'):
    record it from its meta.json if the cycle had not, and, if it passed the gate, nothing has
    moved the pointer to or past it since and its parent still serves, promote it — what the dead
    cycle was about to do. Returns its id, or None."""
    rows, gens = lineage.ledger(), lineage.generations()
    if not rows or not gens:
        return None
    gen = gens[-1]   # a cycle's generation is always the newest folder
    if gen.parent_id is None or "data_cutoff" not in gen.meta:
        return None      # generation 0, or not made by a cycle
    # rows of earlier attempts at this id that died or failed before it was renamed into place say nothing of it
    own = [r.get("event") for r in rows
           if r["gen_folder"] == gen.id and r.get("event") not in ("died", "failed", "gguf_pruned")]
    if any(e != "candidate" for e in own):
        return None      # promoted, held or served by hand since: its cycle finished
    meta, parent = gen.meta, lineage.generation(gen.parent_id)
    passed = meta.get("status") in ("promoted", "held")
    if not own:
        lineage.append_ledger(_ledger_row(
            gen.id, parent, child_sha=gen.sha256, data_sha=(meta.get("data") or {}).get("data_delta_sha", ""),
            train=meta.get("train"), scores=meta.get("scores"), data=meta.get("data"), event="candidate",
            gate="passed" if passed else "refused", actor=meta.get("actor", ""),
            constitution_sha=meta.get("constitution_sha256", ""),
            reason=f"recorded by the next cycle (its own died before recording it): "
                   f"{'; '.join(meta.get('reasons') or []) or 'all checks passed'}"))
        store.upsert_generation(gen_id=gen.id, parent_id=parent.id, gguf_path=str(gen.gguf),
                                gguf_sha256=gen.sha256, status="candidate" if passed else "refused", meta=meta)
    elif not passed:
        return None      # recorded as refused: its cycle had nothing left to do
    store.log_event("cycle_died", detail={"gen": gen.id, "stage": "promote"})
    try:   # held already (its cycle saw the pointer move), or the pointer left the parent since
        moved = meta.get("status") != "held" and promote(
            settings, store, gen.id, actor=meta.get("actor") or "system", expect=parent.id,
            why=f"passed the gate against {parent.id} (promoted by the next cycle: its own died first)")
    except OuroError as exc:   # e.g. its GGUF damaged since: recorded, so it cannot stop every later cycle
        _hold(lineage, store, parent, gen, why=str(exc))
        return gen.id
    if not moved:
        _hold(lineage, store, parent, gen)
    return gen.id


def next_gen_id(lineage: Lineage) -> str:
    numbers = [int(p.name.split("-")[1]) for p in lineage.dir.glob("gen-*") if p.name.split("-")[1].isdigit()]
    return f"gen-{(max(numbers) + 1 if numbers else 0):04d}"


def ensure_full_precision(gen: Generation, precision: str = "float32") -> Path:
    """The parent's full-precision weights; generation 0's come from dequantizing its GGUF (in the
    dtype `precision` trains from: trainer/precision.py `base_dtype`)."""
    hf = gen.folder / "hf"
    if (hf / "config.json").exists():
        return hf
    if gen.parent_id is None:
        from trainer.convert import dequantize_gguf_to_hf
        from trainer.precision import base_dtype

        dequantize_gguf_to_hf(gen.gguf, hf, dtype=base_dtype(precision))
        return hf
    raise OuroError(f"{gen.id} has no full-precision weights (pruned by keep_full_precision)",
                    hint="promote a newer generation or raise OURO_KEEP_FULL_PRECISION; training never "
                         "starts from a quantized file")


def prune_full_precision(lineage: Lineage, keep: int) -> list[str]:
    """Remove the full-precision weights (`hf/`) of all but the active generation, its parent, the
    `keep` newest promoted ones and the newest generation (a refused candidate an admin may still
    promote and train from). Run after every cycle that made a generation, refused ones included:
    otherwise a run of refusals kept a merged checkpoint each (~28 GB for a 7B) until one passed."""
    active = lineage.active()
    gens = lineage.generations()
    protected = {active.id, active.parent_id} | ({gens[-1].id} if gens else set())
    with_hf = [g for g in gens if (g.folder / "hf").exists()]
    promoted = [g for g in with_hf if g.meta.get("status") in ("promoted", "base")]
    protected |= {g.id for g in promoted[-keep:]}
    pruned = []
    for g in with_hf:
        if g.id not in protected and g.parent_id is not None:
            shutil.rmtree(g.folder / "hf", ignore_errors=True)
            pruned.append(g.id)
    return pruned


def prune_ggufs(lineage: Lineage, keep: int) -> list[str]:
    """Delete the GGUFs of all but generation 0, the active generation, its parent, the one it
    replaced (what the live watch rolls back to), the newest generation and the `keep` that served
    most recently (`keep_gguf`; 0: prune nothing) — by when they last served, not by number, so a
    generation rolled back to stays — each with a note and a ledger row (`gguf_pruned`). A daily
    cycle otherwise keeps a model file a day: ~1.5 TB in six months for an 8B in Q8_0. Under the
    pointer lock, so nothing is promoted meanwhile."""
    if keep <= 0:
        return []
    pruned = []
    with lineage.pointer_lock():
        last_served: dict[str, int] = {}
        replaced = None   # the generation the pointer last moved away from
        for i, row in enumerate(lineage.ledger()):
            if row.get("event") in POINTER_EVENTS:
                last_served[row["gen_folder"]] = i
                replaced = row.get("parent_id") or replaced
        served = sorted(last_served, key=last_served.get)
        gens = lineage.generations()
        active = lineage.active()
        protected = {active.id, active.parent_id, replaced, gens[-1].id} | {g.id for g in gens if g.parent_id is None}
        protected |= set(served[-keep:])
        for g in gens:
            if g.id in protected or g.pruned is not None or not g.gguf.exists():
                continue
            why = (f"not among the {keep} newest generations that served (keep_gguf)" if g.id in served
                   else "a candidate that never served, older than the newest")
            freed = g.prune_gguf(why)
            lineage.append_ledger({"gen_folder": g.id, "event": "gguf_pruned", "child_sha": g.sha256,
                                   "reason": f"{why}; {freed / 1e9:.2f} GB freed", "actor": "cycle"})
            pruned.append(g.id)
    return pruned


def run_cycle(settings: Settings, store: Store, *, actor: str = "cli", force: bool = False, progress: bool = True,
              on_stage: Callable[[str], None] | None = None,
              on_step: Callable[[int, int], None] | None = None) -> CycleReport:
    precision = check_precision(settings)
    lineage = Lineage(settings.models_dir)
    with CycleLock(settings.models_dir / ".cycle.lock"):
        cleanup_stale(lineage, store)
        finish_interrupted(settings, lineage, store)
        halt = settings.models_dir / HALT_FILE
        if halt.exists() and not force:
            return _skip(lineage, store, actor, halt.read_text().strip())
        if force and halt.exists():
            halt.unlink()
        return _cycle(settings, store, lineage, actor=actor, progress=progress, stages=_Stages(on_stage),
                      on_step=on_step, precision=precision)


def check_precision(settings: Settings) -> str:
    """The training precision this cycle will use (trainer/precision.py), decided before any work so
    that a missing GPU library, or a model too big for the card in bf16, stops the cycle with its
    fix, not an ImportError or out-of-memory halfway. Sized on the serving generation's file (the
    parent the cycle trains)."""
    from trainer.precision import resolve

    lineage = Lineage(settings.models_dir)
    active = lineage.active_id()
    base = lineage.generation(active).gguf if active is not None else None
    return resolve(settings.train_precision, base).name


def _skip(lineage: Lineage, store: Store, actor: str, reason: str) -> CycleReport:
    parent = lineage.active()
    lineage.append_ledger(_ledger_row("", parent, event="skip", reason=reason, actor=actor))
    store.log_event("cycle_skipped", detail={"reason": reason})
    return CycleReport(status="skipped", parent_id=parent.id, reasons=[reason])


def _cycle(settings: Settings, store: Store, lineage: Lineage, *, actor: str, progress: bool,
           stages: _Stages, on_step: Callable[[int, int], None] | None = None,
           precision: str = "float32") -> CycleReport:
    """The stages in order; any failure before the rename removes the staging folder whole."""
    parent = lineage.active()
    persona = constitution_text(settings)   # the draft in force: this generation is trained and judged with it
    stages.enter("refine")
    refined = _refine(settings, store, parent)
    until = now()
    stages.enter("export")
    delta = reviewed_since(store, persona=persona, since=parent.meta.get("data_cutoff"), until=until,
                           budget=settings.data_budget, opt_out_by_default=settings.training_opt_out_default,
                           policy=policy_for(settings, store), screens=screens_for(settings),
                           carried=carried_over(parent, store, settings))
    if not delta.examples and not delta.pairs:   # lone 👎s alone wait: a generation needs something to imitate
        docs = store.document_stats(after_id=_docs_upto(parent))["chunks"]
        lone = f"; {len(delta.rated)} lone ratings wait" if delta.rated else ""
        if refined.get("made") or refined.get("pending"):
            lone += f"; self-refinement: {refined.get('made', 0)} proposals made, {refined.get('pending', 0)} wait in /review"
        return _skip(lineage, store, actor, f"nothing reviewed since {parent.id} "
                                            f"(considered {delta.considered} rated items{lone})"
                                            + (f"; {docs} document chunks wait for a cycle with chat data"
                                               if docs else ""))
    gen_id = next_gen_id(lineage)
    staging = lineage.dir / f".{gen_id}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "data").mkdir(parents=True)
    stages.staging = staging
    stages.breadcrumb()
    report = CycleReport(status="failed", gen_id=gen_id, parent_id=parent.id)
    try:
        chain = ancestors(lineage, parent)
        split, data_sha = _write_data(settings, store, staging, delta, chain, report)
        report.data["refine"] = _refine_counts(store, refined, split, since=parent.meta.get("data_cutoff"),
                                               until=until)
        if settings.contrast_pairs and any(e.source == "import" for e in split.train):
            stages.enter("contrast")
            report.data["contrast"] = _contrast(settings, staging, parent, split)
            report.data["dpo_pairs"] = len(split.pairs)
        docs_base = None
        if settings.doc_pretrain_tokens and store.document_stats(after_id=_docs_upto(parent))["chunks"]:
            stages.enter("documents")
            docs_base = _documents(settings, store, staging, parent, split, report, progress=progress,
                                   on_step=on_step)
        else:
            report.data["documents"] = {"chunks": 0, "tokens": 0, "upto_chunk_id": _docs_upto(parent),
                                        "waiting": store.document_stats(after_id=_docs_upto(parent))["chunks"]}
        if docs_base is None:
            stages.enter("dequantize")   # generation 0's GGUF → full-precision weights, once per line
            ensure_full_precision(parent, precision)
        stages.enter("train")
        result = _train(settings, staging, parent, split, report, progress=progress, on_step=on_step, base=docs_base,
                        precision=precision)
        stages.absorb(result.stage_peak_rss_mb, result.stage_peak_gpu_mb)
        if docs_base is not None:
            shutil.rmtree(docs_base, ignore_errors=True)   # merged into the SFT result; 4 bytes a weight
        stages.enter("convert")
        _convert(settings, staging, parent, gen_id)
        stages.enter("eval")
        evals, invariants = _evaluate(settings, staging, parent, chain, split, persona)
        report.scores, report.parent_scores = _scores(evals["child"]), _scores(evals["parent"])
        stages.enter("gate")
        if result.trained_tensors_changed <= 0:
            invariants.append("training changed no trainable parameter")
        gate = _gate(settings, report, chain, invariants)
        if gate.passed and lineage.active_id() != parent.id:
            report.status = "held"   # the pointer left the parent while it trained (see _hold): recorded so
        stages.enter("record")
        child_sha = sha256_file(staging / GGUF_NAME)
        constitution_sha = write_constitution(staging, persona)
        atomic_write_text(staging / "evals.json", json.dumps({**evals, "gate": gate.to_dict()}, indent=2,
                                                             ensure_ascii=False))
        report.stage_s = stages.close()
        report.stage_peak_rss_mb, report.stage_peak_gpu_mb = stages.peak_mb, stages.peak_gpu_mb
        meta = {"id": gen_id, "parent_id": parent.id, "gguf": GGUF_NAME, "gguf_sha256": child_sha,
                "created_at": now("seconds"), "status": report.status, "reasons": gate.reasons, "scores": report.scores,
                "parent_scores": report.parent_scores, "data_cutoff": until, "data": report.data,
                "train": report.train, "stage_s": report.stage_s,
                "stage_peak_rss_mb": report.stage_peak_rss_mb, "stage_peak_gpu_mb": report.stage_peak_gpu_mb,
                "quantization": settings.quantization,
                "actor": actor, "constitution_sha256": constitution_sha}
        (staging / "STAGE").unlink(missing_ok=True)
        atomic_write_text(staging / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False))
        os.replace(staging, lineage.dir / gen_id)
    except BaseException as exc:
        stage = stages.current
        shutil.rmtree(staging, ignore_errors=True)
        text = exc.args[0] if isinstance(exc, OuroError) and exc.args else str(exc)   # its hint goes last
        full = "the disk is full: " if disk_full(exc) and "disk full" not in text else ""
        reason = f"failed during {stage}: {full}{text}"
        lineage.append_ledger(_ledger_row(gen_id, parent, event="failed", reason=reason[:500], actor=actor))
        store.log_event("cycle_failed", detail={"gen": gen_id, "stage": stage, "error": repr(exc)[:500]})
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise OuroError(f"the learning cycle {reason}; its partial files were removed and nothing served "
                        "changed", hint=getattr(exc, "hint", None)) from exc

    stages.enter("promote")   # the generation is in place; a death from here on is finished by the next cycle
    gen = lineage.generation(gen_id)
    lineage.append_ledger(_ledger_row(gen_id, parent, child_sha=child_sha, data_sha=data_sha, train=report.train,
                                      scores=report.scores, data=report.data, event="candidate",
                                      gate="passed" if gate.passed else "refused",
                                      reason="; ".join(gate.reasons) or "all checks passed", actor=actor,
                                      constitution_sha=constitution_sha))
    store.upsert_generation(gen_id=gen_id, parent_id=parent.id, gguf_path=str(gen.gguf), gguf_sha256=child_sha,
                            status="candidate" if gate.passed else "refused", meta=meta)
    if report.status == "held" or (gate.passed and not promote(
            settings, store, gen_id, actor=actor, expect=parent.id, why=f"passed the gate against {parent.id}")):
        report.status = "held"   # (moved in the instant between recording and promoting: meta says passed)
        report.reasons.append(_hold(lineage, store, parent, gen))
    elif not gate.passed:
        store.log_event("cycle_refused", detail={"gen": gen_id, "reasons": gate.reasons})
    prune_full_precision(lineage, settings.keep_full_precision)
    try:   # disk housekeeping: a failure here is logged, it does not undo the cycle
        report.pruned = prune_ggufs(lineage, settings.keep_gguf)
    except OSError:
        log.warning("could not prune old generations' GGUFs", exc_info=True)
    for gen_id in report.pruned:
        store.log_event("gguf_pruned", detail={"gen": gen_id})
    return report


def _hold(lineage: Lineage, store: Store, parent: Generation, gen: Generation, why: str | None = None) -> str:
    """The child passed against `parent`, but the pointer left `parent` while it trained (an admin's
    or the live watch's rollback, a promotion by hand): serving it now would undo that decision.
    It is kept as a candidate an admin can promote (recorded as `held`); returns why. `why`: another
    reason it could not be promoted."""
    now_id = lineage.active_id()
    reason = (f"passed the gate against {parent.id}, but " +
              (f"it could not be promoted: {why}" if why else f"{now_id} was made active while it trained; "
               f"not promoted over that (/promote {gen.id} serves it)"))
    lineage.append_ledger(_ledger_row(gen.id, parent, child_sha=gen.sha256, event="held", gate="passed",
                                      reason=reason, actor="system"))
    store.log_event("cycle_held", detail={"gen": gen.id, "parent": parent.id, "active": now_id})
    return reason


def _write_data(settings: Settings, store: Store, staging: Path, delta, chain: list[Generation],
                report: CycleReport):
    """The new data as exported, the split (held-out, replay) and its files; (split, the data's SHA-256)."""
    delta_text = delta.to_jsonl()
    (staging / "data" / "new.jsonl").write_text(delta_text, encoding="utf-8")
    deferred = Delta(examples=[i for i in delta.deferred if not isinstance(i, (Pair, Rated))],
                     pairs=[i for i in delta.deferred if isinstance(i, Pair)],
                     rated=[i for i in delta.deferred if isinstance(i, Rated)])
    (staging / "data" / "deferred.jsonl").write_text(deferred.to_jsonl(), encoding="utf-8")
    data_sha = hashlib.sha256(delta_text.encode("utf-8")).hexdigest()
    split = make_split(delta, chain, fraction=settings.heldout_fraction, replay_size=settings.replay_size,
                       seed=settings.train_seed,
                       allowed=lambda pool: still_trainable(store, pool,
                                                            opt_out_by_default=settings.training_opt_out_default))
    write_jsonl(staging / "data" / "train.jsonl", [asdict(e) for e in split.train])
    write_jsonl(staging / "data" / "heldout.jsonl",
                [{"messages": m, "source": src, **({"rejected": rej} if rej is not None else {})}
                 for m, src, rej in zip(split.heldout, split.heldout_sources, split.heldout_rejected, strict=True)])
    write_jsonl(staging / "data" / "pairs.jsonl", [asdict(p) for p in split.pairs])
    write_jsonl(staging / "data" / "kto.jsonl", [asdict(r) for r in split.rated])
    report.data = {"new_examples": len(delta.examples), "new_pairs": len(delta.pairs),
                   "train": len(split.train), "replay": len(split.replay), "heldout": len(split.heldout),
                   "dpo_pairs": len(split.pairs), "kto_desirable": sum(r.desirable for r in split.rated),
                   "kto_undesirable": sum(not r.desirable for r in split.rated), "dropped": delta.dropped, "data_delta_sha": data_sha,
                   "screened": delta.screened, "screened_items": delta.screened_items[:50],
                   "waiting_review": {str(k): v for k, v in delta.waiting.items()},
                   "deferred": len(delta.deferred), **delta.sources,
                   "languages": language.coverage(store.history_languages())}   # what the evals were written for
    return split, data_sha


def train_config(settings: Settings, precision: str | None = None):
    """The trainer's configuration from the settings (one place, so the cycle and the bench agree);
    `precision` as check_precision resolved it (None: resolve it here)."""
    from trainer.finetune import TrainConfig

    return TrainConfig(rank=settings.lora_rank, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                       lr=settings.learning_rate, epochs=settings.train_epochs, min_steps=settings.train_min_steps,
                       max_epochs=max(settings.train_max_epochs, settings.train_epochs),
                       max_steps=settings.train_max_steps, lr_schedule=settings.lr_schedule,
                       batch=settings.train_batch, max_seq_len=settings.max_seq_len, dpo_beta=settings.dpo_beta,
                       dpo_steps=settings.dpo_steps, dpo_epochs=settings.dpo_epochs, dpo_max_len=settings.dpo_max_len,
                       dpo_lr=settings.dpo_lr, dpo_nll_weight=settings.dpo_nll_weight,
                       dpo_kl_beta=settings.dpo_kl_beta, kto_steps=settings.kto_steps, kto_epochs=settings.kto_epochs,
                       kto_batch=settings.kto_batch, kto_beta=settings.kto_beta, kto_lr=settings.kto_lr,
                       seed=settings.train_seed, kl_beta=settings.kl_beta, kl_free_below=settings.kl_free_below,
                       precision=precision or check_precision(settings))


def _refine(settings: Settings, store: Store, parent: Generation) -> dict:
    """Stage 0: the parent critiques and rewrites lone 👎'd replies and a few scenarios (trainer/refine.py),
    proposals for /review. Optional practice: if it fails (the GGUF will not load, …), the cycle trains
    on what people and admins gave, and the report says why none were made."""
    from trainer.refine import refine_with_gguf

    try:
        out = refine_with_gguf(settings, store, parent.gguf, generation_id=parent.id).to_dict()
    except (OuroError, OSError, ValueError, RuntimeError) as exc:
        log.warning("self-refinement failed; the cycle goes on without it", exc_info=True)
        store.log_event("refine_failed", detail={"gen": parent.id, "error": repr(exc)[:300]})
        out = {"made": 0, "error": str(exc)[:300]}
    out.pop("proposals", None)
    out["pending"] = store.proposal_counts()["pending"]
    return out


def _contrast(settings: Settings, staging: Path, parent: Generation, split) -> dict:
    """Pairs from an imported history (trainer/contrast.py), added to the split's pairs and to
    pairs.jsonl. Optional like self-refinement: if the parent will not load or generate, the cycle
    trains on the import by imitation alone and the report says why."""
    from engine.protocol import Sampling
    from evals.scoring import cycle_gpu_layers
    from trainer.contrast import SampledWriter, contrast_pairs

    try:
        writer = SampledWriter(parent.gguf, generation_id=parent.id, n_ctx=min(settings.n_ctx, 4096),
                               n_threads=settings.n_threads, sampling=Sampling.serving(settings),
                               n_gpu_layers=cycle_gpu_layers(settings, parent.gguf))
        try:
            report = contrast_pairs(split.train, writer, limit=settings.contrast_pairs, seed=settings.train_seed)
        finally:
            writer.close()
    except (OuroError, OSError, ValueError, RuntimeError) as exc:
        log.warning("contrast pairs failed; the cycle trains on the import without them", exc_info=True)
        return {"made": 0, "error": str(exc)[:300]}
    split.pairs.extend(report.pairs)
    with (staging / "data" / "pairs.jsonl").open("a", encoding="utf-8") as f:   # after _write_data's people's pairs
        f.writelines(json.dumps(asdict(p), ensure_ascii=False, sort_keys=True) + "\n" for p in report.pairs)
    return report.to_dict()


def _refine_counts(store: Store, refined: dict, split, *, since: str | None, until: str) -> dict:
    """Self-refinement in numbers for the report and the ledger: proposals made at this cycle's start
    (and botched outputs dropped there), proposals kept (edited included) and dropped by admins since
    the parent took its data, pairs this generation trains on (held-out ones not counted), and how
    many still wait in /review."""
    counts = store.proposal_counts(since=since, until=until)
    out = {"made": refined.get("made", 0), "botched": refined.get("dropped_total", 0),
           "botched_reasons": refined.get("dropped", {}), "kept": counts["kept"], "edited": counts["edited"],
           "dropped": counts["dropped"], "used": sum(p.source == "refine" for p in split.pairs),
           "pending": counts["pending"], "wall_s": refined.get("wall_s", 0.0)}
    if refined.get("error"):
        out["error"] = refined["error"]
    return out


def _docs_upto(gen: Generation) -> int:
    """The last document chunk `gen`'s line has trained on (0: none)."""
    return int(((gen.meta.get("data") or {}).get("documents") or {}).get("upto_chunk_id") or 0)


def _documents(settings: Settings, store: Store, staging: Path, parent: Generation, split, report: CycleReport, *,
               progress: bool, on_step: Callable[[int, int], None] | None) -> Path:
    """Phase 0: the documents not yet trained on in this line, within doc_pretrain_tokens, read in a
    continued-pretraining pass (trainer/pretrain.py) mixed with this cycle's chats; returns the base
    the SFT stage starts from."""
    from engine.template import ChatFormat
    from trainer.pretrain import PretrainConfig, continue_pretraining

    after = _docs_upto(parent)
    chunks = store.document_chunks(after_id=after, max_chars=8 * settings.doc_pretrain_tokens)
    cfg = PretrainConfig(max_tokens=settings.doc_pretrain_tokens, epochs=settings.doc_pretrain_epochs,
                         lr=settings.doc_pretrain_lr, replay_ratio=settings.doc_replay_ratio,
                         batch=settings.train_batch, max_seq_len=settings.max_seq_len, rank=settings.lora_rank,
                         alpha=settings.lora_alpha, seed=settings.train_seed)
    out = staging / "hf-docs"
    texts, replay = [c["text"] for c in chunks], [e.messages for e in split.replay + split.train]
    if settings.train_processes > 1:
        from trainer import train_job

        try:
            result = train_job.pretrain(settings.train_processes, ensure_full_precision(parent), texts, replay, out,
                                        cfg, staging / "docs-job", chat_format=ChatFormat.from_gguf(parent.gguf),
                                        on_step=on_step)
        finally:
            train_job.remove(staging / "docs-job")
    else:
        result = continue_pretraining(ensure_full_precision(parent), texts, replay, out, cfg,
                                      chat_format=ChatFormat.from_gguf(parent.gguf), progress=progress,
                                      on_step=on_step)
    upto = chunks[result.chunks - 1]["id"]
    report.data["documents"] = {"chunks": result.chunks, "tokens": result.tokens, "upto_chunk_id": upto,
                                "waiting": store.document_stats(after_id=upto)["chunks"]}
    report.train["documents"] = result.summary()
    return out


def sft_examples(examples) -> tuple[list[list[dict]], list[float]]:
    """(messages, weights) for SFT: a live example as it is (its final reply is the target); an
    imported window with every owner reply a target (trainer/dataset.py `every_reply`)."""
    from trainer.dataset import every_reply

    sft, weights = [], []
    for e in examples:
        for messages in every_reply(e.messages) if e.source == "import" else [e.messages]:
            sft.append(messages)
            weights.append(e.weight)
    return sft, weights


def _train(settings: Settings, staging: Path, parent: Generation, split, report: CycleReport, *,
           progress: bool, on_step: Callable[[int, int], None] | None, base: Path | None = None,
           precision: str = "float32"):
    from engine.template import ChatFormat
    from trainer.dataset import DPOPair
    from trainer.finetune import train
    from trainer.kto import KTOItem

    base_hf = base or ensure_full_precision(parent, precision)
    sft, weights = sft_examples(split.train + split.replay)
    pairs = [DPOPair(p.prompt, p.chosen, p.rejected) for p in split.pairs]
    kto_items = [KTOItem(r.prompt, r.completion, r.desirable, r.weight) for r in split.rated]
    if settings.train_processes > 1:
        from trainer import train_job

        try:
            result = train_job.finetune(settings.train_processes, base_hf, sft, pairs, staging / "hf",
                                        train_config(settings, precision), staging / "train-job",
                                        chat_format=ChatFormat.from_gguf(parent.gguf), on_step=on_step,
                                        weights=weights, kto_items=kto_items)
        finally:
            train_job.remove(staging / "train-job")
    else:
        result = train(base_hf, sft, pairs, staging / "hf", train_config(settings, precision), progress=progress,
                       chat_format=ChatFormat.from_gguf(parent.gguf), on_step=on_step, weights=weights,
                       kto_items=kto_items)
    report.train = {**report.train, "steps": result.steps, "lr": settings.learning_rate, "epochs": result.epochs,
                    "batch": result.batch, "chats": result.chats, "examples": result.examples,
                    "target_tokens": result.target_tokens, "stage_s": result.stage_s,
                    "peak_rss_mb": result.peak_rss_mb, "stage_peak_rss_mb": result.stage_peak_rss_mb,
                    "stage_peak_gpu_mb": result.stage_peak_gpu_mb, "precision": result.precision,
                    "walltime_min": round(result.wall_s / 60, 2), "loss_start": round(result.loss_start, 4),
                    "loss_end": round(result.loss_end, 4), "tokens_per_s": round(result.tokens_per_s, 1),
                    "dpo_steps": result.dpo_steps, "dpo_margin_start": result.dpo_margin_start,
                    "dpo_margin_end": result.dpo_margin_end, "kto_steps": result.kto_steps,
                    "kto_desirable": result.kto_desirable, "kto_undesirable": result.kto_undesirable,
                    "kto_loss_start": result.kto_loss_start, "kto_loss_end": result.kto_loss_end,
                    "kto_margin_end": result.kto_margin_end, "merge_max_abs_diff": result.merge_max_abs_diff,
                    "trained_tensors_changed": result.trained_tensors_changed}
    return result


def _convert(settings: Settings, staging: Path, parent: Generation, gen_id: str) -> None:
    """Merged weights → F16 GGUF (the parent's tokenizer and template) → the served quantization."""
    from trainer.convert import quantize_gguf, write_gguf

    f16 = staging / "model-f16.gguf"
    write_gguf(staging / "hf", parent.gguf, f16, dtype="f16", name=f"ouroboros {gen_id}")
    if settings.quantization == "F16":
        os.replace(f16, staging / GGUF_NAME)
    else:
        quantize_gguf(f16, staging / GGUF_NAME, settings.quantization)
        f16.unlink()


def _gate(settings: Settings, report: CycleReport, chain: list[Generation], invariants: list[str]):
    """The gate on scores and invariants, then the stop rule over the last generations."""
    th = Thresholds(min_recall=settings.min_recall, min_generalization=settings.min_generalization,
                    max_style_drift=settings.max_style_drift, min_format=settings.min_format,
                    max_contamination=settings.max_contamination, max_refusal_style=settings.max_refusal_style)
    # generation 0's scores, as measured when its first child was evaluated (it has none of its own)
    base = report.parent_scores if len(chain) == 1 else chain[-2].meta.get("parent_scores")
    gate = decide(report.scores, report.parent_scores, th, invariant_failures=invariants, base=base)
    history = [g.meta.get("scores", {}) for g in reversed(chain[:2])] + [report.scores]
    halt_message = stop_rule(history) if gate.passed else None
    if halt_message:
        gate.passed = False
        gate.reasons.append(halt_message)
        atomic_write_text(settings.models_dir / HALT_FILE, halt_message + "\n")
    report.reasons = gate.reasons
    report.status = "promoted" if gate.passed else "refused"
    return gate


def _evaluate(settings: Settings, staging: Path, parent: Generation, chain: list[Generation],
              split, persona: str) -> tuple[dict, list[str]]:
    """The eval suite on the candidate GGUF, then the invariant that the served artifact computes
    what the merged weights it came from compute."""
    from engine.gguf import check_gguf
    from evals.suite import run_suite
    from trainer.convert import logit_agreement

    try:
        check_gguf(staging / GGUF_NAME)
    except OuroError as exc:
        return {"child": {}, "parent": {}}, [f"candidate GGUF refused: {exc}"]
    suite = run_suite(settings, staging / GGUF_NAME, parent, persona=persona, heldout=split.heldout,
                      heldout_sources=split.heldout_sources, heldout_rejected=split.heldout_rejected,
                      ancestor_heldout=ancestor_heldout(chain),
                      screens=Screens(blocklist=tuple(settings.blocklist), reference=persona))
    out, invariants = suite.scores, []
    agreement = logit_agreement(staging / "hf", staging / GGUF_NAME, suite.probe_ids)
    out["child"]["gguf_agreement"] = asdict(agreement)
    if agreement.correlation < 0.98:
        invariants.append(f"GGUF logits disagree with the merged weights (correlation {agreement.correlation:.4f})")
    return out, invariants
