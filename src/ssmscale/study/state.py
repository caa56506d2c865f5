"""The study folder's state: the lock that keeps a second ladder out, the check that a restart is the same
study, the results (result.json per run -> results.csv, rebuilt, never appended) and what counts as
finished. Everything a restart needs is on disk: a run's result.json is written atomically when it ends.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..config import EXECUTION_KEYS, LadderConfig, load_ladder_config
from ..errors import UserError
from ..fsutil import FileLock, check_no_links, make_dirs
from .plan import PlannedRun


RESULT_COLUMNS = [
    "run_id", "study", "family", "size", "d_model", "n_layer", "params", "params_total", "state_bytes", "budget",
    "sweep", "flops", "flops_per_token", "ratio_to_6n", "tokens", "steps", "lr", "lr_source", "seed", "seq_len",
    "batch_size", "loss", "bpb", "val_accuracy", "status", "message", "flags", "wall_s", "tokens_per_s",
    "config_hash", "data_fingerprint", "commit", "device", "versions", "flops_convention", "threads", "train_s",
    "train_cpu_s",
    "context_gain",
]


class StudyLock(FileLock):
    """An exclusive flock on DIR/.ladder.lock (fsutil.FileLock): a second ladder on the folder is refused."""

    def __init__(self, out_dir: Path):
        super().__init__(out_dir / ".ladder.lock", busy=f"{out_dir}: another ladder (pid {{pid}}) is running on "
                                                        "this directory; wait for it to finish or stop it", tidy=True)


def _fixed_part(cfg: LadderConfig) -> dict:
    """What must not change between restarts of one study (the grid itself may grow)."""
    d = cfg.model_dump(mode="json")
    for key in ("families", "budgets", "sizes", "widths", "sweep", "lrs", "seeds", "noise_seeds", "noise_budgets", "lr_tune_budget", "lr_widen",
                "min_steps", "run_flagged", "allow_repeats", "tokens_per_param", "budget_sizes", "executor", "parallel", "submitit",
                "fit", "contrast_with"):
        d.pop(key)
    d.pop("custom_families", None)      # plugin families may be added; one already there may not change (below)
    for key in EXECUTION_KEYS:          # how runs execute, not what they compute
        d["train"].pop(key)
    return d


def _check_same_study(cfg: LadderConfig, out_dir: Path):
    saved_path = out_dir / "config.yaml"
    if not saved_path.exists():
        return
    try:
        saved = load_ladder_config(saved_path, within=out_dir)
    except UserError as exc:
        raise UserError(f"{saved_path}: unreadable ({str(exc).removeprefix(f'{saved_path}: ')}); "
                        "this directory does not look like a study") from None
    a, b = _fixed_part(saved), _fixed_part(cfg)
    common = sorted(set(saved.custom_families) & set(cfg.custom_families))     # a plugin family may not change
    for part, c in ((a, saved), (b, cfg)):
        part["custom_families"] = {n: c.custom_families[n].model_dump(mode="json") for n in common}
    if a != b:
        diff = _first_difference(a, b)
        raise UserError(f"{out_dir}: made with a different config ({diff} differs); "
                        "use another --out or restore the config")


def _first_difference(a, b, prefix="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return prefix.rstrip(".") or "config"


def collect_results(cfg: LadderConfig, out_dir: Path, runs: list[PlannedRun]):
    """results.csv rebuilt from every run's result.json, in plan order: no duplicates, never partial."""
    import pandas as pd
    from ..fsutil import atomic_write_dataframe_csv
    rows = []
    for r in runs:
        res = _read_result(out_dir, r.run_id)
        if res is None:
            continue      # not run yet, or malformed (run_ladder said so and trains it again)
        row = {**res, "run_id": r.run_id, "study": cfg.name, "size": r.size, "budget": r.budget,
               "sweep": r.sweep, "lr_source": r.lr_source, "flags": r.flags,
               "versions": json.dumps(res.get("versions", {}), sort_keys=True)}
        rows.append({k: row.get(k) for k in RESULT_COLUMNS})
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    atomic_write_dataframe_csv(out_dir / "results.csv", df)
    return df


def _read_result(out_dir: Path, run_id: str) -> dict | None:
    """A run's well-formed result.json, else None (absent or malformed: the run counts as unfinished)."""
    from ..safeload import read_result
    return read_result(out_dir / "runs" / run_id / "result.json", within=out_dir)[0]


def _say_malformed(out_dir: Path, runs: list[PlannedRun]) -> None:
    """One line per result.json that cannot be used (wrong shape, not JSON): that run is trained again.
    A link or a special file in a run's place is refused (UserError) before any run starts."""
    from ..safeload import read_result
    for r in runs:
        if not r.skip:
            check_no_links(out_dir, (f"runs/{r.run_id}/result.json", f"runs/{r.run_id}/.run.lock"))
        problem = read_result(out_dir / "runs" / r.run_id / "result.json", within=out_dir)[1]
        if problem and not r.skip:
            print(f"{problem}; the run counts as unfinished and is trained again", file=sys.stderr)


def _finished(out_dir: Path, run: PlannedRun) -> bool:
    """A result exists, is final, and was trained with the learning rate planned now (a tuned learning
    rate changes when the tuning grid grows: such runs are trained again)."""
    res = _read_result(out_dir, run.run_id)
    return bool(res) and res.get("status") in ("ok", "diverged") and (
        run.lr is None or res.get("lr") is None or math.isclose(res["lr"], run.lr, rel_tol=1e-9))


def _run_lock(out_dir: Path, run_id: str) -> FileLock:
    """An exclusive flock on runs/<id>/.run.lock, waited for; the kernel releases it when its holder dies."""
    return FileLock(make_dirs(out_dir, "runs", run_id) / ".run.lock")


def _write_failed(out_dir, run, res) -> dict:
    """Record a run that ended without a result, unless its process did write a final one (a job
    cancelled after its run had finished); return the run's result. The next invocation retries failed runs."""
    from ..fsutil import atomic_write_json
    if _finished(out_dir, run):
        return _read_result(out_dir, run.run_id)
    failed = {**res, "family": run.family, "params": run.params, "params_total": run.params_total,
              "d_model": run.d_model, "n_layer": run.n_layer, "lr": run.lr, "seed": run.seed}
    atomic_write_json(make_dirs(out_dir, "runs", run.run_id) / "result.json", failed)
    return failed
