"""The compute multiplier: how many times the compute the baseline family needs to reach a family's loss.

    k(C) = C_base(L_fam(C)) / C,     L_fam(C) = E + A C^-alpha (the family's frontier fit),
                                     C_base(L) = (A_b / (L - E_b))^(1 / alpha_b) (the baseline's, inverted)

k > 1: the family reaches at C a loss the baseline needs k C FLOPs for (it is ahead by that factor); k < 1:
it is behind. Where L_fam(C) <= E_b the baseline never reaches that loss: k is unbounded ("unreachable").
This is how architectural gains are stated in the field ("an effective compute multiplier"); whether k grows
with C is the "does it scale better" question.

For each family other than the baseline (the transformer by default), in fit.json's "multiplier" block:
- per budget (the family's IsoFLOP budgets) and at its largest budget: k with its bootstrap interval: each
  resample's pair of frontier fits (runs and seeds resampled within each family, fit/bootstrap.py) gives
  one k. Marked `extrapolated` where C_base(L_fam(C)) lies outside the range of compute the baseline's
  frontier was fitted on (the value then rests on the baseline's law beyond its data);
- the trend: the exponent g of k ~ C^g (least squares of ln k on ln C over the budgets), with its interval
  from the same resamples: "growing" (the interval above 0: the family scales better), "shrinking" (below 0:
  its lead fades, or its deficit deepens), "flat" (the interval holds 0: a constant factor), or
  "undetermined" (fewer than 2 budgets with a finite k, or no interval);
- the backtest: both frontiers refitted without their largest budget (the budget backtest's k = 1 refits)
  predict k at the held-out budget; against k there from the fits on every budget: ARE and whether the
  prediction's interval covers it;
- a curve of k(C) with its band over the family's fitted range, for the figure.
"""

from __future__ import annotations

import math

import numpy as np

from .bootstrap import _q
from .frontier import frontier_loss

DEFAULT_BASELINE = "transformer"
DEFINITION = ("k(C) = C_base(L_fam(C)) / C: the compute the baseline's frontier needs to reach the family's frontier "
              "loss at C, over C (k > 1: the family is ahead by that factor); from the frontier fits L(C) = E + A C^-alpha")
TREND_GRID = 40


def baseline_compute(base: dict, loss) -> np.ndarray:
    """C at which the baseline's frontier reaches `loss`; inf where loss <= E (never)."""
    loss = np.asarray(loss, float)
    gap = loss - base["E"]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_c = (math.log(base["A"]) - np.log(np.where(gap > 0, gap, np.nan))) / base["alpha"]
    return np.where(gap > 0, np.exp(np.minimum(log_c, 700.0)), np.inf)


def multiplier(fam: dict, base: dict, flops) -> np.ndarray:
    c = np.asarray(flops, float)
    return baseline_compute(base, frontier_loss(fam, c)) / c


def _law(block: dict) -> dict | None:
    """A frontier's (E, A, alpha) from a point fit, a fit.json block or a bootstrap resample; None if skipped."""
    if not isinstance(block, dict) or "skipped" in block:
        return None
    pick = (lambda v: v["value"] if isinstance(v, dict) else v)
    law = {k: pick(block[k]) for k in ("E", "A", "alpha")}
    return law if all(v is not None and np.isfinite(v) for v in law.values()) else None


def _quantile(values: list, ci: float) -> tuple[float | None, float | None]:
    """Percentile interval that keeps unbounded values (inf): a bound there is null."""
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], float)
    if len(v) < 2:
        return None, None
    lo, hi = np.percentile(v, [50.0 * (1.0 - ci), 50.0 * (1.0 + ci)])
    return (float(lo) if np.isfinite(lo) else None), (float(hi) if np.isfinite(hi) else None)


def _k_entry(value: float, samples: list | None, ci: float) -> dict:
    lo, hi = _quantile(samples, ci) if samples is not None else (None, None)
    return {"value": float(value) if np.isfinite(value) else None, "lo": lo, "hi": hi,
            "unreachable": bool(np.isinf(value))}


def _slope(log_c: np.ndarray, k: np.ndarray) -> float | None:
    ok = np.isfinite(k) & (k > 0)
    if ok.sum() < 2:
        return None
    return float(np.polyfit(log_c[ok], np.log(k[ok]), 1)[0])


def _verdict(q: dict) -> str:
    if q["value"] is None or q["lo"] is None:
        return "undetermined"
    if q["lo"] > 0:
        return "growing"
    if q["hi"] < 0:
        return "shrinking"
    return "flat"


