"""Study report: figures and a report.md that embeds them, regenerated from scaling/<study>/ alone.

Figures (PNG, matplotlib's object API on the Agg canvas, so no global backend is touched):
- isoflop.png     loss against N per budget, one panel per family, fitted parabolas and their minima;
- frontier.png    loss against training FLOPs, every family on one axis, frontier fits, the bootstrap
                  band continued FIGURE_EXTRAPOLATION beyond the data (dashed = extrapolated), crossovers;
- allocation.png  compute-optimal N_opt(C) and D_opt(C): Approach 2 minima and fit, Approach 3 implied line;
- profile.png     tokens/s and peak memory against sequence length, one column per mode (if profile/ exists);
- position.png, wallclock.png: loss by token position and loss against training time (report_trust.py, with
                  the backtest, seed-noise and Approach 1 sections);
- multiplier.png  each family's compute multiplier against the baseline, k(C), the report's first section
                  (report_multiplier.py).
A family has the same colour in every figure. The report holds no timings and no clock or version stamp in
its PNGs, so regenerating it from the same study directory rewrites the same bytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .colors import family_colors
from .errors import UserError
from .fit import (DEFAULT_BASELINE, DEFAULT_N_BOOT, FIGURE_EXTRAPOLATION, LoadedRuns, fit_json, fit_notes, fit_runs,
                  fmt_value, format_fit, frontier_loss, load_runs, quantity_rows)
from .fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable_dir
from .report_contrast import contrast_section
from .report_multiplier import multiplier_section
from .report_trust import trust_sections

_LOSS_LABEL = "validation loss (nats/token)"
_FLOPS_LABEL = "training FLOPs C"
_PARAMS_LABEL = "non-embedding parameters N"


def _figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.6, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})   # no version stamp: same bytes
    return buf.getvalue()


def _sci(x: float) -> str:
    """1.2e+15 -> '1.2e15' for labels."""
    mant, _, exp = f"{x:.2g}".partition("e")
    return f"{mant}e{int(exp)}" if exp else mant


# ---------------------------------------------------------------------------------------------------
# Figures

def _minor_2_5(label):
    """A minor log-axis tick formatter labelling only 2x and 5x a power of ten, with label(v)."""
    def fmt(v: float, _pos=None) -> str:
        return label(v) if round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""
    return _mpl_ticker().FuncFormatter(fmt)


def _mathtext_sci(v: float) -> str:
    """20000 -> '$2\\times10^{4}$'."""
    exp = math.floor(math.log10(v))
    return rf"${round(v / 10 ** exp)}\times10^{{{exp}}}$"


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


def profile_figure(profile: pd.DataFrame, colors: dict):
    modes = [m for m in ("train", "prefill", "generate") if m in set(profile["mode"])]
    modes += sorted(set(profile["mode"]) - set(modes))
    fig, axes = _figure(ncols=len(modes), nrows=2, width=4.8, height=3.8)
    styles = ["-", "--", ":", "-."]
    for j, mode in enumerate(modes):
        pm = profile[profile["mode"] == mode]
        for name in sorted(set(pm["family"])):
            pf = pm[pm["family"] == name]
            batches = sorted(set(pf["batch"]))
            for k, batch in enumerate(batches):
                rows = pf[pf["batch"] == batch].sort_values("seq_len")
                ok = rows[rows["status"] == "ok"]
                bad = rows[rows["status"] != "ok"]
                label = name if len(batches) == 1 else f"{name} (batch {batch})"
                for i, (col, scale) in enumerate((("tokens_per_s", 1.0), ("peak_mem_bytes", 2.0 ** -20))):
                    ax = axes[i][j]
                    ax.plot(ok["seq_len"], ok[col] * scale, styles[k % 4], marker="o", ms=4,
                            color=colors.get(name, "#000000"), label=label)
                    for L, status in zip(bad["seq_len"], bad["status"]):
                        ax.plot(L, 0.94, "x", ms=9, mew=2, color=colors.get(name, "#000000"),
                                transform=ax.get_xaxis_transform())
                        ax.annotate(f"{name}: {status}", (L, 0.94), xycoords=("data", "axes fraction"),
                                    xytext=(-6, -4), textcoords="offset points", fontsize=8, ha="right",
                                    va="top")
        seq_lens = sorted(set(pm["seq_len"].dropna().astype(int)))
        for i, ylabel in enumerate(("throughput (tokens/s)", "peak memory added (MiB)")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(seq_lens, [str(v) for v in seq_lens])
            ax.xaxis.set_minor_formatter(_mpl_ticker().NullFormatter())
            ax.yaxis.set_major_formatter(_mpl_ticker().FuncFormatter(lambda v, _: _human(v)))
            ax.yaxis.set_minor_formatter(_minor_2_5(_human))
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}: {ylabel.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.25)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    return fig


def _mpl_ticker():
    import matplotlib.ticker
    return matplotlib.ticker


def _human(v: float) -> str:
    """Tick labels without exponents: 0.3, 20, 200k, 1.5M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


