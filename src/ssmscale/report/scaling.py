"""Study report: figures and a report.md that embeds them, regenerated from scaling/<study>/ alone.
This module writes the text and the files; scaling_figures.py draws its three scaling-law figures.

Figures (PNG, matplotlib's object API on the Agg canvas, so no global backend is touched):
- isoflop.png     loss against N per budget, one panel per family, fitted parabolas and their minima;
- frontier.png    loss against training FLOPs, every family on one axis, frontier fits, the bootstrap
                  band continued FIGURE_EXTRAPOLATION beyond the data (dashed = extrapolated); beside it
                  each family's gap to the transformer (the crossovers are a table in report.md);
- allocation.png  compute-optimal N_opt(C) and D_opt(C): Approach 2 minima and fit, Approach 3 implied line;
- profile.png     tokens/s and peak memory against sequence length, one column per mode (if profile/ exists;
                  profile.py);
- position.png, wallclock.png: loss by token position and loss against training time (trust.py, with
                  the backtest, seed-noise and Approach 1 sections);
- multiplier.png  each family's compute multiplier against the baseline, k(C), the report's first section
                  (multiplier.py).
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
from ..fit import (DEFAULT_BASELINE, DEFAULT_N_BOOT, LoadedRuns, fit_json, fit_notes, fit_runs, fmt_value, format_fit,
                   frontier_loss, load_runs, quantity_rows)
from ..fit.forecast import score_forecasts, summary_line
from ..fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable_dir
from .caveats import family_caveats, lr_grid, pair_caveats, results_table, weakened
from .colors import check_family_count, family_colors
from .contrast import contrast_section
from .figures import _figure, _png, _sci
from .multiplier import multiplier_section
from .profile import _profile_families, _profile_section, _read_profile, profile_figure
from .provenance import _provenance, config_block
from .scaling_figures import GAP_BASELINE, allocation_figure, frontier_figure, isoflop_figure
from .trust import trust_sections


def _crossover_table(fit: dict) -> list[str]:
    """Where the families' frontiers cross, one row per pair: inside the budgets both were fitted on, and
    beyond them (extrapolated), each crossing with its bootstrap interval."""
    ci, factor = fit["settings"]["ci"], fit["settings"]["crossover_search_factor"]
    lines = [f"| families | inside the fitted range ({ci:.0%} interval; resamples with a crossing near it) "
             "| beyond it, extrapolated | resamples crossing inside the range |", "|---|---|---|---|"]
    for pair in fit["crossover"]["pairs"]:
        f1, f2 = pair["families"]
        if "crossings" not in pair:       # a frontier was skipped, or the ranges do not overlap
            lines.append(f"| {f1} vs {f2} | {pair['statement']} | | |")
            continue
        n = pair["resamples_compared"]

        def cell(c):
            q = c["flops"]
            interval = f" [{fmt_value(q['lo'])}, {fmt_value(q['hi'])}]" if q["lo"] is not None else ""
            return f"{c['lower_above']} lower above {fmt_value(q['value'])}{interval}"

        inside = [f"{cell(c)} ({c['found_in_resamples']}/{n})" for c in pair["crossings"] if not c["extrapolated"]]
        if not inside and pair["fitted_range"]:
            middle = math.sqrt(pair["fitted_range"][0] * pair["fitted_range"][1])
            laws = {f: {k: fit["families"][f]["frontier"][k]["value"] for k in ("E", "A", "alpha")} for f in (f1, f2)}
            lower = min((f1, f2), key=lambda f: frontier_loss(laws[f], middle))
            inside = [f"none: {lower} lower throughout"]
        beyond = [cell(c) for c in pair["crossings"] if c["extrapolated"]] or [f"none within {factor:g}x"]
        lines.append(f"| {f1} vs {f2} | {'; '.join(inside) or 'no overlap'} | {'; '.join(beyond)} "
                     f"| {pair['resamples_crossing_in_range']}/{n} |")
    return lines


def _fit_table(fam: dict, ci: float) -> list[str]:
    lines = [f"| approach | quantity | value | {ci:.0%} interval |", "|---|---|---|---|"]
    lines += [f"| {approach} | {k} | {value} | {interval or 'no bootstrap'} |"
              for approach, k, value, interval in quantity_rows(fam)]
    notes = fit_notes(fam)
    if "skipped" not in fam["frontier"] and all(p.get("n_seeds", 1) == 1 for p in fam["frontier"]["points"]):
        notes.append("frontier: a resample's point at a budget is the best run it drew, so the interval reflects "
                     "which runs were made, not the seed-to-seed noise of the best run itself (one seed per point)")
    return lines + [""] + [f"- {n}." for n in notes]


def _lr_section(study: Path, grid: list[dict]) -> list[str]:
    """Where a learning-rate grid was tried: the best rate per family, size and budget, and a warning
    where it sits at an end of the grid (the optimum may lie outside it); `grid` is lr_grid(study)."""
    edges = sum(r["edge"] for r in grid)
    rows = [f"| {r['family']} | {int(r['params']):,} | {_sci(r['budget'])} | {', '.join(f'{x:.3g}' for x in r['lrs'])} "
            f"| **{r['best_lr']:.3g}**{' (edge)' if r['edge'] else ''} | {r['loss']:.4f} |" for r in grid]
    if not rows:
        return []
    out = ["", "## Learning rates", "",
           "Best learning rate per family, size and budget where a grid was tried (the fits use that run).", "",
           "| family | params | budget | learning rates tried | best | loss |", "|---|---|---|---|---|---|"] + rows
    df = results_table(study)
    if df is not None and "lr_source" in df.columns:
        tuned = df[df["lr_source"].astype(str).str.startswith("tuned")]
        if len(tuned):
            out += ["", f"The other {len(tuned)} runs use the best learning rate of their family and size at the "
                        f"tuning budget ({tuned['lr_source'].iloc[0]})."]
    if edges:
        out += ["", f"**{edges} best learning rate(s) at an end of the grid**: the optimum may lie outside it; "
                    "widen the grid there before trusting that comparison."]
    return out


def render_markdown(name: str, study: Path, loaded: LoadedRuns, fit: dict, figures: list[str],
                    profile: pd.DataFrame | None = None, sections: list[str] = (), lead: list[str] = ()) -> str:
    s = fit["settings"]
    ci = s["ci"]
    grid = lr_grid(study)
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
        lines.append("- " + "; ".join(bits) + "." + weakened(family_caveats(fam_name, fam, grid, _sci)))
    if fit["crossover"]["pairs"]:
        lines += ["", "Where the frontiers cross (frontier.png's right panel shows each family's gap to the "
                      f"{GAP_BASELINE}):", ""] + _crossover_table(fit)
        caveats = [(pair["families"], pair_caveats(pair, fit, _sci)) for pair in fit["crossover"]["pairs"]]
        lines += [""] + [f"- {' vs '.join(fams)}:{weakened(c)}" for fams, c in caveats if c]
    if fit.get("decision", {}).get("rows"):
        lines.append(f"- **Decision accuracy** (backtests): {fit['decision']['statement']}.")
    lines += [f"- **Forecast**: {summary_line(score)}." for score in score_forecasts(study, loaded)]
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
        lines.append(f"- plan.csv is unreadable ({exc.reason}).")
    lines.append(f"- {s['grouping']}.")

    lines += _lr_section(study, grid)

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
        "frontier.png": "Left: loss against training compute for every family. Bold points: the best run at each "
                        "budget, which the frontier L(C) = E + A C^-alpha is fitted to; solid over the budgets it "
                        "was fitted on, dashed beyond (the grey area); shaded bands are bootstrap intervals of the "
                        f"frontier. Right: each family's frontier minus the {GAP_BASELINE}'s (below zero: lower "
                        "loss at that compute), with the family's own band; where the curves cross zero or each "
                        "other is in the crossover table of the Summary.",
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


def cached_fit(study: Path, loaded: LoadedRuns, baseline: str = DEFAULT_BASELINE) -> dict | None:
    """STUDY/fit.json when it is a fit of the current results.csv with compute multipliers against `baseline`,
    else None (and a line saying why)."""
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
    if "decision" not in fit or any("sanity" not in fam for fam in fit["families"].values() if isinstance(fam, dict)):
        print(f"{target}: written before sanity flags and decision accuracy existed, refitting")
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
    from .recall import is_fixed_length_study, write_recall_report
    if is_fixed_length_study(study):      # no budgets, no scaling law: the recall report
        return write_recall_report(study, out)
    loaded = load_runs(study)
    check_family_count(loaded.table["family"].astype(str), loaded.source["csv"])
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
    lead, lead_figures = multiplier_section(fit, colors, _figure, _sci)
    sections, trust_figures = [*sections, *contrast], {**trust_figures, **contrast_figures, **lead_figures}
    markdown = render_markdown(name, study, loaded, fit, list(figures), profile, sections, lead)
    return {fig_name: _png(fig) for fig_name, fig in {**figures, **trust_figures}.items()}, markdown
