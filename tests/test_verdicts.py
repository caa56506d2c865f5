"""What stands beside a verdict: sanity flags on a law whose numbers are suspect, the decision accuracy of the
laws against ranking at the largest budget trained, and the caveats the Summary states with each verdict."""

from __future__ import annotations


from ssmscale import fit
from ssmscale.fit.decision import decision_accuracy
from ssmscale.fit.sanity import sanity_flags
from ssmscale.report.caveats import family_caveats, pair_caveats, weakened
from ssmscale.report.figures import _sci
from synthetic_study import LAWS, frontier_law, make_runs

BUDGETS = (1e13, 1e14, 1e15, 1e16)


def _family(law=LAWS["transformer"]):
    df = make_runs({"transformer": law}, budgets=BUDGETS, noise=0.0, lrs=(1e-3,), n_bad=0)
    return fit.FamilyRuns.from_arrays(df["params"], df["tokens"], df["loss"], budget=df["budget"])


def test_the_true_law_raises_no_sanity_flag():
    law = LAWS["transformer"]
    assert sanity_flags({"frontier": frontier_law(law), "parametric": dict(law)}, _family()) == []


def test_a_floor_above_the_data_and_an_exponent_at_its_edge_are_flagged():
    law = LAWS["transformer"]
    runs = _family()
    high = {**law, "E": float(runs.loss.min()) + 0.05}           # E above a loss some run reached
    front = frontier_law(law)
    offset = {**front, "E": front["E"] * 1.02, "A": front["A"] * 1.02}   # 2% above at every budget: no bend
    flags = sanity_flags({"parametric": high, "frontier": offset}, runs)
    kinds = {(f["approach"], f["kind"]) for f in flags}
    assert ("parametric", "E above an observed loss") in kinds
    # a floor too high weighs most where the power terms have shrunk: the law rises above the largest budgets
    assert ("parametric", "above the data at the largest budgets") in kinds
    assert not any(f["approach"] == "frontier" for f in flags)
    edge = sanity_flags({"frontier": {**frontier_law(law), "alpha": 1.2}}, runs)
    assert [f["kind"] for f in edge] == ["exponent at the edge of its search"]
    assert all(f["message"].startswith(f["approach"] + ":") for f in flags)
    notes = fit.fit_notes({"frontier": {"skipped": "x"}, "sanity": flags})
    assert any(n.startswith("SANITY FLAG: parametric: the irreducible loss E") for n in notes)


def _two_families():
    """Family a wins at the three smaller budgets, b at the largest: a crossover the baseline cannot see."""
    runs = {}
    for name, best in (("a", [3.0, 2.8, 2.6, 2.45]), ("b", [3.1, 2.85, 2.62, 2.40])):
        params, tokens, loss, budget = [], [], [], []
        for c, top in zip(BUDGETS, best):
            for f, extra in ((0.5, 0.05), (1.0, 0.0), (2.0, 0.05)):
                n = 1e6 * f * c / 1e13
                params.append(n), tokens.append(c / (6 * n)), loss.append(top + extra), budget.append(c)
        runs[name] = fit.FamilyRuns.from_arrays(params, tokens, loss, budget=budget)
    return runs


def test_decision_accuracy_scores_the_laws_against_ranking_at_the_largest_budget_trained():
    runs = _two_families()
    holdouts = [{"k": 1, "fit_budgets": list(BUDGETS[:3])}]
    tested = {"families": {f: {"holdouts": holdouts} for f in runs},
              "pairs": [{"families": ["a", "b"], "held_out": [
                  {"k": 1, "budget": 1e16, "observed_lower": "b",
                   "frontier": {"predicted_lower": "b", "order_matches": True},
                   "parametric": {"predicted_lower": "a", "order_matches": False}}]}]}
    got = decision_accuracy(runs, tested)
    (row,) = got["rows"]
    assert row["baseline"] == {"reference_budget": 1e15, "lower": "a", "right": False}
    assert got["summary"] == {"frontier": {"right": 1, "n": 1}, "parametric": {"right": 0, "n": 1},
                              "baseline": {"right": 0, "n": 1}}
    assert "favours the laws (the frontier law)" in got["statement"]
    tested["pairs"][0]["held_out"][0]["frontier"]["order_matches"] = False
    assert "favours the single-scale baseline" not in decision_accuracy(runs, tested)["statement"]
    tested["pairs"][0]["held_out"][0]["observed_lower"] = "a"
    assert "favours the single-scale baseline" in decision_accuracy(runs, tested)["statement"]


def test_the_summary_states_what_weakens_each_verdict():
    fam = {"frontier": {"points": [{"budget": 1e13, "best_at_edge": True}, {"budget": 1e14, "best_at_edge": False}]},
           "approach2": {"budgets": [{"budget": 1e13, "used": False, "reason": "minimum N = 3e5 lies outside the "
                                                                              "sampled sizes [1e6, 4e6]"}]},
           "backtest": {"flags": ["x"]}, "sanity": [{"approach": "parametric", "kind": "k", "message": "parametric: m"}]}
    grid = [{"family": "a", "edge": True}, {"family": "a", "edge": False}, {"family": "b", "edge": True}]
    caveats = family_caveats("a", fam, grid, _sci)
    assert caveats[0] == "best learning rate at an end of its grid at 1 (size, budget) point(s)"
    assert any("smallest or largest size tried at 1e13" in c for c in caveats)
    assert any("minimum outside the sampled sizes at 1e13" in c for c in caveats)
    assert "1 backtest prediction(s) outside their interval" in caveats and "sanity: parametric: m" in caveats
    pair = {"families": ["a", "b"], "crossings": [{"extrapolated": True}]}
    result = {"families": {"a": fam, "b": {}},
              "seed_noise": {"pairs": [{"families": ["a", "b"], "budgets": [
                  {"budget": 1e13, "within_seed_noise": True}, {"budget": 1e14, "within_seed_noise": False}]}]},
              "decision": {"rows": [{"families": ["a", "b"], "frontier": {"right": False},
                                     "parametric": {"right": False}, "baseline": {"right": True}}]}}
    text = weakened(pair_caveats(pair, result, _sci))
    assert text.startswith(" *Weakened by*: the crossing is extrapolated")
    for part in ("within the seed spread at 1e13 FLOPs", "ranking at the largest budget trained in 1/1",
                 "flagged backtests: a (1)"):
        assert part in text
    assert weakened([]) == ""
