"""How far the fits can be trusted: backtests pass on a known law and flag a broken one, seed noise widens
the intervals, Approach 1 and the wall-clock fit recover known answers, and a refit rewrites the same bytes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ssmscale import fit
from synthetic_study import LAWS, allocation, frontier_law, law_loss, make_runs, make_study, optimal_params

SMALL_GRID = fit.CHINCHILLA_GRID[::15]
TINY_GRID = fit.CHINCHILLA_GRID[::90]
BUDGETS = (1e13, 1e14, 1e15, 1e16, 1e17)


def _fit(tmp_path, df, name="runs.csv", **kwargs):
    path = tmp_path / name
    df.to_csv(path, index=False)
    kwargs = {"n_boot": 30, "n_jobs": 1, "progress": False, "parametric_grid": SMALL_GRID, **kwargs}
    return fit.fit_runs(fit.load_runs(path), **kwargs)


def _law_study(budgets=BUDGETS[:4]):
    """One family from Chinchilla's law: 7 sizes per budget, 0.1% noise, one learning rate."""
    return make_runs({"transformer": LAWS["transformer"]}, budgets=budgets, noise=0.001, lrs=(1e-3,), n_bad=0,
                     seed=4)


def _held_all(result, family="transformer", k=1):
    return next(e for e in result["families"][family]["backtest"]["holdouts"] if e["k"] == k)["held_out"]


def _held(result, family="transformer", k=1):
    (row,) = _held_all(result, family, k)
    return row


# ------------------------------------------------------------------------------------ backtest

def test_a_study_drawn_from_a_known_law_backtests_below_1_percent(tmp_path):
    result = _fit(tmp_path, _law_study(BUDGETS))
    bt = result["families"]["transformer"]["backtest"]
    assert [e["k"] for e in bt["holdouts"]] == [1, 2]          # 5 budgets: hold out 1 or 2, keep >= 3
    row = _held(result)
    assert row["budget"] == 1e17 and bt["holdouts"][0]["fit_budgets"] == [1e13, 1e14, 1e15, 1e16]
    assert [h["budget"] for h in _held_all(result, k=2)] == [1e16, 1e17]
    for approach in ("frontier", "parametric"):
        v = row[approach]["loss"]
        assert v["are"] < 0.01 and v["covered"], (approach, v)
    assert row["approach2"]["n_opt"]["are"] < 0.05 and row["parametric"]["n_opt"]["are"] < 0.05
    assert bt["flags"] == []
    assert "BACKTEST FLAG" not in fit.format_fit(result)


def test_a_break_in_the_law_at_the_top_budget_is_flagged(tmp_path):
    df = _law_study()
    df.loc[df["budget"] == 1e16, "loss"] *= 1.10        # the law stops holding at the largest budget
    result = _fit(tmp_path, df, n_boot=20)
    row = _held(result)
    for approach in ("frontier", "parametric"):
        v = row[approach]["loss"]
        assert v["are"] > 0.05 and v["covered"] is False, (approach, v)
    flags = result["families"]["transformer"]["backtest"]["flags"]
    assert any(f.startswith("frontier fitted without the 1 largest budget(s) predicts best loss") for f in flags)
    assert "did not extrapolate" in fit.format_fit(result)


def test_backtest_compares_the_predicted_order_of_two_families(tmp_path):
    df = make_runs(budgets=BUDGETS[:4], noise=0.001, lrs=(1e-3,), n_bad=0, seed=5)
    result = _fit(tmp_path, df, parametric_grid=TINY_GRID, n_boot=10)
    (pair,) = result["backtest"]["pairs"]
    (row,) = pair["held_out"]
    top = df[df["budget"] == 1e16].groupby("family")["loss"].min()
    assert row["budget"] == 1e16 and row["observed_lower"] == top.idxmin()
    assert row["observed_gap"] == pytest.approx(top["transformer"] - top["mamba"])
    assert row["frontier"]["predicted_lower"] in ("mamba", "transformer")
    assert row["frontier"]["order_matches"] == (row["frontier"]["predicted_lower"] == row["observed_lower"])


def test_threshold_backtest_predicts_the_runs_above_it(tmp_path):
    df = _law_study()[["params", "tokens", "loss"]]           # single runs, no budgets (like Chinchilla's CSV)
    result = _fit(tmp_path, df, holdout_above=2e15, n_boot=10)
    bt = result["families"]["all"]["backtest"]
    assert result["backtest"]["mode"] == "threshold"
    assert bt["n_held_out"] == 7 and bt["n_fit"] == 21
    assert bt["parametric"]["mean_are"] < 0.01 and len(bt["parametric"]["runs"]) == 7
    assert all(r["flops"] > 2e15 for r in bt["parametric"]["runs"]) and bt["flags"] == []
    assert "predicts the 7 runs above it" in fit.format_fit(result)


# ------------------------------------------------------------------------------------ seed noise

def _with_seeds(df, spread):
    """Two more seeds of each budget's best configuration, at +spread and -spread (relative): the mean and
    so the best configuration stay, the seed-to-seed spread is 2 x spread."""
    extra = []
    for _, g in df.groupby(["family", "budget"]):
        best = g.loc[g["loss"].idxmin()]
        for s, sign in ((1, 1), (2, -1)):
            extra.append({**best.to_dict(), "seed": s, "loss": best["loss"] * (1 + sign * spread),
                          "run_id": f"{best['run_id']}_s{s}"})
    return pd.concat([df, pd.DataFrame(extra)], ignore_index=True)


