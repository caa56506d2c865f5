"""Decision accuracy: would the laws have ranked the families right at budgets they were not fitted on, and
would simply ranking them at the largest budget trained have done as well?

DataDecide (Magnusson et al. 2025) found that ranking candidates at one small scale predicts the larger-scale
winner about as well as any of 8 scaling-law methods: the baseline a scaling tool must beat or admit to.
For every pair of families and every held-out budget of the budget backtest (k largest budgets held out),
three predictions of which family is lower there: the frontier's and Approach 3's refitted laws, and the
single-scale baseline, the order of the two families' best runs at the largest budget both refits kept.
Each is right or wrong against the observed order; the counts say which predictor this study's evidence
favours. Decisions at one budget predicted from several refits are correlated: the counts are evidence, not
a significance test.
"""

from __future__ import annotations

from .runs import FamilyRuns

PREDICTORS = ("frontier", "parametric", "baseline")
LABEL = {"frontier": "the frontier law", "parametric": "Approach 3", "baseline": "the single-scale baseline"}


def decision_accuracy(families: dict[str, FamilyRuns], tested: dict) -> dict:
    """{"rows": [...], "summary": {predictor: {"right", "n"}}, "statement"} from a budget backtest."""
    rows = []
    for pair in tested.get("pairs", []):
        f1, f2 = pair["families"]
        kept = {f: {e["k"]: e["fit_budgets"] for e in tested["families"][f].get("holdouts", [])} for f in (f1, f2)}
        for r in pair["held_out"]:
            common = set(kept[f1].get(r["k"], [])) & set(kept[f2].get(r["k"], []))
            row = {"families": [f1, f2], "k": r["k"], "budget": r["budget"], "observed_lower": r["observed_lower"]}
            for approach in ("frontier", "parametric"):
                if approach in r:
                    row[approach] = {"lower": r[approach]["predicted_lower"], "right": r[approach]["order_matches"]}
            if common:
                ref = max(common)
                l1, l2 = (_best(families[f], ref) for f in (f1, f2))
                lower = f1 if l1 < l2 else f2
                row["baseline"] = {"reference_budget": ref, "lower": lower, "right": lower == r["observed_lower"]}
            rows.append(row)
    summary = {p: {"right": sum(r[p]["right"] for r in rows if p in r), "n": sum(p in r for r in rows)}
               for p in PREDICTORS}
    return {"rows": rows, "summary": summary, "statement": _statement(summary)}


def _best(runs: FamilyRuns, budget: float) -> float:
    members = runs.group == int((abs(runs.budgets - budget) <= 1e-9 * budget).nonzero()[0][0])
    return float(runs.loss[members].min())


def _statement(summary: dict) -> str:
    scored = {p: s for p, s in summary.items() if s["n"]}
    if "baseline" not in scored or len(scored) < 2:
        return "no decisions to score: the budget backtest compared no pair of families"
    rate = {p: s["right"] / s["n"] for p, s in scored.items()}
    counts = "; ".join(f"{LABEL[p]} {s['right']}/{s['n']}" for p, s in scored.items())
    laws = [p for p in scored if p != "baseline"]
    best = max(laws, key=lambda p: rate[p])
    if rate[best] > rate["baseline"]:
        verdict = f"the study's evidence favours the laws ({LABEL[best]})"
    elif rate[best] == rate["baseline"]:
        verdict = ("the laws did no better than the single-scale baseline: for ranking, the largest budget "
                   "trained says as much as the extrapolation (DataDecide)")
    else:
        verdict = ("the study's evidence favours the single-scale baseline: ranking at the largest budget trained "
                   "beat the laws' extrapolations (DataDecide)")
    return f"which family is lower at a held-out budget, right in: {counts}; {verdict}"
