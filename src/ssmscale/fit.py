"""Scaling-law fits with bootstrap intervals: loss-vs-compute frontier, Chinchilla Approaches 2 and 3, crossover.

Everything here is a pure function of a table of runs (params N, tokens D, flops C, loss L, family,
IsoFLOP group), except `load_runs` (reads a CSV) and `fit_study` / `fit_path` (read, fit, write fit.json).

Fits (all losses in nats/token, N = non-embedding parameters, C = training FLOPs):
- frontier:   L(C) = E + A * C^-alpha on the best run of each IsoFLOP budget, fitted as
              log L = logaddexp(a - alpha log C, e) with a Huber loss (delta 1e-3) on the log residuals,
              summed over points, L-BFGS from a small data-scaled grid of starts. It needs >= 3 budgets
              (3 parameters); with exactly 3 the curve passes through every point and only the bootstrap
              says how uncertain it is.
- approach2:  per budget, a least-squares parabola of L against ln N; its vertex is N_opt(C) and D_opt(C)
              is the token count at N_opt (interpolated in log-log within the budget, which equals
              C / (6 N_opt) when C = 6ND). Budgets whose vertex lies outside the sampled sizes (or whose
              parabola opens downward) are reported and left out. Then N_opt = N0 C^a, D_opt = D0 C^b by
              least squares in log-log on >= 2 budgets.
- parametric: Chinchilla Approach 3, L(N, D) = E + A/N^alpha + B/D^beta, fitted exactly as Hoffmann et al.
              and Epoch AI did: log-sum-exp form LSE(a - alpha ln N, b - beta ln D, e), Huber delta 1e-3 on
              log residuals summed over points, L-BFGS from each of the 4,500 grid starts, best kept. The
              grid runs with scipy's default L-BFGS-B tolerances and the winner is then polished with tight
              ones. Implied allocation (assumes C = 6ND): G = (alpha A / (beta B))^(1/(alpha+beta)),
              N_opt = G (C/6)^a, D_opt = (C/6)^b / G, a = beta/(alpha+beta), b = alpha/(alpha+beta).
- crossover:  for each pair of families, the C where one frontier drops below the other: roots of the
              difference inside the range both frontiers were fitted on, and (labelled extrapolated)
              up to CROSSOVER_SEARCH_FACTOR beyond it.

Bootstrap: resample runs with replacement within each family and within each IsoFLOP group (so every
budget keeps its number of runs), refit everything, take percentile intervals. Caveat for the frontier:
a resample's budget point is the best run it drew, so the interval says how much the frontier depends on
which runs were made, not on the seed-to-seed noise of the best run itself (one seed per configuration
cannot show that; several seeds, averaged by load_runs, reduce it). Each resample has its own
child of numpy's SeedSequence(seed), so results do not depend on the number of worker processes.
Shortcut, for speed: a resample does not rerun the 4,500-point grid; it starts L-BFGS from the point
estimate and the best N_WARM_STARTS - 1 other distinct local minima the full-data grid found (the frontier
likewise). Resamples where an approach cannot be fitted are counted per approach with their reasons, never
silently dropped; intervals come from the successful ones.

fit.json (written by `fit_path` / `fit_study`):
{
  "schema": 1,
  "source":    {"path", "kind": "study" | "csv", "sha256" (of the CSV bytes), "rows_read", "columns"},
  "dropped":   {"status_not_ok": {status: count}, "invalid_values": n, "other_learning_rates": n,
                "seed_duplicates_averaged": n},
  "notes":     [str, ...],                      # data handling and warnings, as printed
  "settings":  {"n_boot", "seed", "ci", "huber_delta", "n_jobs", "flops_convention", "grouping",
                "bootstrap", "warm_starts", "crossover_search_factor", "min_runs_per_budget"},
  "families":  {name: {
      "n_runs", "n_budgets", "flops_range": [lo, hi],
      "frontier":   {"E", "A", "alpha": Q, "points": [{"flops", "loss", "params", "tokens", "budget",
                     "best_at_edge"}], "range": [lo, hi], "exact_fit": bool, "objective",
                     "band": {"flops": [...], "lo": [...], "hi": [...]}, "bootstrap": B}
                    or {"skipped": reason},
      "approach2":  {"a", "b", "N0", "D0": Q, "budgets": [{"budget", "n_runs", "n_sizes", "used",
                     "reason", "parabola": [c2, c1, c0] (L = c2 x^2 + c1 x + c0, x = ln N),
                     "params_range", "n_opt", "n_opt_lo", "n_opt_hi", "d_opt", "loss_opt"}],
                     "bootstrap": B} or {"skipped": reason, "budgets": [...]},
      "parametric": {"E", "A", "B", "alpha", "beta", "a", "b", "G": Q, "objective", "n_points",
                     "bootstrap": B} or {"skipped": reason}}},
  "crossover": {"pairs": [{"families": [f1, f2], "fitted_range": [lo, hi] | null, "search_range": [lo, hi],
                 "crossings": [{"flops": Q, "extrapolated": bool, "lower_above": family,
                                "found_in_resamples": k}],
                 "resamples_compared", "resamples_crossing_in_range", "statement"}]},
  "timing":    {"point_estimates_s", "bootstrap_s", "total_s"}
}
Q = {"value": float, "lo": float | null, "hi": float | null}: point estimate and percentile interval.
B = {"resamples", "ok", "failed", "failure_reasons": {reason: count}}.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import brentq, minimize

from .errors import UserError
from .fsutil import atomic_write_json

HUBER_DELTA = 1e-3
DEFAULT_N_BOOT = 200
DEFAULT_CI = 0.95
MIN_RUNS_PER_BUDGET = 3          # a budget's "best run" or parabola means something only with >= 3 sizes
N_WARM_STARTS = 4                # bootstrap L-BFGS starts: point estimate + 3 other distinct local minima
CROSSOVER_SEARCH_FACTOR = 100.0  # extrapolated crossings are searched this factor beyond the fitted range
E_UNIDENTIFIED = 1e-4           # a fitted E below this fraction of the lowest loss means E ran to 0
FIGURE_EXTRAPOLATION = 10.0      # the frontier band reaches this factor beyond the largest budget
FLOPS_CONVENTION = ("C = the flops column when given (a study's exact count), else 6 * params * tokens; "
                    "Approach 3's allocation N_opt(C), D_opt(C) assumes C = 6ND")

# Chinchilla / Epoch starting grid, columns (a, b, e, alpha, beta): 6 * 6 * 5 * 5 * 5 = 4,500 starts.
CHINCHILLA_GRID = np.array(list(itertools.product(
    np.arange(0.0, 30.0, 5.0), np.arange(0.0, 30.0, 5.0), np.arange(-1.0, 1.5, 0.5),
    np.arange(0.0, 2.5, 0.5), np.arange(0.0, 2.5, 0.5))))

_CHINCHILLA_GRID_REF = CHINCHILLA_GRID.copy()
_TIGHT = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000}
_DEFAULT = {}  # scipy's L-BFGS-B defaults, as in the published procedure

CANONICAL_COLUMNS = ("params", "tokens", "flops", "loss", "family", "budget", "status", "lr", "seed")
_NUMERIC_COLUMNS = ("params", "tokens", "flops", "loss", "budget", "lr")


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


# ---------------------------------------------------------------------------------------------------
# Loading runs

@dataclass
class LoadedRuns:
    table: pd.DataFrame            # family, params, tokens, flops, loss, group_flops
    source: dict
    dropped: dict
    notes: list[str] = field(default_factory=list)
    grouping: str = ""


def parse_column_mapping(specs: list[str] | None) -> dict[str, str]:
    """`["params=Model Size,flops=Training FLOP"]` -> {"params": "Model Size", "flops": "Training FLOP"}."""
    mapping: dict[str, str] = {}
    for spec in specs or []:
        for item in spec.split(","):
            if not item.strip():
                continue
            name, sep, column = item.partition("=")
            name, column = name.strip(), column.strip().strip('"').strip("'")
            if not sep or not column:
                raise UserError(f"--columns: '{item}' is not NAME=COLUMN")
            if name not in CANONICAL_COLUMNS:
                raise UserError(f"--columns: unknown name '{name}' (expected one of {', '.join(CANONICAL_COLUMNS)})")
            mapping[name] = column
    return mapping


def _csv_of(path: Path) -> tuple[Path, str]:
    if path.is_dir():
        csv = path / "results.csv"
        if not csv.is_file():
            raise UserError(f"{path}: not a study directory (no results.csv in it)")
        return csv, "study"
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    return path, "csv"


def _read_csv(csv: Path) -> tuple[pd.DataFrame, bytes]:
    try:
        raw = csv.read_bytes()
    except OSError as exc:
        raise UserError(f"{csv}: cannot read ({exc.strerror or exc})") from None
    try:
        return pd.read_csv(io.BytesIO(raw)), raw
    except pd.errors.EmptyDataError:
        raise UserError(f"{csv}: empty file, expected a CSV with a header row") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{csv}: not a readable CSV ({first})") from None


def _to_numeric(df: pd.DataFrame, col: str, csv: Path) -> None:
    s = df[col]
    if pd.api.types.is_numeric_dtype(s):
        df[col] = s.astype(float)
        return
    conv = pd.to_numeric(s, errors="coerce")
    text = s.astype(str).str.strip().str.lower()
    missing_like = s.isna() | text.isin(["", "nan", "inf", "+inf", "-inf", "infinity", "-infinity", "none"])
    bad = conv.isna() & ~missing_like
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{csv}: column '{col}', line {i + 2}: {s.iloc[i]!r} is not a number")
    df[col] = conv.astype(float)


def load_runs(path: str | os.PathLike, columns: dict[str, str] | None = None) -> LoadedRuns:
    """Read a study directory's results.csv or any CSV of runs, clean it, and say what was dropped.

    Needs `params` and `loss` and at least one of `tokens` / `flops` (the other follows from C = 6ND);
    optional `family` (default "all"), `budget` (IsoFLOP groups), `status`, `lr`, `seed`.
    Cleaning, in order: keep status == "ok"; drop rows with NaN, inf or non-positive values; average
    repeated seeds of one configuration; keep the lowest-loss learning rate per (family, params, budget).
    """
    path = Path(path)
    csv, kind = _csv_of(path)
    df, raw = _read_csv(csv)
    columns = dict(columns or {})
    for name, col in columns.items():
        if col not in df.columns:
            raise UserError(f"--columns: {name}={col!r}: no column {col!r} in {csv} "
                            f"(columns: {', '.join(map(str, df.columns))})")
    df = df.rename(columns={col: name for name, col in columns.items()})
    for name in ("params", "loss"):
        if name not in df.columns:
            raise UserError(f"{csv}: missing column '{name}' (columns: {', '.join(map(str, df.columns))}; "
                            f"map yours with --columns {name}=YOUR_COLUMN)")
    if "tokens" not in df.columns and "flops" not in df.columns:
        raise UserError(f"{csv}: missing column 'tokens' (or 'flops', from which tokens = flops / (6 params))")
    rows_read = len(df)
    for col in _NUMERIC_COLUMNS:
        if col in df.columns:
            _to_numeric(df, col, csv)

    notes: list[str] = []
    dropped: dict = {"status_not_ok": {}, "invalid_values": 0, "other_learning_rates": 0,
                     "seed_duplicates_averaged": 0}
    if "status" in df.columns:
        status = df["status"].astype(str).str.strip()
        not_ok = status != "ok"
        if not_ok.any():
            dropped["status_not_ok"] = {str(k): int(v) for k, v in status[not_ok].value_counts().items()}
            parts = ", ".join(f"{v} {k}" for k, v in dropped["status_not_ok"].items())
            notes.append(f"dropped {int(not_ok.sum())} runs whose status is not 'ok' ({parts})")
        df = df[~not_ok]
    df = df.copy()
    df["family"] = df["family"].astype(str).str.strip() if "family" in df.columns else "all"
    if "flops" not in df.columns:
        df["flops"] = 6.0 * df["params"] * df["tokens"]
        notes.append("no flops column: C = 6 * params * tokens")
    if "tokens" not in df.columns:
        df["tokens"] = df["flops"] / (6.0 * df["params"])
        notes.append("no tokens column: D = flops / (6 * params)")

    checked = ["params", "tokens", "flops", "loss"] + (["budget"] if "budget" in df.columns else [])
    values = df[checked].to_numpy(dtype=float)
    valid = np.isfinite(values).all(axis=1) & (values > 0).all(axis=1)
    if not valid.all():
        dropped["invalid_values"] = int((~valid).sum())
        notes.append(f"dropped {dropped['invalid_values']} rows with NaN, inf or non-positive "
                     f"{'/'.join(checked)}")
    df = df[valid].copy()

    if "budget" in df.columns:
        df["group_flops"] = df["budget"]
        grouping = "IsoFLOP groups from the budget column"
    else:
        rounded = df["flops"].map(lambda c: float(f"{c:.1e}"))
        df["group_flops"] = np.exp(np.log(df["flops"]).groupby(rounded).transform("mean"))
        grouping = ("no budget column: IsoFLOP groups = runs whose flops agree to 2 significant digits "
                    "(C of a group = geometric mean of its runs' flops)")

    if "lr" in df.columns and len(df):
        keys = ["family", "params", "group_flops"]
        n_before = len(df)
        agg = {c: "first" for c in df.columns if c not in keys + ["lr", "loss"]}
        agg["loss"] = "mean"
        df = df.groupby(keys + ["lr"], as_index=False, sort=False, dropna=False).agg(agg)
        dropped["seed_duplicates_averaged"] = n_before - len(df)
        if dropped["seed_duplicates_averaged"]:
            notes.append(f"averaged the loss over repeated seeds of the same (family, params, budget, lr): "
                         f"{dropped['seed_duplicates_averaged']} rows merged")
        best = df.groupby(keys, sort=False, dropna=False)["loss"].idxmin()
        dropped["other_learning_rates"] = len(df) - len(best)
        df = df.loc[np.sort(best.to_numpy())]
        if dropped["other_learning_rates"]:
            notes.append(f"kept the lowest-loss learning rate per (family, params, budget): "
                         f"{dropped['other_learning_rates']} runs with other learning rates set aside "
                         f"(Porian et al. 2024: compare architectures at their best LR per size)")

    table = df[["family", "params", "tokens", "flops", "loss", "group_flops"]].reset_index(drop=True)
    source = {"path": str(path), "csv": str(csv), "kind": kind, "sha256": hashlib.sha256(raw).hexdigest(),
              "rows_read": rows_read, "columns": columns}
    if "flops_convention" in df.columns:
        source["flops_convention"] = sorted(df["flops_convention"].dropna().astype(str).unique().tolist())
    return LoadedRuns(table=table, source=source, dropped=dropped, notes=notes, grouping=grouping)


# ---------------------------------------------------------------------------------------------------
# Runs of one family, as arrays

@dataclass(frozen=True)
class FamilyRuns:
    params: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    loss: np.ndarray
    group: np.ndarray        # index into budgets, one per run
    budgets: np.ndarray      # C of each IsoFLOP group
    frontier_budgets: np.ndarray  # per budget: >= MIN_RUNS_PER_BUDGET sizes in the full data (fixed under resampling)

    @classmethod
    def from_table(cls, t: pd.DataFrame) -> "FamilyRuns":
        budgets, group = np.unique(t["group_flops"].to_numpy(dtype=float), return_inverse=True)
        params = t["params"].to_numpy(float)
        sizes = np.array([len(np.unique(params[group == g])) for g in range(len(budgets))])
        return cls(params, t["tokens"].to_numpy(float), t["flops"].to_numpy(float),
                   t["loss"].to_numpy(float), group, budgets, sizes >= MIN_RUNS_PER_BUDGET)

    @classmethod
    def from_arrays(cls, params, tokens, loss, flops=None, budget=None) -> "FamilyRuns":
        params, tokens, loss = (np.asarray(x, float) for x in (params, tokens, loss))
        flops = 6.0 * params * tokens if flops is None else np.asarray(flops, float)
        t = pd.DataFrame({"params": params, "tokens": tokens, "flops": flops, "loss": loss,
                          "group_flops": flops if budget is None else np.asarray(budget, float)})
        return cls.from_table(t)

    def take(self, idx: np.ndarray) -> "FamilyRuns":
        return FamilyRuns(self.params[idx], self.tokens[idx], self.flops[idx], self.loss[idx],
                          self.group[idx], self.budgets, self.frontier_budgets)

    def __len__(self) -> int:
        return len(self.loss)


def _resample(runs: FamilyRuns, rng: np.random.Generator) -> FamilyRuns:
    """Draw runs with replacement within each IsoFLOP group, keeping every group's size."""
    parts = [rng.choice(members, size=len(members), replace=True)
             for g in range(len(runs.budgets)) if len(members := np.flatnonzero(runs.group == g))]
    return runs.take(np.sort(np.concatenate(parts)))


