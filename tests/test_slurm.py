"""The ladder's submitit path: how jobs are collected (unit tests, no cluster) and, marked `slurm`, the tiny
ladder as a job array on a real Slurm cluster with half the array cancelled mid-flight and a rerun.

    make test-slurm        (tools/slurm_cluster.sh up, pytest -m slurm, tools/slurm_cluster.sh down)
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ssmscale.study import executors, plan, state

ROOT = Path(__file__).parents[1]


class FakeJob:
    """What _as_they_end reads of a submitit job: whether it is done, where its files are (never its result)."""

    def __init__(self, tmp_path, job_id, done=True, log=""):
        self.job_id, self._done = job_id, done
        self.paths = type("Paths", (), {"result_pickle": tmp_path / f"{job_id}_result.pkl",
                                         "stderr": tmp_path / f"{job_id}_0_log.err"})()
        self.paths.stderr.write_text(log)
        if done:
            self.paths.result_pickle.write_bytes(b"x")

    def done(self):
        return self._done

    def result(self):
        raise AssertionError("the ladder unpickled a submitit result")


OK = {"status": "ok", "loss": 1.0, "params": 10, "tokens": 10, "flops": 600.0, "lr": 1e-3}


def _result(study, run_id, res=OK):
    path = study / "runs" / run_id / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))


def test_jobs_are_collected_as_they_end_from_their_runs_result_and_a_failed_job_names_its_log(tmp_path):
    ok = FakeJob(tmp_path, "7_0")
    bad = FakeJob(tmp_path, "7_1", log="Traceback ...\n  line\nValueError: boom\n")
    _result(tmp_path, "a")
    out = list(executors._as_they_end({"a": ok, "b": bad}, slurm=False, out_dir=tmp_path, poll_s=0))
    assert out[0] == ("a", OK, True)
    run_id, res, returned = out[1]
    assert run_id == "b" and not returned and res["status"] == "failed"
    assert res["message"] == f"job 7_1 ended without a result: ValueError: boom; log: {tmp_path / '7_1_0_log.err'}"


def test_a_slurm_job_that_ends_without_a_result_is_failed_with_its_state_and_log(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "RESULT_GRACE_S", 0.0)
    states = iter([{"9_0": "RUNNING", "9_1": "PENDING"}, {"9_0": "RUNNING", "9_1": "CANCELLED"},
                   {"9_0": "COMPLETED"}])
    monkeypatch.setattr(executors, "_slurm_states", lambda ids: next(states))
    running = FakeJob(tmp_path, "9_0", done=False)
    cancelled = FakeJob(tmp_path, "9_1", done=False)
    gen = executors._as_they_end({"r": running, "c": cancelled}, slurm=True, out_dir=tmp_path, poll_s=0)
    run_id, res, returned = next(gen)
    assert run_id == "c" and not returned
    assert res["message"] == f"Slurm job 9_1 ended CANCELLED without a result; log: {tmp_path / '9_1_0_log.err'}"
    running.paths.result_pickle.write_bytes(b"x")          # its result appears: it is collected
    _result(tmp_path, "r")
    assert next(gen) == ("r", OK, True)


def test_a_cancelled_job_that_had_finished_keeps_its_result_and_a_failed_run_is_retried(tmp_path):
    from ssmscale.config import LadderConfig, validate
    from test_ladder import micro
    cfg = validate(LadderConfig, micro(tmp_path, budgets=[2.0e9], sizes=[6.0e3]), "x")
    run = plan.plan(cfg)[0]
    path = tmp_path / "runs" / run.run_id / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"status": "ok", "lr": run.lr, "loss": 1.0, "params": run.params,
                                "tokens": run.tokens, "flops": run.flops}))
    kept = state._write_failed(tmp_path, run, {"status": "failed", "message": "cancelled"})
    assert kept["status"] == "ok" and json.loads(path.read_text())["status"] == "ok"
    path.write_text(json.dumps({"status": "failed", "lr": run.lr}))
    state._write_failed(tmp_path, run, {"status": "failed", "message": "Slurm job 1_0 ended CANCELLED"})
    assert json.loads(path.read_text())["message"] == "Slurm job 1_0 ended CANCELLED"
    assert not state._finished(tmp_path, run)


# ------------------------------------------------------------------------------- a real cluster
def _cluster_up() -> bool:
    return bool(os.environ.get("SLURM_CONF")) and shutil.which("sinfo") is not None and \
        subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


def _training(study) -> list:
    """Runs mid-training: steps logged, no result yet."""
    return [p.parent for p in study.glob("runs/*/metrics.csv")
            if not (p.parent / "result.json").exists() and len(p.read_text().splitlines()) > 5]


def _planned_runs(config: Path, tmp_path: Path) -> int:
    """How many runs the ladder plans to train, as its dry run says: the size of the job array."""
    out = subprocess.run([sys.executable, "-m", "ssmscale.cli", "ladder", str(config), "--dry-run", "--no-progress",
                          "--out", str(tmp_path / "plan"), "--set", f"data.cache_dir={tmp_path / 'cache'}"],
                         capture_output=True, text=True, check=True).stdout
    return int(re.search(r"^(\d+) runs to train", out, re.M).group(1))


def _squeue(name):
    out = subprocess.run(["squeue", "-h", "-r", "--states=all", f"--name={name}", "--format=%i|%T"],
                         capture_output=True, text=True).stdout
    return dict(line.split("|") for line in out.split())


@pytest.mark.slurm
@pytest.mark.skipif(not _cluster_up(), reason="no Slurm cluster (make test-slurm starts one)")
def test_tiny_ladder_as_a_slurm_job_array_survives_cancelling_half_of_it(tmp_path):
    study = tmp_path / "study"
    n = _planned_runs(ROOT / "configs" / "tiny.yaml", tmp_path)
    half = n // 2
    command = [sys.executable, "-m", "ssmscale.cli", "ladder", str(ROOT / "configs" / "tiny.yaml"),
               "--executor", "submitit", "--out", str(study), "--no-progress",
               "--set", "submitit.cluster=slurm", "--set", "submitit.parallelism=2",
               "--set", "submitit.cpus_per_task=1", "--set", "submitit.timeout_min=30",
               "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "fit=false"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    # wait for the array to be queued and two runs to finish, then cancel half of it: the jobs running
    # (cancelled mid-training) and every other job still queued
    deadline = time.time() + 900
    while time.time() < deadline and not (len(list(study.glob("runs/*/result.json"))) >= 2 and _training(study)):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.5)
    states = _squeue("ssmscale-tiny")
    array_id = next(iter(states)).split("_")[0]
    by_index = sorted(states, key=lambda j: int(j.split("_")[1]))
    running = [j for j in by_index if states[j] == "RUNNING"]
    live = (running + [j for j in by_index if states[j] == "PENDING"][1::2])[:half]
    assert len(states) == n and running and len(live) == half, states
    subprocess.run(["scancel", *live], check=True)
    print(f"array {array_id}: {len(states)} tasks; cancelled {len(live)}: {', '.join(live)}")
    first.wait(timeout=1800)
    log.close()
    text = (tmp_path / "first.log").read_text()
    print(text)
    reports = re.findall(rf"\[\d+/{n}\] (\w+) +(\S+): (.*)", text)
    assert len(reports) == n and len({run for _, run, _ in reports}) == n       # each run reported once
    failed = {run: re.fullmatch(r"Slurm job (\S+) (?:ended CANCELLED|left the queue) without a result; "
                                r"log: (\S+)", message) for status, run, message in reports if status == "failed"}
    assert failed and all(failed.values()), failed           # only cancelled jobs failed, each naming its log
    assert {m.group(1) for m in failed.values()} <= set(live)
    assert all(Path(m.group(2)).parent.parent == study / "submitit" for m in failed.values())   # a fresh folder
    after_first = pd.read_csv(study / "results.csv")
    assert after_first.run_id.is_unique and len(after_first) == n
    assert sorted(after_first[after_first.status == "failed"].run_id) == sorted(failed)
    kept = {r: (study / "runs" / r / "result.json").stat().st_mtime_ns
            for r in after_first[after_first.status == "ok"].run_id}

    print(f"{len(failed)} runs lost to the cancel (the other cancelled jobs had finished their run)")
    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    print(second.stdout + second.stderr)
    assert second.returncode == 0
    assert f"{len(kept)} runs already finished, {n - len(kept)} to train" in second.stdout
    final = pd.read_csv(study / "results.csv")
    assert len(final) == n and final.run_id.is_unique and set(final.status) == {"ok"}
    for run_id, mtime in kept.items():          # what had finished was not trained again
        assert (study / "runs" / run_id / "result.json").stat().st_mtime_ns == mtime


def test_squeue_ids_of_pending_array_tasks_are_read_as_their_task_ids(monkeypatch):
    """Once cancelling leaves pending tasks in an array's record, squeue names them "1_[44]" or "1_[4-6,9%2]":
    each must be read as its task id, or the watcher takes a pending task for one that left the queue."""
    from ssmscale.study import executors
    out = "1_2|COMPLETED\n1_3|CANCELLED\n1_[44]|PENDING\n2_[4-6,9%2]|PENDING\n"
    calls = []

    def squeue(args, **kw):
        calls.append(args[-1])
        text = out if args[-1] == "--jobs=1,2" else ("7_45|PENDING\n" if "7_45" in args[-1] else "")
        return subprocess.CompletedProcess(args, 0, stdout=text, stderr="")
    monkeypatch.setattr(executors.subprocess, "run", squeue)
    states = executors._slurm_states(["1_2", "1_44", "2_5"])
    assert states == {"1_2": "COMPLETED", "1_3": "CANCELLED", "1_44": "PENDING", "2_4": "PENDING",
                      "2_5": "PENDING", "2_6": "PENDING", "2_9": "PENDING"}
    # the last pending task, absent from the listing by array id, is asked for by its task id
    states = executors._slurm_states(["7_1", "7_45"])
    assert calls[-2:] == ["--jobs=7", "--jobs=7_1,7_45"] and states == {"7_45": "PENDING"}
