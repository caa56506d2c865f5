"""The report's "How far to trust it" sections, from fit.json and the study's run files:

- Backtest: each law refitted without the largest budgets predicts them (predicted vs observed, ARE,
  interval coverage, and whether the predicted order of the families held).
- Seed noise: the gap between the families' best runs beside the seed spread of each.
- Loss by token position: position.png (loss against position in the window, log x, each family's best run
  at each budget, the largest bold) and the context gain (first 10% of positions minus the last 10%).
- Wall clock: wallclock.png and the verdict at equal training time on the machine that ran the study.
- Approach 1 beside Approaches 2 and 3: the compute-optimal exponents of all three.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fit import FIGURE_EXTRAPOLATION, LoadedRuns, fmt_value, frontier_loss
from ..fit.forecast import score_forecasts, score_lines
from ..fit.text import (backtest_order_lines, backtest_rows, calibration_rows, fmt_interval, seed_gap_lines,
                        threshold_lines, wallclock_statement)

CHOSHEN_ARE = 0.04       # Choshen et al. 2024: ~4% ARE is the best typically reached predicting a larger model


def trust_sections(study: Path, loaded: LoadedRuns, fit: dict, colors: dict, figure, sci) -> tuple[list[str], dict]:
    """(markdown lines, {file name: figure}); `figure` and `sci` are the report's figure factory and number label."""
    lines = ["## How far to trust it", ""]
    figures = {}
    lines += _backtest_section(fit)
    lines += _calibration_section(fit)
    lines += score_lines(score_forecasts(study, loaded))
    lines += _seed_section(fit, sci)
    by_position = _best_run_positions(study, loaded)
    if by_position:
        figures["position.png"] = position_figure(by_position, colors, figure, sci)
    lines += _position_section(by_position, sci)
    if any("skipped" not in fam["wallclock"] for fam in fit["families"].values()):
        figures["wallclock.png"] = wallclock_figure(loaded, fit, colors, figure)
    lines += _wallclock_section(fit, "wallclock.png" in figures, _timed_fit(study, fit))
    lines += _approach1_section(fit)
    return lines, figures


# ---------------------------------------------------------------------------------------------------
# backtest and seeds

def _backtest_section(fit: dict) -> list[str]:
    ci = fit["settings"]["ci"]
    bt = fit.get("backtest", {"mode": "off", "reason": "this fit.json predates backtests"})
    out = ["### Backtest: do the laws predict budgets they were not fitted on?", ""]
    if bt["mode"] == "off":
        return out + [f"Not run: {bt.get('reason', '')}.", ""]
    if bt["mode"] == "threshold":
        for name, fam in fit["families"].items():
            out += [f"- **{name}**: {line}." for line in threshold_lines(fam, ci)]
            out += [f"- **FLAG**: {flag}." for flag in fam.get("backtest", {}).get("flags", [])]
        return out + [""]
    out += [f"Each law is refitted on the budgets below the largest (then below the k largest, while 3 remain) and "
            f"predicts the budgets left out. ARE = |predicted - observed| / observed; reference points: about 4% is "
            f"the best typically reached predicting a held-out larger model (Choshen et al. 2024), 0.7% at 300x the "
            f"compute of the fits (Gadre et al. 2024). Intervals: {ci:.0%} calibrated prediction intervals, each "
            f"built from the errors of the other backtests (see the calibration table below; the bootstrap interval "
            f"of the law is shown where too few backtests exist to calibrate); observed N_opt is the held-out "
            f"budget's parabola vertex, Approach 3's prediction the vertex of the same parabola through its "
            f"predicted losses.", ""]
    for name, fam in fit["families"].items():
        block = fam.get("backtest", {})
        if "skipped" in block:
            out += [f"- **{name}**: skipped: {block['skipped']}.", ""]
            continue
        out += [f"**{name}**", "", "| held out | budget | approach | quantity | predicted | interval | observed | ARE "
                "| covered |", "|---|---|---|---|---|---|---|---|---|"]
        for k, budget, approach, what, pred, interval, obs, are, covered in backtest_rows(block):
            out.append(f"| {k} largest | {budget} | {approach} | {what} | {pred} | {interval} | {obs} | {are} | "
                       f"{'**NO**' if covered == 'NO' else covered} |")
        out.append("")
        loss_ares = [v["are"] for e in block["holdouts"] for row in e["held_out"] for a in ("frontier", "parametric")
                     if isinstance(v := row.get(a, {}).get("loss"), dict) and v.get("are") is not None]
        if loss_ares:
            worst = max(loss_ares)
            out.append(f"Best-loss predictions: mean ARE {np.mean(loss_ares):.2%}, worst {worst:.2%} "
                       f"({'within' if worst <= CHOSHEN_ARE else 'beyond'} the ~4% Choshen et al. report as typical).")
        out += [f"- **FLAG**: {flag}." for flag in block.get("flags", [])]
        out.append("")
    order = backtest_order_lines(fit)
    if order:
        out += ["Predicted against observed order of the families at each held-out budget:", ""]
        out += [f"- {line}." for line in order] + [""]
    return out


