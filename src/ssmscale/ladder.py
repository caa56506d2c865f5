"""The ladder: plan (families x budgets x sizes x learning rates x seeds [x sweep points]) -> run -> results.

An IsoFLOP ladder (`budgets`): each run spends its budget, tokens = budget / training FLOPs per token
(flops.py), rounded to whole optimiser steps; the FLOPs actually spent are recorded. With `noise_seeds`,
once the main grid has finished, the best run of each (family, budget) is trained again with each extra
seed (same shape and learning rate; run id `<best run>_s<seed>`), so the fits can put the seed-to-seed
noise into their intervals; adding noise seeds to a finished study trains only them. A fixed-length
ladder (`steps` or `tokens`, e.g. the recall study) trains every run equally long and has no scaling
law to fit: its report is the recall report (report_recall.py). `widths` instead of `sizes` gives
each family the same d_model at the depth sizing.layers_at_width sets; `sweep` repeats the grid at
every point of extra config axes (sweep.py), whose labels go into the run ids.

The ladder is restartable at any moment: a run's result.json is written atomically when it ends, a
restart skips runs that have one (and retries runs that failed), results.csv is rebuilt from the
result files (never appended), and a lock file keeps a second ladder process out of the same directory.

    scaling/<study>/config.yaml           the ladder config
    scaling/<study>/plan.csv              every planned run, with flags
    scaling/<study>/runs/<run_id>/        result.json, metrics.csv, config.yaml, model.pt
    scaling/<study>/results.csv           one row per finished run
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import EXECUTION_KEYS, LadderConfig, ModelSpec, RunConfig, ShapeSpec, load_ladder_config
from .errors import UserError
from .models.config import FAMILIES

RESULT_COLUMNS = [
    "run_id", "study", "family", "size", "d_model", "n_layer", "params", "params_total", "state_bytes", "budget",
    "sweep", "flops", "flops_per_token", "ratio_to_6n", "tokens", "steps", "lr", "lr_source", "seed", "seq_len",
    "batch_size", "loss", "bpb", "val_accuracy", "status", "message", "flags", "wall_s", "tokens_per_s",
    "config_hash", "data_fingerprint", "commit", "device", "versions", "flops_convention", "threads", "train_s",
    "train_cpu_s",
    "context_gain",
]


@dataclass
class PlannedRun:
    run_id: str
    family: str
    size: str                 # label of the size entry ("1e5", "transformer-d64xL2+mamba-d56xL4" or "d64")
    d_model: int
    n_layer: int
    params: int               # non-embedding
    params_total: int
    budget: float | None      # target training FLOPs (None: a fixed-length ladder)
    sweep: str                # the sweep point as JSON (sweep.encode), "" without a sweep
    lr: float | None          # None: to be taken from the tuning budget's results (not known yet)
    lr_source: str            # "grid", "widened" (lr_widen), "tuned at <budget>" or "copied from <run>"
    seed: int
    flops_per_token: float
    tokens: int               # tokens actually trained (whole steps)
    steps: int
    flops: float              # FLOPs actually spent = tokens * flops_per_token
    flags: str                # "" or e.g. "few-steps;repeats;ratio"
    skip: bool                # not trained (flagged and the config does not ask for flagged runs)
    d_ff: int | None = None   # a plugin family's MLP hidden width, as sizing set it (None: the default rule)


# ------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Width:
    """A `widths` entry: every family at this d_model, at its depth rule's number of layers."""
    d_model: int


def size_entries(cfg: LadderConfig) -> list:
    """The size axis: `sizes` entries (floats or ShapeSpecs) or Width entries."""
    return list(cfg.sizes) if cfg.sizes is not None else [Width(w) for w in cfg.widths]


def size_label(size) -> str:
    if isinstance(size, Width):
        return f"d{size.d_model}"
    if isinstance(size, ShapeSpec):
        return "+".join(f"{f}-d{s[0]}xL{s[1]}" for f in FAMILIES if (s := getattr(size, f)))
    return f"{size:.3g}".replace("+", "")


def _lr_key_matches(key: str, size) -> bool:
    if isinstance(size, (ShapeSpec, Width)) or key.startswith("d"):
        return False
    return math.isclose(float(key), float(size), rel_tol=1e-9)


def lrs_for(cfg: LadderConfig, size) -> list[float]:
    if isinstance(cfg.lrs, list):
        return list(cfg.lrs)
    for key, values in cfg.lrs.items():
        if key != "default" and (_lr_key_matches(key, size) or key == size_label(size)):
            return list(values)
    if "default" in cfg.lrs:
        return list(cfg.lrs["default"])
    raise UserError(f"lrs: no learning rates for size {size_label(size)} (add it or a 'default' entry)")


def vocab_size_of(cfg) -> int:
    if cfg.data.source == "synthetic":
        return (cfg.data.synthetic.vocab_size if cfg.data.synthetic else 256)
    return cfg.tokenizer.vocab_size


