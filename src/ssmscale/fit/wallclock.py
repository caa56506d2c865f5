"""Loss against pure training time, per family, on the machine that ran the study.

The points are the family's Pareto-optimal runs in (train_s, loss): the runs that no faster run beats.
Why not the best run of each FLOP budget: FLOPs per second differ between the families and between sizes
of one family, so the best run at equal FLOPs need not be the best at equal time; what t seconds of
training buy is the lowest loss of any run that took at most t, which is what the Pareto set traces.
The points are fitted with the frontier's law, L(t) = E + A t^-alpha. train_s counts optimiser steps only
(no start-up, validation or checkpointing), so the verdict is about training speed on that machine, with
its thread count and load: it does not carry over to another machine.
"""

from __future__ import annotations

import math

import numpy as np

from .frontier import frontier_starts
from .laws import HUBER_DELTA, Skip, multistart_fit
from .runs import FamilyRuns


def time_points(runs: FamilyRuns) -> dict:
    """The Pareto set in (train_s, loss), fastest first."""
    t = runs.train_s if runs.train_s is not None else np.full(len(runs), np.nan)
    ok = np.flatnonzero(np.isfinite(t) & (t > 0))
    order = ok[np.lexsort((runs.loss[ok], t[ok]))]
    keep, best = [], np.inf
    for i in order:
        if runs.loss[i] < best:
            keep.append(i)
            best = runs.loss[i]
    idx = np.array(keep, dtype=int)
    return {"seconds": t[idx], "loss": runs.loss[idx], "params": runs.params[idx], "flops": runs.flops[idx],
            "n_timed": len(ok)}


def fit_wallclock(runs: FamilyRuns, delta=HUBER_DELTA, starts=None) -> dict:
    pts = time_points(runs)
    if pts["n_timed"] == 0:
        raise Skip("needs each run's pure training time (a train_s column in results.csv)")
    if len(pts["loss"]) < 3:
        raise Skip(f"needs >= 3 runs on the time-loss Pareto front (3 parameters E, A, alpha), "
                   f"got {len(pts['loss'])}")
    log_t, log_l = np.log(pts["seconds"]), np.log(pts["loss"])
    if starts is None:
        starts = frontier_starts(log_t, log_l)
    f, theta, rows = multistart_fit(log_t[None, :], log_l, starts, delta)
    return {"E": math.exp(theta[1]), "A": math.exp(theta[0]), "alpha": float(theta[2]), "theta": theta,
            "objective": f, "rows": rows, "points": pts,
            "range": [float(pts["seconds"].min()), float(pts["seconds"].max())]}