# ---------------------------------------------------------------------------------------------------
# report.md

def _fit_table(fam: dict, ci: float) -> list[str]:
    lines = [f"| approach | quantity | value | {ci:.0%} interval |", "|---|---|---|---|"]
    lines += [f"| {approach} | {k} | {value} | {interval or 'no bootstrap'} |"
              for approach, k, value, interval in quantity_rows(fam)]
    notes = fit_notes(fam)
    if "skipped" not in fam["frontier"] and all(p.get("n_seeds", 1) == 1 for p in fam["frontier"]["points"]):
        notes.append("frontier: a resample's point at a budget is the best run it drew, so the interval reflects "
                     "which runs were made, not the seed-to-seed noise of the best run itself (one seed per point)")
    return lines + [""] + [f"- {n}." for n in notes]


def _provenance(csv: Path, fit: dict) -> list[str]:
    from . import __version__
    from .provenance import source_commit, versions
    raw = pd.read_csv(csv, dtype=str)
    lines = ["| field | value |", "|---|---|"]

    def uniq(col):
        if col not in raw.columns:
            return "(not recorded)"
        vals = sorted(set(raw[col].dropna()))
        return ", ".join(f"`{v}`" for v in vals) if vals else "(empty)"

    lines.append(f"| results.csv sha256 | `{fit['source']['sha256']}` |")
    lines.append(f"| data fingerprint(s) | {uniq('data_fingerprint')} |")
    lines.append(f"| training commit(s) | {uniq('commit')} |")
    lines.append(f"| device(s) | {uniq('device')} |")
    lines.append(f"| FLOPs convention | {uniq('flops_convention')} |")
    if "versions" in raw.columns:
        merged: dict[str, set] = {}
        for blob in raw["versions"].dropna():
            try:
                for k, v in json.loads(blob).items():
                    merged.setdefault(k, set()).add(str(v))
            except (json.JSONDecodeError, AttributeError):
                continue
        if merged:
            lines.append("| training versions | " + ", ".join(f"{k} {'/'.join(sorted(v))}"
                                                           for k, v in sorted(merged.items())) + " |")
    here = versions()
    import matplotlib
    import scipy
    lines.append(f"| report generated by | ssmscale {__version__}, source commit `{source_commit()}`, "
                 f"numpy {here.get('numpy')}, scipy {scipy.__version__}, pandas {pd.__version__}, "
                 f"matplotlib {matplotlib.__version__} |")
    return lines


