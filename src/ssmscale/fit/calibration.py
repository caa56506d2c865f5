"""Calibrated prediction intervals: built from the errors each law made on data it was not fitted on.

A law's prediction p of an observation y has the log error e = ln(y / p). The backtests measure e on
held-out budgets (or runs) at an extrapolation distance d, in decades of compute beyond the largest
budget (or run) the law was fitted on. The error model is

    e = s z,    s = sqrt(s0^2 + sigma^2 + b^2 + (tau d)^2),

- s0: the scatter of the fits, from the in-sample residuals of the points each law describes (the best
  run of each budget for a best-loss law, the IsoFLOP vertices for N_opt, every fitted run for a law of
  single runs), robust (1.4826 x median |r|) and inflated by sqrt(n / (n - p)) for the p fitted
  parameters; each backtest refit has its own, and the model takes their median. It is a floor: the Huber
  fit (nearly least absolute deviations) passes close to some of its points, so in-sample residuals
  understate the noise of a new observation;
- b: the spread of this one prediction over the bootstrap refits (half the distance between their 16th and
  84th percentiles, in log): the law's parameter uncertainty, large for a fit on few budgets or far from
  them, small for a well-pinned one (0 without a bootstrap);
- sigma (the noise of an observation beyond s0: seed noise, the best of a few runs) and tau (the model
  error, how fast the error grows per decade of extrapolation): fitted to the backtest errors by maximum
  likelihood, e normal with standard deviation s;
- z: the normalised errors e / s of the backtests. Their quantile sets the width: the split-conformal
  quantile (the ceil((n + 1) ci)-th smallest |z|, finite-sample coverage whatever the error distribution)
  when there are enough records for it (n >= ci / (1 - ci), 19 at 95%), else a Student-t prediction
  quantile of the normalised errors. The interval is centred on the point prediction unless a sign test
  over the observations predicted says the errors lean one way (two-sided p < SIGN_TEST_P) and no family's
  errors lean the other way: then
  it is centred on the median z, which makes it lopsided around the prediction in the direction the
  evidence shows, growing with s.

The interval is p exp((c - q) s), p exp((c + q) s). Records from one fit are correlated, and records
with one held-out target share its luck; so the backtests' own intervals are cross-fitted: each one is
calibrated on the records of other targets and other fits only (the prediction's own error, and its
target's, never calibrate it), which is what the calibration table's achieved coverage measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, t as student_t

MIN_RECORDS = 4          # fewer backtest errors than this calibrate nothing
SIGN_TEST_P = 0.01       # errors lean one way when a two-sided sign test rejects at this level (strict:
                         # observations predicted by the same refits are not independent)
LOG_BOUND = -20.0        # sigma and tau below exp(-20) are 0
SCALE_FLOOR = 1e-4       # s(d) never below this (a fit through every point has s0 = 0)


@dataclass(frozen=True)
class Record:
    """One backtest error: e = ln(observed / predicted) at distance d (decades) from a fit with scatter s0,
    the prediction's bootstrap spread b. `target` names what was predicted (a budget), `group` the fit that
    predicted it (family and split)."""
    e: float
    d: float
    s0: float
    b: float = 0.0
    target: object = None
    group: object = None


def in_sample_scale(residuals, n_fitted: int, n_params: int) -> float | None:
    """Robust scatter of a fit's log residuals, inflated for the parameters fitted (None: no residuals; 0 for a
    law fitted exactly through its points, whose scatter it cannot show: the model error tau carries it all)."""
    r = np.asarray([x for x in residuals if x is not None and np.isfinite(x)], float)
    if len(r) == 0:
        return None
    if n_fitted <= n_params:
        return 0.0
    return float(1.4826 * np.median(np.abs(r)) * math.sqrt(n_fitted / (n_fitted - n_params)))


def log_spread(values) -> float:
    """Half the distance between the 16th and 84th percentiles of ln(values): a robust standard deviation
    (0 with fewer than two values)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0], float)
    if len(v) < 2:
        return 0.0
    lo, hi = np.percentile(np.log(v), [15.87, 84.13])
    return float((hi - lo) / 2)


def scale(s0: float, sigma: float, b: float, d: float, tau: float) -> float:
    return max(SCALE_FLOOR, math.sqrt(s0 * s0 + sigma * sigma + b * b + (tau * max(d, 0.0)) ** 2))


