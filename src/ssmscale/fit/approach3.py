"""Chinchilla Approach 3: the parametric law L(N, D) = E + A/N^alpha + B/D^beta and the allocation it implies."""

from __future__ import annotations

import math

import numpy as np

from . import laws
from .laws import HUBER_DELTA, Skip, multistart_fit
from .runs import FamilyRuns


def fit_parametric(runs: FamilyRuns, delta=HUBER_DELTA, starts=None, pool=None, n_chunks=1) -> dict:
    n = len(runs)
    if n < 6 or len(np.unique(runs.params)) < 2 or len(np.unique(runs.tokens)) < 2:
        # 5 runs would be fitted exactly, and every bootstrap resample (a subset) by the same law
        raise Skip(f"needs >= 6 runs (more than its 5 parameters E, A, B, alpha, beta) with >= 2 distinct sizes and "
                   f">= 2 distinct token counts, got {n} runs, {len(np.unique(runs.params))} sizes, "
                   f"{len(np.unique(runs.tokens))} token counts")
    logx = np.vstack([np.log(runs.params), np.log(runs.tokens)])
    f, theta, rows = multistart_fit(logx, np.log(runs.loss), laws.CHINCHILLA_GRID if starts is None else starts,
                                    delta, pool, n_chunks)
    return {**parametric_quantities(theta), "theta": theta, "objective": f, "n_points": n, "rows": rows}


def parametric_quantities(theta) -> dict:
    a_, b_, e, alpha, beta = (float(v) for v in theta)
    out = {"E": math.exp(e), "A": math.exp(a_), "B": math.exp(b_), "alpha": alpha, "beta": beta}
    s = alpha + beta
    if s != 0:
        out["a"], out["b"] = beta / s, alpha / s
        ratio = alpha * out["A"] / (beta * out["B"]) if beta != 0 else float("nan")
        out["G"] = ratio ** (1.0 / s) if ratio > 0 else float("nan")
    else:
        out["a"] = out["b"] = out["G"] = float("nan")
    return out


def parametric_loss(fit: dict, params, tokens) -> np.ndarray:
    """E + A/N^alpha + B/D^beta, the power terms in log space (A and B can be astronomically large)."""
    log_n, log_d = np.log(np.asarray(params, float)), np.log(np.asarray(tokens, float))
    return (fit["E"] + np.exp(math.log(fit["A"]) - fit["alpha"] * log_n)
            + np.exp(math.log(fit["B"]) - fit["beta"] * log_d))


def parametric_allocation(fit: dict, flops) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal (N_opt, D_opt) implied by an Approach-3 fit, with C = 6ND."""
    c6 = np.asarray(flops, float) / 6.0
    return fit["G"] * c6 ** fit["a"], c6 ** fit["b"] / fit["G"]

