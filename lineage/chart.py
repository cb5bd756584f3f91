"""The lineage as a picture: eval scores and loss across generations, promotions marked.

People would rather look at this than read the ledger. Used by `ouro generations --chart`
and sent by the bot's /lineage.
"""

from __future__ import annotations

from pathlib import Path

from lineage.generations import Lineage


def lineage_chart(lineage: Lineage, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = lineage.generations()
    if not gens:
        raise ValueError("no generations to draw")
    xs = list(range(len(gens)))
    labels = [g.id.replace("gen-", "") for g in gens]

    # a generation's own scores; the base has none of its own, but its children measured it
    measured_as_parent = {}
    for g in gens:
        if g.parent_id and g.parent_id not in measured_as_parent:
            measured_as_parent[g.parent_id] = g.meta.get("parent_scores") or {}

    def series(key: str):
        return [(g.meta.get("scores") or {}).get(key, measured_as_parent.get(g.id, {}).get(key)) for g in gens]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.9 * len(gens) + 3), 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    for key, style in (("recall", "o-"), ("generalization", "s-"), ("format", "^-")):
        ys = series(key)
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if pts:
            top.plot(*zip(*pts, strict=True), style, label=key)
    top.axhline(0.9, color="grey", lw=0.6, ls=":")
    top.set_ylim(-0.05, 1.05)
    top.set_ylabel("score (0–1)")
    drift = [(x, y) for x, y in zip(xs, series("style_drift"), strict=True) if y is not None]
    ax2 = top.twinx()
    if drift:
        ax2.plot(*zip(*drift, strict=True), "d--", color="tab:red", label="style drift")
    ax2.set_ylim(-0.3, 10.3)
    ax2.set_ylabel("style drift (0–10, lower is better)", color="tab:red")
    lines = top.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    names = top.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    top.legend(lines, names, loc="lower left", fontsize=8)

    loss = [(x, (g.meta.get("train") or {}).get("loss_end")) for x, g in zip(xs, gens, strict=True)]
    loss = [(x, y) for x, y in loss if y is not None]
    if loss:
        bottom.plot(*zip(*loss, strict=True), "o-", color="tab:purple", label="training loss (end)")
        bottom.legend(loc="upper right", fontsize=8)
    bottom.set_ylabel("loss")
    for x, g in zip(xs, gens, strict=True):
        status = g.meta.get("status")
        color = {"promoted": "tab:green", "held": "tab:orange", "refused": "tab:red",
                 "base": "tab:blue"}.get(status, "grey")
        for ax in (top, bottom):
            ax.axvline(x, color=color, alpha=0.12, lw=8)
    events = lineage.ledger()
    index = {g.id: x for x, g in zip(xs, gens, strict=True)}
    for row in events:
        if row.get("event") in ("rollback", "auto_rollback") and row.get("gen_folder") in index:
            top.annotate("rollback", (index[row["gen_folder"]], 1.0), fontsize=7, color="tab:orange", ha="center")
    active = lineage.active_id()
    bottom.set_xticks(xs, [f"{lbl}*" if g.id == active else lbl for lbl, g in zip(labels, gens, strict=True)])
    bottom.set_xlabel("generation (green: promoted, red: refused, blue: base; * active)")
    fig.suptitle("Ouroboros lineage")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
