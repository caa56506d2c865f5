"""Executors: how the runs of a round execute. In process, one after the other (`executor: inprocess`,
`parallel: 1`); a pool of `parallel` worker processes; or submitit jobs: a local process pool or a
Slurm job array. Each reports every run as it ends (the ladder's progress bar) and rebuilds
results.csv after it; a run that ends without a result is recorded as failed and retried next time.

Submitit keeps its job files (pickled calls, results, logs) in a folder of the study, which a stranger
may have filled: each invocation makes a fresh one (submitit/<time>-<random>, mode 0700), and a job's
outcome is read from its run's result.json, never from submitit's result pickle. A stopped ladder
(SIGTERM, SIGINT) stops the runs it started on this machine (pool workers, local jobs); Slurm jobs run on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..config import LadderConfig
from ..errors import Stopped, UserError
from .runner import _train_run, run_one, thread_share
from .state import _write_failed, collect_results


def _cluster(cfg: LadderConfig, executor: str) -> str:
    """Where runs execute: 'inprocess', or the submitit cluster ('local', 'slurm', ...) 'auto' resolves to."""
    if executor != "submitit":
        return "inprocess"
    if cfg.submitit.cluster != "auto":
        return cfg.submitit.cluster
    import submitit
    return submitit.AutoExecutor.which()


def _thread_line(cfg: LadderConfig, cluster: str) -> str:
    from .. import threads
    jobs, cap = thread_share(cfg, cluster)
    if cluster == "slurm" and not cfg.train.num_threads:
        return (f"threads per run: its Slurm allocation's cores, at most cpus_per_task {cap} "
                f"({threads.waiting()})")
    return "per run " + threads.choose(cfg.train.num_threads, jobs=jobs).describe()


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

    from ..threads import configure_waiting
    configure_waiting()          # the workers inherit os.environ: their OpenMP threads sleep when idle
    queue = sorted(todo, key=lambda r: -r.flops)
    context = multiprocessing.get_context("spawn")    # never fork a process whose torch threads exist
    with ProcessPoolExecutor(max_workers=cfg.parallel, mp_context=context, initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool, _workers_stopped_on_exit(pool):
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


@contextmanager
def _workers_stopped_on_exit(pool):
    """A ladder stopped inside the pool by a signal kills its workers: the pool's own exit would wait for
    their runs to end. A killed run resumes from its checkpoint when the ladder is started again."""
    try:
        yield
    except (Stopped, KeyboardInterrupt):
        for process in list((pool._processes or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def _die_with_parent(parent: int) -> None:
    """Pool worker initializer: a ladder stopped by a signal it cannot catch (kill -9; SIGTERM and SIGINT it
    handles, see _workers_stopped_on_exit) must not leave its workers training on (they would hold their runs' locks and the cores). On Linux
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


def _executor(cfg: LadderConfig, out_dir: Path, cluster: str):
    import submitit

    from ..threads import configure_waiting
    configure_waiting()      # the jobs inherit os.environ: their OpenMP threads sleep when idle
    import tempfile

    from ..fsutil import make_dirs
    s = cfg.submitit
    folder = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=make_dirs(out_dir, "submitit")))
    if any(ord(c) < 32 or ord(c) == 127 for c in str(folder.resolve())):
        # the folder's path is written into the job script's #SBATCH lines, which end at a line end
        raise UserError(f"{out_dir}: a study folder whose path holds control characters cannot run Slurm jobs")
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
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

        try:
            while queue and len(pending) < cfg.submitit.parallelism:
                start_next()
            for run_id, res, returned in _as_they_end(pending, slurm=False, out_dir=out_dir):
                if queue:
                    start_next()
                _end_job(cfg, out_dir, runs, bar, tally, by_id[run_id], res, returned)
        except (Stopped, KeyboardInterrupt):          # stopped by a signal: the local jobs stop too
            for job in pending.values():
                _stop_local_job(job)
            raise
        return
    ids = list(by_id)
    jobs = ex.map_array(run_one, [str(out_dir)] * len(ids), ids, [False] * len(ids), *([x] * len(ids) for x in share))
    if ex.cluster == "slurm":
        from tqdm.auto import tqdm
        tqdm.write(f"Slurm job array {jobs[0].job_id.split('_')[0]}: {len(jobs)} runs, at most "
                   f"{cfg.submitit.parallelism} at once; logs in {out_dir / 'submitit'}", file=sys.stderr)
    for run_id, res, returned in _as_they_end(dict(zip(ids, jobs)), slurm=ex.cluster == "slurm", out_dir=out_dir):
        _end_job(cfg, out_dir, runs, bar, tally, by_id[run_id], res, returned)


