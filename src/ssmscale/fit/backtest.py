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
- Pairs of families: at each held-out budget, the predicted order (and the gap's interval, from the two
  families' resamples taken pairwise) against the observed order.

Threshold backtest (`holdout_above`): Approach 3 refitted on the runs at or below the threshold predicts
every run above it (ARE per run, mean / median / max, and how many lie inside their prediction interval).
FLAGGED when so few are inside that a law with honest intervals would do that rarely (binomial, p < 0.01).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.stats import binom

from .approach2 import budget_vertex
from .approach3 import parametric_loss
from .bootstrap import _interval, _q, _run_bootstrap, fit_approaches
from .frontier import frontier_loss
from .runs import MIN_RUNS_PER_BUDGET, FamilyRuns
from .text import fmt_value

BACKTESTED = ("frontier", "approach2", "parametric")
MIN_KEPT_BUDGETS = 3
UNDERCOVERAGE_P = 0.01          # threshold backtest: flag coverage this unlikely under the nominal rate


def holdout_counts(runs: FamilyRuns) -> list[int]:
    """k = 1, 2, ... largest budgets held out while at least MIN_KEPT_BUDGETS budgets remain."""
    return list(range(1, int(runs.frontier_budgets.sum()) - MIN_KEPT_BUDGETS + 1))


def _split(runs: FamilyRuns, k: int) -> tuple[FamilyRuns, list[int]]:
    """The runs below the k largest frontier budgets, and those budgets' group indices."""
    held = list(np.flatnonzero(runs.frontier_budgets)[-k:])
    return runs.select(~np.isin(runs.group, held)), held


def _log_residuals(approach: str, fit: dict, runs: FamilyRuns) -> np.ndarray:
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
        resid = {a: _log_residuals(a, fits[a], kept) for a in ("frontier", "parametric") if "skipped" not in fits[a]}
        entry = {"k": k, "fit_budgets": [float(b) for b in kept.budgets[kept.frontier_budgets]], "held_out": []}
        for h in held:
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
                    if isinstance(v, dict) and v.get("covered") is False:
                        out[name]["flags"].append(_flag(approach, what, k, h["budget"], v, ci))
            entry["held_out"].append(row)
        out[name]["holdouts"].append(entry)
    for block in out.values():
        if "holdouts" in block:
            block["summary"] = _summary(block["holdouts"])
    # the frontier refits themselves, for the compute multiplier's backtest (multiplier.py; not in fit.json)
    refits = {(name, k): {"point": point[key]["frontier"], "samples": [s[key].get("frontier") for s in samples]}
              for key, (name, k, _, _) in splits.items()}
    return {"families": out, "pairs": _pairs(families, preds, ci), "refits": refits}


def _flag(approach, what, k, budget, v, ci) -> str:
    label = "best loss" if what == "loss" else "N_opt"
    q = v["predicted"]
    return (f"{approach} fitted without the {k} largest budget(s) predicts {label} {fmt_value(q['value'])} "
            f"[{fmt_value(q['lo'])}, {fmt_value(q['hi'])}] at {fmt_value(budget)} FLOPs, observed "
            f"{fmt_value(v['observed'])}: outside its {ci:.0%} interval (ARE {v['are']:.1%}); this law did not "
            f"extrapolate there")


def _summary(holdouts: list) -> dict:
    """Per approach and predicted quantity: how many predictions, their mean and largest ARE, how many covered."""
    out: dict = {}
    for entry in holdouts:
        for row in entry["held_out"]:
            for approach in BACKTESTED:
                for what, v in row.get(approach, {}).items():
                    if isinstance(v, dict) and v.get("are") is not None:
                        s = out.setdefault(approach, {}).setdefault(what, {"n": 0, "ares": [], "covered": 0, "checked": 0})
                        s["n"] += 1
                        s["ares"].append(v["are"])
                        if v["covered"] is not None:
                            s["checked"] += 1
                            s["covered"] += v["covered"]
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
    rng = np.random.default_rng(np.random.SeedSequence([seed, 13]))
    for name in kept_runs:
        fit, kept, held = point[name]["parametric"], kept_runs[name], held_runs[name]
        if "skipped" in fit:
            out[name] = {"skipped": fit["skipped"]}
            continue
        pred = parametric_loss(fit, held.params, held.tokens)
        resid = _log_residuals("parametric", fit, kept)
        boot = np.array([parametric_loss(s[name]["parametric"], held.params, held.tokens)
                         * np.exp(rng.choice(resid, size=len(held)))
                         for s in samples if isinstance(s[name].get("parametric"), dict)]).reshape(-1, len(held))
        runs_out = []
        for i in range(len(held)):
            v = _verdict(float(pred[i]), boot[:, i].tolist() if len(boot) else [], float(held.loss[i]), ci)
            runs_out.append({"params": float(held.params[i]), "tokens": float(held.tokens[i]),
                             "flops": float(held.flops[i]), **v})
        ares = np.array([r["are"] for r in runs_out])
        checked = [r["covered"] for r in runs_out if r["covered"] is not None]
        flags = []
        if checked and binom.cdf(sum(checked), len(checked), ci) < UNDERCOVERAGE_P:
            flags.append(f"parametric fitted on the runs at or below {fmt_value(threshold)} FLOPs: only "
                         f"{sum(checked)}/{len(checked)} runs above it lie inside their {ci:.0%} prediction intervals "
                         f"(p = {binom.cdf(sum(checked), len(checked), ci):.2g} for intervals that hold): this law "
                         f"did not extrapolate with the confidence it claims")
        out[name] = {"threshold": threshold, "n_fit": len(kept), "n_held_out": len(held), "flags": flags,
                     "parametric": {"mean_are": float(ares.mean()), "median_are": float(np.median(ares)),
                                    "max_are": float(ares.max()), "covered": sum(checked), "checked": len(checked),
                                    "fit": {k: float(fit[k]) for k in ("E", "A", "B", "alpha", "beta")},
                                    "runs": runs_out}}
    return {"families": out, "pairs": []}