def test_seed_noise_widens_the_intervals_and_is_shown_beside_the_gaps(tmp_path):
    base = make_runs(budgets=BUDGETS[:3], noise=0.001, lrs=(1e-3,), n_bad=0, seed=6, size_factors=(0.25, 0.5, 1, 2, 4))
    one = _fit(tmp_path, base, "one.csv", parametric_grid=TINY_GRID, backtest=False)
    three = _fit(tmp_path, _with_seeds(base, 0.03), "three.csv", parametric_grid=TINY_GRID, backtest=False)
    for family in ("mamba", "transformer"):
        w1 = [p["loss_hi"] - p["loss_lo"] for p in one["families"][family]["frontier"]["points"]]
        w3 = [p["loss_hi"] - p["loss_lo"] for p in three["families"][family]["frontier"]["points"]]
        assert np.mean(w3) > 1.5 * np.mean(w1), (family, w1, w3)
        points = three["families"][family]["frontier"]["points"]
        assert [p["n_seeds"] for p in points] == [3, 3, 3] and all(p["seed_spread"] > 0 for p in points)
        noise = three["families"][family]["seed_noise"]
        assert len(noise["configurations"]) == 3 and noise["max_spread"] == max(p["seed_spread"] for p in points)
    assert three["dropped"]["seed_duplicates_averaged"] == 12
    (pair,) = three["seed_noise"]["pairs"]
    assert [r["within_seed_noise"] is not None for r in pair["budgets"]] == [True] * 3
    assert all(r["within_seed_noise"] == (abs(r["gap"]) <= max(r["seed_spread"].values())) for r in pair["budgets"])
    assert "seed spread" in fit.format_fit(three) and "seed spread" not in fit.format_fit(one)


# ------------------------------------------------------------------------------------ Approach 1, wall clock

def test_approach1_envelope_recovers_the_allocation_of_known_loss_curves():
    law = LAWS["transformer"]
    budgets = 10.0 ** np.arange(15, 19.5, 0.5)
    params, tokens, flops, loss, curves = [], [], [], [], []
    for c in budgets:
        for f in (0.25, 0.5, 1, 2, 4):
            n = float(optimal_params(law, c)) * f
            d = c / (6 * n)
            fractions = 10.0 ** (-1 + np.arange(9) / 8)        # the eval points: one decade up to the end
            curve_d = d * np.append(fractions[:-1], 1.0)
            params.append(n), tokens.append(d), flops.append(c), loss.append(float(law_loss(law, n, d)))
            curves.append(np.array([6 * n * curve_d, law_loss(law, n, curve_d)]))
    runs = fit.FamilyRuns.from_arrays(params, tokens, loss, flops=flops, budget=flops)
    runs = fit.FamilyRuns(*[getattr(runs, k) for k in ("params", "tokens", "flops", "loss", "group", "budgets",
                                                     "frontier_budgets")], curves=tuple(curves))
    got = fit.fit_approach1(runs)
    assert abs(got["a"] - allocation(law)["a"]) < 0.04
    assert abs(got["b"] - allocation(law)["b"]) < 0.04
    env = got["envelope"]
    best = fit.frontier_loss(frontier_law(law), env["flops"])   # the law's own minimum over every size
    assert np.all(env["loss"] >= best - 1e-9) and np.all(env["loss"] <= best * 1.02)


def test_wall_clock_fits_the_time_pareto_front_and_finds_the_crossover_in_seconds(tmp_path):
    rows = []
    # 2.0 + 100 t^-0.2 (transformer) and 1.9 + 200 t^-0.2 (mamba) cross at t^-0.2 = 1e-3, t = 1e15 s
    for family, e, a in (("transformer", 2.0, 100.0), ("mamba", 1.9, 200.0)):
        for t in 10.0 ** np.arange(12, 18.5, 0.5):
            best = e + a * t ** -0.2
            for n, extra, slow in ((1e6, 0.05, 1.3), (2e6, 0.0, 1.0), (4e6, 0.08, 1.1)):
                rows.append({"family": family, "params": n, "tokens": t / (6 * n), "budget": t, "loss": best + extra,
                             "train_s": t * slow, "device": "cpu (test CPU, 2 threads)"})
    result = _fit(tmp_path, pd.DataFrame(rows), parametric_grid=TINY_GRID, n_boot=10, backtest=False)
    w = result["families"]["mamba"]["wallclock"]
    assert len(w["points"]) == 13 and w["n_timed"] == 39      # the slower, worse runs are off the front
    (pair,) = result["wallclock"]["crossover"]["pairs"]
    (crossing,) = pair["crossings"]
    assert crossing["flops"]["value"] == pytest.approx(1e15, rel=0.05) and crossing["lower_above"] == "mamba"
    statement = fit.format_fit(result)
    assert "on cpu (test CPU, 2 threads)" in statement and "holds for that machine" in statement
    assert "s of training" in pair["statement"]


# ------------------------------------------------------------------------------------ determinism

def test_two_fits_of_the_same_study_write_identical_fit_json_bytes_whatever_the_worker_count(tmp_path):
    study = make_study(tmp_path, budgets=BUDGETS[:4], profile=False, size_factors=(0.25, 0.5, 1, 2, 4))
    first, _ = fit.fit_path(study, out=tmp_path / "a", n_boot=12, n_jobs=2, progress=False, parametric_grid=TINY_GRID)
    fit.fit_path(study, out=tmp_path / "b", n_boot=12, n_jobs=1, progress=False, parametric_grid=TINY_GRID)
    a, b = ((tmp_path / d / "fit.json").read_bytes() for d in ("a", "b"))
    assert a == b
    assert "timing" in first and "timing" not in json.loads(a)     # timings go to stdout, not into the file
    assert json.loads(a)["families"]["mamba"]["backtest"]["holdouts"]
