"""Seed-to-seed noise inside a study: the spread of every configuration trained with several seeds, and,
budget by budget, whether the gap between two families' best runs is within the spread of their seeds."""

from __future__ import annotations

import itertools

import numpy as np

from .runs import FamilyRuns


def seed_noise(runs: FamilyRuns) -> dict:
    """Each configuration with several seeds: its losses, their spread (max - min) and standard deviation."""
    configs = []
    for i, losses in enumerate(runs.seed_losses):
        if len(losses) > 1:
            configs.append({"budget": float(runs.budgets[runs.group[i]]), "params": float(runs.params[i]),
                            "n_seeds": len(losses), "losses": [float(v) for v in losses],
                            "spread": float(np.ptp(losses)), "sd": float(np.std(losses, ddof=1))})
    spreads = [c["spread"] for c in configs]
    return {"configurations": configs, "max_spread": max(spreads) if spreads else None,
            "median_spread": float(np.median(spreads)) if spreads else None}


def seed_gaps(point: dict) -> dict:
    """Per pair of families and common budget: both best losses, the gap, each best run's seed spread, and
    whether the gap is within seed noise (|gap| <= the larger spread; null where neither has seeds)."""
    pairs = []
    for f1, f2 in itertools.combinations(sorted(point), 2):
        a, b = point[f1]["frontier"], point[f2]["frontier"]
        if "skipped" in a or "skipped" in b:
            continue
        by_budget = {float(c): i for i, c in enumerate(b["points"]["budget"])}
        rows = []
        for i, c in enumerate(a["points"]["budget"]):
            j = by_budget.get(float(c))
            if j is None:
                continue
            l1, l2 = float(a["points"]["loss"][i]), float(b["points"]["loss"][j])
            s1, s2 = (_spread(p["points"]["seed_losses"][k]) for p, k in ((a, i), (b, j)))
            known = [s for s in (s1, s2) if s is not None]
            rows.append({"budget": float(c), "loss": {f1: l1, f2: l2}, "gap": l2 - l1,
                         "seed_spread": {f1: s1, f2: s2},
                         "within_seed_noise": bool(abs(l2 - l1) <= max(known)) if known else None})
        pairs.append({"families": [f1, f2], "budgets": rows})
    return {"pairs": pairs}


def _spread(losses) -> float | None:
    return float(np.ptp(losses)) if len(losses) > 1 else None