def _lr_section(study: Path) -> list[str]:
    """Where a learning-rate grid was tried: the best rate per family, size and budget, and a warning
    where it sits at an end of the grid (the optimum may lie outside it)."""
    csv = study / "results.csv"
    if not csv.is_file():
        return []
    df = pd.read_csv(csv)
    if not {"lr", "family", "params", "budget", "loss", "status"} <= set(df.columns):
        return []
    ok = df[(df["status"] == "ok") & np.isfinite(df["loss"])]
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


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _profile_meta(study: Path) -> dict:
    """profile.json's descriptive fields, each kept only if it has the shape the report prints (a file of
    another shape is ignored with a line saying so: the numbers themselves come from profile.csv)."""
    from .safeload import FileRefused, read_json
    path = study / "profile" / "profile.json"
    try:
        meta = read_json(path)
    except FileNotFoundError:
        return {}
    except FileRefused as exc:
        print(f"{exc}; ignored")
        return {}
    if not isinstance(meta, dict):
        print(f"{path}: not a JSON object; ignored")
        return {}
    out = {k: meta[k] for k in ("batch", "gen_tokens", "device", "peak_note")
           if _is_number(meta.get(k)) or isinstance(meta.get(k), str)}
    shapes, growth = meta.get("shapes"), meta.get("growth")
    if isinstance(shapes, dict) and all(isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)
                                        for v in shapes.values()):
        out["shapes"] = shapes
    if isinstance(growth, dict) and all(
            isinstance(g, dict) and all(g.get(k) is None or _is_number(g.get(k)) for k in ("time", "memory"))
            and isinstance(g.get("lengths", []), list) for g in growth.values()):
        out["growth"] = growth
    return out


def _profile_section(study: Path, profile: pd.DataFrame) -> list[str]:
    """The profile as numbers: tokens/s and peak memory per mode and length, and the growth exponents."""
    meta = _profile_meta(study)
    families = list(dict.fromkeys(profile["family"].astype(str)))
    out = ["## Profile", "", f"From `{study / 'profile' / 'profile.csv'}` (`ssmscale profile`)."]
    shapes = meta.get("shapes", {})
    if shapes:
        out.append("Models: " + "; ".join(f"{f} d_model {v[0]} x {v[1]} layers, {v[2]:,} non-embedding parameters"
                                          for f, v in shapes.items()) + ".")
    facts = [f"batch {meta['batch']}" if "batch" in meta else "",
             f"{meta['gen_tokens']} decoded tokens per generation point" if "gen_tokens" in meta else "",
             f"device {meta['device']}" if "device" in meta else "",
             f"MFU peak: {meta['peak_note']}" if "peak_note" in meta else ""]
    if any(facts):
        out.append("; ".join(f for f in facts if f) + ".")
    out += ["Peak MiB: the memory a step adds over its fresh process's baseline (weights, optimiser state and "
            "inputs excluded; generation includes the KV cache or the recurrent state).", ""]
    head = "| mode | L | " + " | ".join(f"{f} tokens/s | {f} peak MiB" for f in families) + " |"
    head += "".join(f" {f} / {families[0]} tokens/s |" for f in families[1:])
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for (mode, seq_len), grp in profile.groupby(["mode", "seq_len"], sort=False):
        cells, speed = [], {}
        for f in families:
            row = grp[grp["family"].astype(str) == f]
            if row.empty:
                cells += ["", ""]
                continue
            r = row.iloc[0]
            if r["status"] == "ok":
                speed[f] = float(r["tokens_per_s"])
                cells += [f"{r['tokens_per_s']:,.0f}", f"{r['peak_mem_bytes'] / 2**20:,.1f}"]
            else:
                cells += [r["status"], ""]
        line = f"| {mode} | {int(seq_len)} | " + " | ".join(cells) + " |"
        first = families[0]
        line += "".join(f" {speed[f] / speed[first]:.2f}x |" if first in speed and f in speed else " |"
                        for f in families[1:])
        out.append(line)
    growth = meta.get("growth", {})
    if growth:
        out += ["", "Growth with L (log-log slope of step time and peak memory against L, over the lengths listed):",
                "", "| family / mode | time exponent | memory exponent | lengths |", "|---|---|---|---|"]
        for key, g in growth.items():
            lengths = g.get("lengths", [])
            span = f"{lengths[0]}-{lengths[-1]}" if lengths else ""
            time_, memory = ("n/a" if g.get(k) is None else f"{g[k]:.2f}" for k in ("time", "memory"))
            out.append(f"| {key} | {time_} | {memory} | {span} |")
    return out + [""]


