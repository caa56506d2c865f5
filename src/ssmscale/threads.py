"""The thread policy: how many threads a process gives torch (and with it the fused scan), and how its
idle OpenMP threads wait. Training, the ladder's executors and the profiler all ask this module.

Two things made a run collapse beside other work (issue #15; 2 cores, both measured):
1. Waiting. GNU libgomp (torch's OpenMP on Linux; the fused scan runs on the same pool) spins for
   about 300,000 iterations at every barrier before it sleeps. When the cores are busy, the spinning
   thread burns the time slice its partner needs to reach the barrier: a Mamba training step ran
   4-10x slower with spinning than with sleeping threads on a loaded machine. `configure_waiting()`
   sets OMP_WAIT_POLICY=passive (idle threads sleep at once) unless the user chose OMP_WAIT_POLICY or
   GOMP_SPINCOUNT. libgomp reads it once, when it is loaded (when torch is imported), so the command
   line calls it before importing anything heavy; child processes (profile points, submitit jobs,
   competitors) inherit it from os.environ.
2. Count. threads = the cores this process may use (CPU affinity, capped by a cgroup CPU quota)
   divided by the runs that share them (the ladder's parallel jobs), at least 1. An explicit
   `train.num_threads` (or `profile --threads`) wins.

The load of other processes is deliberately not sampled: the thread count fixes the order of the
fp32 reductions, so a count that followed a momentary load sample would make a run's numbers depend
on its neighbours; a sample taken at start is also wrong for most of a run that lasts minutes; and
with sleeping waits an oversubscribed count costs little next to spinning (measured on 2 cores under
a load of 8-14: 2 sleeping threads 4-30% slower than 1 thread, 2 spinning threads 4-10x slower).

Thread count and numbers: same config, seed and thread count give bit-identical results on CPU.
A different thread count can change the last bits (matmul and scan reductions are split
differently), so `threads` is recorded with every result but is not part of a study's identity.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str          # e.g. "2 cores, 2 parallel runs" or "train.num_threads"

    def describe(self) -> str:
        """One line for a run header: 'threads: 1 (2 cores, 2 parallel runs; idle threads sleep)'."""
        return f"threads: {self.threads} ({self.reason}; {waiting()})"


def configure_waiting(env=None) -> str | None:
    """Make idle OpenMP threads sleep instead of spin, unless the user already chose how they wait.
    Returns what was set (None if nothing). Takes effect only before libgomp is loaded."""
    env = os.environ if env is None else env
    if any(k in env for k in WAIT_ENV):
        return None
    env["OMP_WAIT_POLICY"] = "passive"
    return "OMP_WAIT_POLICY=passive"


def waiting(env=None) -> str:
    """How idle OpenMP threads wait in this process's environment, in words."""
    env = os.environ if env is None else env
    set_ = [f"{k}={env[k]}" for k in WAIT_ENV if k in env]
    if env.get("OMP_WAIT_POLICY", "").lower() == "passive" and "GOMP_SPINCOUNT" not in env:
        return "idle threads sleep"
    return ", ".join(set_) if set_ else "idle threads spin (libgomp default)"


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup"
                     ) -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 cpu.max or v1 cpu.cfs_quota_us), None when unlimited."""
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
    candidates = [root / v2[0].lstrip("/") / "cpu.max"] if v2 else []
    candidates.append(root / "cpu.max")
    for path in candidates:
        try:
            quota, period = path.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 else quota / period
    return None


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (rounded down:
    a thread more than the quota gets the whole group throttled at every period's end)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):      # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)


def choose(explicit: int | None = None, jobs: int = 1, cores: int | None = None,
           explicit_name: str = "train.num_threads") -> ThreadChoice:
    """The thread count for one run: `explicit` if given, else cores // jobs (at least 1)."""
    if explicit:
        return ThreadChoice(int(explicit), explicit_name)
    cores = available_cores() if cores is None else cores
    jobs = max(1, int(jobs))
    runs = "1 run at a time" if jobs == 1 else f"{jobs} parallel runs"
    return ThreadChoice(max(1, cores // jobs), f"{cores} core{'s' if cores != 1 else ''}, {runs}")


def apply(choice: ThreadChoice) -> ThreadChoice:
    """Set torch's intra-op threads; the fused scan splits its rows over the same count."""
    import torch
    torch.set_num_threads(choice.threads)
    return choice
