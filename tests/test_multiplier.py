"""The compute multiplier k(C) = C_base(L_fam(C)) / C: exact on known frontiers, recovered with honest intervals
from studies drawn from known laws, its trend and backtest, in fit.json and at the top of the report."""

import json
import math

import numpy as np
import pytest
from synthetic_study import SMALL_LM_LAWS, frontier_law, make_study

from ssmscale import fit
from ssmscale.fit.multiplier import baseline_compute, multiplier

TINY_GRID = fit.CHINCHILLA_GRID[::90]      # Approach 3 is not what these tests check
BUDGETS = (1e13, 1e14, 1e15, 1e16)
BASE = SMALL_LM_LAWS["transformer"]


def ahead_by(law: dict, k0: float) -> dict:
    """A family whose frontier at C is the baseline's at k0 C: E + K (k0 C)^-g = E + (K k0^-g) C^-g. Scaling A and
    B alike leaves the compute-optimal allocation as it was and scales the frontier prefactor K by the same factor."""
    g = law["alpha"] * law["beta"] / (law["alpha"] + law["beta"])
    return {**law, "A": law["A"] * k0 ** -g, "B": law["B"] * k0 ** -g}


def test_multiplier_of_known_frontiers_is_exact():
    base = {"E": 1.0, "A": 100.0, "alpha": 0.3}
    c = np.array([1e12, 1e13, 1e14])
    same = multiplier(base, base, c)
    assert np.allclose(same, 1.0)
    # a frontier equal to the baseline's at 4 C is ahead by 4 at every C
    fam = {"E": 1.0, "A": 100.0 * 4 ** -0.3, "alpha": 0.3}
    assert np.allclose(multiplier(fam, base, c), 4.0)
    # a family that reaches below the baseline's irreducible loss is out of its reach
    low = {"E": 0.9, "A": 100.0, "alpha": 0.3}
    assert np.isinf(multiplier(low, base, [1e40])[0])
    assert baseline_compute(base, [1.0 + 100.0 * 1e13 ** -0.3])[0] == pytest.approx(1e13, rel=1e-9)


def _fit(tmp_path, laws, n_boot=20, backtest=True):
    study = make_study(tmp_path, "m", laws=laws, budgets=BUDGETS, profile=False, noise=0.002)
    return fit.fit_study(study, n_boot=n_boot, n_jobs=1, progress=False, verbose=False, parametric_grid=TINY_GRID,
                         backtest=backtest), study


def test_a_constant_lead_is_recovered_flat_with_its_interval_and_backtested(tmp_path):
    laws = {"transformer": BASE, "ahead": ahead_by(BASE, 3.0)}
    truth = multiplier(frontier_law(laws["ahead"]), frontier_law(BASE), BUDGETS)
    assert np.allclose(truth, 3.0)
    result, study = _fit(tmp_path, laws)
    block = result["multiplier"]
    assert block["baseline"] == "transformer" and list(block["families"]) == ["ahead"]
    fam = block["families"]["ahead"]
    assert [r["budget"] for r in fam["budgets"]] == list(BUDGETS) and fam["largest"] == fam["budgets"][-1]
    for row in fam["budgets"]:
        k = row["k"]
        assert k["value"] == pytest.approx(3.0, rel=0.35)
        assert k["lo"] <= k["value"] <= k["hi"]
    assert fam["trend"]["verdict"] == "flat"
    assert fam["trend"]["exponent"]["lo"] < 0 < fam["trend"]["exponent"]["hi"]
    bt = fam["backtest"]
    assert bt["budget"] == BUDGETS[-1] and bt["are"] is not None and bt["covered"] is not None
    assert len(fam["curve"]["flops"]) == len(fam["curve"]["lo"]) == len(fam["curve"]["extrapolated"])
    text = (study / "fit.json").read_text()                          # fit.json carries it, as strict JSON
    assert json.loads(text)["multiplier"]["families"]["ahead"]["trend"]["verdict"] == "flat"
    assert "NaN" not in text and "Infinity" not in text
    assert "ahead: at its largest budget" in fit.format_fit(result)


def test_a_steeper_family_has_a_growing_multiplier_and_a_flatter_one_a_shrinking_one(tmp_path):
    steep = {**BASE, "alpha": 0.36, "beta": 0.33, "A": 2 * BASE["A"], "B": 2 * BASE["B"]}    # k ~ 3 -> 18
    flat = {**BASE, "alpha": 0.26, "beta": 0.23, "A": BASE["A"] / 2, "B": BASE["B"] / 2}     # k ~ 2.4 -> 1
    result, _ = _fit(tmp_path, {"transformer": BASE, "steep": steep, "flat": flat}, backtest=False)
    fams = result["multiplier"]["families"]
    for name, law, verdict in (("steep", steep, "growing"), ("flat", flat, "shrinking")):
        truth = multiplier(frontier_law(law), frontier_law(BASE), BUDGETS)
        assert (truth[-1] > truth[0]) == (verdict == "growing")
        assert fams[name]["trend"]["verdict"] == verdict, fams[name]["trend"]
        # k = (excess-loss ratio)^(1/g) with g ~ 0.14 magnifies small fit errors: the level within 50%
        assert np.allclose([r["k"]["value"] for r in fams[name]["budgets"]], truth, rtol=0.5)


