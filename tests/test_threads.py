"""The thread policy: cores / parallel runs, an explicit count wins, cgroup quotas cap the cores, idle
OpenMP threads sleep, and the command line says so before torch is loaded."""

import os
import subprocess
import sys

import pytest

from ssmscale import threads
from ssmscale.threads import ThreadChoice, cgroup_cpu_limit, choose, configure_waiting, waiting


@pytest.mark.parametrize("cores, jobs, expected", [(2, 1, 2), (2, 2, 1), (2, 3, 1), (16, 2, 8), (16, 3, 5),
                                                   (1, 1, 1)])
def test_threads_are_the_cores_divided_by_the_parallel_runs(cores, jobs, expected):
    assert choose(None, jobs=jobs, cores=cores).threads == expected


def test_the_reason_names_cores_and_runs_and_an_explicit_count_wins():
    assert choose(None, jobs=2, cores=2) == ThreadChoice(1, "2 cores, 2 parallel runs")
    assert choose(None, jobs=1, cores=1).reason == "1 core, 1 run at a time"
    assert choose(4, jobs=2, cores=2) == ThreadChoice(4, "train.num_threads")
    assert choose(3, explicit_name="--threads").reason == "--threads"
    line = choose(None, jobs=2, cores=2).describe()
    assert line.startswith("threads: 1 (2 cores, 2 parallel runs; ") and line.endswith(")")


def _cgroup(tmp_path, v2_path=None, cpu_max=None, v1=None):
    tmp_path.mkdir()
    proc = tmp_path / "cgroup"
    proc.write_text(f"0::{v2_path}\n" if v2_path else "4:memory:/x\n1:cpu:/\n")
    if cpu_max is not None:
        folder = tmp_path / v2_path.lstrip("/") if v2_path else tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cpu.max").write_text(cpu_max)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return cgroup_cpu_limit(tmp_path, proc)


def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path):
    assert _cgroup(tmp_path / "a", "/job/42", "150000 100000\n") == 1.5
    assert _cgroup(tmp_path / "b", "/job/42", "max 100000\n") is None
    assert _cgroup(tmp_path / "c", v1=(200000, 100000)) == 2.0
    assert _cgroup(tmp_path / "d", v1=(-1, 100000)) is None
    assert _cgroup(tmp_path / "e") is None


def test_a_cgroup_quota_caps_the_affinity_and_rounds_down(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2.5)
    assert threads.available_cores() == 2
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.5)
    assert threads.available_cores() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.available_cores() == 4


def test_idle_threads_are_made_to_sleep_unless_the_user_chose_how_they_wait():
    env = {}
    assert configure_waiting(env) == "OMP_WAIT_POLICY=passive" and env == {"OMP_WAIT_POLICY": "passive"}
    assert waiting(env) == "idle threads sleep"
    for mine in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "10000"}):
        env = dict(mine)
        assert configure_waiting(env) is None and env == mine
        assert waiting(env) == ", ".join(f"{k}={v}" for k, v in mine.items())
    assert waiting({}) == "idle threads spin (libgomp default)"


def test_the_command_line_sets_the_wait_policy_before_torch_is_imported():
    code = ("import os, sys\nfrom ssmscale.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split()[-2:] == ["passive", "False"]
