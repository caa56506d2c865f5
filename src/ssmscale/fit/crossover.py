"""Where two families' frontiers cross: roots inside the range both were fitted on, and extrapolated ones.
The same for loss against training seconds (key "wallclock")."""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.optimize import brentq

from .bootstrap import _q
from .frontier import frontier_loss
from .text import fmt_value

CROSSOVER_SEARCH_FACTOR = 100.0  # extrapolated crossings are searched this factor beyond the fitted range


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



_UNITS = {"frontier": ("C", "FLOPs"), "wallclock": ("t", "s of training")}


def _crossovers(point: dict, samples: list, ci: float, key: str = "frontier") -> dict:
    names = sorted(point)
    pairs = []
    for f1, f2 in itertools.combinations(names, 2):
        p1, p2 = point[f1][key], point[f2][key]
        entry: dict = {"families": [f1, f2]}
        if "skipped" in p1 or "skipped" in p2:
            which = f1 if "skipped" in p1 else f2
            entry["statement"] = f"no crossover computed: the {which} {key} fit was skipped"
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
            b1, b2 = s[f1].get(key), s[f2].get(key)
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
        entry["statement"] = _crossover_statement(entry, p1, p2, f1, f2, ci, *_UNITS[key])
        pairs.append(entry)
    return {"pairs": pairs}



def _crossover_statement(entry, p1, p2, f1, f2, ci, symbol="C", unit="FLOPs") -> str:
    rng = entry["fitted_range"]
    lines = []
    n_b = entry["resamples_compared"]
    if rng is None:
        lines.append(f"{f1} and {f2} were fitted on disjoint ranges of {unit}: no in-range comparison")
    inside = [c for c in entry["crossings"] if not c["extrapolated"]]
    for c in inside:
        other = f1 if c["lower_above"] == f2 else f2
        q = c["flops"]
        lines.append(f"{c['lower_above']}'s frontier drops below {other}'s at {symbol} = {fmt_value(q['value'])} {unit} "
                     f"({ci:.0%} CI [{fmt_value(q['lo'])}, {fmt_value(q['hi'])}], a crossing near it in "
                     f"{c['found_in_resamples']}/{n_b} resamples)")
    if rng is not None and not inside:
        mid = math.sqrt(rng[0] * rng[1])
        lower = f1 if frontier_loss(p1, mid) < frontier_loss(p2, mid) else f2
        lines.append(f"no crossover in [{fmt_value(rng[0])}, {fmt_value(rng[1])}] {unit}: {lower} is lower throughout "
                     f"({entry['resamples_crossing_in_range']}/{n_b} resamples cross in that range)")
    for c in entry["crossings"]:
        if c["extrapolated"]:
            other = f1 if c["lower_above"] == f2 else f2
            q = c["flops"]
            lines.append(f"EXTRAPOLATED (outside the fitted range): {c['lower_above']} would drop below "
                         f"{other} at {symbol} = {fmt_value(q['value'])} {unit} "
                         f"({ci:.0%} CI [{fmt_value(q['lo'])}, {fmt_value(q['hi'])}])")
    return "; ".join(lines)