# ---------------------------------------------------------------------------------------------------
# The log-sum-exp Huber objective and multi-start L-BFGS

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


# ---------------------------------------------------------------------------------------------------
# Frontier: L(C) = E + A C^-alpha on the best run per budget

def frontier_points(runs: FamilyRuns) -> dict:
    """The best run of each budget that has >= MIN_RUNS_PER_BUDGET sizes (judged on the full data, so a
    bootstrap resample keeps the same budgets and takes the best of the runs it drew)."""
    members = [m for g in np.flatnonzero(runs.frontier_budgets) if len(m := np.flatnonzero(runs.group == g))]
    idx = np.array([m[np.argmin(runs.loss[m])] for m in members], dtype=int)
    at_edge = [bool(runs.params[i] in (runs.params[m].min(), runs.params[m].max())) for i, m in zip(idx, members)]
    return {"flops": runs.flops[idx], "loss": runs.loss[idx], "params": runs.params[idx],
            "tokens": runs.tokens[idx], "budget": runs.budgets[runs.group[idx]], "best_at_edge": at_edge}


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


# ---------------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP parabolas

def fit_approach2(runs: FamilyRuns) -> dict:
    entries, used = [], []
    for g in range(len(runs.budgets)):
        members = np.flatnonzero(runs.group == g)
        x = np.log(runs.params[members])
        entry = {"budget": float(runs.budgets[g]), "n_runs": len(members), "n_sizes": len(np.unique(x)),
                 "used": False, "reason": "", "parabola": None,
                 "params_range": [float(np.exp(x.min())), float(np.exp(x.max()))] if len(x) else None,
                 "n_opt": None, "d_opt": None, "loss_opt": None}
        entries.append(entry)
        if entry["n_sizes"] < MIN_RUNS_PER_BUDGET:
            entry["reason"] = f"{entry['n_sizes']} distinct sizes, a parabola needs >= {MIN_RUNS_PER_BUDGET}"
            continue
        c2, c1, c0 = np.polyfit(x, runs.loss[members], 2)
        entry["parabola"] = [float(c2), float(c1), float(c0)]
        if not c2 > 0:
            entry["reason"] = "parabola opens downward: no loss minimum over sizes at this budget"
            continue
        x_opt = -c1 / (2.0 * c2)
        entry["n_opt"] = float(math.exp(x_opt))
        entry["loss_opt"] = float(c0 - c1 * c1 / (4.0 * c2))
        slope, icpt = np.polyfit(x, np.log(runs.tokens[members]), 1)
        entry["d_opt"] = float(math.exp(icpt + slope * x_opt))
        if not x.min() <= x_opt <= x.max():
            entry["reason"] = (f"minimum N = {entry['n_opt']:.3g} lies outside the sampled sizes "
                               f"[{math.exp(x.min()):.3g}, {math.exp(x.max()):.3g}]")
            continue
        entry["used"] = True
        used.append(entry)
    if len(used) < 2:
        usable = sum(e["n_sizes"] >= MIN_RUNS_PER_BUDGET for e in entries)
        raise Skip(f"needs >= 2 IsoFLOP budgets whose parabola has its minimum inside the sampled sizes, "
                   f"got {len(used)} (of {len(entries)} budgets, {usable} with >= {MIN_RUNS_PER_BUDGET} sizes)",
                   {"budgets": entries})
    log_c = np.log([e["budget"] for e in used])
    a, log_n0 = np.polyfit(log_c, np.log([e["n_opt"] for e in used]), 1)
    b, log_d0 = np.polyfit(log_c, np.log([e["d_opt"] for e in used]), 1)
    return {"a": float(a), "b": float(b), "N0": math.exp(log_n0), "D0": math.exp(log_d0), "budgets": entries}