def _calibration_section(fit: dict) -> list[str]:
    rows = list(calibration_rows(fit))
    if not rows:
        return []
    return (["### Calibration: do the intervals hold on the backtests?", "",
            "How often the held-out observations of the backtests fell inside each kind of interval, against "
            "the nominal rate, and the interval's median width over the median absolute error (both in log, i.e. "
            "relative; about 5.8 is right for a 95% interval of normally distributed errors: much more is wider "
            "than needed, much less too narrow). Bootstrap: refits of the kept runs plus a drawn residual (what "
            "earlier versions reported). Calibrated: error model s = sqrt(s0^2 + sigma^2 + b^2 + (tau d)^2) fitted "
            "to the other backtests' errors, quantile split-conformal (or Student-t where too few errors), each "
            "backtest's interval built without its own budget or refit (docs/forecast.md).", "",
            "| prediction | nominal | bootstrap: inside | width / error | calibrated: inside | width / error | "
            "calibration (all backtests) |", "|---|---|---|---|---|---|---|"]
            + [f"| {' | '.join(r)} |" for r in rows] + [""])


def _seed_section(fit: dict, sci) -> list[str]:
    out = ["### Seed noise beside the family gaps", ""]
    lines = seed_gap_lines(fit)
    configs = [(name, c) for name, fam in fit["families"].items()
               for c in fam.get("seed_noise", {}).get("configurations", [])]
    if not configs:
        return out + ["One seed per point: no gap here can be compared with seed-to-seed noise (set `noise_seeds` "
                      "in the ladder config to retrain each family's best run at each budget with more seeds; "
                      "the fits then average seeds and the bootstrap resamples them).", ""]
    out += ["Each family's best run at each budget, trained with several seeds: the gap between the families "
            "against the spread (max - min) of each best run's seeds. A gap no larger than the larger spread is "
            "within seed noise. The fits average the seeds and the bootstrap resamples them, so every interval "
            "above carries this noise.", ""]
    out += [f"- {line}." for line in lines] + [""]
    out += ["| family | budget | params | seeds | losses | spread | sd |", "|---|---|---|---|---|---|---|"]
    for name, c in configs:
        losses = ", ".join(f"{v:.4f}" for v in c["losses"])
        out.append(f"| {name} | {sci(c['budget'])} | {int(c['params']):,} | {c['n_seeds']} | {losses} | "
                   f"{c['spread']:.4f} | {c['sd']:.4f} |")
    return out + [""]


# ---------------------------------------------------------------------------------------------------
# loss by position

def _best_run_positions(study: Path, loaded: LoadedRuns) -> dict:
    """{family: [(budget, loss by position averaged over the best configuration's seeds)]} for the best run
    of each budget, read from runs/<run_id>/result.json (empty where none recorded it)."""
    from ..safeload import FileRefused, read_json
    out: dict = {}
    t = loaded.table
    for (family, budget), g in t.groupby(["family", "group_flops"], sort=True):
        best = g.loc[g["loss"].idxmin()]
        vectors = []
        for run_id in best["run_ids"]:
            try:
                res = read_json(study / "runs" / run_id / "result.json", within=study)
            except (FileNotFoundError, FileRefused):
                continue
            by_position = res.get("val_loss_by_position") if isinstance(res, dict) else None
            numbers = isinstance(by_position, list) and all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in by_position)
            if numbers and any(v is not None for v in by_position):
                vectors.append([np.nan if v is None else v for v in by_position])
        if vectors and len({len(v) for v in vectors}) == 1:
            values = np.array(vectors, float)
            seen = (~np.isnan(values)).sum(axis=0)      # a position no seed recorded stays NaN (no nanmean warning)
            mean = np.where(seen > 0, np.nansum(values, axis=0) / np.maximum(seen, 1), np.nan)
            out.setdefault(str(family), []).append((float(budget), mean, float(best["params"]), len(vectors)))
    return out


