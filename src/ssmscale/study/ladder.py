"""The ladder: plan (families x budgets x sizes x learning rates x seeds [x sweep points]) -> run -> results.

An IsoFLOP ladder (`budgets`): each run spends its budget, tokens = budget / training FLOPs per token
(flops.py), rounded to whole optimiser steps; the FLOPs actually spent are recorded. With `noise_seeds`,
once the main grid has finished, the best run of each (family, budget) is trained again with each extra
seed (same shape and learning rate; run id `<best run>_s<seed>`), so the fits can put the seed-to-seed
noise into their intervals; adding noise seeds to a finished study trains only them. A fixed-length
ladder (`steps` or `tokens`, e.g. the recall study) trains every run equally long and has no scaling
law to fit: its report is the recall report (report/recall.py). `widths` instead of `sizes` gives
each family the same d_model at the depth sizing.layers_at_width sets; `sweep` repeats the grid at
every point of extra config axes (config/sweep.py), whose labels go into the run ids.

The ladder is restartable at any moment: a run's result.json is written atomically when it ends, a
restart skips runs that have one (and retries runs that failed), results.csv is rebuilt from the
result files (never appended), and a lock file keeps a second ladder process out of the same directory.

    scaling/<study>/config.yaml           the ladder config
    scaling/<study>/plan.csv              every planned run, with flags
    scaling/<study>/runs/<run_id>/        result.json, metrics.csv, config.yaml, model.pt
    scaling/<study>/results.csv           one row per finished run

This module runs the whole ladder (run_ladder); its parts live beside it: plan.py (the grid), tuning.py
(learning-rate tuning and noise seeds), state.py (the study folder: lock, results, resume), runner.py
(one planned run) and executors.py (in-process, worker pool, submitit/Slurm).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..config import LadderConfig, load_ladder_config
from ..errors import UserError
from .executors import _cluster, _ladder_bar, _run_local, _run_submitit, _thread_line
from .plan import format_plan, plan, plan_frame, sweep_points, vocab_size_of
from .state import StudyLock, _check_same_study, _finished, _say_malformed, collect_results
from .tuning import _print_tuned, plan_study


def run_ladder(config_path: str, out: str | None = None, dry_run: bool = False,
               executor: str | None = None, progress: bool = True, overrides: dict | None = None,
               throughput_from: str | None = None) -> Path:
    """Plan, train (resumably) and fit a ladder. The plan is printed first, with a cost estimate in
    device-hours when the study runs on GPUs or `throughput_from` names a `ssmscale profile` CSV."""
    from . import cost
    from ..config import dump_yaml
    from ..fsutil import atomic_write_dataframe_csv, atomic_write_text, check_writable_dir

    cfg = load_ladder_config(config_path, overrides)
    if dry_run:
        from ..config.origin import dry_run_plugins
        if named := dry_run_plugins(cfg, config_path, overrides):
            raise UserError(f"{config_path}: --dry-run: this config lies in a study or run folder and names plugin "
                            f"families ({', '.join(named)}) whose code a dry run would run to size them; planning "
                            "a folder that may have come from someone else runs none of its code. Its plan.csv "
                            "shows the plan as last run; training or resuming it (no --dry-run) runs the code on "
                            f"purpose, as does naming it yourself (--set custom_families.{named[0]}.mixer=...)")
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
    if cfg.mixers():                # plugin families: admitted (and their code checked) before anything trains
        from .plugins import preflight
        preflight(cfg, out_dir, planned)
    with StudyLock(out_dir):
        _check_same_study(cfg, out_dir)
        runs = plan_study(cfg, out_dir, n_train)
        print(format_plan(runs))
        if cfg.noise_seeds and not any(r.lr_source.startswith("copied") for r in runs):
            where = "budget" if cfg.noise_budgets is None else "budget of noise_budgets"
            n_budgets = len(cfg.budgets if cfg.noise_budgets is None else cfg.noise_budgets)
            print(f"noise seeds {cfg.noise_seeds}: once this grid has finished, the best run of each family and "
                  f"{where} is trained again with each ({len(cfg.noise_seeds)} x {len(cfg.families)} x "
                  f"{n_budgets} runs at most)")
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
    from ..config import sweep
    from ..data import prepare_data
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
        if getattr(data, "chunking", None):
            print(f"{where}data: {data.chunking}", flush=True)
        out[sweep.encode(point)] = data.n_train_tokens
    return out


def _fit_and_report(out_dir: Path, scaling_law: bool = True):
    """fit.json in the study directory (IsoFLOP ladders only: a fixed-length ladder has no scaling law);
    the report in reports/<directory name>, as `ssmscale report` does."""
    try:
        from ..fit import fit_study
        from ..report.scaling import write_report
    except ImportError:
        return
    if scaling_law:
        from ..fit import is_default_fit, load_runs
        from ..report.scaling import cached_fit
        fit = cached_fit(out_dir, load_runs(out_dir))
        if fit is not None and is_default_fit(fit):
            # a rerun of a finished ladder: refitting would write the same bytes (`ssmscale fit STUDY` refits)
            print(f"{out_dir / 'fit.json'}: already the fit of this results.csv (default settings), reused")
        else:
            fit_study(out_dir)
    report = write_report(out_dir, Path("reports") / out_dir.resolve().name)
    print(f"report: {report}")