# ---------------------------------------------------------------------------------------------------
# Approach 3: parametric L(N, D)

def fit_parametric(runs: FamilyRuns, delta=HUBER_DELTA, starts=None, pool=None, n_chunks=1) -> dict:
    n = len(runs)
    if n < 6 or len(np.unique(runs.params)) < 2 or len(np.unique(runs.tokens)) < 2:
        # 5 runs would be fitted exactly, and every bootstrap resample (a subset) by the same law
        raise Skip(f"needs >= 6 runs (more than its 5 parameters E, A, B, alpha, beta) with >= 2 distinct sizes and "
                   f">= 2 distinct token counts, got {n} runs, {len(np.unique(runs.params))} sizes, "
                   f"{len(np.unique(runs.tokens))} token counts")
    logx = np.vstack([np.log(runs.params), np.log(runs.tokens)])
    f, theta, rows = multistart_fit(logx, np.log(runs.loss), CHINCHILLA_GRID if starts is None else starts,
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


def parametric_allocation(fit: dict, flops) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal (N_opt, D_opt) implied by an Approach-3 fit, with C = 6ND."""
    c6 = np.asarray(flops, float) / 6.0
    return fit["G"] * c6 ** fit["a"], c6 ** fit["b"] / fit["G"]


# ---------------------------------------------------------------------------------------------------
# Crossover of two frontiers

def find_crossings(fit1: dict, fit2: dict, lo: float, hi: float, n_grid: int = 2001) -> list[tuple[float, int]]:
    """C in [lo, hi] where frontier 1 and frontier 2 cross, each with +1 if frontier 2 is lower above it, else -1."""
    def diff(x):
        return frontier_loss(fit1, np.exp(x)) - frontier_loss(fit2, np.exp(x))
    xs = np.linspace(math.log(lo), math.log(hi), n_grid)
    d = diff(xs)
    sign = np.sign(d)
    for i in range(n_grid - 2, -1, -1):     # a root exactly on a grid point: take the sign to its right
        if sign[i] == 0:
            sign[i] = sign[i + 1]
    out = []
    for i in np.flatnonzero(sign[:-1] * sign[1:] < 0):
        root = brentq(lambda x: float(diff(x)), xs[i], xs[i + 1], xtol=1e-12)
        out.append((math.exp(root), 1 if sign[i + 1] > 0 else -1))
    return out


# ---------------------------------------------------------------------------------------------------
# Bootstrap

APPROACHES = ("frontier", "approach2", "parametric")
QUANTITIES = {"frontier": ("E", "A", "alpha"), "approach2": ("a", "b", "N0", "D0"),
               "parametric": ("E", "A", "B", "alpha", "beta", "a", "b", "G")}


def _fit_one(approach: str, runs: FamilyRuns, warm, delta) -> dict:
    if approach == "frontier":
        r = fit_frontier(runs, delta, starts=warm)
        return {k: r[k] for k in ("E", "A", "alpha")}
    if approach == "approach2":
        r = fit_approach2(runs)
        out = {k: r[k] for k in QUANTITIES["approach2"]}
        out["n_opt"] = {e["budget"]: e["n_opt"] for e in r["budgets"] if e["used"]}
        return out
    r = fit_parametric(runs, delta, starts=warm)
    return {k: r[k] for k in QUANTITIES["parametric"]}


def _bootstrap_chunk(payload) -> list:
    families, warm, delta, seeds = payload
    out = []
    with _one_blas_thread():
        for b, seed_seq in seeds:
            out.append((b, _bootstrap_sample(families, warm, delta, seed_seq)))
    return out


def _bootstrap_sample(families, warm, delta, seed_seq) -> dict:
    rng = np.random.default_rng(seed_seq)
    sample: dict = {}
    for name in sorted(families):
        runs = _resample(families[name], rng)
        sample[name] = {}
        for approach, starts in warm[name].items():
            try:
                sample[name][approach] = _fit_one(approach, runs, starts, delta)
            except Skip as exc:
                sample[name][approach] = str(exc)
            except (ValueError, np.linalg.LinAlgError, FloatingPointError) as exc:
                sample[name][approach] = f"numerical failure: {type(exc).__name__}"
    return sample


def _interval(values, ci) -> tuple[float | None, float | None]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) < 2:
        return None, None
    lo, hi = np.percentile(v, [50.0 * (1.0 - ci), 50.0 * (1.0 + ci)])
    return float(lo), float(hi)


def _q(value, samples, ci) -> dict:
    lo, hi = _interval(samples, ci) if samples is not None else (None, None)
    return {"value": None if value is None or not np.isfinite(value) else float(value), "lo": lo, "hi": hi}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker pool): fair timing on a busy machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@contextmanager
def _worker_pool(n_jobs: int):
    if n_jobs <= 1:
        yield None
        return
    # fork where there is one: workers run only numpy/scipy (never torch, whose thread pools a forked
    # child must not touch), and unlike spawn it works from scripts without an `if __name__` guard
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=multiprocessing.get_context(method)) as pool:
        yield pool


def _run_bootstrap(families, warm, delta, n_boot, seed, pool, n_jobs, progress) -> list:
    from tqdm.auto import tqdm
    seeds = list(enumerate(np.random.SeedSequence(seed).spawn(n_boot)))
    size = max(1, min(10, n_boot // (4 * max(1, n_jobs))))
    chunks = [seeds[i:i + size] for i in range(0, n_boot, size)]
    results: list = [None] * n_boot
    with tqdm(total=n_boot, desc="bootstrap", unit="resample", file=sys.stderr, disable=None if progress else True,
              leave=False) as bar:
        if pool is None:
            for chunk in chunks:
                for b, sample in _bootstrap_chunk((families, warm, delta, chunk)):
                    results[b] = sample
                bar.update(len(chunk))
        else:
            futures = {pool.submit(_bootstrap_chunk, (families, warm, delta, c)): len(c) for c in chunks}
            for fut in as_completed(futures):
                for b, sample in fut.result():
                    results[b] = sample
                bar.update(futures[fut])
    return results


# ---------------------------------------------------------------------------------------------------
# Putting it together

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
    grid = CHINCHILLA_GRID if parametric_grid is None else np.asarray(parametric_grid, float)

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
                                         np.array_equal(grid, _CHINCHILLA_GRID_REF) else f"grid of {len(grid)} starts"),
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


def _boot_counts(samples: list) -> dict:
    # one reason per kind of failure: the counts after ", got" differ from resample to resample
    reasons = Counter(s.split(", got")[0] for s in samples if isinstance(s, str))
    return {"resamples": len(samples), "ok": sum(isinstance(s, dict) for s in samples),
            "failed": sum(reasons.values()), "failure_reasons": dict(reasons.most_common())}


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


def _crossovers(point: dict, samples: list, ci: float) -> dict:
    names = sorted(point)
    pairs = []
    for f1, f2 in itertools.combinations(names, 2):
        p1, p2 = point[f1]["frontier"], point[f2]["frontier"]
        entry: dict = {"families": [f1, f2]}
        if "skipped" in p1 or "skipped" in p2:
            which = f1 if "skipped" in p1 else f2
            entry["statement"] = f"no crossover computed: the {which} frontier was not fitted"
            pairs.append(entry)
            continue
        lo, hi = max(p1["range"][0], p2["range"][0]), min(p1["range"][1], p2["range"][1])
        s_lo = min(p1["range"][0], p2["range"][0]) / CROSSOVER_SEARCH_FACTOR
        s_hi = max(p1["range"][1], p2["range"][1]) * CROSSOVER_SEARCH_FACTOR
        entry["fitted_range"] = [lo, hi] if lo < hi else None
        entry["search_range"] = [s_lo, s_hi]

        def inside(c):
            return lo <= c <= hi

        boot = []
        for s in samples:
            b1, b2 = s[f1].get("frontier"), s[f2].get("frontier")
            if isinstance(b1, dict) and isinstance(b2, dict):
                boot.append(find_crossings(b1, b2, s_lo, s_hi))
        entry["resamples_compared"] = len(boot)
        entry["resamples_crossing_in_range"] = sum(any(inside(c) for c, _ in roots) for roots in boot)
        crossings = []
        for c, sign in find_crossings(p1, p2, s_lo, s_hi):
            near = [min(roots, key=lambda r: abs(math.log(r[0] / c)))[0] for roots in boot if roots]
            near = [x for x in near if abs(math.log(x / c)) < math.log(CROSSOVER_SEARCH_FACTOR)]
            crossings.append({"flops": _q(c, near if boot else None, ci), "extrapolated": not inside(c),
                              "lower_above": f2 if sign > 0 else f1, "found_in_resamples": len(near)})
        entry["crossings"] = crossings
        entry["statement"] = _crossover_statement(entry, p1, p2, f1, f2, ci)
        pairs.append(entry)
    return {"pairs": pairs}


def fmt_value(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _crossover_statement(entry, p1, p2, f1, f2, ci) -> str:
    rng = entry["fitted_range"]
    lines = []
    n_b = entry["resamples_compared"]
    if rng is None:
        lines.append(f"{f1} and {f2} frontiers were fitted on disjoint FLOP ranges: no in-range comparison")
    inside = [c for c in entry["crossings"] if not c["extrapolated"]]
    for c in inside:
        other = f1 if c["lower_above"] == f2 else f2
        q = c["flops"]
        lines.append(f"{c['lower_above']}'s frontier drops below {other}'s at C = {fmt_value(q['value'])} FLOPs "
                     f"({ci:.0%} CI [{fmt_value(q['lo'])}, {fmt_value(q['hi'])}], a crossing near it in "
                     f"{c['found_in_resamples']}/{n_b} resamples)")
    if rng is not None and not inside:
        mid = math.sqrt(rng[0] * rng[1])
        lower = f1 if frontier_loss(p1, mid) < frontier_loss(p2, mid) else f2
        lines.append(f"no crossover in [{fmt_value(rng[0])}, {fmt_value(rng[1])}] FLOPs: {lower} is lower throughout "
                     f"({entry['resamples_crossing_in_range']}/{n_b} resamples cross in that range)")
    for c in entry["crossings"]:
        if c["extrapolated"]:
            other = f1 if c["lower_above"] == f2 else f2
            q = c["flops"]
            lines.append(f"EXTRAPOLATED (outside the fitted range): {c['lower_above']} would drop below "
                         f"{other} at C = {fmt_value(q['value'])} FLOPs "
                         f"({ci:.0%} CI [{fmt_value(q['lo'])}, {fmt_value(q['hi'])}])")
    return "; ".join(lines)


# ---------------------------------------------------------------------------------------------------
# Files in, fit.json out, and the printed table

def fit_path(path, out: str | os.PathLike | None = None, columns: dict[str, str] | None = None,
             **kwargs) -> tuple[dict, Path]:
    """Load a study directory or CSV, fit, write fit.json (default: the study dir / the CSV's folder)."""
    loaded = load_runs(path, columns)
    path = Path(path)
    out_dir = Path(out) if out is not None else (path if path.is_dir() else path.parent)
    target = out_dir / "fit.json"
    try:                                   # find out before a long fit, not after it
        out_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(out_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise UserError(f"{target}: cannot write there; choose another folder with --out")
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


def _list(values, limit: int = 6) -> str:
    shown = ", ".join(f"{v:.3g}" for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def quantity_rows(fam: dict):
    """(approach, quantity, value, interval or None) for every fitted quantity of a family, formatted."""
    for approach in APPROACHES:
        block = fam[approach]
        if "skipped" in block:
            continue
        for k in QUANTITIES[approach]:
            q = block[k]
            interval = f"[{fmt_value(q['lo'])}, {fmt_value(q['hi'])}]" if q["lo"] is not None else None
            yield approach, k, fmt_value(q["value"]), interval


def fit_notes(fam: dict) -> list[str]:
    """What a reader must know about a family's fits: skipped approaches, failed resamples, weak spots."""
    notes = []
    front = fam["frontier"]
    loss_scale = min(p["loss"] for p in front["points"]) if "skipped" not in front else 1.0
    for approach in APPROACHES:
        block = fam[approach]
        if "skipped" in block:
            notes.append(f"{approach} skipped: {block['skipped']}")
            continue
        if "E" in block and block["E"]["value"] < E_UNIDENTIFIED * loss_scale:
            notes.append(f"{approach}: E = {fmt_value(block['E']['value'])} is driven to zero: these runs do not "
                         f"pin down an irreducible loss, the power-law terms absorb it and their exponents "
                         f"are correspondingly less certain")
        bs = block["bootstrap"]
        if bs["failed"]:
            why = "; ".join(f"{n}: {r}" for r, n in bs["failure_reasons"].items())
            notes.append(f"{approach}: {bs['failed']}/{bs['resamples']} resamples could not be fitted ({why}); "
                         f"its intervals come from the other {bs['ok']}")
        if approach == "frontier":
            if block["exact_fit"]:
                notes.append("frontier: 3 budgets for 3 parameters, the curve passes through every point; "
                             "its interval reflects run resampling only and is wide")
            edge = [p["budget"] for p in block["points"] if p["best_at_edge"]]
            if edge:
                notes.append(f"frontier: at {_list(edge)} FLOPs the best run is the smallest or largest "
                             f"size tried: the compute-optimal point may lie outside the sizes sampled")
        if approach == "approach2":
            few = [e["budget"] for e in block["budgets"] if not e["used"] and e["n_sizes"] < MIN_RUNS_PER_BUDGET]
            if few:
                notes.append(f"approach2: {len(few)} budget(s) with < {MIN_RUNS_PER_BUDGET} distinct sizes "
                             f"not used ({_list(few)} FLOPs)")
            other = [e for e in block["budgets"] if not e["used"] and e["n_sizes"] >= MIN_RUNS_PER_BUDGET]
            notes += [f"approach2: budget {e['budget']:.3g} not used: {e['reason']}" for e in other]
    return notes


def format_fit(result: dict) -> str:
    """The human-readable summary: data notes, then a table per family, then the crossovers."""
    ci = result["settings"]["ci"]
    lines = [f"runs: {result['source']['path']}"]
    lines += [f"  {note}" for note in result["notes"]]
    lines.append(f"  {result['settings']['grouping']}")
    if result["source"].get("flops_convention"):
        lines.append(f"  FLOPs as counted by the study: {'; '.join(result['source']['flops_convention'])}")
    head = f"  {'approach':<11} {'quantity':<9} {'value':>11}   {ci:.0%} interval"
    for name, fam in result["families"].items():
        lo, hi = fam["flops_range"]
        lines.append("")
        lines.append(f"{name}: {fam['n_runs']} runs, {fam['n_budgets']} IsoFLOP budgets with >= "
                     f"{MIN_RUNS_PER_BUDGET} sizes, C in [{lo:.3g}, {hi:.3g}] FLOPs")
        lines.append(head)
        for approach, k, value, interval in quantity_rows(fam):
            lines.append(f"  {approach:<11} {k:<9} {value:>11}   {interval or '(no bootstrap)'}")
        notes = fit_notes(fam)
        lines += [f"  note: {n}" for n in notes]
    pairs = result["crossover"]["pairs"]
    if pairs:
        lines.append("")
        lines.append("crossover:")
        lines += [f"  {' vs '.join(p['families'])}: {p['statement']}" for p in pairs]
    s, t = result["settings"], result["timing"]
    lines.append("")
    lines.append(f"bootstrap: {s['n_boot']} resamples, seed {s['seed']}, {s['n_jobs']} processes; "
                 f"fit time {t['point_estimates_s']:.1f} s point estimates + {t['bootstrap_s']:.1f} s bootstrap "
                 f"(wall; {t['cpu_s']:.1f} s CPU over all processes)")
    return "\n".join(lines)
