"""The gate: may this child be served? And the stop rule: should we stop training at all?

A child passes only when every check holds:
- invariants from the cycle (merge left logits unchanged, GGUF readable and its logits agree
  with the merged weights) — passed in as `invariant_failures`;
- absolute thresholds (defaults: recall ≥ 0.90, generalization ≥ 0.85, style drift ≤ 2,
  format ≥ 0.8, contamination ≤ 0.05 unless no worse than the parent's, refusal style ≤ 3
  unless no worse than the parent's beyond the margin);
- no regression against the parent beyond a margin on the scores both are measured on
  (style drift and format; recall and generalization are already relative to the parent).

A base model usually starts *below* the style-drift and format targets (an assistant-tuned
base answers in assistant voice). Refusing every child of such a parent would mean the loop
can never start, so when the parent itself misses one of those two targets, the child must
instead be no worse than the parent beyond the regression margin, and no worse than the
lineage's base (generation 0, `base`) beyond it either (noted in the result). The margin is one
probe's worth: greedy replies to 12 tone probes and 5 format probes flip one way or the other
between generations ("I'm sorry to hear that" → "I'm so sorry to hear that"), and a rule
without it refused a child over one flipped probe (docs/design-notes.md). Measuring against
the base as well keeps those single-probe steps from adding up generation after generation.
Recall and generalization thresholds always apply as they are.

Stop rule (design doc): if for two consecutive generations generalization improved by less
than 0.05 while style drift rose by more than 0.1, stop: keep the parent and tell the admins
to fix the data, not the model size.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Thresholds:
    min_recall: float = 0.90
    min_generalization: float = 0.85
    max_style_drift: float = 2.0
    min_format: float = 0.8
    style_drift_margin: float = 1.0     # child may be at most this much worse than its parent
    format_margin: float = 0.2
    max_contamination: float = 0.05
    max_refusal_style: float = 3.0
    refusal_style_margin: float = 1.5   # one or two probes' worth, as refusal probes flip like tone probes


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)   # why it was refused (empty when passed)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "reasons": self.reasons, "notes": self.notes}


def decide(child: dict, parent: dict | None, th: Thresholds, *, invariant_failures: list[str] | None = None,
           base: dict | None = None) -> GateResult:
    """`child`/`parent`/`base`: {"recall", "generalization", "style_drift", "format", "contamination",
    "refusal_style"} (a score that is missing or None was not measured; parent and base
    may lack some; `base` is generation 0's, as measured when its first child was evaluated)."""
    reasons = list(invariant_failures or [])
    recall, gen = child.get("recall"), child.get("generalization")
    drift, fmt = child.get("style_drift"), child.get("format")
    if recall is None or recall < th.min_recall:
        reasons.append(f"recall {recall} < {th.min_recall}: it forgot what earlier generations knew")
    if gen is None:
        reasons.append("generalization not measured: no held-out examples in the new data")
    elif gen < th.min_generalization:
        reasons.append(f"generalization {gen} < {th.min_generalization}: it did not learn the new data")
    notes = []
    p_drift = (parent or {}).get("style_drift")
    p_fmt = (parent or {}).get("format")
    b_drift, b_fmt = (base or {}).get("style_drift"), (base or {}).get("format")
    if drift is None:
        reasons.append("style drift not measured")
    elif p_drift is not None and p_drift > th.max_style_drift and drift > th.max_style_drift:
        if b_drift is not None and drift > max(b_drift, th.max_style_drift) + th.style_drift_margin:
            reasons.append(f"style drift {drift} > {th.max_style_drift} and worse than the base's {b_drift} "
                           f"beyond the margin {th.style_drift_margin}")
        elif drift <= p_drift + th.style_drift_margin:   # beyond it: the regression check below says so
            notes.append(f"style drift {drift} still above the target {th.max_style_drift}, but no worse than the "
                         f"parent's {p_drift} beyond the margin {th.style_drift_margin}")
    elif drift > th.max_style_drift:
        reasons.append(f"style drift {drift} > {th.max_style_drift}: too much assistant voice")
    if fmt is None:
        reasons.append("format not measured")
    elif p_fmt is not None and p_fmt < th.min_format and fmt < th.min_format:
        if b_fmt is not None and fmt < min(b_fmt, th.min_format) - th.format_margin:
            reasons.append(f"format {fmt} < {th.min_format} and worse than the base's {b_fmt} "
                           f"beyond the margin {th.format_margin}")
        elif fmt >= p_fmt - th.format_margin:
            notes.append(f"format {fmt} still below the target {th.min_format}, but no worse than the parent's "
                         f"{p_fmt} beyond the margin {th.format_margin}")
    elif fmt < th.min_format:
        reasons.append(f"format {fmt} < {th.min_format}: replies are not clean single turns")
    dirty, p_dirty = child.get("contamination"), (parent or {}).get("contamination")
    if dirty is not None and dirty > th.max_contamination and (p_dirty is None or dirty > p_dirty):
        reasons.append(f"contamination {dirty} > {th.max_contamination}: its replies carry links, handles, "
                       "numbers, spam or blocklisted words (see evals.json) — check what it was taught")
    refusal, p_refusal = child.get("refusal_style"), (parent or {}).get("refusal_style")
    if refusal is not None and refusal > th.max_refusal_style and \
            (p_refusal is None or refusal > p_refusal + th.refusal_style_margin):
        reasons.append(f"refusal style {refusal} > {th.max_refusal_style}" +
                       (f" and worse than the parent's {p_refusal} beyond the margin {th.refusal_style_margin}"
                        if p_refusal is not None else "") +
                       ": it says no in assistant voice (\"As an AI I cannot…\"), not its own")
    elif refusal is not None and refusal > th.max_refusal_style:
        notes.append(f"refusal style {refusal} still above the target {th.max_refusal_style}, but no worse than "
                     f"the parent's {p_refusal} beyond the margin {th.refusal_style_margin}")
    if parent:
        if drift is not None and p_drift is not None and drift > p_drift + th.style_drift_margin:
            reasons.append(f"style drift regressed: {drift} vs parent {p_drift} (margin {th.style_drift_margin})")
        if fmt is not None and p_fmt is not None and fmt < p_fmt - th.format_margin:
            reasons.append(f"format regressed: {fmt} vs parent {p_fmt} (margin {th.format_margin})")
        if drift is not None and p_drift is not None:
            notes.append(f"style drift {p_drift} → {drift}")
    return GateResult(passed=not reasons, reasons=reasons, notes=notes)


def stop_rule(history: list[dict], *, min_gain: float = 0.05, max_drift_rise: float = 0.1) -> str | None:
    """`history`: scores of consecutive generations, oldest first, the candidate last.

    Returns the admins' message when the last two steps both stalled on generalization while
    style drift rose; None otherwise.
    """
    if len(history) < 3:
        return None
    steps = list(zip(history[-3:-1], history[-2:], strict=True))
    for before, after in steps:
        g0, g1 = before.get("generalization"), after.get("generalization")
        d0, d1 = before.get("style_drift"), after.get("style_drift")
        if None in (g0, g1, d0, d1):
            return None
        if not (g1 - g0 < min_gain and d1 - d0 > max_drift_rise):
            return None
    return ("stop rule: for two consecutive generations generalization improved by < "
            f"{min_gain} while style drift rose by > {max_drift_rise}. Training is halted and the parent "
            "kept. Fix the data (more varied, better-rated examples), not the model size; then run "
            "`ouro cycle --force` to resume.")
