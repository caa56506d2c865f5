"""Putting it together: fit every approach for every family, bootstrap, summarise, write fit.json."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fsutil import atomic_write_json, check_writable_dir
from . import laws
from .approach2 import fit_approach2
from .approach3 import fit_parametric
from .bootstrap import (
    APPROACHES,
    QUANTITIES,
    _boot_counts,
    _cpu_seconds,
    _interval,
    _q,
    _run_bootstrap,
    _worker_pool,
    default_jobs,
)
from .crossover import CROSSOVER_SEARCH_FACTOR, _crossovers
from .frontier import fit_frontier, frontier_loss
from .laws import HUBER_DELTA, Skip, _one_blas_thread, distinct_minima
from .runs import MIN_RUNS_PER_BUDGET, FamilyRuns, LoadedRuns, load_runs
from .text import format_fit

DEFAULT_N_BOOT = 200
DEFAULT_CI = 0.95
N_WARM_STARTS = 4                # bootstrap L-BFGS starts: point estimate + 3 other distinct local minima
FIGURE_EXTRAPOLATION = 10.0      # the frontier band reaches this factor beyond the largest budget
FLOPS_CONVENTION = ("C = the flops column when given (a study's exact count), else 6 * params * tokens; "
                    "Approach 3's allocation N_opt(C), D_opt(C) assumes C = 6ND")


def fit_runs(loaded: LoadedRuns, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0, ci: float = DEFAULT_CI,
             n_jobs: int | None = None, progress: bool = True, delta: float = HUBER_DELTA,
             parametric_grid: np.ndarray | None = None) -> dict:
    """Fit every family of a cleaned table of runs and bootstrap the intervals; returns the fit.json dict.

    `parametric_grid` replaces the 4,500-point Chinchilla grid (tests use a smaller one for speed).
    """
    if n_boot < 0 or not 0.0 < ci < 1.0:
        raise UserError(f"n_boot must be >= 0 and ci in (0, 1), got n_boot={n_boot}, ci={ci}")
    n_jobs = default_jobs() if n_jobs is None else max(1, int(n_jobs))
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    table = loaded.table
    if table.empty:
        raise UserError(f"{loaded.source['path']}: no usable runs left after cleaning "
                        f"({'; '.join(loaded.notes) or 'empty table'})")
    families = {name: FamilyRuns.from_table(t) for name, t in table.groupby("family", sort=True)}
    grid = laws.CHINCHILLA_GRID if parametric_grid is None else np.asarray(parametric_grid, float)

    point: dict = {}
    warm: dict = {}
    with _one_blas_thread(), _worker_pool(n_jobs) as pool:
        for name, runs in families.items():
            point[name], warm[name] = {}, {}
            for approach in APPROACHES:
                try:
                    if approach == "frontier":
                        r = fit_frontier(runs, delta, pool=pool, n_chunks=n_jobs)
                    elif approach == "approach2":
                        r = fit_approach2(runs)
                    else:
                        r = fit_parametric(runs, delta, starts=grid, pool=pool, n_chunks=n_jobs)
                except Skip as exc:
                    point[name][approach] = {"skipped": str(exc), **exc.details}
                    continue
                except ArithmeticError as exc:    # a fit that ran off to infinity on pathological runs
                    point[name][approach] = {"skipped": f"numerical failure ({type(exc).__name__}: {exc})"}
                    continue
                point[name][approach] = r
                warm[name][approach] = (distinct_minima(r["theta"], r["rows"], N_WARM_STARTS)
                                        if "theta" in r else None)
        t_point = time.perf_counter() - t0
        samples = (_run_bootstrap(families, warm, delta, n_boot, seed, pool, n_jobs, progress)
                   if n_boot > 0 else [])
    t_boot = time.perf_counter() - t0 - t_point

    out_families = {}
    for name, runs in families.items():
        out_families[name] = {"n_runs": len(runs), "n_budgets": int(runs.frontier_budgets.sum()),
                              "flops_range": [float(runs.flops.min()), float(runs.flops.max())]}
        for approach in APPROACHES:
            out_families[name][approach] = _summarise(approach, point[name][approach],
                                                      [s[name].get(approach) for s in samples], ci)
    crossover = _crossovers(point, samples, ci)
    return {
        "schema": 1,
        "source": loaded.source,
        "dropped": loaded.dropped,
        "notes": list(loaded.notes),
        "settings": {"n_boot": n_boot, "seed": seed, "ci": ci, "huber_delta": delta, "n_jobs": n_jobs,
                     "flops_convention": FLOPS_CONVENTION, "grouping": loaded.grouping,
                     "parametric_grid": ("Chinchilla 4,500-point grid" if len(grid) == 4500 and
                                         np.array_equal(grid, laws._CHINCHILLA_GRID_REF) else f"grid of {len(grid)} starts"),
                     "bootstrap": "runs resampled with replacement within each family and IsoFLOP group; "
                                  "percentile intervals",
                     "warm_starts": f"bootstrap fits start L-BFGS from the point estimate and up to "
                                    f"{N_WARM_STARTS - 1} other distinct local minima of the full-data grid",
                     "crossover_search_factor": CROSSOVER_SEARCH_FACTOR,
                     "min_runs_per_budget": MIN_RUNS_PER_BUDGET},
        "families": out_families,
        "crossover": crossover,
        "timing": {"point_estimates_s": round(t_point, 3), "bootstrap_s": round(t_boot, 3),
                   "total_s": round(time.perf_counter() - t0, 3),
                   "cpu_s": round(_cpu_seconds() - cpu0, 3)},
    }



def _summarise(approach: str, point: dict, samples: list, ci: float) -> dict:
    if "skipped" in point:
        return point
    ok = [s for s in samples if isinstance(s, dict)]
    out = {k: _q(point[k], [s[k] for s in ok] if samples else None, ci) for k in QUANTITIES[approach]}
    out["bootstrap"] = _boot_counts(samples)
    if approach == "frontier":
        pts = point["points"]
        out["points"] = [{"flops": float(pts["flops"][i]), "loss": float(pts["loss"][i]),
                          "params": float(pts["params"][i]), "tokens": float(pts["tokens"][i]),
                          "budget": float(pts["budget"][i]), "best_at_edge": pts["best_at_edge"][i]}
                         for i in range(len(pts["loss"]))]
        out["range"] = point["range"]
        out["exact_fit"] = point["exact_fit"]
        out["objective"] = point["objective"]
        grid = np.geomspace(point["range"][0], point["range"][1] * FIGURE_EXTRAPOLATION, 60)
        curves = np.array([frontier_loss(s, grid) for s in ok]) if len(ok) >= 2 else None
        out["band"] = {"flops": grid.tolist(),
                       "lo": np.percentile(curves, 50 * (1 - ci), axis=0).tolist() if curves is not None else None,
                       "hi": np.percentile(curves, 50 * (1 + ci), axis=0).tolist() if curves is not None else None}
    elif approach == "approach2":
        out["budgets"] = point["budgets"]
        for entry in out["budgets"]:
            if entry["used"]:
                entry["n_opt_lo"], entry["n_opt_hi"] = _interval(
                    [s["n_opt"].get(entry["budget"]) for s in ok], ci)
            else:
                entry["n_opt_lo"] = entry["n_opt_hi"] = None
    else:
        out["objective"] = point["objective"]
        out["n_points"] = point["n_points"]
    return out



def fit_path(path, out: str | os.PathLike | None = None, columns: dict[str, str] | None = None,
             **kwargs) -> tuple[dict, Path]:
    """Load a study directory or CSV, fit, write fit.json (default: the study dir / the CSV's folder)."""
    loaded = load_runs(path, columns)
    path = Path(path)
    out_dir = Path(out) if out is not None else (path if path.is_dir() else path.parent)
    target = out_dir / "fit.json"
    # find out before a long fit, not after it; nothing is created until fit.json is written
    check_writable_dir(out_dir, "fit.json folder (--out)")
    result = fit_runs(loaded, **kwargs)
    try:
        atomic_write_json(target, json_safe(result))
    except OSError as exc:
        raise UserError(f"{target}: cannot write ({exc.strerror or exc}); choose another folder with --out") from None
    return result, target


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


def fit_study(study_dir: str | os.PathLike, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
              ci: float = DEFAULT_CI, n_jobs: int | None = None, progress: bool = True,
              verbose: bool = True, parametric_grid: np.ndarray | None = None) -> dict:
    """Fit scaling/<study>/results.csv and write scaling/<study>/fit.json; the ladder calls this at its end.

    `parametric_grid` (default: the 4,500 Chinchilla starts) lets tests trade exactness for speed."""
    result, target = fit_path(study_dir, n_boot=n_boot, seed=seed, ci=ci, n_jobs=n_jobs, progress=progress,
                              parametric_grid=parametric_grid)
    if verbose:
        print(format_fit(result))
        print(f"wrote {target}")
    return result

