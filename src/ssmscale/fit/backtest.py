"""Backtests: refit each law without the largest budgets (or, for a CSV of single runs, without the runs above
a FLOP threshold), predict what was held out, and say how close and how honest the predictions were.

Budget backtest (data with IsoFLOP budgets): per family, with n budgets that have >= MIN_RUNS_PER_BUDGET
sizes, for k = 1 .. n - 3 the runs of the k largest budgets are held out and the frontier, Approach 2 and
Approach 3 are refitted on the rest from the same starts as the main fit. Each held-out budget gets:
- best loss. Observed: its best run. Frontier: L(C) at that run's FLOPs. Approach 3: the lowest L(N, D)
  over the budget's runs (their N and D are what was planned, not an outcome).
- N_opt. Observed: the Approach 2 parabola vertex of the held-out runs, where it lies inside their sizes.
  Approach 2: N0 C^a. Approach 3: the vertex of the same parabola fitted to the losses its law predicts for
  those runs (the estimator of the observation applied to the prediction, so the parabola's own bias
  cancels).
- ARE = |predicted - observed| / observed, and an interval: the predictions of bootstrap refits of the kept
  runs (runs and seeds resampled as in the main bootstrap). A loss prediction is also multiplied by exp(r),
  r a log residual of the point fit drawn at random (for Approach 3 one per held-out run before taking the
  best, as the observed best is the lowest of noisy runs), so its interval is a prediction interval and not
  only the law's confidence interval; N_opt intervals are the refits' alone. covered: the observation lies
  inside. An observation outside its interval is FLAGGED: the law did not extrapolate there.
- calibrated: the prediction interval calibration.py builds from the backtests' own errors (each one
  cross-fitted: calibrated on the errors of other held-out budgets and other refits), with its own
  covered; FLAGS and summaries use it where there are enough backtests to build it, the bootstrap
  interval above otherwise. "distance" (decades of compute beyond the largest fitted budget) and "s0" (the
  refit's in-sample scatter for that quantity) are what the calibration reads.
- Pairs of families: at each held-out budget, the predicted order (and the gap's interval, from the two
  families' resamples taken pairwise) against the observed order.

Threshold backtest (`holdout_above`): Approach 3 refitted on the runs at or below the threshold predicts
every run above it (ARE per run, mean / median / max, and how many lie inside their prediction interval).
Its calibrated intervals come from inner backtests on the kept runs alone (Approach 3 refitted below cuts
INNER_STEP decades apart under the largest kept run, predicting the kept runs above each cut), so the
held-out runs never calibrate anything. FLAGGED when so few are inside that a law with honest intervals
would do that rarely (binomial, p < 0.01).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.stats import binom

from . import calibration
from .approach2 import budget_vertex
from .approach3 import parametric_loss
from .bootstrap import _interval, _q, _run_bootstrap, fit_approaches
from .frontier import frontier_loss
from .runs import MIN_RUNS_PER_BUDGET, FamilyRuns
from .text import fmt_value

BACKTESTED = ("frontier", "approach2", "parametric")
MIN_KEPT_BUDGETS = 3
UNDERCOVERAGE_P = 0.01          # threshold backtest: flag coverage this unlikely under the nominal rate
LAW_PARAMS = {"frontier": 3, "approach2": 2, "parametric": 5}     # fitted parameters, for the scatter's dof
INNER_STEP = 0.25               # threshold backtest: inner cuts this many decades apart below the largest kept run
MAX_INNER = 4                   # at most this many inner cuts
MIN_INNER_SHARE = 0.5           # an inner fit keeps at least this share of the kept runs


def holdout_counts(runs: FamilyRuns) -> list[int]:
    """k = 1, 2, ... largest budgets held out while at least MIN_KEPT_BUDGETS budgets remain."""
    return list(range(1, int(runs.frontier_budgets.sum()) - MIN_KEPT_BUDGETS + 1))


def _split(runs: FamilyRuns, k: int) -> tuple[FamilyRuns, list[int]]:
    """The runs below the k largest frontier budgets, and those budgets' group indices."""
    held = list(np.flatnonzero(runs.frontier_budgets)[-k:])
    return runs.select(~np.isin(runs.group, held)), held


