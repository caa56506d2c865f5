"""The loss-vs-compute frontier L(C) = E + A C^-alpha, fitted on the best run of each IsoFLOP budget."""

from __future__ import annotations

import math

import numpy as np

from .laws import HUBER_DELTA, Skip, multistart_fit
from .runs import MIN_RUNS_PER_BUDGET, FamilyRuns


def frontier_points(runs: FamilyRuns) -> dict:
    """The best run of each budget that has >= MIN_RUNS_PER_BUDGET sizes (judged on the full data, so a
    bootstrap resample keeps the same budgets and takes the best of the runs it drew)."""
    members = [m for g in np.flatnonzero(runs.frontier_budgets) if len(m := np.flatnonzero(runs.group == g))]
    idx = np.array([m[np.argmin(runs.loss[m])] for m in members], dtype=int)
    at_edge = [bool(runs.params[i] in (runs.params[m].min(), runs.params[m].max())) for i, m in zip(idx, members)]
    seeds = [runs.seed_losses[i] if runs.seed_losses else runs.loss[i:i + 1] for i in idx]
    return {"flops": runs.flops[idx], "loss": runs.loss[idx], "params": runs.params[idx],
            "tokens": runs.tokens[idx], "budget": runs.budgets[runs.group[idx]], "best_at_edge": at_edge,
            "seed_losses": seeds}


def frontier_starts(log_c: np.ndarray, log_l: np.ndarray) -> np.ndarray:
    """Data-scaled starts (a, e, alpha): E a fraction of the lowest loss, A matching the median point."""
    l_min, l_mid, c_mid = np.exp(log_l.min()), np.exp(np.median(log_l)), np.median(log_c)
    starts = []
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
        e = math.log(frac * l_min)
        for alpha in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0):
            a = math.log(l_mid - frac * l_min) + alpha * c_mid
            starts += [(a + da, e, alpha) for da in (-1.0, 0.0, 1.0)]
    return np.array(starts)


def fit_frontier(runs: FamilyRuns, delta=HUBER_DELTA, starts=None, pool=None, n_chunks=1) -> dict:
    pts = frontier_points(runs)
    n = len(pts["loss"])
    if n < 3:
        raise Skip(f"needs >= 3 IsoFLOP budgets with >= {MIN_RUNS_PER_BUDGET} run sizes each "
                   f"(3 parameters E, A, alpha), got {n}")
    log_c, log_l = np.log(pts["flops"])[None, :], np.log(pts["loss"])
    if starts is None:
        starts = frontier_starts(log_c[0], log_l)
    f, theta, rows = multistart_fit(log_c, log_l, starts, delta, pool, n_chunks)
    a, e, alpha = theta
    return {"E": math.exp(e), "A": math.exp(a), "alpha": float(alpha), "theta": theta, "objective": f,
            "points": pts, "range": [float(pts["flops"].min()), float(pts["flops"].max())],
            "exact_fit": n == 3, "rows": rows}


def frontier_loss(fit: dict, flops) -> np.ndarray:
    """E + A C^-alpha, computed in log space (A can be astronomically large)."""
    log_c = np.log(np.asarray(flops, float))
    return fit["E"] + np.exp(math.log(fit["A"]) - fit["alpha"] * log_c)