def _context_gain(v: np.ndarray) -> float:
    from ..train import context_gain
    return context_gain([float(x) for x in v])


def position_figure(by_position: dict, colors: dict, figure, sci):
    fig, axes = figure(width=7.5, height=4.8)
    ax = axes[0][0]
    for name, rows in sorted(by_position.items()):
        top = max(b for b, *_ in rows)
        for budget, v, params, _ in rows:
            pos = np.arange(1, len(v) + 1)
            largest = budget == top
            ax.plot(pos, v, "-", color=colors.get(name, "#000000"), lw=2.0 if largest else 0.8,
                    alpha=1.0 if largest else 0.35,
                    label=f"{name}, best run at {sci(budget)} FLOPs ({int(params):,} params)" if largest else None)
    ax.set_xscale("log")
    ax.set_xlabel("position in the window (tokens of context + 1)")
    ax.set_ylabel("validation loss at that position (nats/token)")
    ax.set_title("Loss by token position: each family's best run per budget (bold: the largest budget)", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def _position_section(by_position: dict, sci) -> list[str]:
    out = ["### Loss by token position: does each family use its context?", ""]
    if not by_position:
        return out + ["No run of this study recorded its loss by position (`val_loss_by_position` in result.json; "
                      "runs trained before ssmscale recorded it have none): retrain to see it.", ""]
    out += ["![position.png](position.png)", "",
            "Validation loss at each position of the window (log x), for each family's best run at each budget. "
            "Context gain: mean loss over the first 10% of positions minus over the last 10% (higher: the model "
            "gains more from the context it has seen). Every run is scored on the same windows, so what the text "
            "happens to hold at a position moves all curves alike: compare the families at a position, and read "
            "one curve's shape with that in mind (the fewer validation windows, the more it shows).", "",
            "| family | budget | best run params | seeds | context gain (nats) | loss, first 10% | loss, last 10% |",
            "|---|---|---|---|---|---|---|"]
    for name, rows in sorted(by_position.items()):
        for budget, v, params, n in rows:
            edge = max(1, int(np.ceil(0.1 * len(v))))
            out.append(f"| {name} | {sci(budget)} | {int(params):,} | {n} | {_context_gain(v):.4f} | "
                       f"{np.nanmean(v[:edge]):.4f} | {np.nanmean(v[-edge:]):.4f} |")
    return out + [""]


# ---------------------------------------------------------------------------------------------------
# wall clock

def wallclock_figure(loaded: LoadedRuns, fit: dict, colors: dict, figure):
    fig, axes = figure(width=8.0, height=5.2)
    ax = axes[0][0]
    t = loaded.table
    for name in sorted(fit["families"]):
        col = colors[name]
        rows = t[(t["family"] == name) & np.isfinite(t["train_s"])]
        ax.plot(rows["train_s"], rows["loss"], "o", color=col, alpha=0.25, ms=4, mew=0)
        block = fit["families"][name]["wallclock"]
        if "skipped" in block:
            ax.plot([], [], "o", color=col, label=f"{name}: {block['skipped']}")
            continue
        pts = block["points"]
        ax.plot([p["seconds"] for p in pts], [p["loss"] for p in pts], "o", color=col, ms=8, mec="black", mew=0.8,
                zorder=4)
        law = {k: block[k]["value"] for k in ("E", "A", "alpha")}
        lo, hi = block["range"]
        inside, beyond = np.geomspace(lo, hi, 100), np.geomspace(hi, hi * FIGURE_EXTRAPOLATION, 40)
        ax.plot(inside, frontier_loss(law, inside), "-", color=col, lw=2,
                label=f"{name}: L = {law['E']:.3g} + {law['A']:.3g} t^-{law['alpha']:.3g}")
        ax.plot(beyond, frontier_loss(law, beyond), "--", color=col, lw=1.5)
        band = block.get("band") or {}
        if band.get("lo"):
            ax.fill_between(band["seconds"], band["lo"], band["hi"], color=col, alpha=0.15, lw=0)
    for pair in fit["wallclock"]["crossover"].get("pairs", []):
        for c in pair.get("crossings", []):
            if not c["extrapolated"]:
                ax.axvline(c["flops"]["value"], color="black", ls="-.", lw=1,
                           label=f"crossover: {c['lower_above']} lower beyond {fmt_value(c['flops']['value'])} s")
    ax.set_xscale("log")
    ax.set_xlabel("CPU time of the training steps (s), 1 thread per run" if fit["wallclock"].get("time_basis") ==
                  "train_cpu_s" else "pure training time (s): optimiser steps only")
    ax.set_ylabel("validation loss (nats/token)")
    devices = fit["wallclock"].get("devices") or ["device not recorded"]
    ax.set_title("Loss against training time on " + "; ".join(devices) + "\nbold: runs no faster run beats "
                 "(fitted); faint: all runs; shaded: bootstrap band; dashed: extrapolation", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def _timed_fit(study: Path, fit: dict) -> dict | None:
    """STUDY/fit_timed.json (`ssmscale fit --time-from`) when it re-prices the same results.csv as fit.json."""
    from ..safeload import FileRefused, read_json
    try:
        timed = read_json(study / "fit_timed.json", within=study)
    except (FileNotFoundError, FileRefused):
        return None
    wc = timed.get("wallclock") if isinstance(timed, dict) else None
    if (not isinstance(wc, dict) or wc.get("time_basis") != "profile" or not isinstance(timed.get("source"), dict)
            or timed["source"].get("sha256") != fit["source"].get("sha256")
            or not isinstance(wc.get("crossover"), dict)):
        return None
    return timed


def _wallclock_section(fit: dict, has_figure: bool, timed: dict | None = None) -> list[str]:
    ci = fit["settings"]["ci"]
    out = ["### Wall clock: which family wins at equal training time, here", ""]
    skipped = [f"{n}: {fam['wallclock']['skipped']}" for n, fam in fit["families"].items()
               if "skipped" in fam["wallclock"]]
    if len(skipped) == len(fit["families"]):
        return out + ["Not fitted (" + "; ".join(skipped) + ").", ""]
    if has_figure:
        out += ["![wallclock.png](wallclock.png)", ""]
    out += [f"**Verdict**: {wallclock_statement(fit)}", ""]
    if timed is not None:
        out += [f"**Re-priced** (fit_timed.json, `ssmscale fit --time-from`): {wallclock_statement(timed)}", ""]
    out += [
            "Points: each family's runs that no faster run of it beats in final loss (the best loss t seconds of "
            "training buy, any size); law L(t) = E + A t^-alpha fitted to them as the frontier is to FLOPs, "
            f"{ci:.0%} bootstrap intervals. Pure training time counts optimiser steps only: no start-up, "
            "validation or checkpointing.", "",
            "| family | E | A | alpha | runs on the front | time range (s) |", "|---|---|---|---|---|---|"]
    for name, fam in fit["families"].items():
        w = fam["wallclock"]
        if "skipped" in w:
            out.append(f"| {name} | skipped: {w['skipped']} | | | | |")
            continue
        out.append(f"| {name} | {fmt_value(w['E']['value'])} {fmt_interval(w['E'])} | {fmt_value(w['A']['value'])} | "
                   f"{fmt_value(w['alpha']['value'])} {fmt_interval(w['alpha'])} | {len(w['points'])} of "
                   f"{w['n_timed']} | {fmt_value(w['range'][0])}-{fmt_value(w['range'][1])} |")
    return out + [""]


# ---------------------------------------------------------------------------------------------------
# Approach 1

def _approach1_section(fit: dict) -> list[str]:
    out = ["### Compute-optimal allocation by Chinchilla's three approaches", "",
           "N_opt ∝ C^a and D_opt ∝ C^b. Approach 1: the run with the lowest loss at each C over every run's "
           "eval points (the lower envelope); Approach 2: IsoFLOP parabola minima; Approach 3: the parametric "
           "law (assumes C = 6ND).", "",
           "| family | approach | a | b | N_opt at the largest budget |", "|---|---|---|---|---|"]
    caveat = None
    for name, fam in fit["families"].items():
        c_max = fam["flops_range"][1]
        for key, label in (("approach1", "1 (envelope)"), ("approach2", "2 (IsoFLOP)"), ("parametric", "3 (parametric)")):
            block = fam[key]
            if "skipped" in block:
                out.append(f"| {name} | {label} | skipped: {block['skipped']} | | |")
                continue
            if key == "parametric":
                n_opt = block["G"]["value"] * (c_max / 6) ** block["a"]["value"]
            else:
                n_opt = block["N0"]["value"] * c_max ** block["a"]["value"]
                caveat = block.get("caveat", caveat)
            out.append(f"| {name} | {label} | {fmt_value(block['a']['value'])} {fmt_interval(block['a'])} | "
                       f"{fmt_value(block['b']['value'])} {fmt_interval(block['b'])} | {fmt_value(n_opt)} |")
    out.append("")
    if caveat:
        out += [f"Approach 1 caveat: {caveat}.", ""]
    return out
