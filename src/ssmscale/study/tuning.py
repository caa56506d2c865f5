"""Learning rates found by the study itself, and seed noise: `lr_tune_budget` tunes each (family, size)
cell at one budget and the other budgets take its best rate; `lr_widen` adds rates beyond a cell's grid
while the best sits at its edge; `noise_seeds` trains the best run of each (family, budget) again with
other seeds once the main grid has ended. The plan grows as results arrive (plan_study).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path

from ..config import LadderConfig
from .plan import PlannedRun, lrs_for, plan, size_entries, size_label, sweep_points
from .state import _finished, _read_result


def tuned_lrs(cfg: LadderConfig, out_dir: Path) -> dict:
    """{(family, size label, sweep point): lr} with the lowest validation loss at the tuning budget, for
    the (family, size, point) cells whose tuning runs have all ended (a cell with no successful run gets
    none)."""
    if cfg.lr_tune_budget is None:
        return {}
    best, open_pairs = {}, set()
    for r in plan(cfg, widened=widened_lrs(cfg, out_dir)):
        if r.budget != cfg.lr_tune_budget:
            continue
        key = (r.family, r.size, r.sweep)
        res = _read_result(out_dir, r.run_id)
        if res is None:
            open_pairs.add(key)       # not tried yet: the best rate is not known
        elif res.get("status") == "ok" and res.get("loss") is not None and math.isfinite(res["loss"]):
            if key not in best or res["loss"] < best[key][0]:
                best[key] = (res["loss"], r.lr)
    return {k: lr for k, (_, lr) in best.items() if k not in open_pairs}


def widened_lrs(cfg: LadderConfig, out_dir: Path) -> dict:
    """{(family, size label, sweep point): [lr, ...]}: the learning rates `lr_widen` adds beyond each cell's
    grid at the tuning budget. While every rate a cell has tried has ended and the lowest loss sits at the
    lowest (highest) of them, the next rate below (above) is added, one grid step away (the ratio of the
    grid's two end values on that side; 3x for a one-value grid), at most `lr_widen` of them per cell.
    A diverged run counts as the worst loss (it ends the widening on its side); a failed one is retried
    first."""
    if not cfg.lr_widen or cfg.lr_tune_budget is None:
        return {}
    out: dict = {}
    while True:                                   # one more rate per open-edged cell and pass
        cells: dict = {}
        for r in plan(cfg, widened=out):
            if r.budget == cfg.lr_tune_budget and not r.skip:
                cells.setdefault((r.family, r.size, r.sweep), []).append(r)
        grew = False
        for key, runs in cells.items():
            extra = out.get(key, [])
            losses = {r.lr: _tuning_loss(_read_result(out_dir, r.run_id)) for r in runs}
            if len(extra) >= cfg.lr_widen or any(v is None for v in losses.values()):
                continue
            grid = sorted(r.lr for r in runs if r.lr_source == "grid")
            tried = sorted(losses)
            best = min(tried, key=lambda lr: (losses[lr], lr))
            if not math.isfinite(losses[best]) or best not in (tried[0], tried[-1]):
                continue
            if best == tried[-1]:
                lr = best * (grid[-1] / grid[-2] if len(grid) > 1 else 3.0)
            else:
                lr = best / (grid[1] / grid[0] if len(grid) > 1 else 3.0)
            lr = float(f"{lr:.2g}")
            if lr in losses:
                continue
            out[key] = [*extra, lr]
            grew = True
        if not grew:
            return out


def _tuning_loss(res: dict | None) -> float | None:
    """A tuning run's loss for widening: None while it has not ended (or failed: it is retried), inf where it
    diverged."""
    if not res or res.get("status") not in ("ok", "diverged"):
        return None
    loss = res.get("loss")
    return float(loss) if res.get("status") == "ok" and loss is not None and math.isfinite(loss) else math.inf


def noise_runs(cfg: LadderConfig, out_dir: Path, runs: list[PlannedRun]) -> list[PlannedRun]:
    """The seed-noise runs: none until every run of the main grid has ended; then, per (family, budget),
    the run with the lowest loss (mean over `seeds`) trained again with each of `noise_seeds` (at the budgets
    of `noise_budgets` only, where it is given)."""
    main = [r for r in runs if not r.skip]
    if not cfg.noise_seeds or not main or any(r.lr is None or not _finished(out_dir, r) for r in main):
        return []
    losses: dict = {}
    for r in main:
        if cfg.noise_budgets is not None and not any(math.isclose(r.budget, c, rel_tol=1e-9) for c in cfg.noise_budgets):
            continue
        res = _read_result(out_dir, r.run_id)
        if res.get("status") == "ok" and res.get("loss") is not None and math.isfinite(res["loss"]):
            losses.setdefault((r.family, r.budget, r.size, r.lr), []).append((res["loss"], r))
    best: dict = {}
    for (family, budget, _, _), seeds in losses.items():
        mean = sum(loss for loss, _ in seeds) / len(seeds)
        if (family, budget) not in best or mean < best[(family, budget)][0]:
            best[(family, budget)] = (mean, seeds[0][1])
    out = []
    for _, r in sorted(best.values(), key=lambda v: (cfg.families.index(v[1].family), v[1].budget)):
        base = re.sub(r"_s\d+$", "", r.run_id) if len(cfg.seeds) > 1 else r.run_id
        for seed in cfg.noise_seeds:
            out.append(PlannedRun(**{**asdict(r), "run_id": f"{base}_s{seed}", "seed": seed,
                                     "lr_source": f"copied from {r.run_id}"}))
    return out


def plan_study(cfg: LadderConfig, out_dir: Path, n_train_tokens: int | None = None) -> list[PlannedRun]:
    """The plan as far as the study's results make it known: tuned learning rates, then the noise-seed runs."""
    runs = plan(cfg, n_train_tokens, tuned_lrs(cfg, out_dir), widened_lrs(cfg, out_dir))
    return runs + noise_runs(cfg, out_dir, runs)


def _print_tuned(cfg: LadderConfig, out_dir: Path):
    from ..config import sweep
    tuned = tuned_lrs(cfg, out_dir)
    lines = []
    for point, _ in sweep_points(cfg):
        for size in size_entries(cfg):
            grid = sorted(lrs_for(cfg, size))
            for fam in cfg.families:
                lr = tuned.get((fam, size_label(size), sweep.encode(point)))
                if lr is None:
                    continue
                edge = "  <- edge of the grid: the optimum may lie outside it" if lr in (grid[0], grid[-1]) else ""
                lines.append(f"  {fam:<11} {size_label(size):>8} {sweep.label(point)}  lr {lr:.3g}{edge}")
    print(f"learning rates tuned at {cfg.lr_tune_budget:.3g} FLOPs:\n" + "\n".join(lines))