def _stop_local_job(job) -> None:
    """SIGTERM to a local job's controller, which passes it on to the job (its run stops as a run stops on
    SIGTERM; submitit's own cancel sends SIGINT, whose KeyboardInterrupt the controller prints on our stderr)."""
    import signal
    process = getattr(job, "_process", None)
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)


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


def _as_they_end(pending: dict, slurm: bool, out_dir: Path, poll_s: float | None = None):
    """Yield (run_id, result, returned) for each submitit job of {run_id: job} as it ends, in the order
    they end; `returned`: the job left its run's result (else it raised, or ended without one).

    A job's result file decides when it ended (its existence only: the pickle is never read). On Slurm the
    states come from squeue, not from submitit's watcher: it asks sacct, which clusters without an
    accounting database do not have, and without it a cancelled job would be waited for forever."""
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
            yield (run_id, *_job_result(job, out_dir, run_id))
        if pending:
            time.sleep(poll_s)


def _job_result(job, out_dir: Path, run_id: str) -> tuple[dict, bool]:
    """(the run's result, True) when the job left a result.json that ends the run, else (a failed result
    naming the job's log and its last line, False). Submitit's result pickle is never unpickled: the
    study's submitit folder is the kind of place a stranger could have planted one."""
    from ..safeload import CAPS, FileRefused, read_bytes, read_result
    res, _ = read_result(out_dir / "runs" / run_id / "result.json", within=out_dir)
    if res is not None:
        return res, True
    try:
        tail = read_bytes(job.paths.stderr, CAPS["text"]).decode(errors="replace").strip().splitlines()
    except (OSError, FileRefused):
        tail = []
    last = f": {tail[-1].strip()[:300]}" if tail else ""
    return {"status": "failed", "message": f"job {job.job_id} ended without a result{last}; "
                                           f"log: {job.paths.stderr}"}, False


def _slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    """{job id ("123_4" for array tasks): state} from one squeue call; None when squeue cannot answer."""
    masters = sorted({j.split("_")[0] for j in job_ids})
    states = _squeue(masters)
    if states is None:
        return None
    # an array's last pending task can be missing from the listing by array id (seen once cancelling leaves
    # it alone in the array's own record), while squeue still lists it when asked by its task id
    missing = [j for j in job_ids if j not in states]
    for i in range(0, len(missing), 500):
        more = _squeue(missing[i:i + 500])
        if more is None:
            return None
        states.update(more)
    return states


def _squeue(ids: list[str]) -> dict[str, str] | None:
    proc = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T",
                           "--jobs=" + ",".join(ids)], capture_output=True, text=True)
    if proc.returncode != 0:
        # the jobs are older than the controller's memory: they have all ended
        return {} if "Invalid job id" in proc.stderr else None
    states = {}
    for line in proc.stdout.split():
        if "|" in line:
            job, state = line.split("|", 1)
            for one in _array_tasks(job):
                states[one] = state
    return states


def _array_tasks(job: str) -> list[str]:
    """squeue's id of a job or of pending array tasks as task ids: "7_3" -> ["7_3"]; the pending tasks an
    array record still holds, "7_[4]", "7_[4-6,9]" or "7_[1-9:2%2]" (step, throttle), -> ["7_4", ...]
    (seen as soon as cancelling leaves one pending task in the array's record: read as "7_44" it was
    taken for a job that had left the queue)."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job)
    if not m:
        return [job]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        rng = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not rng:
            return [job]
        lo = int(rng.group(1))
        hi = int(rng.group(2) or lo)
        step = int(rng.group(3) or 1)
        if hi - lo > 1_000_000 or step < 1:
            return [job]
        out += [f"{m.group(1)}_{i}" for i in range(lo, hi + 1, step)]
    return out