def _fit_sigma_tau(e: np.ndarray, d: np.ndarray, b: np.ndarray, s0: float) -> tuple[float, float]:
    """sigma, tau >= 0 maximising the normal likelihood of the errors e (Nelder-Mead in their logs, from the
    errors' root mean square; a value that runs to the lower bound is 0)."""
    from scipy.optimize import minimize
    base = s0 * s0 + b * b

    def nll(x):
        var = np.maximum(base + math.exp(2 * x[0]) + math.exp(2 * x[1]) * d * d, SCALE_FLOOR ** 2)
        return float(0.5 * np.sum(np.log(var) + e * e / var))

    rms = math.log(max(float(np.sqrt(np.mean(e * e))), SCALE_FLOOR))
    res = minimize(nll, [rms - 1.0, rms - 1.0], method="Nelder-Mead",
                   options={"xatol": 1e-6, "fatol": 1e-10, "maxiter": 2000})
    x = np.clip(res.x, LOG_BOUND, -LOG_BOUND)
    sigma, tau = (0.0 if v <= LOG_BOUND + 1 else math.exp(v) for v in x)
    return sigma, tau


def calibrate(records: list[Record], ci: float) -> dict:
    """The error model fitted to these records: {"n", "tau", "center", "q", "method"}, or {"n", "skipped"}."""
    n = len(records)
    if n < MIN_RECORDS:
        return {"n": n, "skipped": f"{n} backtest errors, calibration needs >= {MIN_RECORDS}"}
    e = np.array([r.e for r in records])
    d = np.array([r.d for r in records])
    b = np.array([r.b for r in records])
    s0 = float(np.median([r.s0 for r in records]))
    sigma, tau = _fit_sigma_tau(e, d, b, s0)
    z = e / np.array([scale(s0, sigma, bi, di, tau) for bi, di in zip(b, d)])
    center, lean_p = _lean(records, z)
    r = np.abs(z - center)
    k = math.ceil((n + 1) * ci)
    if k <= n:
        q, method = float(np.sort(r)[k - 1]), "split-conformal"
    else:
        dof = n - (1 if center else 0)
        sd = math.sqrt(float((r ** 2).sum()) / dof)
        q = float(student_t.ppf(0.5 + ci / 2, dof) * sd * math.sqrt(1 + 1 / n))
        method = f"Student-t ({n} errors, conformal needs {math.ceil(ci / (1 - ci))})"
    return {"n": n, "s0": s0, "sigma": sigma, "tau": tau, "center": center, "lean_p": lean_p, "q": q, "method": method}


def _family(r: Record):
    return r.group[0] if isinstance(r.group, tuple) else r.group


def _lean(records: list[Record], z: np.ndarray) -> tuple[float, float]:
    """(centre, sign-test p) of the normalised errors. One observation predicted by several refits is one piece
    of evidence, so the test runs over observations (family and target; the mean z of each), not records. A
    lean counts only when significant and no family's errors lean the other way (a family-specific bias is
    not evidence about the others' predictions); otherwise the centre is 0."""
    units: dict = {}
    for i, r in enumerate(records):
        units.setdefault((_family(r), r.target) if r.target is not None else i, []).append(i)
    zu = np.array([z[ix].mean() for ix in units.values()])
    fam = [_family(records[ix[0]]) for ix in units.values()]
    nonzero = int((zu != 0).sum())
    lean_p = float(binomtest(int((zu > 0).sum()), nonzero, 0.5).pvalue) if nonzero else 1.0
    center = float(np.median(zu))
    medians = [float(np.median(zu[[g == f for g in fam]])) for f in set(fam)]
    if lean_p >= SIGN_TEST_P or any(m * center < 0 for m in medians):
        return 0.0, lean_p
    return center, lean_p


def interval(pred: float | None, d: float, b: float, model: dict) -> tuple[float | None, float | None]:
    """The calibrated interval for a prediction at distance d (decades beyond the fitted range) whose
    bootstrap spread is b."""
    if pred is None or "skipped" in model or not np.isfinite(pred) or pred <= 0:
        return None, None
    s = scale(model["s0"], model["sigma"], b, d, model["tau"])
    return pred * math.exp((model["center"] - model["q"]) * s), pred * math.exp((model["center"] + model["q"]) * s)


def coverage_row(entries: list[dict]) -> dict:
    """Summary of predictions with observed value, ARE and an interval: {"checked", "covered", "median_abs_error"
    (of ln(observed / predicted)), "median_width" (ln(hi / lo)), "width_ratio" (median width / median |error|;
    about 2 x 1.96 / 0.674 = 5.8 for calibrated 95% intervals of normal errors)}."""
    done = [x for x in entries if x.get("lo") is not None and x.get("observed") is not None]
    if not done:
        return {"checked": 0, "covered": 0, "median_abs_error": None, "median_width": None, "width_ratio": None}
    err = np.array([abs(math.log(x["observed"] / x["predicted"])) for x in done])
    width = np.array([math.log(x["hi"] / x["lo"]) for x in done])
    mae = float(np.median(err))
    return {"checked": len(done), "covered": int(sum(x["lo"] <= x["observed"] <= x["hi"] for x in done)),
            "median_abs_error": mae, "median_width": float(np.median(width)),
            "width_ratio": float(np.median(width) / mae) if mae > 0 else None}
