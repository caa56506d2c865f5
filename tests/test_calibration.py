"""Calibrated prediction intervals: near-nominal coverage on errors from a known model, no wider than
needed, lopsided only when the errors lean one way; on a CSV of single runs drawn from a known noisy law
the threshold backtest's intervals hold and vary; a bootstrap that cannot vary is said out loud."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ssmscale import fit
from ssmscale.fit import calibration
from synthetic_study import LAWS, law_loss, make_runs

TINY_GRID = fit.CHINCHILLA_GRID[::90]


def _draw(rng, n, s0=0.005, sigma=0.01, tau=0.03, bias=0.0):
    d = rng.uniform(0.2, 1.2, n)
    s = np.sqrt(s0 ** 2 + sigma ** 2 + (tau * d) ** 2)
    return [calibration.Record(float(e), float(x), s0) for e, x in zip(bias * s + s * rng.standard_normal(n), d)]


def _coverage_and_ratio(records_per_trial: int, trials: int = 300, bias: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    inside, widths, errors = 0, [], []
    for _ in range(trials):
        model = calibration.calibrate(_draw(rng, records_per_trial, bias=bias), 0.95)
        (test,) = _draw(rng, 1, bias=bias)
        lo, hi = calibration.interval(1.0, test.d, 0.0, model)
        inside += lo <= math.exp(test.e) <= hi
        widths.append(math.log(hi / lo))
        errors.append(abs(test.e))
    return inside / trials, float(np.median(widths) / np.median(errors))


def test_intervals_from_a_known_error_model_cover_near_nominal_with_conformal_and_student_t():
    for n in (30, 12):                     # split-conformal (n >= 19 at 95%), then Student-t
        coverage, ratio = _coverage_and_ratio(n)
        assert 0.90 <= coverage <= 0.99, (n, coverage)
        assert 4.5 < ratio < 9.0, (n, ratio)      # ~5.8 for normal errors: calibrated, not padded


def test_errors_that_lean_one_way_shift_the_interval_and_still_cover():
    rng = np.random.default_rng(3)
    model = calibration.calibrate(_draw(rng, 40, bias=1.5), 0.95)
    assert model["center"] > 0.5 and model["lean_p"] < 0.05
    lo, hi = calibration.interval(1.0, 0.5, 0.0, model)
    assert hi - 1.0 > 2 * (1.0 - lo)          # lopsided toward where the errors fall
    coverage, _ = _coverage_and_ratio(30, bias=1.5, seed=5)
    assert coverage >= 0.90
    centred = calibration.calibrate(_draw(rng, 40), 0.95)
    assert centred["center"] == 0.0           # no lean: symmetric around the prediction


def test_too_few_backtest_errors_calibrate_nothing():
    model = calibration.calibrate(_draw(np.random.default_rng(0), calibration.MIN_RECORDS - 1), 0.95)
    assert "skipped" in model
    assert calibration.interval(1.0, 0.3, 0.0, model) == (None, None)


def test_a_law_fitted_through_every_point_has_zero_in_sample_scatter():
    assert calibration.in_sample_scale([0.0, 0.0, 0.0], 3, 3) == 0.0
    assert calibration.in_sample_scale([], 10, 3) is None
    assert calibration.in_sample_scale([0.01, -0.01, 0.02, -0.02], 8, 5) > 0.01


def _single_runs(n_sizes=9, noise=0.01, seed=0) -> pd.DataFrame:
    """A grid of single runs without a budget column: every run has its own FLOPs (no IsoFLOP groups)."""
    rng = np.random.default_rng(seed)
    law = LAWS["transformer"]
    rows = []
    for n in np.geomspace(2e7, 2e9, n_sizes):
        for tpp in (5, 10, 20, 40, 80):
            d = n * tpp * rng.uniform(0.9, 1.1)          # jitter: no two runs share their FLOPs
            rows.append({"params": n, "tokens": d, "loss": float(law_loss(law, n, d)) * math.exp(noise * rng.standard_normal())})
    return pd.DataFrame(rows)


def test_single_runs_without_budgets_get_intervals_that_vary_and_hold(tmp_path):
    covered = checked = 0
    for seed in (0, 1, 2):                 # three draws of the noise: coverage is a rate, not one outcome
        df = _single_runs(n_sizes=12, seed=seed)
        path = tmp_path / f"runs{seed}.csv"
        df.to_csv(path, index=False)
        loaded = fit.load_runs(path)
        assert loaded.table["group_flops"].nunique() > 0.8 * len(df)      # nearly every run its own group
        threshold = float(np.quantile(6 * df["params"] * df["tokens"], 0.7))
        result = fit.fit_runs(loaded, n_boot=20, n_jobs=1, progress=False, parametric_grid=TINY_GRID,
                              holdout_above=threshold)
        par = result["families"]["all"]["parametric"]
        assert par["collapsed"] == []
        for k in ("E", "alpha", "beta"):
            assert par[k]["hi"] > par[k]["lo"], k                   # resampled over runs: the intervals vary
        assert "within each family (no budget column" in result["settings"]["bootstrap"]
        bt = result["families"]["all"]["backtest"]
        assert bt["inner_cuts"]                                       # calibrated on the kept runs alone
        cal = bt["parametric"]["calibrated"]
        assert cal["checked"] == bt["n_held_out"] == 18
        covered, checked = covered + cal["covered"], checked + cal["checked"]
    assert covered >= 0.8 * checked, (covered, checked)                # 95% nominal, a few dozen runs


def test_a_bootstrap_that_cannot_vary_is_flagged_not_silent(tmp_path):
    df = _single_runs(n_sizes=4)
    df["budget"] = 6 * df["params"] * df["tokens"]          # a budget column with one run per budget
    path = tmp_path / "runs.csv"
    df.to_csv(path, index=False)
    result = fit.fit_runs(fit.load_runs(path), n_boot=10, n_jobs=1, progress=False, parametric_grid=TINY_GRID,
                          backtest=False)
    assert any("hold a single run" in note for note in result["notes"])
    par = result["families"]["all"]["parametric"]
    assert set(par["collapsed"]) >= {"E", "A", "B", "alpha", "beta"}
    notes = fit.fit_notes(result["families"]["all"])
    assert any("zero width" in n and "say nothing" in n for n in notes)
    assert "zero width" in fit.format_fit(result)


def test_a_studys_budget_backtest_carries_cross_fitted_calibrated_intervals(tmp_path):
    df = make_runs(budgets=(1e12, 1e13, 1e14, 1e15, 1e16), noise=0.005, lrs=(1e-3,), n_bad=0, seed=7)
    path = tmp_path / "runs.csv"
    df.to_csv(path, index=False)
    result = fit.fit_runs(fit.load_runs(path), n_boot=8, n_jobs=1, progress=False, parametric_grid=TINY_GRID)
    cal = result["calibration"]
    assert cal["mode"] == "budgets" and cal["ci"] == 0.95
    labels = {(r["approach"], r["quantity"]) for r in cal["table"]}
    assert labels == {("frontier", "loss"), ("approach2", "n_opt"), ("parametric", "loss"), ("parametric", "n_opt")}
    v = result["families"]["mamba"]["backtest"]["holdouts"][0]["held_out"][0]["frontier"]["loss"]
    assert v["distance"] > 0 and v["calibrated"]["n_cal"] >= 1
    # a prediction's own budget and refit never calibrate it: 2 families x 3 held-out predictions, and
    # the other family's prediction of the same budget is left out too
    assert v["calibrated"]["n_cal"] < cal["models"]["frontier"]["loss"]["n"]
    text = fit.format_fit(result)
    assert "calibration (95% intervals on the backtests" in text
