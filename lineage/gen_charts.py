"""Per-generation charts for the owner's web page: eval scores against the parent, 👎 share in live
use, and where each learning cycle spent its time.

The lineage chart (lineage/chart.py) shows the whole story in one picture; these answer the next
questions an owner asks of one generation — did it beat its parent on each eval, did people like
it once it served, which stage of its cycle was slow. Server-rendered PNGs (matplotlib, Agg): the
page's CSP runs no chart script. The live ratings come from the store, which this floor does not
read: the caller passes them in (memory's `ratings_by_generation`).
"""

from __future__ import annotations

from pathlib import Path

from lineage.generations import Generation

CHARTS = ("evals", "feedback", "stages")
EVALS = (("recall", "recall (0–1, higher is better)"), ("generalization", "generalization (0–1, higher is better)"),
         ("style_drift", "style drift (0–10, lower is better)"))
STATUS_COLORS = {"promoted": "tab:green", "held": "tab:orange", "refused": "tab:red", "base": "tab:blue"}


def generation_chart(kind: str, gens: list[Generation], out: Path, *, active: str | None = None,
                     ratings: dict[str, dict[str, int]] | None = None) -> Path:
    """Draw one of CHARTS for `gens` (oldest first) into `out` (a PNG); ValueError for an unknown kind
    or no generations."""
    if kind not in CHARTS:
        raise ValueError(f"unknown chart {kind!r}")
    if not gens:
        raise ValueError("no generations to draw")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [g.id.replace("gen-", "") + ("*" if g.id == active else "") for g in gens]
    colors = [STATUS_COLORS.get(g.meta.get("status"), "grey") for g in gens]
    xs = list(range(len(gens)))
    width = max(6.0, 0.6 * len(gens) + 3)
    if kind == "evals":
        # the base has no scores of its own, but its first child measured it: drawn hatched
        as_parent: dict[str, dict] = {}
        for g in gens:
            if g.parent_id and g.parent_id not in as_parent:
                as_parent[g.parent_id] = g.meta.get("parent_scores") or {}
        fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 3 * (0.35 * len(gens) + 2)), 3.4))
        for ax, (key, title) in zip(axes, EVALS, strict=True):
            own = [(g.meta.get("scores") or {}).get(key) for g in gens]
            parent = [(g.meta.get("parent_scores") or {}).get(key) for g in gens]
            ax.bar(xs, [0 if v is None else v for v in own], color=colors, alpha=0.75)
            measured = [(x, as_parent.get(g.id, {}).get(key)) for x, g, v in zip(xs, gens, own, strict=True)
                        if v is None]
            measured = [(x, v) for x, v in measured if v is not None]
            if measured:
                ax.bar(*zip(*measured, strict=True), color="white", edgecolor="tab:blue", hatch="//",
                       label="measured as a parent")
            pts = [(x, p) for x, p in zip(xs, parent, strict=True) if p is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "k_", markersize=14, mew=2, label="its parent")
            if pts or measured:
                ax.legend(fontsize=7, loc="best")
            for x, v in zip(xs, own, strict=True):
                if v is None and x not in dict(measured):
                    ax.text(x, 0, "—", ha="center", va="bottom", fontsize=8, color="grey")
            ax.set_ylim(0, 10.5 if key == "style_drift" else 1.05)
            ax.set_title(title, fontsize=9)
            ax.set_xticks(xs, labels, fontsize=8)
        fig.suptitle("Eval scores by generation (bars: its own; black ticks: its parent, measured in the same run)",
                     fontsize=9)
    elif kind == "feedback":
        ratings = ratings or {}
        fig, ax = plt.subplots(figsize=(width, 3.2))
        for x, g in zip(xs, gens, strict=True):
            r = ratings.get(g.id) or {}
            rated = r.get("up", 0) + r.get("down", 0)
            if rated:
                share = r.get("down", 0) / rated
                ax.bar(x, share, color="tab:red", alpha=0.7)
                ax.text(x, share + 0.02, f"{share:.0%}\n{rated} rated / {r.get('answered', 0)}", ha="center",
                        va="bottom", fontsize=7)
            else:
                ax.text(x, 0.02, f"no ratings\n{r.get('answered', 0)} served", ha="center", va="bottom", fontsize=7,
                        color="grey")
        ax.set_ylim(0, 1.25)
        ax.set_ylabel("thumbs-down share of rated replies")
        ax.set_xticks(xs, labels)
        ax.set_title("Thumbs-down share in live use, by the generation that served the reply", fontsize=9)
    else:
        fig, ax = plt.subplots(figsize=(width, 3.4))
        stages: list[str] = []
        for g in gens:
            for name in (g.meta.get("stage_s") or {}):
                if name not in stages:
                    stages.append(name)
        bottom = [0.0] * len(gens)
        for name in stages:
            values = [float((g.meta.get("stage_s") or {}).get(name) or 0.0) for g in gens]
            ax.bar(xs, values, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for x, total in zip(xs, bottom, strict=True):
            ax.text(x, total, f"{total:.0f} s" if total else "no cycle", ha="center", va="bottom", fontsize=7,
                    color="black" if total else "grey")
        if stages:
            ax.legend(fontsize=7, loc="upper left", ncols=min(4, len(stages)))
        ax.set_ylim(0, max(bottom + [1.0]) * 1.3)
        ax.set_ylabel("seconds")
        ax.set_xticks(xs, labels)
        ax.set_title("Learning-cycle time by stage (the cycle that made each generation)", fontsize=9)
    fig.supxlabel("generation (green: promoted, red: refused, blue: base; * active)", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
