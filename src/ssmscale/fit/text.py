"""Text output: the printed fit summary, per-family notes, and the rows and statements the report shares
(backtest, seed noise beside the family gaps, the wall-clock verdict), with their number formatting."""

from __future__ import annotations

from .bootstrap import APPROACHES, QUANTITIES
from .runs import MIN_RUNS_PER_BUDGET

E_UNIDENTIFIED = 1e-4           # a fitted E below this fraction of the lowest loss means E ran to 0


def fmt_value(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def fmt_interval(q: dict) -> str:
    return f"[{fmt_value(q['lo'])}, {fmt_value(q['hi'])}]" if q.get("lo") is not None else "(no bootstrap)"



def _list(values, limit: int = 6) -> str:
    shown = ", ".join(f"{v:.3g}" for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _approaches(fam: dict):
    """(approach, block) for the approaches a family's fit holds (a fit.json from an older version may
    lack the newer ones, e.g. approach1 or wallclock)."""
    return [(a, fam[a]) for a in APPROACHES if a in fam]


def quantity_rows(fam: dict):
    """(approach, quantity, value, interval or None) for every fitted quantity of a family, formatted."""
    for approach, block in _approaches(fam):
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
    for approach, block in _approaches(fam):
        if "skipped" in block:
            notes.append(f"{approach} skipped: {block['skipped']}")
            continue
        if "E" in block and block["E"]["value"] < E_UNIDENTIFIED * loss_scale:
            notes.append(f"{approach}: E = {fmt_value(block['E']['value'])} is driven to zero: these runs do not "
                         f"pin down an irreducible loss, the power-law terms absorb it and their exponents "
                         f"are correspondingly less certain")
        if block.get("collapsed"):
            notes.append(f"{approach}: the bootstrap intervals of {', '.join(block['collapsed'])} have zero width although "
                         f"{block['bootstrap']['ok']} resamples were fitted: the resamples did not vary, so these "
                         f"intervals say nothing about uncertainty")
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
        if approach == "approach1":
            notes.append(f"approach1: envelope of {block['n_curves']} runs' eval points; {block['caveat']}")
        if approach == "approach2":
            few = [e["budget"] for e in block["budgets"] if not e["used"] and e["n_sizes"] < MIN_RUNS_PER_BUDGET]
            if few:
                notes.append(f"approach2: {len(few)} budget(s) with < {MIN_RUNS_PER_BUDGET} distinct sizes "
                             f"not used ({_list(few)} FLOPs)")
            other = [e for e in block["budgets"] if not e["used"] and e["n_sizes"] >= MIN_RUNS_PER_BUDGET]
            notes += [f"approach2: budget {e['budget']:.3g} not used: {e['reason']}" for e in other]
    notes += [f"SANITY FLAG: {flag['message']}" for flag in fam.get("sanity", [])]
    bt = fam.get("backtest", {})
    notes += [f"BACKTEST FLAG: {flag}" for flag in bt.get("flags", [])]
    if "skipped" in bt:
        notes.append(f"backtest skipped: {bt['skipped']}")
    return notes


_QUANTITY_LABEL = {"loss": "best loss", "n_opt": "N_opt"}


def backtest_rows(bt: dict):
    """(k, budget, approach, quantity, predicted, interval, observed, ARE, covered) for every prediction of a
    family's budget backtest, formatted; covered is "yes", "NO" or "n/a"."""
    for entry in bt.get("holdouts", []):
        for row in entry["held_out"]:
            for approach in ("frontier", "approach2", "parametric"):
                for what, v in row.get(approach, {}).items():
                    if not isinstance(v, dict) or "predicted" not in v:
                        continue
                    cal = v.get("calibrated") or {}
                    shown = cal if cal.get("lo") is not None else v["predicted"]
                    covered = shown.get("covered", v["covered"])
                    covered = "n/a" if covered is None else ("yes" if covered else "NO")
                    yield (entry["k"], fmt_value(row["budget"]), approach, _QUANTITY_LABEL[what],
                           fmt_value(v["predicted"]["value"]), fmt_interval(shown), fmt_value(v["observed"]),
                           "n/a" if v["are"] is None else f"{v['are']:.2%}", covered)


def backtest_order_lines(result: dict) -> list[str]:
    """For each pair of families and held-out budget: the predicted order and gap against the observed ones."""
    lines = []
    for pair in result.get("backtest", {}).get("pairs", []):
        f1, f2 = pair["families"]
        for row in pair["held_out"]:
            for approach in ("frontier", "parametric"):
                v = row.get(approach)
                if v is None:
                    continue
                verdict = "matches" if v["order_matches"] else "DOES NOT MATCH"
                lines.append(f"{approach} without the {row['k']} largest budget(s), at {fmt_value(row['budget'])} FLOPs: "
                             f"predicts {v['predicted_lower']} lower ({f2} - {f1} = {fmt_value(v['gap']['value'])} "
                             f"{fmt_interval(v['gap'])}), observed {row['observed_lower']} lower "
                             f"({fmt_value(row['observed_gap'])}): order {verdict}")
    return lines


_PREDICTION_LABEL = {("frontier", "loss"): "frontier best loss", ("approach2", "n_opt"): "Approach 2 N_opt",
                     ("parametric", "loss"): "Approach 3 best loss", ("parametric", "n_opt"): "Approach 3 N_opt",
                     ("parametric", "run_loss"): "Approach 3 single runs"}


def calibration_rows(result: dict):
    """(prediction, nominal, bootstrap coverage, bootstrap width/error, calibrated coverage, calibrated
    width/error, how calibrated) per approach: how often the backtests' observations fell inside each kind
    of interval, and the interval's median width over the median absolute error (log scale; ~5.8 for a
    calibrated 95% interval of normal errors)."""
    cal = result.get("calibration", {})
    for row in cal.get("table", []):
        model = cal["models"].get(row["approach"], {}).get(row["quantity"], {})
        yield (_PREDICTION_LABEL.get((row["approach"], row["quantity"]), f"{row['approach']} {row['quantity']}"),
               f"{row['nominal']:.0%}", _coverage(row["bootstrap"]), _ratio(row["bootstrap"]),
               _coverage(row["calibrated"]), _ratio(row["calibrated"]), _how(model))


def _coverage(c: dict) -> str:
    return "n/a" if not c["checked"] else f"{c['covered']}/{c['checked']} ({c['covered'] / c['checked']:.0%})"


def _ratio(c: dict) -> str:
    return "n/a" if c.get("width_ratio") is None else f"{c['width_ratio']:.1f}"


def _how(model: dict) -> str:
    if "skipped" in model or not model:
        return model.get("skipped", "not calibrated")
    lean = "" if not model["center"] else f", centred {model['center']:+.2f} s (errors lean that way, sign test p = {model['lean_p']:.2g})"
    return (f"{model['method']} on {model['n']} errors: s0 {model['s0']:.3g}, sigma {model['sigma']:.3g}, "
            f"tau {model['tau']:.3g}/decade, q {model['q']:.2f}{lean}")


def threshold_lines(fam: dict, ci: float) -> list[str]:
    bt = fam.get("backtest", {})
    if "parametric" not in bt:
        return []
    p = bt["parametric"]
    cal = p.get("calibrated")
    inside = (f"{cal['covered']}/{cal['checked']} inside their {ci:.0%} calibrated prediction interval (the bootstrap "
              f"one: {p['covered']}/{p['checked']})" if cal and cal["checked"] else
              f"{p['covered']}/{p['checked']} inside their {ci:.0%} prediction interval")
    return [f"Approach 3 fitted on the {bt['n_fit']} runs at or below {fmt_value(bt['threshold'])} FLOPs predicts the "
            f"{bt['n_held_out']} runs above it with mean ARE {p['mean_are']:.2%} (median {p['median_are']:.2%}, "
            f"max {p['max_are']:.2%}); {inside}"]


def seed_gap_lines(result: dict) -> list[str]:
    """The family gap at each budget beside the seed spread of both best runs, where seeds were trained."""
    lines = []
    for pair in result.get("seed_noise", {}).get("pairs", []):
        f1, f2 = pair["families"]
        for row in pair["budgets"]:
            if row["within_seed_noise"] is None:
                continue
            s = row["seed_spread"]
            within = "WITHIN seed noise" if row["within_seed_noise"] else "larger than the seed spread"
            lines.append(f"at {fmt_value(row['budget'])} FLOPs {f2} - {f1} = {row['gap']:+.4f} nats; seed spread "
                         f"(max - min) {f1} {_spread(s[f1])}, {f2} {_spread(s[f2])}: {within}")
    return lines


def _spread(v) -> str:
    return "n/a (one seed)" if v is None else f"{v:.4f}"


def wallclock_statement(result: dict) -> str:
    """The winner at equal training time, any crossover, and the machine the verdict belongs to."""
    wc = result.get("wallclock", {})
    devices = wc.get("devices") or []
    where = (f"on {devices[0]}" if len(devices) == 1 else
             f"on {len(devices)} different devices ({'; '.join(devices)}): times from different machines are "
             f"not comparable, so this is NOT a verdict for any one machine" if devices else "on an unrecorded device")
    threads = wc.get("threads") or []
    if len(threads) > 1:
        where += f" (runs trained with different thread counts: {', '.join(map(str, threads))})"
    parts = [p["statement"] for p in wc.get("crossover", {}).get("pairs", [])]
    if wc.get("time_basis") == "profile":
        src = wc.get("time_from") or {}
        return (f"At equal training time priced from the profile {src.get('path', '?')} ({where}; each run's FLOPs "
                f"over its family's FLOP rate there, {src.get('outside_runs', '?')} of {src.get('runs', '?')} runs "
                f"outside the profiled sizes or lengths at the nearest one's rate): " + "; ".join(parts) +
                ". This verdict holds for the profiled machine, its thread count and its kernels, not for the one "
                "that trained the study.")
    what = ("CPU time of single-threaded training steps" if wc.get("time_basis") == "train_cpu_s"
            else "pure training time")
    return (f"At equal {what} {where}: " + "; ".join(parts) + ". This verdict holds for that machine, "
            "its thread count and its load only: another CPU or a GPU changes FLOPs per second, per family and size.")


def fmt_k(q: dict) -> str:
    """A multiplier with its interval: 1.8x [1.2x, 2.9x]; unbounded values read 'unreachable' / 'inf'."""
    def one(v, unbounded=False):
        return "inf" if v is None and unbounded else ("n/a" if v is None else f"{v:.3g}x")
    value = "unreachable" if q.get("unreachable") else one(q["value"])
    if q["lo"] is None and q["hi"] is None:
        return value
    return f"{value} [{one(q['lo'])}, {one(q['hi'], unbounded=True)}]"


def multiplier_lines(result: dict) -> list[str]:
    """Per family: k at its largest budget, the trend of k with C, the backtest of k (fit.json's "multiplier")."""
    block = result.get("multiplier")
    if not isinstance(block, dict):
        return []
    base = block["baseline"]
    if "skipped" in block:
        return [f"compute multiplier against {base}: not computed, {block['skipped']}"]
    ci = result["settings"]["ci"]
    lines = []
    for name, fam in block["families"].items():
        if name not in result["families"]:      # a fit.json from elsewhere may list others: fitted ones only
            continue
        if "skipped" in fam:
            lines.append(f"{name}: no multiplier against {base}: {fam['skipped']}")
            continue
        top, trend = fam["largest"], fam["trend"]
        ext = (f", EXTRAPOLATED ({base}'s frontier followed beyond the compute it was fitted on)"
               if top["extrapolated"] else "")
        e = trend["exponent"]
        slope = (f"k ~ C^{fmt_value(e['value'])} {fmt_interval(e)}" if e["value"] is not None else "no exponent")
        line = (f"{name}: at its largest budget, C = {fmt_value(top['budget'])} FLOPs, {base} needs "
                f"{fmt_k(top['k'])} ({ci:.0%} bootstrap) that compute to reach {name}'s loss{ext}; trend over "
                f"{trend['n_budgets']} budgets: {slope}: {trend['verdict'].upper()}")
        bt = fam["backtest"]
        if "skipped" in bt:
            line += f"; no backtest ({bt['skipped']})"
        else:
            are = "n/a" if bt["are"] is None else f"{bt['are']:.0%}"
            covered = {True: "inside", False: "OUTSIDE", None: "no interval"}[bt["covered"]]
            line += (f"; backtest: fitted without {fmt_value(bt['budget'])} FLOPs it predicts {fmt_k(bt['predicted'])} "
                     f"there, {fmt_value(bt['observed'])}x from every budget (ARE {are}, {covered} the interval)")
        lines.append(line)
    return lines


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
        if fam.get("backtest", {}).get("holdouts"):
            lines.append(f"  backtest (refit without the largest budgets, predict them; {ci:.0%} prediction intervals):")
            lines.append(f"    {'k':>2} {'budget':>8} {'approach':<11} {'quantity':<9} {'predicted':>10} "
                         f"{'interval':<22} {'observed':>9} {'ARE':>7}  covered")
            for k, budget, approach, what, pred, interval, obs, are, covered in backtest_rows(fam["backtest"]):
                lines.append(f"    {k:>2} {budget:>8} {approach:<11} {what:<9} {pred:>10} {interval:<22} {obs:>9} "
                             f"{are:>7}  {covered}")
        lines += [f"  backtest: {line}" for line in threshold_lines(fam, ci)]
    table = list(calibration_rows(result))
    if table:
        lines += ["", f"calibration ({ci:.0%} intervals on the backtests: achieved coverage, median width / median "
                      f"|error|; ~5.8 is right for normal errors):",
                  f"  {'prediction':<24} {'bootstrap':>14} {'w/e':>5}   {'calibrated':>14} {'w/e':>5}   how"]
        lines += [f"  {label:<24} {bc:>14} {br:>5}   {cc:>14} {cr:>5}   {how}"
                  for label, _, bc, br, cc, cr, how in table]
    mult = multiplier_lines(result)
    if mult:
        base = result["multiplier"]["baseline"]
        lines += ["", f"compute multiplier against {base} (k(C) = C_{base}(L_family(C)) / C):"]
        lines += [f"  {line}" for line in mult]
    pairs = result["crossover"]["pairs"]
    if pairs:
        lines.append("")
        lines.append("crossover:")
        lines += [f"  {' vs '.join(p['families'])}: {p['statement']}" for p in pairs]
    if result.get("decision", {}).get("rows"):
        lines += ["", f"decision accuracy: {result['decision']['statement']}"]
    for title, body in (("backtest order", backtest_order_lines(result)), ("seed noise", seed_gap_lines(result))):
        if body:
            lines += ["", f"{title}:"] + [f"  {line}" for line in body]
    if result.get("wallclock", {}).get("crossover", {}).get("pairs"):
        lines += ["", "wall clock:", f"  {wallclock_statement(result)}"]
    s = result["settings"]
    lines.append("")
    lines.append(f"bootstrap: {s['n_boot']} resamples, seed {s['seed']}")
    t = result.get("timing")
    if t:
        lines.append(f"fit time on {t['n_jobs']} processes: {t['point_estimates_s']:.1f} s point estimates + {t['bootstrap_s']:.1f} s bootstrap "
                     f"+ {t.get('backtest_s', 0.0):.1f} s backtest (wall; {t['cpu_s']:.1f} s CPU over all processes)")
    return "\n".join(lines)
