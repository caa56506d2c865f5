"""Study report: figures and a report.md that embeds them, regenerated from scaling/<study>/ alone.

Figures (PNG, matplotlib's object API on the Agg canvas, so no global backend is touched):
- isoflop.png     loss against N per budget, one panel per family, fitted parabolas and their minima;
- frontier.png    loss against training FLOPs, every family on one axis, frontier fits, the bootstrap
                  band continued FIGURE_EXTRAPOLATION beyond the data (dashed = extrapolated), crossovers;
- allocation.png  compute-optimal N_opt(C) and D_opt(C): Approach 2 minima and fit, Approach 3 implied line;
- profile.png     tokens/s and peak memory against sequence length, one column per mode (if profile/ exists;
                  profile.py);
- position.png, wallclock.png: loss by token position and loss against training time (trust.py, with
                  the backtest, seed-noise and Approach 1 sections).
A family has the same colour in every figure. The report holds no timings and no clock or version stamp in
its PNGs, so regenerating it from the same study directory rewrites the same bytes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError
from ..fit import (DEFAULT_N_BOOT, FIGURE_EXTRAPOLATION, LoadedRuns, fit_json, fit_notes, fit_runs,
                  fmt_value, format_fit, frontier_loss, load_runs, quantity_rows)
from ..fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable_dir
from .colors import check_family_count, family_colors
from .contrast import contrast_section
from .figures import _figure, _mathtext_sci, _minor_2_5, _png, _sci
from .profile import _profile_families, _profile_section, _read_profile, profile_figure
from .provenance import _provenance, config_block
from .trust import trust_sections

_LOSS_LABEL = "validation loss (nats/token)"
_FLOPS_LABEL = "training FLOPs C"
_PARAMS_LABEL = "non-embedding parameters N"


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


def frontier_figure(table: pd.DataFrame, fit: dict, colors: dict):
    fig, axes = _figure(width=8.0, height=5.2)
    ax = axes[0][0]
    fitted_max = max(f["flops_range"][1] for f in fit["families"].values())
    x_min = min(f["flops_range"][0] for f in fit["families"].values()) / 2
    x_max = fitted_max * FIGURE_EXTRAPOLATION
    for name in sorted(fit["families"]):
        col = colors[name]
        t = table[table["family"] == name]
        ax.plot(t["flops"], t["loss"], "o", color=col, alpha=0.25, ms=4, mew=0)
        block = fit["families"][name]["frontier"]
        if "skipped" in block:
            ax.plot([], [], "o", color=col, label=f"{name}: frontier skipped ({block['skipped']})")
            continue
        pts = block["points"]
        ax.plot([p["flops"] for p in pts], [p["loss"] for p in pts], "o", color=col, ms=8, mec="black",
                mew=0.8, zorder=4)
        law = {k: block[k]["value"] for k in ("E", "A", "alpha")}
        lo, hi = block["range"]
        c_in = np.geomspace(lo, hi, 100)
        c_out = np.geomspace(hi, x_max, 60)
        ax.plot(c_in, frontier_loss(law, c_in), "-", color=col, lw=2,
                label=f"{name}: L = {law['E']:.3g} + {law['A']:.3g} C^-{law['alpha']:.3g}")
        ax.plot(c_out, frontier_loss(law, c_out), "--", color=col, lw=1.5)
        band = block.get("band") or {}
        if band.get("lo"):
            ax.fill_between(band["flops"], band["lo"], band["hi"], color=col, alpha=0.15, lw=0)
    off_plot = []
    for pair in fit["crossover"]["pairs"]:
        for c in pair.get("crossings", []):
            q = c["flops"]
            tag = "extrapolated crossover" if c["extrapolated"] else "crossover"
            text = f"{tag}: {c['lower_above']} lower above {_sci(q['value'])}"
            if not x_min <= q["value"] <= x_max:
                off_plot.append(text + " FLOPs (outside the plot)")
                continue
            ax.axvline(q["value"], color="black", ls=":" if c["extrapolated"] else "-.", lw=1, label=text)
            if q["lo"] and q["hi"]:
                ax.axvspan(max(q["lo"], x_min), min(q["hi"], x_max), color="black", alpha=0.06, lw=0,
                           label=f"{tag} {fit['settings']['ci']:.0%} interval")
    if off_plot:
        ax.text(0.02, 0.02, "\n".join(off_plot), transform=ax.transAxes, fontsize=8, color="#333333")
    ax.axvspan(fitted_max, x_max, color="#999999", alpha=0.08, lw=0)
    ax.set_xscale("log")
    ax.set_xlim(x_min, x_max)
    ax.set_xlabel(_FLOPS_LABEL)
    ax.set_ylabel(_LOSS_LABEL)
    ax.set_title("Loss against compute: runs at their best learning rate (faint), best run per budget (bold), frontier fits\n"
                 f"shaded: {fit['settings']['ci']:.0%} bootstrap band; dashed, grey area: extrapolation",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper right")
    return fig


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
                      label=f"{name}, Approach 1: N_opt ∝ C^{a1['a']['value']:.2f}")
            ax_d.plot(cc, a1["D0"]["value"] * cc ** a1["b"]["value"], ":", color=col, lw=1.8,
                      label=f"{name}, Approach 1: D_opt ∝ C^{a1['b']['value']:.2f}")
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
                      label=f"{name}, Approach 2: N_opt ∝ C^{a2['a']['value']:.2f}")
            ax_d.plot(cc, a2["D0"]["value"] * cc ** a2["b"]["value"], "-", color=col, lw=2,
                      label=f"{name}, Approach 2: D_opt ∝ C^{a2['b']['value']:.2f}")
        if "skipped" not in a3:
            cc = np.geomspace(c_lo, c_hi, 50)
            law = {k: a3[k]["value"] for k in ("G", "a", "b")}
            ax_n.plot(cc, law["G"] * (cc / 6) ** law["a"], "--", color=col, lw=1.5,
                      label=f"{name}, Approach 3: N_opt ∝ C^{law['a']:.2f}")
            ax_d.plot(cc, (cc / 6) ** law["b"] / law["G"], "--", color=col, lw=1.5,
                      label=f"{name}, Approach 3: D_opt ∝ C^{law['b']:.2f}")
    for ax, ylabel, title in ((ax_n, "compute-optimal " + _PARAMS_LABEL, "Compute-optimal model size"),
                              (ax_d, "compute-optimal training tokens D", "Compute-optimal training tokens")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(_FLOPS_LABEL)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="upper left")
    return fig


def _fit_table(fam: dict, ci: float) -> list[str]:
    lines = [f"| approach | quantity | value | {ci:.0%} interval |", "|---|---|---|---|"]
    lines += [f"| {approach} | {k} | {value} | {interval or 'no bootstrap'} |"
              for approach, k, value, interval in quantity_rows(fam)]
    notes = fit_notes(fam)
    if "skipped" not in fam["frontier"] and all(p.get("n_seeds", 1) == 1 for p in fam["frontier"]["points"]):
        notes.append("frontier: a resample's point at a budget is the best run it drew, so the interval reflects "
                     "which runs were made, not the seed-to-seed noise of the best run itself (one seed per point)")
    return lines + [""] + [f"- {n}." for n in notes]


def _lr_section(study: Path) -> list[str]:
    """Where a learning-rate grid was tried: the best rate per family, size and budget, and a warning
    where it sits at an end of the grid (the optimum may lie outside it)."""
    from ..safeload import FileRefused, read_csv
    try:
        df = read_csv(study / "results.csv", within=study)
    except (FileNotFoundError, FileRefused):
        return []
    if not {"lr", "family", "params", "budget", "loss", "status"} <= set(df.columns):
        return []
    for col in ("lr", "params", "budget", "loss"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    # the fits' own cleaning: finite positive numbers only (a params of inf has no row here)
    ok = df[(df["status"] == "ok") & (np.isfinite(df[["lr", "params", "budget", "loss"]]).all(axis=1))
            & (df[["lr", "params", "budget"]] > 0).all(axis=1)]
    rows, edges = [], 0
    for (fam, params, budget), g in ok.groupby(["family", "params", "budget"]):
        if g["lr"].nunique() < 2:
            continue
        best = g.loc[g["loss"].idxmin()]
        lrs = sorted(g["lr"].unique())
        edge = best["lr"] in (lrs[0], lrs[-1])
        edges += edge
        tried = ", ".join(f"{x:.3g}" for x in lrs)
        rows.append(f"| {fam} | {int(params):,} | {_sci(budget)} | {tried} | **{best['lr']:.3g}**"
                    f"{' (edge)' if edge else ''} | {best['loss']:.4f} |")
    if not rows:
        return []
    out = ["", "## Learning rates", "",
           "Best learning rate per family, size and budget where a grid was tried (the fits use that run).", "",
           "| family | params | budget | learning rates tried | best | loss |", "|---|---|---|---|---|---|"] + rows
    if "lr_source" in df.columns:
        tuned = df[df["lr_source"].astype(str).str.startswith("tuned")]
        if len(tuned):
            out += ["", f"The other {len(tuned)} runs use the best learning rate of their family and size at the "
                        f"tuning budget ({tuned['lr_source'].iloc[0]})."]
    if edges:
        out += ["", f"**{edges} best learning rate(s) at an end of the grid**: the optimum may lie outside it; "
                    "widen the grid there before trusting that comparison."]
    return out


def render_markdown(name: str, study: Path, loaded: LoadedRuns, fit: dict, figures: list[str],
                    profile: pd.DataFrame | None = None, sections: list[str] = ()) -> str:
    s = fit["settings"]
    ci = s["ci"]
    lines = [f"# Scaling study `{name}`", "",
             f"Regenerate with `ssmscale report {study}`: everything below comes from that directory alone "
             f"(results.csv, config.yaml, fit.json, profile/).", "", "## Summary", ""]
    for fam_name, fam in fit["families"].items():
        bits = [f"**{fam_name}**: {fam['n_runs']} runs, {fam['n_budgets']} IsoFLOP budgets, "
                f"C from {_sci(fam['flops_range'][0])} to {_sci(fam['flops_range'][1])} FLOPs"]
        front = fam["frontier"]
        if "skipped" not in front:
            bits.append(f"frontier L(C) = {fmt_value(front['E']['value'])} + {fmt_value(front['A']['value'])} "
                        f"C^-{fmt_value(front['alpha']['value'])}")
        for key, label in (("approach2", "Approach 2"), ("parametric", "Approach 3")):
            block = fam[key]
            if "skipped" not in block:
                bits.append(f"{label}: N_opt ∝ C^{fmt_value(block['a']['value'])} "
                            f"[{fmt_value(block['a']['lo'])}, {fmt_value(block['a']['hi'])}], "
                            f"D_opt ∝ C^{fmt_value(block['b']['value'])} "
                            f"[{fmt_value(block['b']['lo'])}, {fmt_value(block['b']['hi'])}]")
        lines.append("- " + "; ".join(bits) + ".")
    for pair in fit["crossover"]["pairs"]:
        lines.append(f"- **Crossover {' vs '.join(pair['families'])}**: {pair['statement']}.")
    lines += ["", "## Data", ""]
    lines.append(f"- {fit['source'].get('rows_read', '?')} rows read from `{loaded.source['csv']}`; "
                 f"{len(loaded.table)} runs kept for fitting.")
    lines += [f"- {note}." for note in fit["notes"]]
    if not fit["dropped"].get("other_learning_rates"):
        lines.append("- one learning rate per (family, size, budget) in this study: nothing to select. "
                     "(When several are tried, the fits use the lowest-loss one per family, size and budget, "
                     "after Porian et al. 2024.)")
    from ..safeload import FileRefused, read_csv
    try:
        lines.append(f"- plan.csv lists {len(read_csv(study / 'plan.csv', within=study))} planned runs.")
    except FileNotFoundError:
        pass
    except FileRefused as exc:
        lines.append(f"- plan.csv is unreadable ({str(exc).split(': ', 1)[-1]}).")
    lines.append(f"- {s['grouping']}.")

    lines += _lr_section(study)

    lines += ["", "## Fits", "",
              f"Each value with its {ci:.0%} percentile bootstrap interval ({s['n_boot']} resamples, seed "
              f"{s['seed']}; {s['bootstrap']}). Fits use Huber loss (delta {s['huber_delta']:g}) on log "
              f"residuals of the log-sum-exp form, summed over points, minimised by L-BFGS. Approach 3 starts "
              f"from the {s['parametric_grid']} and keeps the best; for speed, {s['warm_starts']}. "
              f"FLOPs: {s['flops_convention']}.", ""]
    for fam_name, fam in fit["families"].items():
        lines += [f"### {fam_name}", ""] + _fit_table(fam, ci) + [""]
    lines += list(sections)

    captions = {
        "isoflop.png": "IsoFLOP curves: final validation loss against model size at each compute budget, with "
                       "the least-squares parabola in ln N and its minimum (star; hollow = outside the sampled "
                       "sizes or otherwise not used for Approach 2).",
        "frontier.png": "Loss against training compute for every family. Bold points: the best run at each "
                        "budget, which the frontier L(C) = E + A C^-alpha is fitted to. Dashed lines and the grey "
                        "area are extrapolation; shaded bands are bootstrap intervals of the frontier.",
        "allocation.png": "Compute-optimal allocation. Points: Approach 2 parabola minima (error bars: bootstrap "
                          "interval of each); solid: power-law fit through them; dashed: the allocation implied "
                          "by the Approach 3 fit (assumes C = 6ND); dotted: Approach 1, the lower envelope of every "
                          "run's eval points.",
        "profile.png": "Throughput and peak memory against sequence length (log-log), one column per mode; "
                       "x marks a run that did not finish (e.g. out of memory).",
    }
    lines += ["## Figures", ""]
    for fig_name in figures:
        lines += [f"![{fig_name}]({fig_name})", "", captions[fig_name], ""]
    if profile is not None:
        lines += _profile_section(study, profile)

    lines += ["## Configuration", ""]
    lines += config_block(study)
    lines += ["## Provenance", ""] + _provenance(Path(loaded.source["csv"]), fit) + [""]
    return "\n".join(lines)


def cached_fit(study: Path, loaded: LoadedRuns) -> dict | None:
    """STUDY/fit.json when it is a fit of the current results.csv, else None (and a line saying why)."""
    from ..safeload import FileRefused, read_json
    target = study / "fit.json"
    try:
        fit = read_json(target, within=study)
    except FileNotFoundError:
        return None
    except FileRefused as exc:
        print(f"{exc}; refitting")
        return None
    source = fit.get("source") if isinstance(fit, dict) else None
    if not isinstance(source, dict) or not isinstance(fit.get("families"), dict) or fit.get("schema") != 1:
        print(f"{target}: not a fit.json of this tool (wrong shape), refitting")
        return None
    if source.get("sha256") != loaded.source["sha256"]:
        print(f"{target}: fitted on a different results.csv, refitting")
        return None
    if set(fit["families"]) != set(loaded.table["family"].astype(str)):
        print(f"{target}: its families are not those of results.csv, refitting")
        return None
    return fit


def _fit_and_save(study: Path, loaded: LoadedRuns, **fit_kwargs) -> dict:
    target = study / "fit.json"
    fit = fit_runs(loaded, **fit_kwargs)
    print(format_fit(fit))
    fit = fit_json(fit)
    try:
        atomic_write_json(target, fit)
    except OSError as exc:
        print(f"{target}: cannot write ({exc.strerror or exc}); the report uses the fit anyway")
    return fit


def write_report(study_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, refit: bool = False,
                 n_boot: int = DEFAULT_N_BOOT, seed: int = 0, progress: bool = True,
                 parametric_grid: np.ndarray | None = None) -> Path:
    """Write <out_dir>/report.md and its figures (default out_dir: reports/<study>); returns report.md's path.

    Uses STUDY_DIR/fit.json when it was fitted on the current results.csv, else fits (n_boot, seed,
    parametric_grid as in fit.fit_runs) and writes it.
    """
    study = Path(study_dir)
    if not study.is_dir():
        raise UserError(f"{study}: no such study directory")
    if not (study / "results.csv").is_file():
        raise UserError(f"{study}: not a study directory (no results.csv in it)")
    name = study.resolve().name
    out = Path(out_dir) if out_dir is not None else Path("reports") / name
    check_writable_dir(out, "report folder (--out)")     # before a fit that may take minutes
    from .recall import is_fixed_length_study, write_recall_report
    if is_fixed_length_study(study):      # no budgets, no scaling law: the recall report
        return write_recall_report(study, out)
    loaded = load_runs(study)
    check_family_count(loaded.table["family"].astype(str), loaded.source["csv"])
    profile = _read_profile(study)
    fit_kwargs = dict(n_boot=n_boot, seed=seed, progress=progress, parametric_grid=parametric_grid)
    fit = None if refit else cached_fit(study, loaded)
    rendered = None
    if fit is not None:
        try:
            rendered = _render(name, study, loaded, fit, profile)
        except _MALFORMED_FIT as exc:      # right source, but not what the fitter writes: fit again
            print(f"{study / 'fit.json'}: malformed ({type(exc).__name__}: {str(exc)[:200]}), refitting")
    if rendered is None:
        fit = _fit_and_save(study, loaded, **fit_kwargs)
        rendered = _render(name, study, loaded, fit, profile)
    figures, markdown = rendered
    for fig_name, png in figures.items():
        atomic_write_bytes(out / fig_name, png)
    atomic_write_text(out / "report.md", markdown)
    return out / "report.md"


# what rendering a fit.json of the wrong shape raises (a missing key, a list where a number belongs, ...)
_MALFORMED_FIT = (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError)


def _render(name: str, study: Path, loaded: LoadedRuns, fit: dict, profile) -> tuple[dict[str, bytes], str]:
    """The figures (PNG bytes by file name) and report.md text; writes nothing."""
    colors = family_colors(set(fit["families"]) | set(_profile_families(study)))
    figures = {"isoflop.png": isoflop_figure(loaded.table, fit, colors),
               "frontier.png": frontier_figure(loaded.table, fit, colors)}
    if any("skipped" not in fam[a] for fam in fit["families"].values() for a in ("approach2", "parametric")):
        figures["allocation.png"] = allocation_figure(fit, colors)
    if profile is not None:
        figures["profile.png"] = profile_figure(profile, colors)
    sections, trust_figures = trust_sections(study, loaded, fit, colors, _figure, _sci)
    contrast, contrast_figures = contrast_section(study, colors, _figure, _sci)
    sections, trust_figures = [*sections, *contrast], {**trust_figures, **contrast_figures}
    markdown = render_markdown(name, study, loaded, fit, list(figures), profile, sections)
    return {fig_name: _png(fig) for fig_name, fig in {**figures, **trust_figures}.items()}, markdown