def model_configs(cfg: LadderConfig):
    """[(size, {family: ModelConfig})] in config order: with `sizes`, every family is matched to the transformer
    in parameters per size; with `widths`, every family has that d_model and its depth rule's layers.
    Plugin families (custom_families) carry their MixerSpec; sizing them builds their mixer (imports it)."""
    from .models import ModelConfig
    from .models.sizing import MIN_LAYERS, layers_at_width, shape_for
    m = cfg.model
    mixers = cfg.mixers()
    base = ModelConfig(family="transformer", d_model=m.head_dim, n_layer=1, vocab_size=vocab_size_of(cfg),
                       **m.knobs())
    out = []
    for i, size in enumerate(size_entries(cfg)):
        per_family = {}
        try:
            if isinstance(size, Width):
                for fam in cfg.families:
                    per_family[fam] = base.replace(
                        family=fam, d_model=size.d_model, mixer=mixers.get(fam),
                        n_layer=layers_at_width(fam, cfg.width_layers or MIN_LAYERS, mixers.get(fam)))
            elif isinstance(size, ShapeSpec):
                for fam in cfg.families:
                    d, n = getattr(size, fam)
                    per_family[fam] = base.replace(family=fam, d_model=d, n_layer=n)
            else:
                tf = shape_for("transformer", size, base)
                for fam in cfg.families:
                    s = tf if fam == "transformer" else shape_for(fam, size, base, match=tf.params,
                                                                  mixer=mixers.get(fam))
                    per_family[fam] = base.replace(family=fam, d_model=s.d_model, n_layer=s.n_layer,
                                                   mixer=mixers.get(fam), d_ff=s.d_ff or base.d_ff)
        except ValueError as exc:
            raise UserError(f"{'sizes' if cfg.sizes is not None else 'widths'}.{i}: {exc}") from None
        out.append((size, per_family))
    return out


def sweep_points(cfg: LadderConfig) -> list[tuple[dict, LadderConfig]]:
    """[(point, the ladder config at that point)]; [({}, cfg)] without a sweep."""
    from . import sweep
    return [(p, config_at(cfg, p)) for p in sweep.points(cfg.sweep)]


def config_at(cfg: LadderConfig, point: dict) -> LadderConfig:
    """The ladder config with a sweep point's values written in and no sweep of its own."""
    from . import sweep
    if not point:
        return cfg
    return LadderConfig.model_validate(sweep.apply_point(cfg.model_dump(mode="json", exclude={"sweep"}), point))


def plan(cfg: LadderConfig, n_train_tokens: int | dict | None = None, tuned: dict | None = None,
         widened: dict | None = None) -> list[PlannedRun]:
    """Every run of the grid, with its shape, tokens, steps, FLOPs and flags. Pure (no training).

    `n_train_tokens`: the training split's size, or {sweep.encode(point): size} per sweep point.
    With `lr_tune_budget`, runs at other budgets take their learning rate from `tuned`
    ({(family, size label, sweep point): lr}, see tuned_lrs); until it is known their lr is None.
    `widened` ({same key: [lr, ...]}, see widened_lrs) adds learning rates beyond a cell's grid."""
    from . import sweep
    runs = []
    for point, pcfg in sweep_points(cfg):
        code = sweep.encode(point)
        n_train = n_train_tokens.get(code) if isinstance(n_train_tokens, dict) else n_train_tokens
        runs += _plan_point(pcfg, point, n_train, tuned, widened)
    seen = set()
    for r in runs:
        if r.run_id in seen:
            raise UserError(f"sweep: two runs would share the id {r.run_id} (keys with the same last name and "
                            "value, or values that differ only in characters a run id cannot hold)")
        seen.add(r.run_id)
    return runs


