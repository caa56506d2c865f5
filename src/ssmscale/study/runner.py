"""One planned run trained: in this process, or (a multi-device run) in a process of its own
(`python -m ssmscale.study.worker`); the unit of work every executor hands out (run_one), and how
many threads it may take when several share a machine (thread_share).
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

from ..config import LadderConfig, load_ladder_config
from ..errors import UserError
from .plan import PlannedRun, run_config
from .state import _finished, _read_result, _run_lock
from .tuning import plan_study


def run_one(study_dir: str, run_id: str, progress: bool = False, parallel_jobs: int = 1,
            max_cores: int | None = None) -> dict:
    """Train one planned run of a study: the unit of work of the out-of-process executors. `parallel_jobs`
    and `max_cores` size its threads (threads.py; see thread_share).

    One process at a time trains a run: a job whose run is still being trained elsewhere (a cancelled
    job not yet dead, jobs left running by a ladder that was stopped and restarted) waits for it, and
    then skips the run if that process finished it. Extra ranks of a multi-process run take no lock."""
    out_dir = Path(study_dir)
    cfg = load_ladder_config(out_dir / "config.yaml", within=out_dir)
    run = _planned(cfg, out_dir, run_id)
    with _run_lock(out_dir, run_id) if _process_rank() == 0 else nullcontext():
        if _finished(out_dir, run):
            return _read_result(out_dir, run_id)
        if not _needs_own_process(cfg):
            return _train_run(cfg, out_dir, run, progress=progress, position=1, share=(parallel_jobs, max_cores),
                              announce=True)
        # Lightning's ddp re-executes the command line for each extra rank: give the run a command of its own
        code = subprocess.run([sys.executable, "-m", "ssmscale.study.worker", str(out_dir), run_id]).returncode
        return _read_result(out_dir, run_id) or {"status": "failed",
                                                 "message": f"ssmscale.study.worker exited with code {code}"}


def train_planned_run(study_dir: str, run_id: str) -> dict:
    """Train one planned run of a study in this process, which the run owns (`python -m ssmscale.study.worker`):
    its ranks share the cores the process may use."""
    out_dir = Path(study_dir)
    cfg = load_ladder_config(out_dir / "config.yaml", within=out_dir)
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
    from ..config import sweep
    from ..fsutil import make_dirs
    from ..train import run_training
    extra = {"run_id": run.run_id, "budget": run.budget, "size": run.size, "study": cfg.name,
             "sweep": sweep.decode(run.sweep), "lr_source": run.lr_source}
    return run_training(run_config(cfg, run, progress), make_dirs(out_dir, "runs", run.run_id),
                        progress_position=position,
                        extra=extra, parallel_jobs=share[0], max_cores=share[1], announce=announce)