def log_residuals(approach: str, fit: dict, runs: FamilyRuns) -> np.ndarray:
    if approach == "frontier":
        pts = fit["points"]
        return np.log(pts["loss"]) - np.log(frontier_loss(fit, pts["flops"]))
    return np.log(runs.loss) - np.log(parametric_loss(fit, runs.params, runs.tokens))


def _predict(approach: str, fit: dict, held: dict) -> dict:
    """Predictions of one fitted law for one held-out budget."""
    if approach == "frontier":
        return {"loss": float(frontier_loss(fit, held["best_flops"]))}
    if approach == "approach2":
        return {"n_opt": float(fit["N0"] * held["budget"] ** fit["a"])}
    losses = parametric_loss(fit, held["params"], held["tokens"])
    return {"loss": float(losses.min()), "run_losses": losses,
            "n_opt": budget_vertex(held["budget"], held["params"], held["tokens"], losses)["n_opt"]}


def _noisy_best(pred: dict, factors: np.ndarray) -> float:
    """A resample's best-loss prediction with residual noise: per run for Approach 3 (then the lowest)."""
    if "run_losses" in pred:
        return float((pred["run_losses"] * factors).min())
    return pred["loss"] * float(factors[0])


def _held_budget(runs: FamilyRuns, g: int) -> dict:
    m = np.flatnonzero(runs.group == g)
    best = m[np.argmin(runs.loss[m])]
    vertex = budget_vertex(runs.budgets[g], runs.params[m], runs.tokens[m], runs.loss[m])
    return {"budget": float(runs.budgets[g]), "params": runs.params[m], "tokens": runs.tokens[m],
            "loss": runs.loss[m], "best_flops": float(runs.flops[best]), "best_loss": float(runs.loss[best]),
            "best_params": float(runs.params[best]), "n_opt": vertex["n_opt"] if vertex["used"] else None,
            "n_opt_note": vertex["reason"]}


def _verdict(pred: float | None, samples: list, observed: float | None, ci: float) -> dict:
    q = _q(pred, [v for v in samples if v is not None], ci)
    out = {"predicted": q, "observed": observed}
    if observed is None or pred is None:
        out.update(are=None, covered=None)
        return out
    out["are"] = abs(pred - observed) / observed
    out["covered"] = None if q["lo"] is None else bool(q["lo"] <= observed <= q["hi"])
    return out


