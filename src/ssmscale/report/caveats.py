"""What weakens each verdict, said beside it in the report's Summary, where a reader looks first.

Otherwise a verdict reads cleaner than its evidence: the weak spots sit deep in the tables and notes. Per
family: a best learning rate at an end of its grid, an IsoFLOP minimum outside the sizes sampled, backtest
predictions outside their calibrated intervals, sanity flags of its laws (fit/sanity.py). Per crossover
verdict: a crossing that is extrapolated, a gap between the two families within their seed spread, and,
where the laws ranked the pair worse than the single-scale baseline in the backtests, that too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def results_table(study: Path) -> pd.DataFrame | None:
    """The study's results.csv read through safeload (a regular file of bounded size inside the study), or
    None where there is none or it is refused (the fit has already said why)."""
    from ..safeload import FileRefused, read_csv
    try:
        return read_csv(study / "results.csv", within=study)
    except (FileNotFoundError, FileRefused):
        return None


def lr_grid(study: Path) -> list[dict]:
    """Each (family, size, budget) where several learning rates were tried: {"family", "params", "budget",
    "lrs", "best_lr", "loss", "edge"} (edge: the best rate is the smallest or largest tried)."""
    df = results_table(study)
    if df is None or not {"lr", "family", "params", "budget", "loss", "status"} <= set(df.columns):
        return []
    for col in ("lr", "params", "budget", "loss"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    # the fits' own cleaning: finite positive numbers only (a params of inf has no row here)
    ok = df[(df["status"] == "ok") & (np.isfinite(df[["lr", "params", "budget", "loss"]]).all(axis=1))
            & (df[["lr", "params", "budget"]] > 0).all(axis=1)]
    rows = []
    for (fam, params, budget), g in ok.groupby(["family", "params", "budget"]):
        if g["lr"].nunique() < 2:
            continue
        best = g.loc[g["loss"].idxmin()]
        lrs = sorted(g["lr"].unique())
        rows.append({"family": str(fam), "params": params, "budget": budget, "lrs": lrs, "best_lr": best["lr"],
                     "loss": best["loss"], "edge": bool(best["lr"] in (lrs[0], lrs[-1]))})
    return rows


def family_caveats(name: str, fam: dict, grid: list[dict], sci) -> list[str]:
    out = []
    edges = [r for r in grid if r["family"] == name and r["edge"]]
    if edges:
        out.append(f"best learning rate at an end of its grid at {len(edges)} (size, budget) point(s)")
    front = fam.get("frontier", {})
    at_edge = [p["budget"] for p in front.get("points", []) if p.get("best_at_edge")]
    if at_edge:
        out.append(f"best run at the smallest or largest size tried at {', '.join(sci(b) for b in at_edge)} FLOPs "
                   f"(the IsoFLOP minimum may lie outside the sizes sampled)")
    outside = [e["budget"] for e in fam.get("approach2", {}).get("budgets", [])
               if not e["used"] and "outside the sampled sizes" in e.get("reason", "")]
    if outside:
        out.append(f"IsoFLOP parabola minimum outside the sampled sizes at {', '.join(sci(b) for b in outside)} FLOPs")
    flags = fam.get("backtest", {}).get("flags", [])
    if flags:
        out.append(f"{len(flags)} backtest prediction(s) outside their interval")
    out += [f"sanity: {f['message']}" for f in fam.get("sanity", [])]
    return out


def pair_caveats(pair: dict, fit: dict, sci) -> list[str]:
    f1, f2 = pair["families"]
    out = []
    extrapolated = [c for c in pair.get("crossings", []) if c["extrapolated"]]
    if extrapolated:
        out.append("the crossing is extrapolated beyond the fitted range" if len(extrapolated) == 1 else
                   f"{len(extrapolated)} crossings are extrapolated beyond the fitted range")
    for seeds in fit.get("seed_noise", {}).get("pairs", []):
        if seeds["families"] == [f1, f2]:
            within = [r["budget"] for r in seeds["budgets"] if r["within_seed_noise"]]
            if within:
                out.append(f"the gap is within the seed spread at {', '.join(sci(b) for b in within)} FLOPs")
    rows = [r for r in fit.get("decision", {}).get("rows", []) if r["families"] == [f1, f2]]
    if rows:
        base = sum(r["baseline"]["right"] for r in rows if "baseline" in r)
        laws = {a: sum(r[a]["right"] for r in rows if a in r) for a in ("frontier", "parametric")}
        if max(laws.values()) < base:
            out.append(f"in the backtests the laws ranked this pair right in at most {max(laws.values())}/{len(rows)} "
                       f"held-out budgets, ranking at the largest budget trained in {base}/{len(rows)}")
    flagged = [f"{f} ({n})" for f in (f1, f2) if (n := len(fit["families"][f].get("backtest", {}).get("flags", [])))]
    if flagged:
        out.append(f"flagged backtests: {', '.join(flagged)}")
    return out


def weakened(caveats: list[str]) -> str:
    return f" *Weakened by*: {'; '.join(caveats)}." if caveats else ""
