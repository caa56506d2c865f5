"""The ladder's grid, planned without training anything: families x budgets x sizes x learning rates x
seeds [x sweep points] -> PlannedRun rows with shapes, tokens, steps, FLOPs, flags and run ids.

Sizes are matched in parameters to the transformer (`sizes`), given as shapes, or given as widths
(every family at one d_model, its depth rule's layers). Each run spends its budget: tokens = budget /
training FLOPs per token (flops.py), rounded to whole optimiser steps; a fixed-length ladder (`steps`
or `tokens`) trains every run equally long. Pure functions (no training, no files).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ..config import LadderConfig, ModelSpec, RunConfig, ShapeSpec
from ..errors import UserError
from ..models.config import FAMILIES


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
    from ..models import ModelConfig
    from ..models.sizing import MIN_LAYERS, check_within_bounds, layers_at_width, shape_for
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
                    check_within_bounds(per_family[fam])
            elif isinstance(size, ShapeSpec):
                for fam in cfg.families:
                    d, n = getattr(size, fam)
                    per_family[fam] = base.replace(family=fam, d_model=d, n_layer=n)
                    check_within_bounds(per_family[fam])
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
    from ..config import sweep
    return [(p, config_at(cfg, p)) for p in sweep.points(cfg.sweep)]


def config_at(cfg: LadderConfig, point: dict) -> LadderConfig:
    """The ladder config with a sweep point's values written in and no sweep of its own."""
    from ..config import sweep
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
    from ..config import sweep
    runs = []
    for point, pcfg in sweep_points(cfg):
        code = sweep.encode(point)
        n_train = n_train_tokens.get(code) if isinstance(n_train_tokens, dict) else n_train_tokens
        runs += _plan_point(pcfg, point, n_train, tuned, widened)
    seen: dict[str, PlannedRun] = {}
    for r in runs:
        if r.run_id in seen:
            raise UserError(_collision(seen[r.run_id], r))
        seen[r.run_id] = r
    return runs


def _collision(a: PlannedRun, b: PlannedRun) -> str:
    """Which axis of the grid gives two runs one id (a run id names numbers to 3 significant digits)."""
    tail = f"would share the run id {a.run_id} (a run id names numbers to 3 significant digits): make them differ more"
    if a.sweep != b.sweep:
        return (f"sweep: two runs would share the id {a.run_id} (keys with the same last name and value, or "
                "values that differ only in characters a run id cannot hold)")
    if a.budget != b.budget:
        return f"budgets: {a.budget:g} and {b.budget:g} {tail}"
    if a.lr != b.lr:
        return f"lrs: {a.lr:g} and {b.lr:g} {tail}"
    return f"sizes: two sizes labelled {a.size} {tail}"


def _plan_point(cfg: LadderConfig, point: dict, n_train_tokens: int | None, tuned: dict | None,
                widened: dict | None = None) -> list[PlannedRun]:
    """The runs of one sweep point (`cfg` is the ladder config at that point)."""
    from ..config import sweep
    from ..flops import flops_summary
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
                # the tuning budget keeps a size outside the ratio: the other budgets need its learning rate
                off_ratio = "ratio" in flags and budget != tune
                skip = steps == 0 or outside or (("few-steps" in flags or off_ratio) and not cfg.run_flagged) or \
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
    from ..config import sweep
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
    from ..train import eval_points_tokens
    t = cfg.train
    if not t.eval_points or t.eval_points_tokens:
        return t.eval_points_tokens
    fewest = min((r.tokens for r in plan(cfg) if not r.skip), default=t.eval_tokens)
    return eval_points_tokens(fewest, t.seq_len, t.eval_points, t.eval_tokens)


def run_config(cfg: LadderConfig, run: PlannedRun, progress: bool = True) -> RunConfig:
    """The single-run config the training loop gets for one planned run (at its sweep point)."""
    from ..config import sweep
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
