"""Sanity flags on every fit: things a fitted law can do that make its numbers suspect however small its
residuals, said in fit.json ("sanity" per family) and beside the report's verdicts.

- E above an observed loss: the irreducible loss of L = E + ... is its floor at infinite compute; a run
  that already went below it means the law's E (and so its extrapolation) is wrong.
- above the data at the largest budgets: at each of the two largest budgets the law's in-sample prediction
  of the best loss lies above the best run by more than it does at its other budgets, beyond its own
  scatter there: it bends away from the data exactly where an extrapolation starts.
- an exponent at the edge of its search: L-BFGS starts the exponents inside a range (Approach 3: the
  Chinchilla grid, 0 to 2; the frontier laws: 0.02 to 1); an exponent that ends at or beyond its ends (or
  at zero) is not pinned by the data, and the other terms absorb what it should carry.
"""

from __future__ import annotations

import math

import numpy as np

from .backtest import _held_budget, _predict
from .runs import FamilyRuns

EXPONENT_RANGE = {"parametric": (0.0, 2.0), "frontier": (0.02, 1.0), "approach1": (0.02, 1.0),
                  "wallclock": (0.02, 1.0)}
EXPONENT_EDGE = 0.01             # within this of an end of the range counts as at the edge
TOP_BUDGETS = 2
MIN_SCATTER = 1e-3               # a law's scatter is never taken as below 0.1%


def sanity_flags(point: dict, runs: FamilyRuns) -> list[dict]:
    """[{"approach", "kind", "message"}] for one family's full-data fits (`point`: approach -> fit)."""
    flags = []
    lowest = float(runs.loss.min())
    for approach, fit in point.items():
        if not isinstance(fit, dict) or "skipped" in fit:
            continue
        if "E" in fit and fit["E"] > lowest:
            flags.append({"approach": approach, "kind": "E above an observed loss",
                          "message": f"{approach}: the irreducible loss E = {fit['E']:.4g} lies above the lowest loss "
                                     f"observed ({lowest:.4g}): some run already beat the law's floor, so its E and "
                                     f"its extrapolation are wrong"})
        for name in ("alpha", "beta"):
            if name in fit and approach in EXPONENT_RANGE:
                lo, hi = EXPONENT_RANGE[approach]
                v = fit[name]
                if v <= max(lo, 0.0) + EXPONENT_EDGE or v >= hi - EXPONENT_EDGE:
                    flags.append({"approach": approach, "kind": "exponent at the edge of its search",
                                  "message": f"{approach}: {name} = {v:.3g} ends at the edge of the range its search "
                                             f"starts from ({lo:g} to {hi:g}): the data do not pin it"})
        if approach in ("frontier", "parametric"):
            flags += _above_at_top(approach, fit, runs)
    return flags


def _above_at_top(approach: str, fit: dict, runs: FamilyRuns) -> list[dict]:
    budgets = np.flatnonzero(runs.frontier_budgets)
    if len(budgets) < TOP_BUDGETS + 1:
        return []
    excess = []                    # ln(predicted best / observed best) at every budget, as the backtest predicts it
    for g in budgets:
        h = _held_budget(runs, g)
        excess.append(math.log(_predict(approach, fit, h)["loss"] / h["best_loss"]))
    excess = np.array(excess)
    top, rest = excess[-TOP_BUDGETS:], excess[:-TOP_BUDGETS]
    # the law's level and scatter at the other budgets (centred: an offset everywhere is no bend at the top)
    level = float(np.median(rest))
    scatter = max(MIN_SCATTER, 1.4826 * float(np.median(np.abs(rest - level))))
    if top.min() <= max(0.0, level + scatter):
        return []
    return [{"approach": approach, "kind": "above the data at the largest budgets",
             "message": f"{approach}: at the {TOP_BUDGETS} largest budgets the law predicts a best loss "
                        f"{', '.join(f'{math.expm1(x):+.1%}' for x in top)} off the best run, above its level at the "
                        f"other budgets by more than its scatter ({scatter:.1%}): it bends away from the data where "
                        f"extrapolation starts, so it will over-predict beyond them"}]