def budget_backtest(families: dict, *, delta, grid, pool, n_jobs, n_boot, seed, ci, progress) -> dict:
    """The leave-the-largest-budgets-out sweep for every family; see the module docstring."""
    point, warm, splits = {}, {}, {}
    skipped = {}
    for name, runs in families.items():
        ks = holdout_counts(runs)
        if not ks:
            skipped[name] = (f"needs >= {MIN_KEPT_BUDGETS + 1} IsoFLOP budgets with >= {MIN_RUNS_PER_BUDGET} "
                             f"sizes (one to hold out, {MIN_KEPT_BUDGETS} to fit), got {int(runs.frontier_budgets.sum())}")
        for k in ks:
            kept, held = _split(runs, k)
            key = f"{name}|{k}"
            splits[key] = (name, k, kept, [_held_budget(runs, g) for g in held])
            point[key], warm[key] = fit_approaches(kept, delta, grid, pool, n_jobs, approaches=BACKTESTED)
    samples = (_run_bootstrap({key: s[2] for key, s in splits.items()}, warm, delta, n_boot, seed, pool, n_jobs,
                              progress, desc="backtest") if n_boot > 0 and splits else [])
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))   # residual draws, fixed order
    out = {name: {"holdouts": [], "flags": []} if name not in skipped else {"skipped": skipped[name]}
           for name in families}
    preds: dict = {}                # (name, k, budget) -> {approach: (point prediction, resample predictions)}
    for key, (name, k, kept, held) in splits.items():
        fits = point[key]
        resid = {a: log_residuals(a, fits[a], kept) for a in ("frontier", "parametric") if "skipped" not in fits[a]}
        s0 = {a: scatter(a, fits[a], kept) for a in BACKTESTED if "skipped" not in fits[a]}
        entry = {"k": k, "fit_budgets": [float(b) for b in kept.budgets[kept.frontier_budgets]], "held_out": []}
        for h in held:
            distance = math.log10(h["budget"] / max(entry["fit_budgets"]))
            row = {"budget": h["budget"], "observed": {"best_loss": h["best_loss"], "best_params": h["best_params"],
                                                       "n_opt": h["n_opt"], "n_opt_note": h["n_opt_note"]}}
            n_runs = len(h["loss"])
            noise = {a: np.exp(rng.choice(r, size=(len(samples), n_runs))) if len(r) else np.ones((len(samples), n_runs))
                     for a, r in resid.items()}
            for approach in BACKTESTED:
                fit = fits[approach]
                if "skipped" in fit:
                    row[approach] = {"skipped": fit["skipped"]}
                    continue
                p = _predict(approach, fit, h)
                boot = []
                for s in samples:
                    b = s[key].get(approach)
                    boot.append(_predict(approach, b, h) if isinstance(b, dict) else None)
                row[approach] = {}
                if "loss" in p:
                    draws = [None if b is None else _noisy_best(b, noise[approach][i]) for i, b in enumerate(boot)]
                    row[approach]["loss"] = _verdict(p["loss"], [d for d in draws if d is not None], h["best_loss"], ci)
                    preds.setdefault((name, k, h["budget"]), {})[approach] = (p["loss"], draws)
                if "n_opt" in p:
                    row[approach]["n_opt"] = _verdict(p["n_opt"], [b["n_opt"] for b in boot if b is not None],
                                                      h["n_opt"], ci)
                if "run_losses" in p:
                    are = np.abs(p["run_losses"] - h["loss"]) / h["loss"]
                    row[approach]["runs_mean_are"] = float(are.mean())
                for what, v in row[approach].items():
                    if isinstance(v, dict):
                        spread = calibration.log_spread([None if b is None else b.get(what) for b in boot])
                        v.update(distance=distance, s0=s0[approach].get(what), spread=spread)
            entry["held_out"].append(row)
        out[name]["holdouts"].append(entry)
    models, table = _calibrate_budgets(out, ci)
    for name, block in out.items():
        if "holdouts" in block:
            block["flags"] = [_flag(approach, what, entry["k"], row["budget"], v, ci)
                              for entry in block["holdouts"] for row in entry["held_out"]
                              for approach in BACKTESTED for what, v in row.get(approach, {}).items()
                              if isinstance(v, dict) and _covered(v) is False]
            block["summary"] = _summary(block["holdouts"])
    # the frontier refits themselves, for the compute multiplier's backtest (multiplier.py; not in fit.json)
    refits = {(name, k): {"point": point[key]["frontier"], "samples": [s[key].get("frontier") for s in samples]}
              for key, (name, k, _, _) in splits.items()}
    return {"families": out, "pairs": _pairs(families, preds, ci),
            "calibration": {"mode": "budgets", "models": models, "table": table}, "refits": refits}


def scatter(approach: str, fit: dict, runs: FamilyRuns) -> dict:
    """s0 of each quantity a fitted law predicts: the robust scatter of its predictions of the budgets it was
    fitted on, made as for a held-out budget (so the points are the ones the law describes: each budget's
    best run, or its IsoFLOP vertex), against what those budgets observed."""
    res: dict = {"loss": [], "n_opt": []}
    for g in np.flatnonzero(runs.frontier_budgets):
        if not (runs.group == g).any():
            continue
        h = _held_budget(runs, g)
        p = _predict(approach, fit, h)
        if p.get("loss"):
            res["loss"].append(math.log(h["best_loss"] / p["loss"]))
        if p.get("n_opt") and h["n_opt"]:
            res["n_opt"].append(math.log(h["n_opt"] / p["n_opt"]))
    return {what: calibration.in_sample_scale(r, len(runs) if approach == "parametric" else len(r), LAW_PARAMS[approach])
            for what, r in res.items() if r}


def _covered(v: dict) -> bool | None:
    """Inside the calibrated interval where there is one, else inside the bootstrap interval."""
    cal = v.get("calibrated") or {}
    return cal["covered"] if cal.get("lo") is not None else v.get("covered")