def _plan_point(cfg: LadderConfig, point: dict, n_train_tokens: int | None, tuned: dict | None,
                widened: dict | None = None) -> list[PlannedRun]:
    """The runs of one sweep point (`cfg` is the ladder config at that point)."""
    from . import sweep
    from .flops import flops_summary
    t = cfg.train
    per_step = t.batch_size * t.seq_len
    code = sweep.encode(point)
    where = f" at the sweep point {sweep.label(point)}" if point else ""
    sized = model_configs(cfg)
    runs = []
    tune = cfg.lr_tune_budget
    budgets = sorted(cfg.budgets, key=lambda b: b != tune) if cfg.budgets else [None]   # the tuning budget first
    for budget in budgets:
        smallest = None
        for size, per_family in sized:
            for fam in cfg.families:
                mc = per_family[fam]
                cost = flops_summary(mc, t.seq_len)
                steps = _steps(cfg, budget, cost["train_flops_per_token"], per_step)
                if smallest is None or cost["params"] < smallest[0]:
                    smallest = (cost["params"], steps, size)
                tokens = steps * per_step
                flags = []
                if steps < cfg.min_steps:
                    flags.append("few-steps")
                if n_train_tokens is not None and tokens > n_train_tokens:
                    flags.append("repeats")
                window = cfg.tokens_per_param
                if window and not window[0] <= tokens / cost["params"] <= window[1]:
                    flags.append("ratio")
                outside = not cfg.trains_size(budget, fam, size)
                if outside:
                    flags.append("window")
                skip = steps == 0 or outside or (("few-steps" in flags or "ratio" in flags) and not cfg.run_flagged) or \
                    ("repeats" in flags and not (cfg.allow_repeats or cfg.run_flagged))
                if tune is None or budget == tune:
                    choices = [(float(lr), "grid") for lr in lrs_for(cfg, size)]
                    choices += [(lr, "widened") for lr in (widened or {}).get((fam, size_label(size), code), [])]
                else:
                    choices = [((tuned or {}).get((fam, size_label(size), code)), f"tuned at {tune:.3g}")]
                for lr, source in choices:
                    for seed in cfg.seeds:
                        run_id = _run_id(fam, size, mc, budget, point, lr if source in ("grid", "widened") else None,
                                         seed, cfg, always_lr=source == "widened")
                        runs.append(PlannedRun(run_id, fam, size_label(size), mc.d_model, mc.n_layer,
                                               cost["params"], cost["params_total"], budget, code, lr, source,
                                               seed, cost["train_flops_per_token"], tokens, steps,
                                               tokens * cost["train_flops_per_token"], ";".join(flags), skip,
                                               mc.d_ff if mc.is_plugin else None))
        if smallest[1] < cfg.min_steps:
            what = (f"budgets.{cfg.budgets.index(budget)}: {budget:.3g} FLOPs" if budget is not None
                    else f"tokens: {cfg.tokens:.3g} tokens")
            raise UserError(f"{what} gives the smallest size ({size_label(smallest[2])}, "
                            f"{smallest[0]:,} params) only {smallest[1]} step{'' if smallest[1] == 1 else 's'} of "
                            f"{per_step} tokens{where} (min_steps {cfg.min_steps}): raise it or shrink the batch")
    return runs


def _steps(cfg: LadderConfig, budget: float | None, flops_per_token: float, per_step: int) -> int:
    """Optimiser steps of one run: its budget's, or the ladder's fixed length."""
    if budget is not None:
        return max(0, round(budget / flops_per_token / per_step))
    if cfg.steps is not None:
        return cfg.steps
    return max(0, round(cfg.tokens / per_step))


def _run_id(family, size, mc, budget, point, lr, seed, cfg, always_lr=False) -> str:
    from . import sweep
    parts = [family, f"N{size_label(size)}" if not isinstance(size, (ShapeSpec, Width))
             else f"d{mc.d_model}xL{mc.n_layer}"]
    if budget is not None:
        parts.append(f"C{budget:.3g}")
    if point:
        parts.append(sweep.label(point))
    if lr is not None and (always_lr or isinstance(cfg.lrs, dict) or len(cfg.lrs) > 1):
        parts.append(f"lr{lr:.3g}")
    if len(cfg.seeds) > 1:
        parts.append(f"s{seed}")
    return re.sub(r"[^A-Za-z0-9.\-_]", "", "_".join(parts).replace("+", ""))


def study_eval_points_tokens(cfg: LadderConfig) -> int | None:
    """The eval points' validation subset, one size for every run of the study: the default size for its
    run with the fewest tokens (so the points cost at most ~5% of any run), unless the config sets one."""
    from .train import eval_points_tokens
    t = cfg.train
    if not t.eval_points or t.eval_points_tokens:
        return t.eval_points_tokens
    fewest = min((r.tokens for r in plan(cfg) if not r.skip), default=t.eval_tokens)
    return eval_points_tokens(fewest, t.seq_len, t.eval_points, t.eval_tokens)


def run_config(cfg: LadderConfig, run: PlannedRun, progress: bool = True) -> RunConfig:
    """The single-run config the training loop gets for one planned run (at its sweep point)."""
    from . import sweep
    cfg = config_at(cfg, sweep.decode(run.sweep))
    knobs = {**cfg.model.model_dump(), **({"d_ff": run.d_ff} if run.d_ff is not None else {})}
    spec = ModelSpec(family=run.family, d_model=run.d_model, n_layer=run.n_layer, **knobs)
    train = cfg.train.model_copy(update={"tokens": float(run.tokens), "lr": run.lr,
                                         "progress": cfg.train.progress and progress,
                                         "eval_points_tokens": study_eval_points_tokens(cfg)})
    custom = {k: v for k, v in cfg.custom_families.items() if k == run.family}
    return RunConfig(name=f"{cfg.name}/{run.run_id}", seed=run.seed, data=cfg.data,
                     tokenizer=cfg.tokenizer, model=spec, train=train, custom_families=custom)


def plan_frame(runs: list[PlannedRun]):
    import pandas as pd
    return pd.DataFrame([asdict(r) for r in runs])


def format_plan(runs: list[PlannedRun]) -> str:
    w = max([44] + [len(r.run_id) for r in runs])
    lines = [f"{'run_id':<{w}} {'family':<11} {'d_model':>7} {'n_layer':>7} {'params':>10} {'tokens':>11} "
             f"{'FLOPs':>9} {'steps':>6} {'lr':>8}  flags"]
    for r in runs:
        flags = r.flags + (" (skipped)" if r.skip else "")
        lr = f"{r.lr:.2g}" if r.lr is not None else "tuned"
        lines.append(f"{r.run_id:<{w}} {r.family:<11} {r.d_model:>7} {r.n_layer:>7} {r.params:>10,} "
                     f"{r.tokens:>11,} {r.flops:>9.3g} {r.steps:>6} {lr:>8}  {flags}")
    todo = [r for r in runs if not r.skip]
    lines.append(f"{len(todo)} runs to train ({len(runs) - len(todo)} skipped), "
                 f"{sum(r.flops for r in todo):.3g} training FLOPs in all")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the study dir
class StudyLock:
    """An exclusive flock on DIR/.ladder.lock: released by the kernel even after kill -9."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".ladder.lock"
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise UserError(f"{self.path.parent}: another ladder (pid {holder}) is running on this "
                            "directory; wait for it to finish or stop it") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        return False


def _fixed_part(cfg: LadderConfig) -> dict:
    """What must not change between restarts of one study (the grid itself may grow)."""
    d = cfg.model_dump(mode="json")
    for key in ("families", "budgets", "sizes", "widths", "sweep", "lrs", "seeds", "noise_seeds", "lr_tune_budget", "lr_widen",
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
        saved = load_ladder_config(saved_path)
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
    from .fsutil import atomic_write_dataframe_csv
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
    from .safeload import read_result
    return read_result(out_dir / "runs" / run_id / "result.json")[0]


def _say_malformed(out_dir: Path, runs: list[PlannedRun]) -> None:
    """One line per result.json that cannot be used (wrong shape, not JSON): that run is trained again."""
    from .safeload import read_result
    for r in runs:
        problem = read_result(out_dir / "runs" / r.run_id / "result.json")[1]
        if problem and not r.skip:
            print(f"{problem}; the run counts as unfinished and is trained again", file=sys.stderr)


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
    the run with the lowest loss (mean over `seeds`) trained again with each of `noise_seeds`."""
    main = [r for r in runs if not r.skip]
    if not cfg.noise_seeds or not main or any(r.lr is None or not _finished(out_dir, r) for r in main):
        return []
    losses: dict = {}
    for r in main:
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


def _finished(out_dir: Path, run: PlannedRun) -> bool:
    """A result exists, is final, and was trained with the learning rate planned now (a tuned learning
    rate changes when the tuning grid grows: such runs are trained again)."""
    res = _read_result(out_dir, run.run_id)
    return bool(res) and res.get("status") in ("ok", "diverged") and (
        run.lr is None or res.get("lr") is None or math.isclose(res["lr"], run.lr, rel_tol=1e-9))


# ------------------------------------------------------------------------------------- running
def run_one(study_dir: str, run_id: str, progress: bool = False, parallel_jobs: int = 1,
            max_cores: int | None = None) -> dict:
    """Train one planned run of a study: the unit of work of the out-of-process executors. `parallel_jobs`
    and `max_cores` size its threads (threads.py; see thread_share).

    One process at a time trains a run: a job whose run is still being trained elsewhere (a cancelled
    job not yet dead, jobs left running by a ladder that was stopped and restarted) waits for it, and
    then skips the run if that process finished it. Extra ranks of a multi-process run take no lock."""
    out_dir = Path(study_dir)
    cfg = load_ladder_config(out_dir / "config.yaml")
    run = _planned(cfg, out_dir, run_id)
    with _run_lock(out_dir / "runs" / run_id) if _process_rank() == 0 else nullcontext():
        if _finished(out_dir, run):
            return _read_result(out_dir, run_id)
        if not _needs_own_process(cfg):
            return _train_run(cfg, out_dir, run, progress=progress, position=1, share=(parallel_jobs, max_cores),
                              announce=True)
        # Lightning's ddp re-executes the command line for each extra rank: give the run a command of its own
        code = subprocess.run([sys.executable, "-m", "ssmscale.worker", str(out_dir), run_id]).returncode
        return _read_result(out_dir, run_id) or {"status": "failed",
                                                 "message": f"ssmscale.worker exited with code {code}"}


def train_planned_run(study_dir: str, run_id: str) -> dict:
    """Train one planned run of a study in this process, which the run owns (`python -m ssmscale.worker`):
    its ranks share the cores the process may use."""
    out_dir = Path(study_dir)
    cfg = load_ladder_config(out_dir / "config.yaml")
    return _train_run(cfg, out_dir, _planned(cfg, out_dir, run_id), progress=False, position=1,
                      share=(cfg.train.devices, None), announce=True)


def _planned(cfg: LadderConfig, out_dir: Path, run_id: str) -> PlannedRun:
    run = next((r for r in plan_study(cfg, out_dir) if r.run_id == run_id), None)
    if run is None or run.lr is None:
        raise UserError(f"{run_id}: not a runnable run of the study in {out_dir}")
    return run


def _process_rank() -> int:
    """This process's rank in a multi-process run, 0 outside one: a Slurm task, or a rank Lightning launched."""
    return max(int(os.environ.get(name) or 0) for name in ("SLURM_PROCID", "LOCAL_RANK"))


def _needs_own_process(cfg: LadderConfig) -> bool:
    """A multi-device run must own its command line, unless Slurm already started one task per device."""
    return cfg.train.devices > 1 and os.environ.get("SLURM_NTASKS") != str(cfg.train.devices)


@contextmanager
def _run_lock(run_dir: Path):
    """An exclusive flock on runs/<id>/.run.lock, waited for; the kernel releases it when its holder dies."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def thread_share(cfg: LadderConfig, cluster: str) -> tuple[int, int | None]:
    """(runs sharing one machine's cores at a time, cap on the cores a run may count) for an executor:
    the local submitit pool runs `parallelism` runs at once on this machine; a Slurm job runs alone
    on its allocation, counted at most `cpus_per_task`; the local executor ("inprocess") runs `parallel`."""
    if cluster == "local":
        return cfg.submitit.parallelism, None
    if cluster == "slurm":
        return 1, cfg.submitit.cpus_per_task
    return cfg.parallel, None


def _train_run(cfg, out_dir, run, progress, position, share=(1, None), announce=False):
    from . import sweep
    from .train import run_training
    extra = {"run_id": run.run_id, "budget": run.budget, "size": run.size, "study": cfg.name,
             "sweep": sweep.decode(run.sweep), "lr_source": run.lr_source}
    return run_training(run_config(cfg, run, progress), out_dir / "runs" / run.run_id, progress_position=position,
                        extra=extra, parallel_jobs=share[0], max_cores=share[1], announce=announce)


def _cluster(cfg: LadderConfig, executor: str) -> str:
    """Where runs execute: 'inprocess', or the submitit cluster ('local', 'slurm', ...) 'auto' resolves to."""
    if executor != "submitit":
        return "inprocess"
    if cfg.submitit.cluster != "auto":
        return cfg.submitit.cluster
    import submitit
    return submitit.AutoExecutor.which()


def _thread_line(cfg: LadderConfig, cluster: str) -> str:
    from . import threads
    jobs, cap = thread_share(cfg, cluster)
    if cluster == "slurm" and not cfg.train.num_threads:
        return (f"threads per run: its Slurm allocation's cores, at most cpus_per_task {cap} "
                f"({threads.waiting()})")
    return "per run " + threads.choose(cfg.train.num_threads, jobs=jobs).describe()


def run_ladder(config_path: str, out: str | None = None, dry_run: bool = False,
               executor: str | None = None, progress: bool = True, overrides: dict | None = None,
               throughput_from: str | None = None) -> Path:
    """Plan, train (resumably) and fit a ladder. The plan is printed first, with a cost estimate in
    device-hours when the study runs on GPUs or `throughput_from` names a `ssmscale profile` CSV."""
    from . import cost
    from .config import dump_yaml
    from .fsutil import atomic_write_dataframe_csv, atomic_write_text, check_writable_dir

    cfg = load_ladder_config(config_path, overrides)
    out_dir = Path(out or Path("scaling") / cfg.name)
    check_writable_dir(out_dir, "study directory")
    executor = executor or cfg.executor
    throughput = None
    if throughput_from:
        throughput = cost.throughput_from_profile(throughput_from, cfg.families, cfg.train.seq_len)
    elif cfg.train.accelerator == "gpu":
        throughput = cost.assumed_throughput(cfg.families)
    n_train = None
    if dry_run and cfg.data.source == "hf":
        print(f"dry run: the {cfg.data.hf_name} corpus is not downloaded, so runs are not checked against "
              "its size (the 'repeats' flag)")
    else:
        n_train = training_tokens(cfg, progress)
    planned = plan(cfg, n_train)    # a grid that cannot be planned is refused before the study folder exists
    if cfg.mixers():
        from .ladder_plugins import preflight
        preflight(cfg, out_dir, planned)
    with StudyLock(out_dir):
        _check_same_study(cfg, out_dir)
        runs = plan_study(cfg, out_dir, n_train)
        print(format_plan(runs))
        if cfg.noise_seeds and not any(r.lr_source.startswith("copied") for r in runs):
            print(f"noise seeds {cfg.noise_seeds}: once this grid has finished, the best run of each family and "
                  f"budget is trained again with each ({len(cfg.noise_seeds)} x {len(cfg.families)} x "
                  f"{len(cfg.budgets)} runs at most)")
        if throughput:
            print(cost.format_estimate(runs, throughput))
        atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg.model_dump(mode="json")))
        atomic_write_dataframe_csv(out_dir / "plan.csv", plan_frame(runs))
        if dry_run:
            print(f"dry run: plan written to {out_dir / 'plan.csv'}")
            return out_dir
        _say_malformed(out_dir, runs)
        pending = [r for r in runs if not r.skip and not _finished(out_dir, r)]
        done = sum(1 for r in runs if not r.skip) - len(pending)
        cluster = _cluster(cfg, executor)
        print(f"{out_dir}: {done} runs already finished, {len(pending)} to train ({executor} executor); "
              f"{_thread_line(cfg, cluster)}")
        start = time.perf_counter()
        execute = _run_submitit if executor == "submitit" else _run_local
        bar = _ladder_bar(pending, progress)
        tally = {"done": 0, "total": len(pending)}
        attempted = set()
        # rounds: runs whose learning rate is known; after the tuning budget, the rest become known
        counted = {r.run_id for r in pending}
        while True:
            runs = plan_study(cfg, out_dir, n_train)
            todo = [r for r in runs if not r.skip and r.lr is not None and (r.run_id, r.lr) not in attempted
                    and not _finished(out_dir, r)]
            if not todo:
                break
            new = [r for r in todo if r.run_id not in counted]     # noise-seed runs, known only now
            counted.update(r.run_id for r in new)
            tally["total"] += len(new)
            bar.total += sum(r.flops for r in new)
            attempted.update((r.run_id, r.lr) for r in todo)
            execute(cfg, out_dir, runs, todo, bar, tally, cluster)
        bar.close()
        # the plan as it ended: tuned rates, widened grids and noise-seed runs are known only now
        atomic_write_dataframe_csv(out_dir / "plan.csv", plan_frame(plan_study(cfg, out_dir, n_train)))
        if cfg.lr_tune_budget is not None:
            _print_tuned(cfg, out_dir)
        orphans = [r.run_id for r in runs if not r.skip and r.lr is None]
        if orphans:
            print(f"{len(orphans)} runs not trained: no successful run at the tuning budget for their family "
                  f"and size ({', '.join(orphans[:3])}{', ...' if len(orphans) > 3 else ''})", file=sys.stderr)
        df = collect_results(cfg, out_dir, runs)
        print(f"ladder finished in {time.perf_counter() - start:.1f} s: {len(df)} results in {out_dir / 'results.csv'}")
        if cfg.fit:
            _fit_and_report(out_dir, scaling_law=cfg.budgets is not None)
    return out_dir


def training_tokens(cfg: LadderConfig, progress: bool = True) -> dict:
    """{sweep point (encoded): tokens in the training split}, preparing (and checking) each point's data:
    its vocabulary must be the config's, a synthetic task must fit the point's sequence length."""
    from . import sweep
    from .data import prepare_data
    out = {}
    for point, pcfg in sweep_points(cfg):
        where = f"sweep point {sweep.label(point)}: " if point else ""
        try:
            data = prepare_data(pcfg.data, pcfg.tokenizer, seq_len=pcfg.train.seq_len,
                                eval_tokens=pcfg.train.eval_tokens, progress=progress)
        except UserError as exc:
            raise UserError(f"{where}{exc}") from None
        if data.vocab_size != vocab_size_of(pcfg):
            raise UserError(f"{where}tokenizer.vocab_size: the data has {data.vocab_size} tokens, the config says "
                            f"{vocab_size_of(pcfg)}")
        out[sweep.encode(point)] = data.n_train_tokens
    return out


def _print_tuned(cfg: LadderConfig, out_dir: Path):
    from . import sweep
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


def _ladder_bar(todo, progress):
    from tqdm.auto import tqdm
    bar = tqdm(total=sum(r.flops for r in todo), unit="FLOP", unit_scale=True, desc="ladder",
               position=0, dynamic_ncols=True, disable=not progress, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3g}/{total:.3g} FLOP "
                          "[{elapsed}<{remaining}] {postfix}")
    bar.set_postfix_str(f"runs 0/{len(todo)}")
    return bar


def _report_run(bar, tally, run, res):
    from tqdm.auto import tqdm
    tally["done"] += 1
    k, n = tally["done"], tally["total"]
    status = res.get("status", "failed")
    if status == "ok":
        score = (f"accuracy {res['val_accuracy']:.3f}" if res.get("val_accuracy") is not None
                 else f"bpb {res['bpb']:.4f}")
        line = (f"[{k}/{n}] ok       {run.run_id}: loss {res['loss']:.4f} nats/token, {score} "
                f"({res.get('wall_s', 0):.1f} s)")
    else:
        line = f"[{k}/{n}] {status:<8} {run.run_id}: {res.get('message', '')}"
    tqdm.write(line, file=sys.stderr)
    bar.update(run.flops)
    bar.set_postfix_str(f"runs {k}/{n}")


def _run_local(cfg, out_dir, runs, todo, bar, tally, cluster):
    if cfg.parallel > 1:
        return _run_pool(cfg, out_dir, runs, todo, bar, tally)
    for run in todo:
        try:
            if cfg.train.devices > 1:     # the run needs a process of its own (see run_one)
                res = run_one(str(out_dir), run.run_id)
            else:
                res = _train_run(cfg, out_dir, run, bar.disable is False, position=1)
        except UserError:
            raise
        except Exception as exc:  # a bug or crash in one run must not take the finished ones with it
            res = {"status": "failed", "message": f"{type(exc).__name__}: {exc}"}
            _write_failed(out_dir, run, res)
        _report_run(bar, tally, run, res)
        collect_results(cfg, out_dir, runs)


def _run_pool(cfg, out_dir, runs, todo, bar, tally):
    """`parallel` runs at once in as many worker processes, which import torch and Lightning once for the
    whole ladder (a process per run would pay seconds of start-up each time); the costliest runs first,
    so that a round does not end waiting on one long run. A worker that dies fails its run, not the ladder."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from .threads import configure_waiting
    configure_waiting()          # the workers inherit os.environ: their OpenMP threads sleep when idle
    queue = sorted(todo, key=lambda r: -r.flops)
    context = multiprocessing.get_context("spawn")    # never fork a process whose torch threads exist
    with ProcessPoolExecutor(max_workers=cfg.parallel, mp_context=context, initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pending = {}
        while queue or pending:
            while queue and len(pending) < cfg.parallel:
                run = queue.pop(0)
                pending[pool.submit(run_one, str(out_dir), run.run_id, False, cfg.parallel, None)] = run
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                run = pending.pop(fut)
                try:
                    res = fut.result()
                except UserError:
                    raise
                except (BrokenProcessPool, Exception) as exc:
                    res = _write_failed(out_dir, run, {"status": "failed", "message": f"{type(exc).__name__}: {exc}"})
                    if isinstance(exc, BrokenProcessPool):    # a killed worker takes the pool with it
                        _report_run(bar, tally, run, res)
                        collect_results(cfg, out_dir, runs)
                        raise UserError(f"{out_dir}: a worker process died ({exc}); run the ladder again to "
                                        "resume") from None
                _report_run(bar, tally, run, res)
                collect_results(cfg, out_dir, runs)


def _die_with_parent(parent: int) -> None:
    """Pool worker initializer: a ladder stopped by a signal it cannot catch (kill, a scheduler's SIGTERM)
    must not leave its workers training on (they would hold their runs' locks and the cores). On Linux
    the kernel kills the worker when the ladder process ends (SIGKILL: Lightning catches SIGTERM, stops
    the run and leaves the worker waiting for tasks that never come); its run resumes from its checkpoint
    when the ladder is started again."""
    import signal
    if sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))     # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:            # the ladder ended before the line above
            os._exit(1)


def _write_failed(out_dir, run, res) -> dict:
    """Record a run that ended without a result, unless its process did write a final one (a job
    cancelled after its run had finished); return the run's result. The next invocation retries failed runs."""
    from .fsutil import atomic_write_json
    if _finished(out_dir, run):
        return _read_result(out_dir, run.run_id)
    failed = {**res, "family": run.family, "params": run.params, "params_total": run.params_total,
              "d_model": run.d_model, "n_layer": run.n_layer, "lr": run.lr, "seed": run.seed}
    atomic_write_json(out_dir / "runs" / run.run_id / "result.json", failed)
    return failed


def _executor(cfg: LadderConfig, out_dir: Path, cluster: str):
    import submitit

    from .threads import configure_waiting
    configure_waiting()      # the jobs inherit os.environ: their OpenMP threads sleep when idle
    s = cfg.submitit
    ex = submitit.AutoExecutor(folder=out_dir / "submitit", cluster=cluster)
    params = {"timeout_min": s.timeout_min, "gpus_per_node": s.gpus_per_node, "cpus_per_task": s.cpus_per_task,
              "name": f"ssmscale-{cfg.name}"}
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    if ex.cluster == "slurm":
        # one task per device: Lightning reads each rank from its Slurm task (SLURM_PROCID, SLURM_NTASKS)
        params.update(slurm_array_parallelism=s.parallelism, slurm_additional_parameters=dict(s.slurm_extra),
                      nodes=1, tasks_per_node=cfg.train.devices)
        if s.partition:
            params["slurm_partition"] = s.partition
        if s.account:
            params["slurm_account"] = s.account
    ex.update_parameters(**params)
    return ex


def _run_submitit(cfg, out_dir, runs, todo, bar, tally, cluster):
    """Each run is a submitit job: a local process pool here, a Slurm job array on a cluster. Jobs are
    collected in the order they end; a job that ends without a result is a failed run naming its log."""
    ex = _executor(cfg, out_dir, cluster)
    share = thread_share(cfg, ex.cluster)
    by_id = {r.run_id: r for r in todo}
    if ex.cluster == "local":
        # a local pool: `parallelism` runs at a time, the next starting as soon as one ends; the costliest
        # first, so that the round does not end waiting on one long run
        queue = sorted(by_id, key=lambda run_id: -by_id[run_id].flops)
        pending: dict = {}

        def start_next():
            run_id = queue.pop(0)
            pending[run_id] = ex.submit(run_one, str(out_dir), run_id, False, *share)

        while queue and len(pending) < cfg.submitit.parallelism:
            start_next()
        for run_id, res, returned in _as_they_end(pending, slurm=False):
            if queue:
                start_next()
            _end_job(cfg, out_dir, runs, bar, tally, by_id[run_id], res, returned)
        return
    ids = list(by_id)
    jobs = ex.map_array(run_one, [str(out_dir)] * len(ids), ids, [False] * len(ids), *([x] * len(ids) for x in share))
    if ex.cluster == "slurm":
        from tqdm.auto import tqdm
        tqdm.write(f"Slurm job array {jobs[0].job_id.split('_')[0]}: {len(jobs)} runs, at most "
                   f"{cfg.submitit.parallelism} at once; logs in {out_dir / 'submitit'}", file=sys.stderr)
    for run_id, res, returned in _as_they_end(dict(zip(ids, jobs)), slurm=ex.cluster == "slurm"):
        _end_job(cfg, out_dir, runs, bar, tally, by_id[run_id], res, returned)


def _end_job(cfg, out_dir, runs, bar, tally, run, res, returned):
    if not returned:
        res = _write_failed(out_dir, run, res)
    _report_run(bar, tally, run, res)
    collect_results(cfg, out_dir, runs)


# Slurm job states after which a job runs no more. squeue --states=all lists them for MinJobAge (300 s by
# default); after that, and at once for an array task cancelled before it started, squeue no longer knows
# the job ("GONE")
SLURM_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
               "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT", "GONE"}
RESULT_GRACE_S = 10.0     # how long a shared filesystem may take to show the result of a job that ended


def _as_they_end(pending: dict, slurm: bool, poll_s: float | None = None):
    """Yield (run_id, result, returned) for each submitit job of {run_id: job} as it ends, in the order
    they end; `returned`: the job returned the result (else it raised, or ended without one).

    A job's result file decides first. On Slurm the states come from squeue, not from submitit's
    watcher: it asks sacct, which clusters without an accounting database do not have, and without
    it a cancelled job would be waited for forever."""
    poll_s = poll_s or (2.0 if slurm else 0.2)      # squeue is a request to the controller; a local poll is cheap
    ended_at: dict[str, float] = {}
    while pending:
        states = _slurm_states([job.job_id for job in pending.values()]) if slurm else None
        for run_id, job in list(pending.items()):
            if slurm:
                state = (states or {}).get(job.job_id, "GONE")
                if not job.paths.result_pickle.exists():
                    if states is None or state not in SLURM_ENDED:
                        ended_at.pop(run_id, None)
                        continue
                    now = time.monotonic()       # ended for RESULT_GRACE_S and still no result: it has none
                    if now - ended_at.setdefault(run_id, now) < RESULT_GRACE_S:
                        continue
                    del pending[run_id]
                    how = "left the queue" if state == "GONE" else f"ended {state}"
                    yield run_id, {"status": "failed", "message": f"Slurm job {job.job_id} {how} without a result; "
                                                                  f"log: {job.paths.stderr}"}, False
                    continue
            elif not job.done():
                continue
            del pending[run_id]
            yield (run_id, *_job_result(job))
        if pending:
            time.sleep(poll_s)


def _job_result(job) -> tuple[dict, bool]:
    try:
        return job.result(), True
    except Exception as exc:      # the job's own error, raised again here by submitit
        last = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ""
        return {"status": "failed", "message": f"{type(exc).__name__}: {last}; log: {job.paths.stderr}"}, False


def _slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    """{job id ("123_4" for array tasks): state} from one squeue call; None when squeue cannot answer."""
    masters = sorted({j.split("_")[0] for j in job_ids})
    proc = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T",
                           "--jobs=" + ",".join(masters)], capture_output=True, text=True)
    if proc.returncode != 0:
        # the jobs are older than the controller's memory: they have all ended
        return {} if "Invalid job id" in proc.stderr else None
    return dict(line.split("|", 1) for line in proc.stdout.split() if "|" in line)


def _fit_and_report(out_dir: Path, scaling_law: bool = True):
    """fit.json in the study directory (IsoFLOP ladders only: a fixed-length ladder has no scaling law);
    the report in reports/<directory name>, as `ssmscale report` does."""
    try:
        from .fit import fit_study
        from .report import write_report
    except ImportError:
        return
    if scaling_law:
        from .fit import is_default_fit, load_runs
        from .report import cached_fit
        fit = cached_fit(out_dir, load_runs(out_dir))
        if fit is not None and is_default_fit(fit):
            # a rerun of a finished ladder: refitting would write the same bytes (`ssmscale fit STUDY` refits)
            print(f"{out_dir / 'fit.json'}: already the fit of this results.csv (default settings), reused")
        else:
            fit_study(out_dir)
    report = write_report(out_dir, Path("reports") / out_dir.resolve().name)
    print(f"report: {report}")
