"""Chinchilla Approach 2: a parabola of loss against ln N per IsoFLOP budget; its vertices give N_opt ~ C^a, D_opt ~ C^b."""

from __future__ import annotations

import math

import numpy as np

from .laws import Skip
from .runs import MIN_RUNS_PER_BUDGET, FamilyRuns


def budget_vertex(budget: float, params: np.ndarray, tokens: np.ndarray, loss: np.ndarray) -> dict:
    """One budget's parabola in ln N and its vertex; "used" only if the vertex lies inside the sampled sizes."""
    x = np.log(params)
    entry = {"budget": float(budget), "n_runs": len(x), "n_sizes": len(np.unique(x)),
             "used": False, "reason": "", "parabola": None,
             "params_range": [float(np.exp(x.min())), float(np.exp(x.max()))] if len(x) else None,
             "n_opt": None, "d_opt": None, "loss_opt": None}
    if entry["n_sizes"] < MIN_RUNS_PER_BUDGET:
        entry["reason"] = f"{entry['n_sizes']} distinct sizes, a parabola needs >= {MIN_RUNS_PER_BUDGET}"
        return entry
    c2, c1, c0 = np.polyfit(x, loss, 2)
    entry["parabola"] = [float(c2), float(c1), float(c0)]
    if not c2 > 0:
        entry["reason"] = "parabola opens downward: no loss minimum over sizes at this budget"
        return entry
    x_opt = -c1 / (2.0 * c2)
    entry["n_opt"] = float(math.exp(x_opt))
    entry["loss_opt"] = float(c0 - c1 * c1 / (4.0 * c2))
    slope, icpt = np.polyfit(x, np.log(tokens), 1)
    entry["d_opt"] = float(math.exp(icpt + slope * x_opt))
    if not x.min() <= x_opt <= x.max():
        entry["reason"] = (f"minimum N = {entry['n_opt']:.3g} lies outside the sampled sizes "
                           f"[{math.exp(x.min()):.3g}, {math.exp(x.max()):.3g}]")
        return entry
    entry["used"] = True
    return entry


def fit_approach2(runs: FamilyRuns) -> dict:
    entries = [budget_vertex(runs.budgets[g], runs.params[m], runs.tokens[m], runs.loss[m])
               for g in range(len(runs.budgets)) for m in [np.flatnonzero(runs.group == g)]]
    used = [e for e in entries if e["used"]]
    if len(used) < 2:
        usable = sum(e["n_sizes"] >= MIN_RUNS_PER_BUDGET for e in entries)
        raise Skip(f"needs >= 2 IsoFLOP budgets whose parabola has its minimum inside the sampled sizes, "
                   f"got {len(used)} (of {len(entries)} budgets, {usable} with >= {MIN_RUNS_PER_BUDGET} sizes)",
                   {"budgets": entries})
    log_c = np.log([e["budget"] for e in used])
    a, log_n0 = np.polyfit(log_c, np.log([e["n_opt"] for e in used]), 1)
    b, log_d0 = np.polyfit(log_c, np.log([e["d_opt"] for e in used]), 1)
    return {"a": float(a), "b": float(b), "N0": math.exp(log_n0), "D0": math.exp(log_d0), "budgets": entries}

