"""The scaling report's own figures, drawn from the runs and fit.json: isoflop.png (loss against size per
budget, one panel per family), frontier.png (loss against compute with the frontier fits, and each
family's gap to the transformer) and allocation.png (compute-optimal N and D by Approaches 1-3).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..fit import FIGURE_EXTRAPOLATION, frontier_loss
from .figures import _figure, _mathtext_sci, _minor_2_5, _sci


_LOSS_LABEL = "validation loss (nats/token)"
_FLOPS_LABEL = "training FLOPs C"
_PARAMS_LABEL = "non-embedding parameters N"
GAP_BASELINE = "transformer"   # frontier.png's second panel: every other family's gap to it


def isoflop_figure(table: pd.DataFrame, fit: dict, colors: dict):
    import matplotlib as mpl
    families = sorted(fit["families"])
    ncols = len(families) if len(families) <= 3 else 2          # four or more families: two per row
    nrows = math.ceil(len(families) / ncols)
    fig, grid = _figure(ncols=ncols, nrows=nrows, sharey=True)
    panels = list(grid.flat)
    for ax in panels[len(families):]:
        ax.set_visible(False)
    budgets = np.unique(table["group_flops"])
    norm = mpl.colors.LogNorm(budgets.min(), budgets.max() * (1.0001 if len(budgets) == 1 else 1.0))
    cmap = mpl.colormaps["viridis"]
    for ax, name in zip(panels, families):
        t = table[table["family"] == name]
        block = fit["families"][name]["approach2"]
        entries = {e["budget"]: e for e in block.get("budgets", [])}
        for c in np.unique(t["group_flops"]):
            g = t[t["group_flops"] == c].sort_values("params")
            col = cmap(norm(c))
            ax.plot(g["params"], g["loss"], "o", color=col, ms=5)
            e = entries.get(c)
            if e and e["parabola"]:
                lo, hi = np.log(e["params_range"])
                pad = 0.1 * (hi - lo)
                x = np.linspace(lo - pad, hi + pad, 100)
                ax.plot(np.exp(x), np.polyval(e["parabola"], x), "-", color=col, lw=1.2)
            if e and e["n_opt"] is not None:
                used = e["used"]
                lo_n, hi_n = e["params_range"]
                # an unused minimum far outside the sampled sizes would only stretch the axis
                if used or lo_n / 3 <= e["n_opt"] <= hi_n * 3:
                    ax.plot(e["n_opt"], e["loss_opt"], "*", ms=13, mec="black", mew=0.8,
                            color=col if used else "white", zorder=5)
        ax.set_xscale("log")
        # minor labels at 2x and 5x each decade only: 3x and 4x collide once the sizes span a decade or more
        ax.xaxis.set_minor_formatter(_minor_2_5(_mathtext_sci))
        ax.set_xlabel(_PARAMS_LABEL)
        note = "\n(too few budgets with a minimum for Approach 2: see report)" if "skipped" in block else ""
        ax.set_title(f"{name}: IsoFLOP curves{note}", color=colors[name], fontweight="bold")
        ax.grid(True, which="both", alpha=0.25)
    for row in grid:
        row[0].set_ylabel(_LOSS_LABEL)
    from matplotlib.lines import Line2D
    handles, labels = [], []
    for c in budgets:
        handles.append(Line2D([], [], marker="o", ls="-", color=cmap(norm(c))))
        labels.append(f"C = {_sci(c)} FLOPs")
    handles.append(Line2D([], [], marker="*", ls="", ms=12, mec="black", color="#bbbbbb"))
    labels.append("parabola minimum (hollow: not used; not drawn beyond 3x the sampled sizes)")
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 2 if len(families) == 1 else 5),
               fontsize=9, frameon=False)
    return fig


def frontier_figure(table, fit, colors):
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    names = sorted(fit["families"])
    fitted = [n for n in names if "skipped" not in fit["families"][n]["frontier"]]
    baseline = GAP_BASELINE if GAP_BASELINE in fitted and len(fitted) > 1 else None
    fig, axes = _figure(ncols=2 if baseline else 1, width=6.0, height=4.6)
    ax = axes[0][0]
    fitted_max = max(f["flops_range"][1] for f in fit["families"].values())
    x_min = min(f["flops_range"][0] for f in fit["families"].values()) / 2
    x_max = fitted_max * FIGURE_EXTRAPOLATION
    ci = fit["settings"]["ci"]
    handles, tops, bottoms = [], [], []
    for name in names:
        col = colors[name]
        t = table[table["family"] == name]
        ax.plot(t["flops"], t["loss"], "o", color=col, alpha=0.25, ms=4, mew=0)
        block = fit["families"][name]["frontier"]
        if "skipped" in block:
            handles.append(Line2D([], [], marker="o", ls="", color=col,
                                  label=f"{name}: frontier skipped ({block['skipped']})"))
            tops.append(t["loss"].min())
            continue
        pts = block["points"]
        ax.plot([p["flops"] for p in pts], [p["loss"] for p in pts], "o", color=col, ms=8, mec="black",
                mew=0.8, zorder=4)
        law = {k: block[k]["value"] for k in ("E", "A", "alpha")}
        lo, hi = block["range"]
        c_in, c_out = np.geomspace(lo, hi, 100), np.geomspace(hi, x_max, 60)
        ax.plot(c_in, frontier_loss(law, c_in), "-", color=col, lw=2, zorder=3)
        ax.plot(c_out, frontier_loss(law, c_out), "--", color=col, lw=1.5, zorder=3)
        band = block.get("band") or {}
        if band.get("lo"):
            ax.fill_between(band["flops"], band["lo"], band["hi"], color=col, alpha=0.15, lw=0)
            bottoms.append(min(band["lo"]))
        tops.append(max(p["loss"] for p in pts))
        bottoms.append(min(frontier_loss(law, c_out)))
        handles.append(Line2D([], [], color=col, lw=2, marker="o", mec="black", ms=7,
                              label=f"{name}: L = {law['E']:.3g} + {law['A']:.3g} C^-{law['alpha']:.3g}"))
    ax.axvspan(fitted_max, x_max, color="#999999", alpha=0.12, lw=0, zorder=0)
    span = max(tops) - min(bottoms)
    top = max(tops) + 0.25 * span
    hidden = int((table["loss"] > top).sum())
    ax.set_ylim(min(bottoms) - 0.05 * span, top)
    ax.set_xscale("log")
    ax.set_xlim(x_min, x_max)
    ax.set_xlabel(_FLOPS_LABEL)
    ax.set_ylabel(_LOSS_LABEL)
    ax.set_title("Loss against compute", fontsize=11)
    ax.grid(True, which="both", alpha=0.25)
    if baseline:
        _gap_panel(axes[0][1], fit, colors, baseline, x_min, x_max, fitted_max)
    handles += [
        Line2D([], [], marker="o", ls="", color="#777777", mec="black", ms=7, label="best run per budget (fitted)"),
        Line2D([], [], marker="o", ls="", color="#777777", alpha=0.35, ms=4, mew=0,
               label="other runs at their best learning rate" + (f" ({hidden} above the plot; all in isoflop.png)"
                                                                if hidden else "")),
        Line2D([], [], color="#444444", lw=2, label="frontier fit, over the budgets it was fitted on"),
        Line2D([], [], color="#444444", lw=1.5, ls="--", label="extrapolated"),
        Patch(color="#444444", alpha=0.2, lw=0, label=f"{ci:.0%} bootstrap band"),
        Patch(color="#999999", alpha=0.25, lw=0, label="beyond the largest budget"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def _gap_panel(ax, fit, colors, baseline, x_min, x_max, fitted_max):
    """Each family's frontier minus the baseline's: where a family is better (below zero) at a glance."""
    base = fit["families"][baseline]["frontier"]
    base_law = {k: base[k]["value"] for k in ("E", "A", "alpha")}
    ax.axhline(0, color=colors[baseline], lw=1.5)
    for name in sorted(fit["families"]):
        block = fit["families"][name]["frontier"]
        if name == baseline or "skipped" in block:
            continue
        col = colors[name]
        law = {k: block[k]["value"] for k in ("E", "A", "alpha")}
        lo = max(block["range"][0], base["range"][0])
        hi = min(block["range"][1], base["range"][1])
        c_all = np.geomspace(x_min, x_max, 200)
        inside = (c_all >= lo) & (c_all <= hi)
        gap = frontier_loss(law, c_all) - frontier_loss(base_law, c_all)
        ax.plot(c_all[inside], gap[inside], "-", color=col, lw=2, zorder=3)
        ax.plot(c_all[c_all >= hi], gap[c_all >= hi], "--", color=col, lw=1.5, zorder=3)
        pts = block["points"]
        c_pts = np.array([p["flops"] for p in pts])
        ax.plot(c_pts, np.array([p["loss"] for p in pts]) - frontier_loss(base_law, c_pts), "o", color=col, ms=7,
                mec="black", mew=0.8, zorder=4)
        band = block.get("band") or {}
        if band.get("lo"):
            c_band = np.asarray(band["flops"])
            shift = frontier_loss(base_law, c_band)
            ax.fill_between(c_band, np.asarray(band["lo"]) - shift, np.asarray(band["hi"]) - shift, color=col,
                            alpha=0.15, lw=0)
    ax.axvspan(fitted_max, x_max, color="#999999", alpha=0.12, lw=0, zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(x_min, x_max)
    ax.set_xlabel(_FLOPS_LABEL)
    ax.set_ylabel(f"loss minus the {baseline}'s frontier (nats/token)")
    ax.set_title(f"Gap to the {baseline} (below 0: lower loss)\nband: the family's own band, "
                 f"the {baseline}'s uncertainty not included", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)


def allocation_figure(fit: dict, colors: dict):
    fig, axes = _figure(ncols=2, width=6.0)
    ax_n, ax_d = axes[0]
    for name in sorted(fit["families"]):
        col = colors[name]
        fam = fit["families"][name]
        a2, a3 = fam["approach2"], fam["parametric"]
        c_lo, c_hi = fam["flops_range"]
        a1 = fam.get("approach1", {"skipped": "not fitted"})
        if "skipped" not in a1:
            env = np.asarray(a1["envelope"]["flops"])
            cc = np.geomspace(env.min(), env.max(), 50)
            ax_n.plot(cc, a1["N0"]["value"] * cc ** a1["a"]["value"], ":", color=col, lw=1.8,
                      label=_allocation_label(name, 1, a1["a"]["value"], a1["b"]["value"]))
            ax_d.plot(cc, a1["D0"]["value"] * cc ** a1["b"]["value"], ":", color=col, lw=1.8)
        if "skipped" not in a2:
            used = [e for e in a2["budgets"] if e["used"]]
            c = np.array([e["budget"] for e in used])
            n = np.array([e["n_opt"] for e in used])
            err = None
            if all(e["n_opt_lo"] is not None for e in used):
                err = np.array([[max(v - e["n_opt_lo"], 0.0), max(e["n_opt_hi"] - v, 0.0)]
                                for e, v in zip(used, n)]).T
            ax_n.errorbar(c, n, yerr=err, fmt="o", color=col, ms=6, capsize=3, mec="black", mew=0.6)
            ax_d.plot(c, [e["d_opt"] for e in used], "o", color=col, ms=6, mec="black", mew=0.6)
            cc = np.geomspace(c.min(), c.max(), 50)
            ax_n.plot(cc, a2["N0"]["value"] * cc ** a2["a"]["value"], "-", color=col, lw=2,
                      label=_allocation_label(name, 2, a2["a"]["value"], a2["b"]["value"]))
            ax_d.plot(cc, a2["D0"]["value"] * cc ** a2["b"]["value"], "-", color=col, lw=2)
        if "skipped" not in a3:
            cc = np.geomspace(c_lo, c_hi, 50)
            law = {k: a3[k]["value"] for k in ("G", "a", "b")}
            ax_n.plot(cc, law["G"] * (cc / 6) ** law["a"], "--", color=col, lw=1.5,
                      label=_allocation_label(name, 3, law["a"], law["b"]))
            ax_d.plot(cc, (cc / 6) ** law["b"] / law["G"], "--", color=col, lw=1.5)
    for ax, ylabel, title in ((ax_n, "N_opt (non-embedding parameters)", "Compute-optimal model size"),
                              (ax_d, "D_opt (training tokens)", "Compute-optimal training tokens")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(_FLOPS_LABEL)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.25)
    # one legend for both panels, under them: the lines cover most of each panel
    fig.legend(*ax_n.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def _allocation_label(name: str, approach: int, a: float, b: float) -> str:
    def exponent(v):            # a slope that rounds to zero from below reads 0.00, not -0.00
        return f"{v:.2f}".replace("-0.00", "0.00")
    return f"{name}, Approach {approach}: N_opt ∝ C^{exponent(a)}, D_opt ∝ C^{exponent(b)}"
