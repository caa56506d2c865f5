"""Text output: the printed fit summary, per-family notes, and number formatting shared with the report."""

from __future__ import annotations

from .bootstrap import APPROACHES, QUANTITIES
from .runs import MIN_RUNS_PER_BUDGET

E_UNIDENTIFIED = 1e-4           # a fitted E below this fraction of the lowest loss means E ran to 0


def fmt_value(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"



def _list(values, limit: int = 6) -> str:
    shown = ", ".join(f"{v:.3g}" for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def quantity_rows(fam: dict):
    """(approach, quantity, value, interval or None) for every fitted quantity of a family, formatted."""
    for approach in APPROACHES:
        block = fam[approach]
        if "skipped" in block:
            continue
        for k in QUANTITIES[approach]:
            q = block[k]
            interval = f"[{fmt_value(q['lo'])}, {fmt_value(q['hi'])}]" if q["lo"] is not None else None
            yield approach, k, fmt_value(q["value"]), interval


def fit_notes(fam: dict) -> list[str]:
    """What a reader must know about a family's fits: skipped approaches, failed resamples, weak spots."""
    notes = []
    front = fam["frontier"]
    loss_scale = min(p["loss"] for p in front["points"]) if "skipped" not in front else 1.0
    for approach in APPROACHES:
        block = fam[approach]
        if "skipped" in block:
            notes.append(f"{approach} skipped: {block['skipped']}")
            continue
        if "E" in block and block["E"]["value"] < E_UNIDENTIFIED * loss_scale:
            notes.append(f"{approach}: E = {fmt_value(block['E']['value'])} is driven to zero: these runs do not "
                         f"pin down an irreducible loss, the power-law terms absorb it and their exponents "
                         f"are correspondingly less certain")
        bs = block["bootstrap"]
        if bs["failed"]:
            why = "; ".join(f"{n}: {r}" for r, n in bs["failure_reasons"].items())
            notes.append(f"{approach}: {bs['failed']}/{bs['resamples']} resamples could not be fitted ({why}); "
                         f"its intervals come from the other {bs['ok']}")
        if approach == "frontier":
            if block["exact_fit"]:
                notes.append("frontier: 3 budgets for 3 parameters, the curve passes through every point; "
                             "its interval reflects run resampling only and is wide")
            edge = [p["budget"] for p in block["points"] if p["best_at_edge"]]
            if edge:
                notes.append(f"frontier: at {_list(edge)} FLOPs the best run is the smallest or largest "
                             f"size tried: the compute-optimal point may lie outside the sizes sampled")
        if approach == "approach2":
            few = [e["budget"] for e in block["budgets"] if not e["used"] and e["n_sizes"] < MIN_RUNS_PER_BUDGET]
            if few:
                notes.append(f"approach2: {len(few)} budget(s) with < {MIN_RUNS_PER_BUDGET} distinct sizes "
                             f"not used ({_list(few)} FLOPs)")
            other = [e for e in block["budgets"] if not e["used"] and e["n_sizes"] >= MIN_RUNS_PER_BUDGET]
            notes += [f"approach2: budget {e['budget']:.3g} not used: {e['reason']}" for e in other]
    return notes


def format_fit(result: dict) -> str:
    """The human-readable summary: data notes, then a table per family, then the crossovers."""
    ci = result["settings"]["ci"]
    lines = [f"runs: {result['source']['path']}"]
    lines += [f"  {note}" for note in result["notes"]]
    lines.append(f"  {result['settings']['grouping']}")
    if result["source"].get("flops_convention"):
        lines.append(f"  FLOPs as counted by the study: {'; '.join(result['source']['flops_convention'])}")
    head = f"  {'approach':<11} {'quantity':<9} {'value':>11}   {ci:.0%} interval"
    for name, fam in result["families"].items():
        lo, hi = fam["flops_range"]
        lines.append("")
        lines.append(f"{name}: {fam['n_runs']} runs, {fam['n_budgets']} IsoFLOP budgets with >= "
                     f"{MIN_RUNS_PER_BUDGET} sizes, C in [{lo:.3g}, {hi:.3g}] FLOPs")
        lines.append(head)
        for approach, k, value, interval in quantity_rows(fam):
            lines.append(f"  {approach:<11} {k:<9} {value:>11}   {interval or '(no bootstrap)'}")
        notes = fit_notes(fam)
        lines += [f"  note: {n}" for n in notes]
    pairs = result["crossover"]["pairs"]
    if pairs:
        lines.append("")
        lines.append("crossover:")
        lines += [f"  {' vs '.join(p['families'])}: {p['statement']}" for p in pairs]
    s, t = result["settings"], result["timing"]
    lines.append("")
    lines.append(f"bootstrap: {s['n_boot']} resamples, seed {s['seed']}, {s['n_jobs']} processes; "
                 f"fit time {t['point_estimates_s']:.1f} s point estimates + {t['bootstrap_s']:.1f} s bootstrap "
                 f"(wall; {t['cpu_s']:.1f} s CPU over all processes)")
    return "\n".join(lines)
