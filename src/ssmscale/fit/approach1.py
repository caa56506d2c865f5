"""Chinchilla Approach 1: the lower envelope of loss against FLOPs over every run's eval points, the law it
follows, and the compute-optimal size it implies.

Each run's eval points (validation loss on one fixed subset of the validation set at log-spaced steps, then
at its end; train.eval_points) form a curve of loss against the FLOPs spent so far. On a grid of C
(ENVELOPE_PER_DECADE points a decade) the envelope is the lowest loss any run reached at C, each curve
interpolated linearly in ln C between its points, and the run that reached it gives N_opt(C) and D_opt(C)
(its tokens at C). N_opt = N0 C^a and D_opt = D0 C^b by least squares in log-log over the grid points where
at least two sizes competed; the envelope itself is fitted with the frontier's law L(C) = E + A C^-alpha.

Caveat: a point before the end of its run is not annealed (the cosine schedule has not decayed yet), so its
loss is above what a run stopped there with a full schedule would reach. The envelope therefore leans on
runs near their end; where a larger model's intermediate point would win, it is handicapped, which biases
N_opt toward smaller models. Chinchilla trained each size at several horizons to avoid this.
"""

from __future__ import annotations

import math

import numpy as np

from .frontier import frontier_starts
from .laws import HUBER_DELTA, Skip, multistart_fit
from .runs import FamilyRuns

ENVELOPE_PER_DECADE = 10
CAVEAT = ("points before the end of a run are not annealed (cosine schedule not yet decayed): their losses are "
          "too high for a run of that length, which biases N_opt toward smaller models")


def envelope(runs: FamilyRuns) -> dict:
    """The lowest interpolated loss over all curves at each grid C, the run that reached it, and how many
    distinct sizes had a curve there."""
    have = [i for i, c in enumerate(runs.curves) if c is not None and c.shape[1] >= 2]
    if not have:
        raise Skip("needs eval-point curves (train.eval_points); these runs recorded only their final loss")
    lo = min(runs.curves[i][0, 0] for i in have)
    hi = max(runs.curves[i][0, -1] for i in have)
    n = max(2, int(math.ceil(ENVELOPE_PER_DECADE * math.log10(hi / lo))) + 1)
    log_grid = np.linspace(math.log(lo), math.log(hi), n)
    loss = np.full((len(have), n), np.inf)
    for row, i in enumerate(have):
        x = np.log(runs.curves[i][0])
        inside = (log_grid >= x[0]) & (log_grid <= x[-1])
        loss[row, inside] = np.interp(log_grid[inside], x, runs.curves[i][1])
    best = np.argmin(loss, axis=0)
    run = np.array(have)[best]
    flops = np.exp(log_grid)
    params = runs.params[np.array(have)]
    competing = np.array([len(np.unique(params[np.isfinite(loss[:, j])])) for j in range(n)])
    return {"flops": flops, "loss": loss[best, np.arange(n)], "params": runs.params[run],
            "tokens": flops * runs.tokens[run] / runs.flops[run], "competing": competing, "n_curves": len(have)}


def fit_approach1(runs: FamilyRuns, delta=HUBER_DELTA, starts=None) -> dict:
    env = envelope(runs)
    chosen = env["competing"] >= 2
    if chosen.sum() < 3 or len(np.unique(env["params"][chosen])) < 2:
        raise Skip(f"needs >= 3 envelope points where >= 2 sizes compete and >= 2 different winning sizes, got "
                   f"{int(chosen.sum())} points and {len(np.unique(env['params'][chosen]))} sizes")
    log_c = np.log(env["flops"])
    a, log_n0 = np.polyfit(log_c[chosen], np.log(env["params"][chosen]), 1)
    b, log_d0 = np.polyfit(log_c[chosen], np.log(env["tokens"][chosen]), 1)
    log_l = np.log(env["loss"])
    if starts is None:
        starts = frontier_starts(log_c, log_l)
    f, theta, rows = multistart_fit(log_c[None, :], log_l, starts, delta)
    return {"a": float(a), "b": float(b), "N0": math.exp(log_n0), "D0": math.exp(log_d0),
            "E": math.exp(theta[1]), "A": math.exp(theta[0]), "alpha": float(theta[2]), "theta": theta,
            "objective": f, "rows": rows, "envelope": env}
