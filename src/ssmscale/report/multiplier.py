"""The report's first section: each family's compute multiplier against the baseline (fit/multiplier.py), as a
table per budget with bootstrap intervals, its trend with compute, its backtest, and multiplier.png: k(C) per
family with its band (log y, a line at k = 1, dashed where the baseline's frontier is extrapolated).
Everything comes from fit.json's "multiplier" block; a fit.json without one gives no section."""

from __future__ import annotations

import numpy as np

from ..fit import fmt_k, fmt_value, multiplier_lines

CAPTION = ("Compute multiplier k(C) = C_base(L_family(C)) / C against the baseline, from the frontier fits: above "
           "the line k = 1 a family reaches at C a loss the baseline needs k C FLOPs for. Shaded: bootstrap "
           "interval; dashed: the baseline's frontier extrapolated beyond the compute it was fitted on; dots: "
           "the family's IsoFLOP budgets.")


def multiplier_section(fit: dict, colors: dict, figure, sci) -> tuple[list[str], dict]:
    """(markdown lines for the top of the report, {"multiplier.png": figure}) or ([], {}) without a multiplier."""
    block = fit.get("multiplier")
    if not isinstance(block, dict):
        return [], {}
    base = block["baseline"]
    ci = fit["settings"]["ci"]
    lines = ["## Compute multiplier", "",
             f"How many times the compute **{base}** needs to reach each family's loss: {block['definition']}. "
             f"{ci:.0%} bootstrap intervals (runs and seeds resampled). Trend: the exponent g of k ~ C^g over the "
             "budgets (growing: scales better than the baseline; flat: a constant factor; shrinking: the lead "
             "fades). Backtest: both frontiers refitted without the largest budget predict k there.", ""]
    if "skipped" in block:
        return lines + [f"Not computed: {block['skipped']}.", ""], {}
    lines += [f"- {line}." for line in multiplier_lines(fit)] + [""]
    # the families fitted (as many as the report draws, colors.check_family_count): a fit.json from elsewhere
    # may list any number of names in its multiplier block
    fams = {n: f for n, f in block["families"].items() if n in fit["families"] and "skipped" not in f}
    if not fams:
        return lines, {}
    budgets = sorted({r["budget"] for f in fams.values() for r in f["budgets"]})
    lines += ["| budget C | " + " | ".join(f"{n}: k [{ci:.0%}]" for n in fams) + " |",
              "|---|" + "---|" * len(fams)]
    for c in budgets:
        cells = []
        for f in fams.values():
            row = next((r for r in f["budgets"] if r["budget"] == c), None)
            cells.append("" if row is None else fmt_k(row["k"]) + (" (extrapolated)" if row["extrapolated"] else ""))
        lines.append(f"| {sci(c)} | " + " | ".join(cells) + " |")
    trend = [f"{n}: g = {fmt_value(f['trend']['exponent']['value'])} "
             f"[{fmt_value(f['trend']['exponent']['lo'])}, {fmt_value(f['trend']['exponent']['hi'])}], "
             f"{f['trend']['verdict']}" for n, f in fams.items()]
    lines += ["", "Trend: " + "; ".join(trend) + ".", "", "![multiplier.png](multiplier.png)", "", CAPTION, ""]
    return lines, {"multiplier.png": multiplier_figure(fams, base, colors, figure, ci)}


def multiplier_figure(fams: dict, base: str, colors: dict, figure, ci: float):
    fig, axes = figure(width=7.6, height=4.8)
    ax = axes[0][0]
    ax.axhline(1.0, color="black", lw=1, label=f"k = 1: as {base}")
    for name, fam in fams.items():
        col = colors.get(name, "#333333")
        curve = fam["curve"]
        c = np.array(curve["flops"])
        k = np.array([np.nan if v is None else v for v in curve["k"]], float)
        ext = np.array(curve["extrapolated"], bool)
        inside = np.where(ext, np.nan, k)
        ax.plot(c, inside, "-", color=col, lw=2, label=f"{name} ({fam['trend']['verdict']})")
        # dashed where the baseline is extrapolated, joined to the solid part
        edge = ext | np.convolve(ext.astype(int), [1, 1, 1], "same").astype(bool)
        ax.plot(c, np.where(edge, k, np.nan), "--", color=col, lw=1.5)
        lo = np.array([np.nan if v is None else v for v in curve["lo"]], float)
        hi = np.array([np.nan if v is None else v for v in curve["hi"]], float)
        ax.fill_between(c, lo, hi, color=col, alpha=0.15, lw=0)     # no band where a bound is unbounded
        pts = [(r["budget"], r["k"]["value"]) for r in fam["budgets"] if r["k"]["value"] is not None]
        if pts:
            ax.plot(*zip(*pts), "o", color=col, ms=6, mec="black", mew=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel(f"compute multiplier k (× {base}'s compute)")
    ax.set_title(f"Compute multiplier against {base}: k(C) = C_{base}(L(C)) / C\n"
                 f"shaded: {ci:.0%} bootstrap band; dashed: {base}'s frontier extrapolated", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    # under the axes, as every report figure has it: the curves and bands cover the panel
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig
