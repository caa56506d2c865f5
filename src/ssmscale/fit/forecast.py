"""Pre-registered forecasts: predict budgets before they are trained, then score the prediction.

`ssmscale forecast STUDY --budgets C [C ...]` fits the study as `ssmscale fit` does (same settings, so the
same laws as its fit.json) and writes STUDY/forecasts/forecast-<UTC date>-<hash>.json, never over an
existing file. Per family and budget it holds the frontier's and Approach 3's best loss, Approach 2's and
Approach 3's N_opt, each with the calibrated prediction interval of fit/calibration.py (from the study's
own backtests) and the bootstrap interval of the law alone; per pair of families and budget, which one
each law puts lower and in what share of the bootstrap resamples. Approach 3's best loss is its law at the
compute-optimal split of C (C = 6ND); the score compares it with the best run trained at that budget.
A forecast records the results.csv it was made from (sha256, rows), the source commit, the time (UTC) and
a sha256 of its own contents: the report refuses a forecast whose contents no longer match it.

The report scores every forecast on file once runs at its budgets exist (score_forecasts): ARE, inside
or outside each interval, the order of each pair right or wrong, and whether the forecast came first:
every run at the budget must have finished (result.json "finished_at") after the forecast was made, and
where the study is in git the commit that added the forecast must be an ancestor of the commits that
added those runs' results.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fsutil import check_writable_dir
from ..provenance import source_commit
from ..safeload import FileRefused, read_json, read_result
from . import calibration
from .approach2 import budget_vertex
from .approach3 import parametric_allocation, parametric_loss
from .bootstrap import _interval
from .frontier import frontier_loss
from .pipeline import fit_runs, json_safe
from .runs import load_runs

FORECAST_DIR = "forecasts"
SCHEMA = 1
PREDICTED = (("frontier", "loss"), ("parametric", "loss"), ("approach2", "n_opt"), ("parametric", "n_opt"))
ORDERED = ("frontier", "parametric")        # the laws that predict a best loss, so an order of families
SAME_BUDGET = 1e-6                          # budgets this close (relative) are the same budget


def parse_budget(text: str) -> float:
    try:
        c = float(text)
    except ValueError:
        raise UserError(f"--budgets: {text!r} is not a number of FLOPs") from None
    if not (math.isfinite(c) and c > 0):
        raise UserError(f"--budgets: {text!r} is not a positive finite number of FLOPs")
    return c


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= SAME_BUDGET * max(abs(a), abs(b))


# ---------------------------------------------------------------------------------------------------
# making a forecast

def make_forecast(study, budgets: list[float], *, n_boot: int, seed: int, n_jobs: int | None = None,
                  progress: bool = True, parametric_grid=None) -> tuple[dict, Path]:
    """Fit the study, predict `budgets`, write the forecast file; returns (forecast, path).
    `parametric_grid` as in fit_runs (tests use a smaller one for speed)."""
    study = Path(study)
    if not (study / "results.csv").is_file():
        raise UserError(f"{study}: not a study directory (no results.csv in it)")
    budgets = sorted({float(c) for c in budgets})
    loaded = load_runs(study)
    if loaded.grouping != "IsoFLOP groups from the budget column":
        raise UserError(f"{study / 'results.csv'}: no budget column, so no budgets to forecast")
    trained = sorted({c for c in budgets for b in loaded.table["group_flops"] if _same(c, float(b))})
    if trained:
        raise UserError(f"--budgets: {', '.join(f'{c:.3g}' for c in trained)} FLOPs already trained in "
                        f"{study / 'results.csv'}: a forecast is made before the runs exist")
    out_dir = study / FORECAST_DIR
    check_writable_dir(out_dir, "forecast folder")     # before the fit, which takes minutes
    commit, now = source_commit(), datetime.now(timezone.utc)    # the code and the time the forecast starts from
    result = fit_runs(loaded, n_boot=n_boot, seed=seed, n_jobs=n_jobs, progress=progress, keep_samples=True,
                      parametric_grid=parametric_grid)
    body = forecast_body(result, budgets, study.name, now, commit)
    return body, write_forecast(out_dir, body)


def forecast_body(result: dict, budgets: list[float], study: str, now: datetime, commit: str) -> dict:
    """The forecast, from a fit_runs result made with keep_samples, by the code at `commit` at time `now`."""
    now = now.astimezone(timezone.utc)
    models = result["calibration"].get("models", {})
    families = {}
    for name, point in result["point"].items():
        top = _largest_budget(point, result["families"][name])
        samples = [s[name] for s in result["samples"]]
        families[name] = {"largest_budget": top, "predictions": [
            _predictions(point, samples, c, max(0.0, math.log10(c / top)), models, result["settings"]["ci"])
            for c in budgets]}
    body = {"schema": SCHEMA, "kind": "ssmscale forecast", "study": study,
            "made_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "source_commit": commit,
            "results": {"sha256": result["source"]["sha256"], "rows_read": result["source"]["rows_read"],
                        "runs_fitted": sum(f["n_runs"] for f in result["families"].values())},
            "settings": {k: result["settings"][k] for k in ("n_boot", "seed", "ci", "parametric_grid")},
            "budgets": budgets, "families": families,
            "order": _order(result, budgets),
            "calibration": {"mode": result["calibration"]["mode"], "models": models}}
    body = json_safe(body)
    body["sha256"] = content_hash(body)
    return body


def _largest_budget(point: dict, fam: dict) -> float:
    front = point.get("frontier", {})
    if "points" in front:
        return float(np.max(front["points"]["budget"]))
    return float(fam["flops_range"][1])


def predict(approach: str, quantity: str, law: dict, c: float) -> float | None:
    """One law's prediction at budget c (None where the law has no such prediction)."""
    if not isinstance(law, dict) or "skipped" in law:
        return None
    with np.errstate(all="ignore"):
        if approach == "frontier":
            v = float(frontier_loss(law, c))
        elif approach == "approach2":
            v = float(law["N0"] * c ** law["a"])
        else:
            n, d = parametric_allocation(law, c)
            v = float(parametric_loss(law, n, d)) if quantity == "loss" else float(n)
    return v if math.isfinite(v) and v > 0 else None


def _predictions(point: dict, samples: list, c: float, distance: float, models: dict, ci: float) -> dict:
    out: dict = {"budget": c, "distance": distance}
    for approach, quantity in PREDICTED:
        value = predict(approach, quantity, point.get(approach), c)
        if value is None:
            continue
        boot = [predict(approach, quantity, s.get(approach), c) for s in samples]
        spread = calibration.log_spread(boot)
        model = models.get(approach, {}).get(quantity, {"skipped": "no backtest to calibrate on"})
        lo, hi = calibration.interval(value, distance, spread, model)
        law_lo, law_hi = _interval(boot, ci)
        # centre: the middle of the calibrated interval (in log), off the law's value where its backtest
        # errors lean one way: the law's prediction corrected for the bias its backtests showed
        out.setdefault(approach, {})[quantity] = {
            "value": value, "centre": None if lo is None else math.sqrt(lo * hi), "lo": lo, "hi": hi,
            "law_lo": law_lo, "law_hi": law_hi, "spread": spread,
            "calibration": model.get("method", model.get("skipped"))}
    return out


def _order(result: dict, budgets: list[float]) -> list[dict]:
    """Per pair of families and budget: the family each law puts lower, and the share of resamples agreeing."""
    rows = []
    for f1, f2 in itertools.combinations(sorted(result["point"]), 2):
        for c in budgets:
            row: dict = {"families": [f1, f2], "budget": c}
            for approach in ORDERED:
                p1, p2 = (predict(approach, "loss", result["point"][f].get(approach), c) for f in (f1, f2))
                if p1 is None or p2 is None:
                    continue
                lower = f1 if p1 < p2 else f2
                pairs = [(predict(approach, "loss", s[f1].get(approach), c),
                          predict(approach, "loss", s[f2].get(approach), c)) for s in result["samples"]]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                agree = sum((a < b) == (lower == f1) for a, b in pairs)
                row[approach] = {"lower": lower, "gap": p2 - p1, "resamples": len(pairs),
                                 "probability": agree / len(pairs) if pairs else None}
            rows.append(row)
    return rows


def content_hash(body: dict) -> str:
    blob = json.dumps({k: v for k, v in body.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"),
                      allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_forecast(out_dir: Path, body: dict) -> Path:
    """forecasts/forecast-<YYYYMMDD>-<hash>.json, created whole (temp file, then a hard link that fails if the
    name exists) and never over another forecast."""
    out_dir.mkdir(exist_ok=True)
    target = out_dir / f"forecast-{body['made_at'][:10].replace('-', '')}-{body['sha256'][:8]}.json"
    fd, tmp = tempfile.mkstemp(prefix=".forecast.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(body, indent=2, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, target)
    except FileExistsError:
        raise UserError(f"{target}: a forecast of that name exists already; forecasts are never overwritten") from None
    finally:
        os.unlink(tmp)
    return target


def forecast_lines(body: dict, path: Path) -> list[str]:
    """What `ssmscale forecast` prints."""
    ci = body["settings"]["ci"]
    lines = [f"forecast of {body['study']} made {body['made_at']} from commit {body['source_commit']} "
             f"(results.csv sha256 {body['results']['sha256'][:12]}, {body['results']['runs_fitted']} runs fitted)"]
    for name, fam in body["families"].items():
        for p in fam["predictions"]:
            bits = [f"{_label(a, q)} {_shown(v)}" for a, q in PREDICTED if (v := p.get(a, {}).get(q))]
            lines.append(f"  {name} at {p['budget']:.3g} FLOPs ({p['distance']:.2f} decades beyond its largest "
                         f"budget): " + "; ".join(bits))
    for row in body["order"]:
        for approach in ORDERED:
            if approach in row:
                o = row[approach]
                prob = "n/a" if o["probability"] is None else f"{o['probability']:.0%}"
                lines.append(f"  {' vs '.join(row['families'])} at {row['budget']:.3g}: {approach} puts {o['lower']} "
                             f"lower (in {prob} of {o['resamples']} resamples)")
    lines.append(f"  intervals: {ci:.0%} prediction intervals calibrated on the study's backtests (docs/forecast.md)")
    lines.append(f"wrote {path}; commit it before training these budgets, then `ssmscale report` scores it")
    return lines


def _shown(v: dict) -> str:
    """A prediction, its interval, and its centre where the backtests moved it off the law's value."""
    if v["lo"] is None:
        return (f"{_fmt(v['value'])} (not calibrated: {v['calibration']}; the law's bootstrap interval alone "
                f"[{_fmt(v['law_lo'])}, {_fmt(v['law_hi'])}])")
    leans = abs(v["centre"] / v["value"] - 1) > 1e-9
    return (f"{_fmt(v['value'])} " + (f"(centre {_fmt(v['centre'])}: its backtests lean) " if leans else "")
            + f"[{_fmt(v['lo'])}, {_fmt(v['hi'])}]")


def _label(approach: str, quantity: str) -> str:
    return {"frontier": "frontier", "parametric": "Approach 3", "approach2": "Approach 2"}[approach] + \
        (" best loss" if quantity == "loss" else " N_opt")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


# ---------------------------------------------------------------------------------------------------
# reading and scoring

def read_forecast(path: Path, within: Path | None = None) -> dict:
    """A forecast file, checked: strict JSON of this tool's shape whose sha256 matches its contents (read
    through safeload: a regular file of bounded size, with `within` from inside that folder only)."""
    from ..safeload import FileRefused, read_json
    try:
        body = read_json(path, within)
    except (FileRefused, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    if not isinstance(body, dict) or body.get("schema") != SCHEMA or body.get("kind") != "ssmscale forecast":
        raise UserError(f"{path}: not a forecast of this tool (wrong shape)")
    try:
        ok = body.get("sha256") == content_hash(body)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{path}: its contents do not match its sha256: the forecast was edited after it was made")
    try:
        datetime.fromisoformat(body["made_at"].replace("Z", "+00:00"))
        for fam in body["families"].values():
            for p in fam["predictions"]:
                float(p["budget"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{path}: not a forecast of this tool (wrong shape)") from None
    return body


def score_forecasts(study: Path, loaded) -> list[dict]:
    """Every forecast in STUDY/forecasts scored against the runs now in the study."""
    folder = study / FORECAST_DIR
    if not folder.is_dir():
        return []
    scores = []
    for path in sorted(folder.glob("forecast-*.json")):
        body = read_forecast(path, within=study)
        try:
            scores.append(score_forecast(study, path, body, loaded))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError):
            # its sha256 matches (anyone can compute one), but it is not what make_forecast writes
            raise UserError(f"{path}: not a forecast of this tool (wrong shape)") from None
    return scores


def score_forecast(study: Path, path: Path, body: dict, loaded) -> dict:
    table = loaded.table
    scored, observed = [], {}
    for name, fam in body["families"].items():
        for p in fam["predictions"]:
            c = float(p["budget"])
            rows = table[(table["family"] == name) & table["group_flops"].map(lambda b: _same(float(b), c))]
            if rows.empty:
                continue
            best = rows.loc[rows["loss"].idxmin()]
            vertex = budget_vertex(c, rows["params"].to_numpy(float), rows["tokens"].to_numpy(float),
                                   rows["loss"].to_numpy(float))
            obs = {"loss": float(best["loss"]), "n_opt": vertex["n_opt"] if vertex["used"] else None}
            observed[(name, c)] = obs["loss"]
            entry = {"family": name, "budget": c, "n_runs": len(rows), "best_params": float(best["params"]),
                     "observed": obs, "run_ids": sorted(i for ids in rows["run_ids"] for i in ids), "scores": []}
            for approach, quantity in PREDICTED:
                v = p.get(approach, {}).get(quantity)
                if not v or obs[quantity] is None:
                    continue
                o = obs[quantity]
                entry["scores"].append({"approach": approach, "quantity": quantity, "predicted": v["value"],
                                        "lo": v["lo"], "hi": v["hi"], "observed": o,
                                        "are": abs(v["value"] - o) / o,
                                        "inside": None if v["lo"] is None else bool(v["lo"] <= o <= v["hi"])})
            scored.append(entry)
    order = []
    for row in body["order"]:
        f1, f2 = row["families"]
        c = float(row["budget"])
        if (f1, c) not in observed or (f2, c) not in observed:
            continue
        lower = f1 if observed[(f1, c)] < observed[(f2, c)] else f2
        order.append({"families": [f1, f2], "budget": c, "observed_lower": lower,
                      **{a: {"lower": row[a]["lower"], "probability": row[a]["probability"],
                             "right": row[a]["lower"] == lower} for a in ORDERED if a in row}})
    run_ids = sorted({i for e in scored for i in e["run_ids"]})
    return {"path": str(path), "made_at": body["made_at"], "source_commit": body["source_commit"],
            "budgets": body["budgets"], "ci": body["settings"]["ci"], "families": scored, "order": order,
            "pending": not scored, "came_first": _came_first(study, path, body["made_at"], run_ids)}


def _came_first(study: Path, path: Path, made_at: str, run_ids: list[str]) -> dict:
    """Whether the forecast predates the runs it is scored on: their finish times in result.json, and in git
    the commit adding the forecast against the commits adding the runs' results."""
    if not run_ids:
        return {"verdict": None, "statement": "no runs at these budgets yet"}
    made = datetime.fromisoformat(made_at.replace("Z", "+00:00"))
    finished, unknown = [], []
    for run_id in run_ids:
        res = read_result(study / "runs" / run_id / "result.json", within=study)[0] or {}
        try:
            finished.append(datetime.fromisoformat(str(res["finished_at"]).replace("Z", "+00:00")))
        except (KeyError, ValueError):
            unknown.append(run_id)
    early = [t for t in finished if t <= made]
    git = _git_order(study, path, run_ids)
    if early or git is False:
        why = (f"{len(early)} of {len(run_ids)} runs finished before it was made" if early else
               "in git, some runs' results were committed before or with the forecast")
        return {"verdict": False, "statement": f"NOT a forecast of these runs: {why}"}
    parts = []
    if finished:
        parts.append(f"every run with a recorded finish time ({len(finished)} of {len(run_ids)}) finished after it "
                     f"(first {min(finished).isoformat(timespec='seconds')})")
    if unknown:
        parts.append(f"{len(unknown)} runs record no finish time")
    parts.append("git: the forecast's commit precedes the runs' commits" if git else
                 "git: not checked (forecast or runs not committed, or no git)")
    verdict = True if (not unknown and (git or finished)) else None
    return {"verdict": verdict, "statement": ("made before these runs existed: " if verdict else
                                              "not fully verifiable: ") + "; ".join(parts)}


def _git(study: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=study, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_order(study: Path, path: Path, run_ids: list[str]) -> bool | None:
    """True: the commit that added the forecast is a strict ancestor of every commit that added a run's
    result.json; False: some run's result was added before or with it; None: cannot tell."""
    def added(p: Path) -> str | None:
        log = _git(study, "log", "--diff-filter=A", "--format=%H", "--", str(p.resolve()))
        return log.splitlines()[-1] if log else None
    fc = added(path)
    if fc is None:
        return None
    commits = [added(study / "runs" / r / "result.json") for r in run_ids]
    if any(c is None for c in commits):
        return None
    for c in set(commits):
        if c == fc or _git(study, "merge-base", "--is-ancestor", fc, c) is None:
            return False
    return True


def summary_line(score: dict) -> str:
    """One line for the report's Summary: how a forecast on file did, or that it waits for its runs."""
    head = f"forecast {Path(score['path']).name} (made {score['made_at']} from commit `{score['source_commit'][:12]}`)"
    if score["pending"]:
        return f"{head}: pending, no runs at {', '.join(f'{c:.3g}' for c in score['budgets'])} FLOPs yet"
    parts = []
    for approach, quantity in PREDICTED:
        got = [v["inside"] for e in score["families"] for v in e["scores"]
               if (v["approach"], v["quantity"]) == (approach, quantity) and v["inside"] is not None]
        ares = [v["are"] for e in score["families"] for v in e["scores"] if (v["approach"], v["quantity"]) == (approach, quantity)]
        if ares:
            parts.append(f"{_label(approach, quantity)} mean ARE {np.mean(ares):.1%}, {sum(got)}/{len(got)} inside")
    for approach in ORDERED:
        right = [o[approach]["right"] for o in score["order"] if approach in o]
        if right:
            parts.append(f"{approach} order right {sum(right)}/{len(right)}")
    return f"{head}: " + "; ".join(parts) + f"; {score['came_first']['statement']}"


def score_lines(scores: list[dict]) -> list[str]:
    """Markdown for the report: every forecast on file and its score."""
    if not scores:
        return []
    out = ["### Forecasts on file: predictions made before the runs", ""]
    for s in scores:
        budgets = ", ".join(f"{c:.3g}" for c in s["budgets"])
        out.append(f"**{Path(s['path']).name}**: made {s['made_at']} from commit `{s['source_commit']}` for "
                   f"{budgets} FLOPs. {s['came_first']['statement']}.")
        out.append("")
        if s["pending"]:
            out += ["Pending: no runs at these budgets yet.", ""]
            continue
        out += [f"| family | budget | runs | prediction | predicted | {s['ci']:.0%} interval | observed | ARE | inside |",
                "|---|---|---|---|---|---|---|---|---|"]
        for e in s["families"]:
            for v in e["scores"]:
                inside = "n/a" if v["inside"] is None else ("yes" if v["inside"] else "**NO**")
                out.append(f"| {e['family']} | {e['budget']:.3g} | {e['n_runs']} | {_label(v['approach'], v['quantity'])} "
                           f"| {_fmt(v['predicted'])} | [{_fmt(v['lo'])}, {_fmt(v['hi'])}] | {_fmt(v['observed'])} "
                           f"| {v['are']:.2%} | {inside} |")
        out.append("")
        for o in s["order"]:
            for a in ORDERED:
                if a in o:
                    prob = "n/a" if o[a]["probability"] is None else f"{o[a]['probability']:.0%}"
                    out.append(f"- {' vs '.join(o['families'])} at {o['budget']:.3g} FLOPs: {a} predicted "
                               f"{o[a]['lower']} lower ({prob} of resamples), observed {o['observed_lower']}: order "
                               f"{'right' if o[a]['right'] else '**WRONG**'}.")
        out.append("")
    return out
