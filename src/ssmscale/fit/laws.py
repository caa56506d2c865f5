"""The law forms and the robust fit: one log-sum-exp Huber objective and multi-start L-BFGS.

Every law is fitted in log space as log y ~ LSE(a_1 - alpha_1 log x_1, ..., a_k - alpha_k log x_k, e):
k = 1 is the loss-vs-compute frontier L(C) = E + A C^-alpha, k = 2 Chinchilla's L(N, D) = E + A/N^alpha
+ B/D^beta. Huber loss (delta 1e-3) on the log residuals, summed; L-BFGS from many starts, best polished.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3

# Chinchilla / Epoch starting grid, columns (a, b, e, alpha, beta): 6 * 6 * 5 * 5 * 5 = 4,500 starts.
CHINCHILLA_GRID = np.array(list(itertools.product(
    np.arange(0.0, 30.0, 5.0), np.arange(0.0, 30.0, 5.0), np.arange(-1.0, 1.5, 0.5),
    np.arange(0.0, 2.5, 0.5), np.arange(0.0, 2.5, 0.5))))

_CHINCHILLA_GRID_REF = CHINCHILLA_GRID.copy()
_TIGHT = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000}
_DEFAULT = {}  # scipy's L-BFGS-B defaults, as in the published procedure


_blas_pinned = False


@contextmanager
def _one_blas_thread():
    """Pin OpenBLAS to one thread: L-BFGS-B's tiny LAPACK calls otherwise wake its thread pool, which
    made every fit 3x slower here (and 10x with two worker processes competing for two cores).
    Re-entrant and cheap when already pinned (forked workers inherit the pinning)."""
    global _blas_pinned
    if _blas_pinned:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    _blas_pinned = True
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        _blas_pinned = False


class Skip(Exception):
    """An approach cannot be fitted on these runs; the message says what it needs, `details` what was found."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def lse_huber(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float = HUBER_DELTA):
    """Summed Huber loss of log y against LSE(a_1 - alpha_1 logx_1, ..., a_k - alpha_k logx_k, e), and its gradient.

    theta = (a_1..a_k, e, alpha_1..alpha_k); logx has shape (k, n). For k = 2 this is Chinchilla's
    (a, b, e, alpha, beta) with logx = (ln N, ln D); for k = 1 the frontier (a, e, alpha) with ln C.
    """
    k = logx.shape[0]
    a, e, alpha = theta[:k], theta[k], theta[k + 1:]
    with np.errstate(all="ignore"):
        t = a[:, None] - alpha[:, None] * logx
        m = np.maximum(t.max(axis=0), e)
        w = np.exp(t - m)
        we = np.exp(e - m)
        s = w.sum(axis=0) + we
        r = m + np.log(s) - logy
        c = np.minimum(np.maximum(r, -delta), delta)
        # Huber(r) = c^2/2 + delta (|r| - |c|) with c = clip(r, -delta, delta); dHuber/dr = c
        f = 0.5 * (c @ c) + delta * (np.abs(r).sum() - np.abs(c).sum())
        q = c / s
        grad = np.empty_like(theta)
        grad[:k] = w @ q
        grad[k] = we @ q
        grad[k + 1:] = -((w * logx) @ q)
    if not np.isfinite(f):
        return np.inf, np.zeros_like(theta)
    return float(f), grad


def _lbfgs(theta0, logx, logy, delta, options) -> tuple[float, np.ndarray]:
    res = minimize(lse_huber, np.asarray(theta0, float), args=(logx, logy, delta), jac=True,
                   method="L-BFGS-B", options=options)
    f = float(res.fun)
    return (f, res.x) if np.isfinite(f) and np.all(np.isfinite(res.x)) else (np.inf, res.x)


def _run_starts(payload) -> np.ndarray:
    """Rows (objective, theta...) of L-BFGS from each start; module level so worker processes can run it."""
    starts, logx, logy, delta, options = payload
    out = np.empty((len(starts), 1 + starts.shape[1]))
    for i, s in enumerate(starts):
        f, x = _lbfgs(s, logx, logy, delta, options)
        out[i, 0], out[i, 1:] = f, x
    return out


def _grid_task(payload) -> np.ndarray:
    with _one_blas_thread():
        return _run_starts(payload)


def multistart_fit(logx, logy, starts, delta=HUBER_DELTA, pool=None, n_chunks=1):
    """L-BFGS from every start (default tolerances), polish the best with tight ones.

    Returns (objective, theta, rows) with rows = (objective, theta) of every start, best first.
    """
    starts = np.atleast_2d(np.asarray(starts, float))
    with _one_blas_thread():
        if pool is not None and n_chunks > 1 and len(starts) >= 2 * n_chunks:
            chunks = np.array_split(starts, n_chunks)
            rows = np.concatenate(list(pool.map(_grid_task, [(c, logx, logy, delta, _DEFAULT) for c in chunks])))
        else:
            rows = _run_starts((starts, logx, logy, delta, _DEFAULT))
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
        if not np.isfinite(rows[0, 0]):
            raise Skip("L-BFGS failed from every start")
        f, x = _lbfgs(rows[0, 1:], logx, logy, delta, _TIGHT)
    if not f <= rows[0, 0]:
        f, x = rows[0, 0], rows[0, 1:]
    return f, x, rows


def distinct_minima(theta: np.ndarray, rows: np.ndarray, k: int, tol: float = 1e-2) -> np.ndarray:
    """theta, then up to k - 1 other converged points from `rows` (best first) that differ from all kept ones."""
    kept = [np.asarray(theta, float)]
    for row in rows:
        if len(kept) >= k:
            break
        if np.isfinite(row[0]) and all(np.max(np.abs(row[1:] - x)) > tol for x in kept):
            kept.append(row[1:])
    return np.array(kept)