def render_markdown(name: str, study: Path, loaded: LoadedRuns, fit: dict, figures: list[str],
                    profile: pd.DataFrame | None = None, sections: list[str] = (), lead: list[str] = ()) -> str:
    s = fit["settings"]
    ci = s["ci"]
    lines = [f"# Scaling study `{name}`", "",
             f"Regenerate with `ssmscale report {study}`: everything below comes from that directory alone "
             f"(results.csv, config.yaml, fit.json, profile/).", "", *lead, "## Summary", ""]
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
    plan = study / "plan.csv"
    if plan.is_file():
        try:
            lines.append(f"- plan.csv lists {len(pd.read_csv(plan))} planned runs.")
        except ValueError:       # pandas' parser errors and a non-UTF-8 file are ValueErrors
            lines.append("- plan.csv is unreadable (not a CSV).")
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
    cfg = study / "config.yaml"
    if cfg.is_file():
        text = cfg.read_bytes().decode("utf-8", errors="replace").rstrip("\n")
        # a fence longer than any run of backticks inside, so the file cannot end the code block early
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
        lines += ["`config.yaml`, verbatim:", "", fence + "yaml", text, fence, ""]
    else:
        lines += ["(no config.yaml in the study directory)", ""]
    lines += ["## Provenance", ""] + _provenance(Path(loaded.source["csv"]), fit) + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------

def cached_fit(study: Path, loaded: LoadedRuns, baseline: str = DEFAULT_BASELINE) -> dict | None:
    """STUDY/fit.json when it is a fit of the current results.csv with compute multipliers against `baseline`,
    else None (and a line saying why)."""
    from .safeload import FileRefused, read_json
    target = study / "fit.json"
    try:
        fit = read_json(target)
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
    mult = fit.get("multiplier")
    if not isinstance(mult, dict) or mult.get("baseline") != baseline:
        print(f"{target}: has no compute multipliers against {baseline}, refitting")
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
                 parametric_grid: np.ndarray | None = None, baseline: str = DEFAULT_BASELINE) -> Path:
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
    from .report_recall import is_fixed_length_study, write_recall_report
    if is_fixed_length_study(study):      # no budgets, no scaling law: the recall report
        return write_recall_report(study, out)
    loaded = load_runs(study)
    profile = _read_profile(study)
    fit_kwargs = dict(n_boot=n_boot, seed=seed, progress=progress, parametric_grid=parametric_grid,
                      baseline=baseline)
    fit = None if refit else cached_fit(study, loaded, baseline)
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
_MALFORMED_FIT = (KeyError, TypeError, ValueError, IndexError, AttributeError)


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
    lead, lead_figures = multiplier_section(fit, colors, _figure, _sci)
    sections, trust_figures = [*sections, *contrast], {**trust_figures, **contrast_figures, **lead_figures}
    markdown = render_markdown(name, study, loaded, fit, list(figures), profile, sections, lead)
    return {fig_name: _png(fig) for fig_name, fig in {**figures, **trust_figures}.items()}, markdown


_PROFILE_COLUMNS = ("family", "mode", "seq_len", "batch", "tokens_per_s", "peak_mem_bytes", "status")


def _read_profile(study: Path) -> pd.DataFrame | None:
    path = study / "profile" / "profile.csv"
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    missing = [c for c in _PROFILE_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    df["status"] = df["status"].astype(str).str.strip()
    for col in ("family", "mode"):
        df[col] = df[col].astype(str)
    for col in ("seq_len", "batch", "tokens_per_s", "peak_mem_bytes"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    usable = np.isfinite(df[["seq_len", "batch"]]).all(axis=1) & (df[["seq_len", "batch"]] >= 1).all(axis=1)
    if not usable.all():
        print(f"{path}: ignored {int((~usable).sum())} rows without a positive seq_len and batch")
    return df[usable]


def _profile_families(study: Path) -> list[str]:
    path = study / "profile" / "profile.csv"
    if not path.is_file():
        return []
    try:
        return [str(f) for f in pd.read_csv(path, usecols=["family"])["family"].dropna().unique()]
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return []