def _calibrate_budgets(out: dict, ci: float) -> tuple[dict, list]:
    """Calibrated intervals on every backtest prediction, each cross-fitted (calibrated on the errors of the
    other held-out budgets and the other refits); returns the models calibrated on all the errors (what a
    forecast from the full data uses) and the calibration table."""
    items: dict = {}                # (approach, quantity) -> [(V, Record or None, target, group)]
    for name, block in out.items():
        for entry in block.get("holdouts", []):
            for row in entry["held_out"]:
                for approach in BACKTESTED:
                    for what, v in row.get(approach, {}).items():
                        if not isinstance(v, dict) or v["predicted"]["value"] is None or v.get("s0") is None:
                            continue
                        group = (name, entry["k"])
                        rec = (None if v["observed"] is None else
                               calibration.Record(math.log(v["observed"] / v["predicted"]["value"]), v["distance"],
                                                  v["s0"], v["spread"], row["budget"], group))
                        items.setdefault((approach, what), []).append((v, rec, row["budget"], group))
    models: dict = {}
    table = []
    for (approach, what), rows in sorted(items.items()):
        records = [r for _, r, _, _ in rows if r is not None]
        for v, _, target, group in rows:
            model = calibration.calibrate([r for r in records if r.target != target and r.group != group], ci)
            lo, hi = calibration.interval(v["predicted"]["value"], v["distance"], v["spread"], model)
            v["calibrated"] = {"lo": lo, "hi": hi, "n_cal": model["n"],
                               "covered": None if lo is None or v["observed"] is None else bool(lo <= v["observed"] <= hi),
                               "method": model.get("method", model.get("skipped"))}
        models.setdefault(approach, {})[what] = calibration.calibrate(records, ci)
        table.append(_table_row(approach, what, [v for v, *_ in rows], ci))
    return models, table


def _table_row(approach: str, what: str, vs: list, ci: float) -> dict:
    """Nominal against achieved coverage, and interval width against error, of the bootstrap and the calibrated
    intervals of these predictions."""
    def entries(key):
        return [{"predicted": v["predicted"]["value"], "observed": v["observed"],
                 "lo": (v["predicted"] if key == "bootstrap" else v["calibrated"])["lo"],
                 "hi": (v["predicted"] if key == "bootstrap" else v["calibrated"])["hi"]} for v in vs]
    return {"approach": approach, "quantity": what, "nominal": ci,
            "bootstrap": calibration.coverage_row(entries("bootstrap")),
            "calibrated": calibration.coverage_row(entries("calibrated"))}


def _flag(approach, what, k, budget, v, ci) -> str:
    label = "best loss" if what == "loss" else "N_opt"
    cal = v.get("calibrated") or {}
    q = cal if cal.get("lo") is not None else v["predicted"]
    kind = "calibrated" if q is cal else "bootstrap"
    return (f"{approach} fitted without the {k} largest budget(s) predicts {label} {fmt_value(v['predicted']['value'])} "
            f"[{fmt_value(q['lo'])}, {fmt_value(q['hi'])}] at {fmt_value(budget)} FLOPs, observed "
            f"{fmt_value(v['observed'])}: outside its {ci:.0%} {kind} interval (ARE {v['are']:.1%}); this law did not "
            f"extrapolate there")


def _summary(holdouts: list) -> dict:
    """Per approach and predicted quantity: how many predictions, their mean and largest ARE, how many covered."""
    out: dict = {}
    for entry in holdouts:
        for row in entry["held_out"]:
            for approach in BACKTESTED:
                for what, v in row.get(approach, {}).items():
                    if isinstance(v, dict) and v.get("are") is not None:
                        s = out.setdefault(approach, {}).setdefault(what, {"n": 0, "ares": [], "covered": 0, "checked": 0,
                                                                           "calibrated": {"covered": 0, "checked": 0}})
                        s["n"] += 1
                        s["ares"].append(v["are"])
                        if v["covered"] is not None:
                            s["checked"] += 1
                            s["covered"] += v["covered"]
                        if (v.get("calibrated") or {}).get("covered") is not None:
                            s["calibrated"]["checked"] += 1
                            s["calibrated"]["covered"] += v["calibrated"]["covered"]
    for per in out.values():
        for s in per.values():
            ares = s.pop("ares")
            s["mean_are"], s["max_are"] = float(np.mean(ares)), float(np.max(ares))
    return out