def fit_multipliers(point: dict, samples: list, ci: float, baseline: str = DEFAULT_BASELINE,
                    refits: dict | None = None) -> dict:
    """The "multiplier" block of fit.json (see the module docstring). `point`: {family: {approach: fit}},
    `samples`: the bootstrap resamples, `refits`: the budget backtest's {(family, k): {"point", "samples"}}."""
    out = {"baseline": baseline, "definition": DEFINITION, "families": {}}
    if baseline not in point:
        out["skipped"] = f"no {baseline} runs to compare with (choose another with --baseline)"
        return out
    base = _law(point[baseline]["frontier"])
    if base is None:
        out["skipped"] = f"the baseline {baseline}'s frontier was not fitted ({point[baseline]['frontier']['skipped']})"
        return out
    base_range = point[baseline]["frontier"]["range"]
    for name in sorted(point):
        if name == baseline:
            continue
        out["families"][name] = _family(name, point[name]["frontier"], base, base_range, samples, ci, baseline,
                                        refits or {})
    return out


def _family(name, front, base, base_range, samples, ci, baseline, refits) -> dict:
    law = _law(front)
    if law is None:
        return {"skipped": f"its frontier was not fitted ({front.get('skipped', 'no fit')})"}
    budgets = np.array(sorted(set(float(b) for b in front["points"]["budget"])))
    k = multiplier(law, base, budgets)
    c_base = baseline_compute(base, frontier_loss(law, budgets))
    pairs = [(_law(s[name].get("frontier")), _law(s[baseline].get("frontier"))) for s in samples]
    pairs = [(f, b) for f, b in pairs if f is not None and b is not None]
    boot = np.array([multiplier(f, b, budgets) for f, b in pairs]) if pairs else None
    rows = []
    for i, c in enumerate(budgets):
        extrapolated = bool(not base_range[0] <= c_base[i] <= base_range[1])
        rows.append({"budget": float(c), "loss": float(frontier_loss(law, c)), "c_baseline": _finite(c_base[i]),
                     "k": _k_entry(k[i], None if boot is None else boot[:, i].tolist(), ci),
                     "extrapolated": extrapolated})
    log_c = np.log(budgets)
    slope = _slope(log_c, k)
    boot_slopes = [_slope(log_c, row) for row in boot] if boot is not None else None
    exponent = _q(slope, [s for s in boot_slopes if s is not None] if boot_slopes is not None else None, ci)
    lo, hi = front["range"]
    grid = np.geomspace(lo, hi, TREND_GRID)
    curve_k = multiplier(law, base, grid)
    curve_boot = np.array([multiplier(f, b, grid) for f, b in pairs]) if pairs else None
    band = [_quantile(curve_boot[:, j].tolist(), ci) if curve_boot is not None else (None, None)
            for j in range(len(grid))]
    c_grid = baseline_compute(base, frontier_loss(law, grid))
    return {
        "budgets": rows, "largest": rows[-1],
        "trend": {"exponent": exponent, "verdict": _verdict(exponent), "n_budgets": int(np.isfinite(k).sum()),
                  "resamples": len(pairs)},
        "backtest": _backtest(name, baseline, budgets, k, refits, ci),
        "curve": {"flops": grid.tolist(), "k": [_finite(v) for v in curve_k], "lo": [b[0] for b in band],
                  "hi": [b[1] for b in band],
                  "extrapolated": [bool(not base_range[0] <= c <= base_range[1]) for c in c_grid]},
    }


def _finite(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def _backtest(name, baseline, budgets, k_full, refits, ci) -> dict:
    fam_fit, base_fit = refits.get((name, 1)), refits.get((baseline, 1))
    if fam_fit is None or base_fit is None:
        return {"skipped": "it needs both frontiers refitted without the largest budget: >= 4 budgets each, "
                           "and the budget backtest on"}
    fam_law, base_law = _law(fam_fit["point"]), _law(base_fit["point"])
    if fam_law is None or base_law is None:
        return {"skipped": "a frontier refit without the largest budget could not be fitted"}
    top = budgets[-1]
    predicted = float(multiplier(fam_law, base_law, [top])[0])
    boot = [float(multiplier(f, b, [top])[0]) for f, b in zip(map(_law, fam_fit["samples"]),
                                                               map(_law, base_fit["samples"]))
            if f is not None and b is not None]
    q = _k_entry(predicted, boot, ci)
    observed = float(k_full[-1])
    out = {"budget": float(top), "predicted": q, "observed": _finite(observed),
           "fit_range": [float(v) for v in fam_fit["point"]["range"]]}
    if np.isfinite(predicted) and np.isfinite(observed) and observed > 0:
        out["are"] = abs(predicted - observed) / observed
    else:
        out["are"] = None
    lo, hi = q["lo"], q["hi"]
    out["covered"] = (None if q["lo"] is None and q["hi"] is None or not np.isfinite(observed)
                      else bool((lo is None or lo <= observed) and (hi is None or observed <= hi)))
    return out