def test_fit_json_holds_the_calibration_and_the_multiplier_and_a_refit_writes_the_same_bytes(tmp_path):
    laws = {"transformer": BASE, "ahead": ahead_by(BASE, 3.0)}
    study = make_study(tmp_path, "d", laws=laws, budgets=BUDGETS, profile=False, noise=0.002)
    kwargs = dict(n_boot=6, n_jobs=1, progress=False, verbose=False, parametric_grid=TINY_GRID)
    result = fit.fit_study(study, **kwargs)
    first = (study / "fit.json").read_bytes()
    data = json.loads(first)
    assert data["calibration"]["mode"] == "budgets" and data["calibration"]["table"]      # the backtest's
    assert "backtest" in data["multiplier"]["families"]["ahead"]                           # its refits, too
    assert "refits" not in data and "samples" not in data                                  # never on disk
    text = fit.format_fit(result)
    assert "calibration (95% intervals on the backtests" in text and "compute multiplier against transformer" in text
    fit.fit_study(study, **kwargs)
    assert (study / "fit.json").read_bytes() == first


def test_the_baseline_can_be_chosen_and_a_missing_one_is_said(tmp_path):
    laws = {"transformer": BASE, "ahead": ahead_by(BASE, 2.0)}
    study = make_study(tmp_path, "b", laws=laws, budgets=BUDGETS[:3], profile=False, noise=0.002)
    loaded = fit.load_runs(study)
    other = fit.fit_runs(loaded, n_boot=0, n_jobs=1, progress=False, parametric_grid=TINY_GRID, baseline="ahead")
    k = other["multiplier"]["families"]["transformer"]["largest"]["k"]["value"]
    assert k == pytest.approx(0.5, rel=0.35) and other["settings"]["baseline"] == "ahead"
    assert other["multiplier"]["families"]["transformer"]["backtest"]["skipped"].startswith("it needs both frontiers")
    none = fit.fit_runs(loaded, n_boot=0, n_jobs=1, progress=False, parametric_grid=TINY_GRID, baseline="rwkv")
    assert none["multiplier"]["skipped"].startswith("no rwkv runs")
    assert "compute multiplier against rwkv: not computed" in fit.format_fit(none)


def test_a_value_that_needs_the_baseline_beyond_its_data_is_marked_extrapolated():
    base = {"E": 1.0, "A": 100.0, "alpha": 0.3, "range": [1e12, 1e14], "points": {"budget": [1e12, 1e13, 1e14]}}
    fam = {**base, "A": 100.0 * 50 ** -0.3}                           # ahead by 50: needs the baseline at 50 C
    point = {"transformer": {"frontier": base}, "x": {"frontier": fam}}
    rows = fit.fit_multipliers(point, [], 0.95)["families"]["x"]["budgets"]
    assert [r["extrapolated"] for r in rows] == [False, True, True]
    assert [round(r["k"]["value"], 6) for r in rows] == [50.0] * 3


def test_the_report_leads_with_the_multiplier_table_and_figure_and_refits_a_fit_without_one(tmp_path, monkeypatch):
    from ssmscale.report.scaling import write_report
    monkeypatch.chdir(tmp_path)
    laws = {"transformer": BASE, "ahead": ahead_by(BASE, 3.0)}
    study = make_study(tmp_path, "r", laws=laws, budgets=BUDGETS[:3], profile=False, noise=0.002)
    fit.fit_study(study, n_boot=4, n_jobs=1, progress=False, verbose=False, parametric_grid=TINY_GRID)
    old = json.loads((study / "fit.json").read_text())
    old.pop("multiplier")                      # a fit.json from before the multiplier
    old["settings"].pop("baseline")
    (study / "fit.json").write_text(json.dumps(old))
    assert not fit.is_default_fit(old)
    monkeypatch.setattr(fit.laws, "CHINCHILLA_GRID", TINY_GRID)
    report = write_report(study, tmp_path / "out", n_boot=4).read_text()
    assert "multiplier" in json.loads((study / "fit.json").read_text())
    head = report.split("## Summary")[0]
    assert "## Compute multiplier" in head and "![multiplier.png](multiplier.png)" in head
    assert "| budget C | ahead: k [95%] |" in head and "ahead: at its largest budget" in head
    png = (tmp_path / "out" / "multiplier.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert math.isfinite(json.loads((study / "fit.json").read_text())["multiplier"]["families"]["ahead"]["largest"]
                         ["k"]["value"])


def test_a_fit_json_listing_other_families_in_its_multiplier_draws_only_the_fitted_ones(tmp_path):
    from ssmscale.report.colors import family_colors
    from ssmscale.report.figures import _figure, _sci
    from ssmscale.report.multiplier import multiplier_section
    result, _ = _fit(tmp_path, {"transformer": BASE, "ahead": ahead_by(BASE, 3.0)}, n_boot=4, backtest=False)
    planted = fit.fit_json(result)
    block = planted["multiplier"]["families"]
    block.update({f"x{i}": block["ahead"] for i in range(3000)})     # as a fit.json from elsewhere may hold
    lines, figures = multiplier_section(planted, family_colors(set(planted["families"])), _figure, _sci)
    text = "\n".join(lines)
    assert "ahead: at its largest budget" in text and "x0" not in text and "x2999" not in text
    assert len(figures["multiplier.png"].axes[0].get_lines()) < 10