def _pairs(families: dict, preds: dict, ci: float) -> list:
    pairs = []
    for f1, f2 in itertools.combinations(sorted(families), 2):
        rows = []
        for (name, k, budget), by in sorted(preds.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            other = preds.get((f2, k, budget)) if name == f1 else None
            if other is None:
                continue
            obs1 = _observed_best(families[f1], budget)
            obs2 = _observed_best(families[f2], budget)
            row = {"k": k, "budget": budget, "observed_gap": obs2 - obs1,
                   "observed_lower": f1 if obs1 < obs2 else f2}
            for approach in ("frontier", "parametric"):
                if approach not in by or approach not in other:
                    continue
                (p1, b1), (p2, b2) = by[approach], other[approach]
                gaps = [y - x for x, y in zip(b1, b2) if x is not None and y is not None]
                lo, hi = _interval(gaps, ci)
                row[approach] = {"gap": {"value": p2 - p1, "lo": lo, "hi": hi},
                                 "predicted_lower": f1 if p1 < p2 else f2,
                                 "order_matches": (p1 < p2) == (obs1 < obs2),
                                 "gap_covered": None if lo is None else bool(lo <= obs2 - obs1 <= hi)}
            rows.append(row)
        if rows:
            pairs.append({"families": [f1, f2], "held_out": rows})
    return pairs


def _observed_best(runs: FamilyRuns, budget: float) -> float:
    g = int(np.flatnonzero(runs.budgets == budget)[0])
    return float(runs.loss[runs.group == g].min())


def threshold_backtest(families: dict, threshold: float, *, delta, grid, pool, n_jobs, n_boot, seed, ci,
                       progress) -> dict:
    """Approach 3 refitted on the runs at or below `threshold` FLOPs, predicting each run above it."""
    out, kept_runs, held_runs, point, warm = {}, {}, {}, {}, {}
    for name, runs in families.items():
        above = runs.flops > threshold
        if not above.any() or above.all():
            out[name] = {"skipped": f"no runs {'above' if not above.any() else 'at or below'} {threshold:.3g} FLOPs"}
            continue
        kept_runs[name], held_runs[name] = runs.select(~above), runs.select(above)
        point[name], warm[name] = fit_approaches(kept_runs[name], delta, grid, pool, n_jobs,
                                                 approaches=("parametric",))
    samples = (_run_bootstrap(kept_runs, warm, delta, n_boot, seed, pool, n_jobs, progress, desc="backtest")
               if n_boot > 0 and kept_runs else [])
    records, cuts = _inner_records(kept_runs, delta=delta, grid=grid, pool=pool, n_jobs=n_jobs, n_boot=n_boot,
                                   seed=seed, progress=progress)
    model = calibration.calibrate(records, ci)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 13]))
    all_runs = []
    for name in kept_runs:
        fit, kept, held = point[name]["parametric"], kept_runs[name], held_runs[name]
        if "skipped" in fit:
            out[name] = {"skipped": fit["skipped"]}
            continue
        pred = parametric_loss(fit, held.params, held.tokens)
        resid = log_residuals("parametric", fit, kept)
        s0 = calibration.in_sample_scale(resid, len(kept), LAW_PARAMS["parametric"])
        laws, boot = [], []
        for s in samples:
            if isinstance(s[name].get("parametric"), dict):
                laws.append(parametric_loss(s[name]["parametric"], held.params, held.tokens))
                boot.append(laws[-1] * np.exp(rng.choice(resid, size=len(held))))   # same draws as before
        laws, boot = (np.array(x).reshape(-1, len(held)) for x in (laws, boot))
        runs_out = []
        for i in range(len(held)):
            v = _verdict(float(pred[i]), boot[:, i].tolist() if len(boot) else [], float(held.loss[i]), ci)
            distance = max(0.0, math.log10(held.flops[i] / kept.flops.max()))
            spread = calibration.log_spread(laws[:, i])
            lo, hi = calibration.interval(float(pred[i]), distance, spread, model)
            v.update(distance=distance, s0=s0, spread=spread, calibrated={
                "lo": lo, "hi": hi, "covered": None if lo is None else bool(lo <= held.loss[i] <= hi),
                "n_cal": model["n"], "method": model.get("method", model.get("skipped"))})
            runs_out.append({"params": float(held.params[i]), "tokens": float(held.tokens[i]),
                             "flops": float(held.flops[i]), **v})
        all_runs += runs_out
        ares = np.array([r["are"] for r in runs_out])
        checked = [r["covered"] for r in runs_out if r["covered"] is not None]
        calibrated = [r["calibrated"]["covered"] for r in runs_out if r["calibrated"]["covered"] is not None]
        used, kind = (calibrated, "calibrated") if calibrated else (checked, "bootstrap")
        flags = []
        if used and binom.cdf(sum(used), len(used), ci) < UNDERCOVERAGE_P:
            flags.append(f"parametric fitted on the runs at or below {fmt_value(threshold)} FLOPs: only "
                         f"{sum(used)}/{len(used)} runs above it lie inside their {ci:.0%} {kind} prediction intervals "
                         f"(p = {binom.cdf(sum(used), len(used), ci):.2g} for intervals that hold): this law "
                         f"did not extrapolate with the confidence it claims")
        out[name] = {"threshold": threshold, "n_fit": len(kept), "n_held_out": len(held), "flags": flags,
                     "inner_cuts": cuts[name], "s0": s0,
                     "parametric": {"mean_are": float(ares.mean()), "median_are": float(np.median(ares)),
                                    "max_are": float(ares.max()), "covered": sum(checked), "checked": len(checked),
                                    "calibrated": {"covered": sum(calibrated), "checked": len(calibrated)},
                                    "fit": {k: float(fit[k]) for k in ("E", "A", "B", "alpha", "beta")},
                                    "runs": runs_out}}
    table = [_table_row("parametric", "run_loss", all_runs, ci)] if all_runs else []
    return {"families": out, "pairs": [],
            "calibration": {"mode": "threshold", "models": {"parametric": {"run_loss": model}}, "table": table,
                            "inner_errors": [{"family": r.group[0], "cut": r.group[1], "run": r.target, "e": r.e,
                                              "d": r.d, "s0": r.s0, "spread": r.b} for r in records]}}


