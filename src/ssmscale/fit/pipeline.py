"""Putting it together: fit every approach for every family, bootstrap, backtest, summarise, write fit.json.

fit.json holds no timings (they go to stdout): its bytes depend only on the data, the settings and the
machine's floating-point libraries, so refitting the same results.csv rewrites the same file."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fsutil import atomic_write_json, check_writable_dir
from . import laws
from .backtest import budget_backtest, threshold_backtest
from .approach1 import CAVEAT as APPROACH1_CAVEAT
from .bootstrap import (
    APPROACHES,
    N_WARM_STARTS,
    QUANTITIES,
    _boot_counts,
    _cpu_seconds,
    _interval,
    _q,
    _run_bootstrap,
    _worker_pool,
    default_jobs,
    fit_approaches,
)
from .crossover import CROSSOVER_SEARCH_FACTOR, _crossovers
from .frontier import frontier_loss
from .laws import HUBER_DELTA, _one_blas_thread
from .multiplier import DEFAULT_BASELINE, fit_multipliers
from .runs import MIN_RUNS_PER_BUDGET, FamilyRuns, LoadedRuns, load_runs
from .decision import decision_accuracy
from .sanity import sanity_flags
from .seeds import seed_gaps, seed_noise
from .text import format_fit

DEFAULT_N_BOOT = 200
DEFAULT_CI = 0.95
DEFAULT_SEED = 0
CHINCHILLA_GRID_NAME = "Chinchilla 4,500-point grid"    # fit.json's name for the default parametric grid
FIGURE_EXTRAPOLATION = 10.0      # the frontier band reaches this factor beyond the largest budget
FLOPS_CONVENTION = ("C = the flops column when given (a study's exact count), else 6 * params * tokens; "
                    "Approach 3's allocation N_opt(C), D_opt(C) assumes C = 6ND")
BY_BUDGET_COLUMN = "IsoFLOP groups from the budget column"


def fit_runs(loaded: LoadedRuns, *, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED, ci: float = DEFAULT_CI,
             n_jobs: int | None = None, progress: bool = True, delta: float = HUBER_DELTA,
             parametric_grid: np.ndarray | None = None, backtest: bool = True,
             holdout_above: float | None = None, keep_samples: bool = False,
             baseline: str = DEFAULT_BASELINE) -> dict:
    """Fit every family of a cleaned table of runs, bootstrap the intervals, backtest, and state each family's
    compute multiplier against `baseline` (multiplier.py); returns the fit.json dict plus "timing" (wall and
    CPU seconds, which fit.json leaves out: its bytes depend on the data only) and, with `keep_samples`,
    "samples": every resample's fits ({family: {approach: fit or why not}}) and "point": the full-data fits,
    which forecasts predict from.

    `parametric_grid` replaces the 4,500-point Chinchilla grid (tests use a smaller one for speed).
    Backtest: with `holdout_above`, Approach 3 fitted on the runs at or below that many FLOPs predicts the
    rest; otherwise, where the runs have IsoFLOP budgets and `backtest` is on, the largest budgets are held out.
    """
    if n_boot < 0 or not 0.0 < ci < 1.0:
        raise UserError(f"n_boot must be >= 0 and ci in (0, 1), got n_boot={n_boot}, ci={ci}")
    if holdout_above is not None and not holdout_above > 0:
        raise UserError(f"--holdout-above: expected a positive number of FLOPs, got {holdout_above}")
    n_jobs = default_jobs() if n_jobs is None else max(1, int(n_jobs))
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    table = loaded.table
    if table.empty:
        raise UserError(f"{loaded.source['path']}: no usable runs left after cleaning "
                        f"({'; '.join(loaded.notes) or 'empty table'})")
    by_budget = loaded.grouping == BY_BUDGET_COLUMN
    families = {name: FamilyRuns.from_table(t, resample="groups" if by_budget else "runs")
                for name, t in table.groupby("family", sort=True)}
    notes = list(loaded.notes) + (_single_run_groups(families) if by_budget else [])
    grid = laws.CHINCHILLA_GRID if parametric_grid is None else np.asarray(parametric_grid, float)

    point: dict = {}
    warm: dict = {}
    with _one_blas_thread(), _worker_pool(n_jobs) as pool:
        for name, runs in families.items():
            point[name], warm[name] = fit_approaches(runs, delta, grid, pool, n_jobs)
        t_point = time.perf_counter() - t0
        samples = (_run_bootstrap(families, warm, delta, n_boot, seed, pool, n_jobs, progress)
                   if n_boot > 0 else [])
        t_boot = time.perf_counter() - t0 - t_point
        common = dict(delta=delta, grid=grid, pool=pool, n_jobs=n_jobs, n_boot=n_boot, seed=seed, ci=ci,
                      progress=progress)
        if holdout_above is not None:
            mode, tested = "threshold", threshold_backtest(families, holdout_above, **common)
        elif backtest and loaded.grouping == BY_BUDGET_COLUMN:
            mode, tested = "budgets", budget_backtest(families, **common)
        else:
            mode, tested = "off", None
    t_test = time.perf_counter() - t0 - t_point - t_boot

    out_families = {}
    for name, runs in families.items():
        out_families[name] = {"n_runs": len(runs), "n_budgets": int(runs.frontier_budgets.sum()),
                              "flops_range": [float(runs.flops.min()), float(runs.flops.max())]}
        for approach in APPROACHES:
            out_families[name][approach] = _summarise(approach, point[name][approach],
                                                      [s[name].get(approach) for s in samples], ci)
        out_families[name]["seed_noise"] = seed_noise(runs)
        out_families[name]["sanity"] = sanity_flags(point[name], runs)
        if tested is not None:
            out_families[name]["backtest"] = tested["families"][name]
    return {
        "schema": 1,
        "source": loaded.source,
        "dropped": loaded.dropped,
        "notes": notes,
        "settings": {"n_boot": n_boot, "seed": seed, "ci": ci, "huber_delta": delta,
                     "flops_convention": FLOPS_CONVENTION, "grouping": loaded.grouping,
                     "parametric_grid": (CHINCHILLA_GRID_NAME if len(grid) == 4500 and
                                         np.array_equal(grid, laws._CHINCHILLA_GRID_REF) else f"grid of {len(grid)} starts"),
                     "bootstrap": (("runs resampled with replacement within each family and IsoFLOP group"
                                    if by_budget else "runs resampled with replacement within each family (no budget "
                                    "column: groups of similar FLOPs are a guess and may hold one run, which could "
                                    "not vary)") + ", and the seeds of a run trained with several; percentile intervals"),
                     "warm_starts": f"bootstrap fits start L-BFGS from the point estimate and up to "
                                    f"{N_WARM_STARTS - 1} other distinct local minima of the full-data grid",
                     "crossover_search_factor": CROSSOVER_SEARCH_FACTOR,
                     "min_runs_per_budget": MIN_RUNS_PER_BUDGET, "baseline": baseline},
        "families": out_families,
        "crossover": _crossovers(point, samples, ci),
        "wallclock": {"devices": loaded.source.get("device", []), "threads": loaded.source.get("threads", []),
                      "time_basis": loaded.source.get("time_basis", "train_s"),
                      **({"time_from": loaded.source["time_profile"]} if "time_profile" in loaded.source else {}),
                      "crossover": _crossovers(point, samples, ci, key="wallclock")},
        "seed_noise": seed_gaps(point),
        "backtest": _backtest_block(mode, tested, holdout_above, loaded, backtest),
        "decision": (decision_accuracy(families, tested) if mode == "budgets" else
                     {"rows": [], "summary": {}, "statement": "no budget backtest, so no decisions to score"}),
        "calibration": ({"ci": ci, **tested["calibration"]} if tested is not None else
                        {"mode": "off", "reason": "no backtest, so nothing to calibrate prediction intervals on"}),
        "multiplier": fit_multipliers(point, samples, ci, baseline,
                                      tested.get("refits") if tested is not None else None),
        **({"samples": samples, "point": point} if keep_samples else {}),
        # worker processes sit here, not in settings: the results do not depend on them, so fit.json is the
        # same on machines with other core counts
        "timing": {"n_jobs": n_jobs, "point_estimates_s": round(t_point, 3), "bootstrap_s": round(t_boot, 3),
                   "backtest_s": round(t_test, 3), "total_s": round(time.perf_counter() - t0, 3),
                   "cpu_s": round(_cpu_seconds() - cpu0, 3)},
    }


def _backtest_block(mode: str, tested: dict | None, holdout_above, loaded: LoadedRuns, requested: bool) -> dict:
    if mode == "threshold":
        return {"mode": mode, "holdout_above": holdout_above, "pairs": []}
    if mode == "budgets":
        return {"mode": mode, "pairs": tested["pairs"]}
    why = ("turned off" if not requested else
           f"the runs have no budget column ({loaded.grouping}): hold out the largest runs with --holdout-above FLOPS")
    return {"mode": "off", "reason": why, "pairs": []}


def _band(fit_fn, samples: list, lo: float, hi: float, ci: float) -> dict:
    grid = np.geomspace(lo, hi, 60)
    curves = np.array([fit_fn(s, grid) for s in samples]) if len(samples) >= 2 else None
    return {"x": grid.tolist(),
            "lo": np.percentile(curves, 50 * (1 - ci), axis=0).tolist() if curves is not None else None,
            "hi": np.percentile(curves, 50 * (1 + ci), axis=0).tolist() if curves is not None else None}


def _single_run_groups(families: dict) -> list[str]:
    """A note per family whose budgets include some of one run: the bootstrap cannot vary those."""
    notes = []
    for name, runs in families.items():
        sizes = np.bincount(runs.group, minlength=len(runs.budgets))
        if (sizes == 1).any():
            notes.append(f"{name}: {int((sizes == 1).sum())} of {len(sizes)} budgets hold a single run: the bootstrap "
                         f"resamples within budgets, so it cannot vary those runs and intervals leaning on them are "
                         f"too narrow")
    return notes


def _collapsed(out: dict, ok: list) -> list[str]:
    """The quantities whose bootstrap interval has zero width although >= 2 resamples were fitted: the
    resamples did not vary, so the interval says nothing (a warning, never silent)."""
    if len(ok) < 2:
        return []
    return [k for k, q in out.items() if isinstance(q, dict) and q.get("lo") is not None and q["value"] is not None
            and q["hi"] - q["lo"] <= 1e-12 * max(1.0, abs(q["value"]))]


def _summarise(approach: str, point: dict, samples: list, ci: float) -> dict:
    if "skipped" in point:
        return point
    ok = [s for s in samples if isinstance(s, dict)]
    out = {k: _q(point[k], [s[k] for s in ok] if samples else None, ci) for k in QUANTITIES[approach]}
    out["collapsed"] = _collapsed(out, ok)
    out["bootstrap"] = _boot_counts(samples)
    if approach == "frontier":
        pts = point["points"]
        out["points"] = []
        for i in range(len(pts["loss"])):
            budget = float(pts["budget"][i])
            lo, hi = _interval([s["best_loss"].get(budget) for s in ok], ci)
            seeds = pts["seed_losses"][i]
            out["points"].append({"flops": float(pts["flops"][i]), "loss": float(pts["loss"][i]),
                                  "params": float(pts["params"][i]), "tokens": float(pts["tokens"][i]),
                                  "budget": budget, "best_at_edge": pts["best_at_edge"][i],
                                  "loss_lo": lo, "loss_hi": hi, "n_seeds": len(seeds),
                                  "seed_spread": float(np.ptp(seeds)) if len(seeds) > 1 else None})
        out["range"] = point["range"]
        out["exact_fit"] = point["exact_fit"]
        out["objective"] = point["objective"]
        band = _band(frontier_loss, ok, point["range"][0], point["range"][1] * FIGURE_EXTRAPOLATION, ci)
        out["band"] = {"flops": band["x"], "lo": band["lo"], "hi": band["hi"]}
    elif approach == "approach1":
        env = point["envelope"]
        out["envelope"] = {k: np.asarray(env[k]).tolist() for k in ("flops", "loss", "params", "tokens", "competing")}
        out["n_curves"] = env["n_curves"]
        out["objective"] = point["objective"]
        out["caveat"] = APPROACH1_CAVEAT
    elif approach == "approach2":
        out["budgets"] = point["budgets"]
        for entry in out["budgets"]:
            if entry["used"]:
                entry["n_opt_lo"], entry["n_opt_hi"] = _interval(
                    [s["n_opt"].get(entry["budget"]) for s in ok], ci)
            else:
                entry["n_opt_lo"] = entry["n_opt_hi"] = None
    elif approach == "parametric":
        out["objective"] = point["objective"]
        out["n_points"] = point["n_points"]
    else:
        pts = point["points"]
        out["points"] = [{"seconds": float(pts["seconds"][i]), "loss": float(pts["loss"][i]),
                          "params": float(pts["params"][i]), "flops": float(pts["flops"][i])}
                         for i in range(len(pts["loss"]))]
        out["n_timed"] = pts["n_timed"]
        out["range"] = point["range"]
        out["objective"] = point["objective"]
        band = _band(frontier_loss, ok, point["range"][0], point["range"][1] * FIGURE_EXTRAPOLATION, ci)
        out["band"] = {"seconds": band["x"], "lo": band["lo"], "hi": band["hi"]}
    return out


TIMED_FIT = "fit_timed.json"      # fit_path's file when the training times are priced from a profile


def fit_path(path, out: str | os.PathLike | None = None, columns: dict[str, str] | None = None,
             time_from=None, **kwargs) -> tuple[dict, Path]:
    """Load a study directory or CSV, fit, write fit.json (default: the study dir / the CSV's folder).
    With `time_from` (a profile.csv, or a list of them), the runs' training times are priced from it (timing.py) and the
    result goes to fit_timed.json instead, beside the study's own fit.json."""
    loaded = load_runs(path, columns)
    if time_from is not None:
        from .timing import reprice
        loaded = reprice(loaded, time_from)
    path = Path(path)
    out_dir = Path(out) if out is not None else (path if path.is_dir() else path.parent)
    target = out_dir / ("fit.json" if time_from is None else TIMED_FIT)
    # find out before a long fit, not after it; nothing is created until fit.json is written
    check_writable_dir(out_dir, "fit.json folder (--out)")
    result = fit_runs(loaded, **kwargs)
    try:
        atomic_write_json(target, fit_json(result))
    except OSError as exc:
        raise UserError(f"{target}: cannot write ({exc.strerror or exc}); choose another folder with --out") from None
    return result, target


def fit_json(result: dict) -> dict:
    """What fit.json holds: the result without its timings and resamples, as strict JSON."""
    return json_safe({k: v for k, v in result.items() if k not in ("timing", "samples", "point")})


def is_default_fit(fit: dict) -> bool:
    """Whether a fit.json was made as fit_study makes it by default (bootstrap size, seed, interval, the
    Chinchilla grid, the backtest by budget, the transformer as the multipliers' baseline): the fit is
    deterministic, so refitting the same results.csv would write the same bytes. A fit.json from before
    the compute multiplier existed is not (refitting adds it)."""
    settings, backtest = fit.get("settings"), fit.get("backtest")
    if not isinstance(settings, dict) or not isinstance(backtest, dict):    # a fit.json of another shape
        return False
    if isinstance(fit.get("wallclock"), dict) and fit["wallclock"].get("time_from"):    # priced from a profile
        return False
    return ((settings.get("n_boot"), settings.get("seed"), settings.get("ci"), settings.get("parametric_grid"),
             settings.get("baseline"))
            == (DEFAULT_N_BOOT, DEFAULT_SEED, DEFAULT_CI, CHINCHILLA_GRID_NAME, DEFAULT_BASELINE)
            and isinstance(fit.get("multiplier"), dict)
            and backtest.get("mode") != "threshold" and backtest.get("reason") != "turned off")


def json_safe(obj):
    """NaN and inf become null, numpy scalars and arrays plain Python: fit.json stays strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def fit_study(study_dir: str | os.PathLike, *, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
              ci: float = DEFAULT_CI, n_jobs: int | None = None, progress: bool = True,
              verbose: bool = True, parametric_grid: np.ndarray | None = None, backtest: bool = True,
              baseline: str = DEFAULT_BASELINE) -> dict:
    """Fit scaling/<study>/results.csv and write scaling/<study>/fit.json; the ladder calls this at its end.

    `parametric_grid` (default: the 4,500 Chinchilla starts) lets tests trade exactness for speed."""
    result, target = fit_path(study_dir, n_boot=n_boot, seed=seed, ci=ci, n_jobs=n_jobs, progress=progress,
                              parametric_grid=parametric_grid, backtest=backtest, baseline=baseline)
    if verbose:
        print(format_fit(result))
        print(f"wrote {target}")
    return result

