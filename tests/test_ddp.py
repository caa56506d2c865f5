"""Data-parallel training for real: 2 processes (Lightning DDP over gloo, one thread each) on this CPU
against 1 process with the same global batch; kill -9 mid-run and resume; one writer (rank 0)."""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from ssmscale.train import METRIC_FIELDS, run_training
from test_train import _freeze_at_a_readable_checkpoint, tiny_config

DDP = ["--set", "train.devices=2", "--set", "train.strategy=ddp", "--set", "train.accelerator=cpu",
       "--set", "train.num_threads=1"]


def _train_losses(run_dir) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["train_loss"]]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {int(r["step"]): float(r["train_loss"]) for r in rows}


@pytest.mark.ddp
def test_two_process_ddp_matches_one_process_step_by_step_and_resumes_after_kill_9(tmp_path):
    n_steps = 30
    cfg = tiny_config(tmp_path, tokens=n_steps * 128, checkpoint_every=10)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    one = run_training(cfg, tmp_path / "one")

    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "ssmscale.cli", "train", str(cfg_path), "--out", str(run_dir), *DDP]
    # its own session: kill -9 takes rank 0 and the rank 1 it launched, as a scheduler would
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        at_step = _freeze_at_a_readable_checkpoint(proc, run_dir / "checkpoints" / "last.ckpt")
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 0 < at_step < n_steps and not (run_dir / "result.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len([line for line in resumed.stdout.splitlines() if line.startswith("ok:")]) == 1   # rank 0 reports

    result = json.loads((run_dir / "result.json").read_text())
    assert result["resumed_from_step"] == at_step and result["steps"] == n_steps
    assert result["tokens"] == one["tokens"] == n_steps * 128          # the global batch, counted once
    assert result["flops"] == one["flops"]
    assert result["loss"] == pytest.approx(one["loss"], rel=1e-5)
    ddp_losses, one_losses = _train_losses(run_dir), _train_losses(tmp_path / "one")
    assert sorted(ddp_losses) == list(range(1, n_steps + 1))          # steps before and after the kill
    for step, loss in one_losses.items():                             # the mean over both ranks
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-5), step
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert files == [".run.lock", "config.yaml", "logs/csv/hparams.yaml", "logs/csv/metrics.csv", "metrics.csv",
                     "model.pt", "result.json"]                      # one of each (the lock: rank 0's); no checkpoint left
    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as f:   # Lightning's CSV log agrees
        logged = [r for r in csv.DictReader(f) if r["train_loss"]]
    assert set(logged[0]) == set(METRIC_FIELDS) - {"val_accuracy"}   # text data: no accuracy to log
    assert [int(r["step"]) for r in logged] == list(range(1, n_steps + 1))
    assert [float(r["train_loss"]) for r in logged] == [ddp_losses[s] for s in range(1, n_steps + 1)]