def _inner_records(kept_runs: dict, *, delta, grid, pool, n_jobs, n_boot, seed, progress) -> tuple[list, dict]:
    """Errors of Approach 3 refitted on each family's kept runs below cuts INNER_STEP decades apart (while an
    inner fit keeps MIN_INNER_SHARE of them), predicting the kept runs above each cut, with each prediction's
    spread over bootstrap refits of its inner fit: the calibration of a threshold backtest, from the kept runs
    alone. Returns (records, {family: cuts used})."""
    inner, point, warm, cuts = {}, {}, {}, {}
    for name, kept in kept_runs.items():
        top = float(kept.flops.max())
        cuts[name] = []
        for j in range(1, MAX_INNER + 1):
            cut = top / 10 ** (INNER_STEP * j)
            below = kept.flops <= cut
            if below.sum() < max(6, MIN_INNER_SHARE * len(kept)):
                break
            key = f"{name}|{cut!r}"
            fits, starts = fit_approaches(kept.select(below), delta, grid, pool, n_jobs, approaches=("parametric",))
            if "skipped" in fits["parametric"]:
                continue
            inner[key], point[key], warm[key] = (name, cut, below), fits["parametric"], starts
            cuts[name].append(cut)
    # their own stream of resamples, so the kept fits' bootstrap is what it would be without them
    samples = (_run_bootstrap({k: kept_runs[n].select(b) for k, (n, _, b) in inner.items()}, warm, delta, n_boot,
                              [seed, 17], pool, n_jobs, progress, desc="calibration") if n_boot > 0 and inner else [])
    records = []
    for key, (name, cut, below) in inner.items():
        kept, fit = kept_runs[name], point[key]
        fitted, above = kept.select(below), kept.select(~below)
        s0 = calibration.in_sample_scale(log_residuals("parametric", fit, fitted), len(fitted), LAW_PARAMS["parametric"])
        pred = parametric_loss(fit, above.params, above.tokens)
        laws = np.array([parametric_loss(s[key]["parametric"], above.params, above.tokens) for s in samples
                         if isinstance(s[key].get("parametric"), dict)]).reshape(-1, len(above))
        top = float(fitted.flops.max())
        runs = np.flatnonzero(~below)          # each run's index among the kept: one observation, several cuts
        records += [calibration.Record(math.log(above.loss[i] / pred[i]), max(0.0, math.log10(above.flops[i] / top)),
                                       s0, calibration.log_spread(laws[:, i]), int(runs[i]), (name, cut))
                    for i in range(len(above))]
    return records, cuts
