"""The IsoFLOP ladder: planning arithmetic, bad grids, restart after kill -9, lock, submitit executor."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from ssmscale.cli import main
from ssmscale.config import LadderConfig, config_hash, validate
from ssmscale.errors import UserError
from ssmscale.flops import train_flops_per_token
from ssmscale.study.ladder import run_ladder
from ssmscale.study.plan import plan, run_config
from ssmscale.study.runner import thread_share
from ssmscale.study.state import StudyLock
from ssmscale.threads import available_cores


def micro(tmp_path, **over):
    raw = {
        "name": "micro", "families": ["transformer", "mamba"],
        "budgets": [2.0e9, 4.0e9], "sizes": [6.0e3, 1.2e4], "lrs": [3e-3], "min_steps": 10,
        "data": {"source": "stdlib", "max_bytes": 300_000, "cache_dir": str(tmp_path / "cache")},
        "model": {"head_dim": 8},
        "train": {"seq_len": 32, "batch_size": 4, "eval_tokens": 1024, "progress": False},
        "fit": False,
    }
    raw.update(over)
    return raw


def write_cfg(tmp_path, raw, name="ladder.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_plan_spends_each_budget_in_whole_steps(tmp_path):
    cfg = validate(LadderConfig, micro(tmp_path), "x")
    runs = plan(cfg)
    assert len(runs) == 2 * 2 * 2 and len({r.run_id for r in runs}) == len(runs)
    from ssmscale.study.plan import model_configs
    shapes = {(fam, mc.d_model, mc.n_layer): mc for _, per in model_configs(cfg) for fam, mc in per.items()}
    for r in runs:
        mc = shapes[(r.family, r.d_model, r.n_layer)]
        fpt = train_flops_per_token(mc, 32)
        assert r.steps == round(r.budget / fpt / 128)
        assert r.tokens == r.steps * 128 and r.flops == pytest.approx(r.tokens * fpt)
        assert abs(r.flops / r.budget - 1) < 0.5 * 128 * fpt / r.budget + 1e-9   # within half a step
    tf = [r for r in runs if r.family == "transformer"]
    mb = [r for r in runs if r.family == "mamba"]
    for a, b in zip(tf, mb):
        assert abs(b.params / a.params - 1) < 0.10 and b.n_layer == 2 * a.n_layer


def test_plan_matches_every_family_to_the_transformer_and_takes_explicit_shapes(tmp_path):
    from ssmscale.study.plan import size_label
    from ssmscale.models import FAMILIES
    cfg = validate(LadderConfig, micro(tmp_path, families=list(FAMILIES), sizes=[
        1.2e4, {"transformer": [32, 2], "mamba": [24, 4], "mamba2": [28, 4], "hybrid": [30, 4]}]), "x")
    runs = plan(cfg)
    assert len(runs) == 2 * 2 * len(FAMILIES) and len({r.run_id for r in runs}) == len(runs)
    by_size = {}
    for r in runs:
        by_size.setdefault((r.size, r.budget), {})[r.family] = r
    for (size, _), per in by_size.items():
        tf = per["transformer"]
        for fam in FAMILIES[1:]:
            assert per[fam].n_layer == 2 * tf.n_layer
            if size == "1.2e04":     # width 20-24: a step of 2 in width is ~20% of the count
                assert abs(per[fam].params / tf.params - 1) < 0.10, fam
    explicit = [r for r in runs if r.size != "1.2e04"]
    assert {(r.family, r.d_model, r.n_layer) for r in explicit} == {
        ("transformer", 32, 2), ("mamba", 24, 4), ("mamba2", 28, 4), ("hybrid", 30, 4)}
    assert explicit[0].size == size_label(cfg.sizes[1]) == \
        "transformer-d32xL2+mamba-d24xL4+mamba2-d28xL4+hybrid-d30xL4"
    assert {r.run_id.split("_")[1] for r in explicit} == {"d32xL2", "d24xL4", "d28xL4", "d30xL4"}


def test_plan_flags_few_steps_and_repeats_and_skips_them(tmp_path):
    cfg = validate(LadderConfig, micro(tmp_path, budgets=[2.0e9, 4.0e10], sizes=[6.0e3, 2.0e5], min_steps=30), "x")
    runs = plan(cfg, n_train_tokens=20_000)
    few = [r for r in runs if "few-steps" in r.flags]
    rep = [r for r in runs if "repeats" in r.flags]
    assert few and all(r.steps < 30 and r.skip for r in few)
    assert rep and all(r.tokens > 20_000 and r.skip for r in rep)
    allowed = plan(validate(LadderConfig, micro(tmp_path, budgets=[2.0e9, 4.0e10], sizes=[6.0e3, 2.0e5], min_steps=30,
                                                allow_repeats=True), "x"), n_train_tokens=20_000)
    assert not any(r.skip for r in allowed if r.flags == "repeats")


def test_lr_grid_per_size_multiplies_runs(tmp_path):
    cfg = validate(LadderConfig, micro(tmp_path, lrs={"6e3": [1e-3, 3e-3], "default": [2e-3]}), "x")
    runs = plan(cfg)
    small = {r.lr for r in runs if r.size == "6e03"}
    large = {r.lr for r in runs if r.size == "1.2e04"}
    assert small == {1e-3, 3e-3} and large == {2e-3}
    assert len(runs) == 2 * 2 * 3


def test_budget_too_small_for_the_smallest_size_is_an_error_naming_it(tmp_path):
    cfg = validate(LadderConfig, micro(tmp_path, budgets=[2.0e9, 1.0e7]), "x")
    with pytest.raises(UserError, match=r"budgets\.1: 1e\+07 FLOPs gives the smallest size .* only 1 step of 128 tokens"):
        plan(cfg)


def test_dry_run_prints_the_table_and_writes_plan_csv(tmp_path, capsys):
    path = write_cfg(tmp_path, micro(tmp_path))
    assert main(["ladder", str(path), "--out", str(tmp_path / "s"), "--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "run_id" in out and "transformer_N6e03_C2e09" in out and "8 runs to train" in out
    df = pd.read_csv(tmp_path / "s" / "plan.csv")
    assert len(df) == 8 and {"family", "d_model", "n_layer", "params", "tokens", "flops", "steps", "lr"} <= set(df)
    assert not (tmp_path / "s" / "runs").exists()


def test_the_worker_command_trains_one_planned_run_in_a_process_of_its_own(tmp_path):
    # the command a multi-device run of a ladder is started with (runner.run_one): python -m ssmscale.study.worker
    path = write_cfg(tmp_path, micro(tmp_path, families=["mamba"], budgets=[2.0e9], sizes=[6.0e3]))
    study = tmp_path / "s"
    assert main(["ladder", str(path), "--out", str(study), "--dry-run", "--no-progress"]) == 0
    run_id = pd.read_csv(study / "plan.csv").run_id[0]
    worker = [sys.executable, "-m", "ssmscale.study.worker", str(study)]
    proc = subprocess.run([*worker, run_id], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((study / "runs" / run_id / "result.json").read_text())["status"] == "ok"
    proc = subprocess.run([*worker, "no_such_run"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(f"no_such_run: not a runnable run of the study in {study}")


def _results(study):
    return pd.read_csv(study / "results.csv")


def test_ladder_killed_mid_way_resumes_without_losing_or_duplicating_rows(tmp_path):
    path = write_cfg(tmp_path, micro(tmp_path))
    study = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "ssmscale.cli", "ladder", str(path), "--out", str(study),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        done = list(study.glob("runs/*/result.json"))
        if len(done) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.parent.name: p.stat().st_mtime_ns for p in study.glob("runs/*/result.json")}
    assert 3 <= len(before) < 8
    rows_before = _results(study)
    assert len(rows_before) == len(set(rows_before.run_id)) <= len(before)

    run_ladder(str(path), out=str(study), progress=False)
    after = _results(study)
    assert len(after) == 8 and after.run_id.is_unique and set(after.status) == {"ok"}
    for run_id, mtime in before.items():      # finished runs were not trained again
        assert (study / "runs" / run_id / "result.json").stat().st_mtime_ns == mtime
    required = {"family", "params", "params_total", "tokens", "flops", "budget", "lr", "loss", "bpb", "status",
                "run_id", "seed", "config_hash", "data_fingerprint", "commit", "device", "versions", "wall_s"}
    assert required <= set(after.columns)
    assert after[list(required)].notna().all().all()

    run_ladder(str(path), out=str(study), progress=False)     # a third call trains nothing
    assert _results(study).equals(after)


def _children(pid: int) -> set[int]:
    from pathlib import Path
    kids = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        kids |= {int(x) for x in task.read_text().split()}
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_killed_parallel_ladder_takes_its_workers_with_it(tmp_path):
    """kill -9 of a `parallel: 2` ladder: its worker processes end too (no orphan keeps training and holding
    its run's lock), and the next invocation finishes the study."""
    path = write_cfg(tmp_path, micro(tmp_path, parallel=2))
    study = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "ssmscale.cli", "ladder", str(path), "--out", str(study),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    workers = set()
    while proc.poll() is None and time.time() < deadline and not list(study.glob("runs/*/metrics.csv")):
        workers = _children(proc.pid) or workers
        time.sleep(0.05)
    workers = _children(proc.pid) or workers
    assert proc.poll() is None and len(workers) >= 2, "no workers seen training"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read().split()[2]
                                         for w in workers if os.path.exists(f"/proc/{w}")):
        time.sleep(0.1)
    alive = [w for w in workers if os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z"]
    assert alive == [], f"workers {alive} outlived the ladder"
    run_ladder(str(path), out=str(study), progress=False)
    df = _results(study)
    assert len(df) == 8 and df.run_id.is_unique and set(df.status) == {"ok"}


def test_a_second_ladder_on_the_same_directory_is_refused(tmp_path, capsys):
    path = write_cfg(tmp_path, micro(tmp_path))
    study = tmp_path / "study"
    with StudyLock(study):
        code = subprocess.run([sys.executable, "-m", "ssmscale.cli", "ladder", str(path), "--out", str(study),
                               "--no-progress"], capture_output=True, text=True)
    assert code.returncode == 2
    assert "another ladder" in code.stderr and str(os.getpid()) in code.stderr
    assert len(code.stderr.strip().splitlines()) == 1


def test_restarting_with_a_different_fixed_config_is_refused(tmp_path):
    path = write_cfg(tmp_path, micro(tmp_path))
    study = tmp_path / "study"
    run_ladder(str(path), out=str(study), dry_run=True, progress=False)
    other = micro(tmp_path)
    other["train"] = {**other["train"], "seq_len": 64}
    with pytest.raises(UserError, match="train.seq_len differs"):
        run_ladder(str(write_cfg(tmp_path, other, "other.yaml")), out=str(study), dry_run=True, progress=False)


def test_submitit_local_executor_trains_the_same_runs(tmp_path):
    raw = micro(tmp_path, budgets=[2.0e9], sizes=[6.0e3], executor="submitit",
                submitit={"cluster": "local", "parallelism": 2, "cpus_per_task": 1, "timeout_min": 10})
    study = tmp_path / "study"
    run_ladder(str(write_cfg(tmp_path, raw)), out=str(study), progress=False)
    df = _results(study)
    assert sorted(df.family) == ["mamba", "transformer"] and set(df.status) == {"ok"}
    assert (study / "submitit").is_dir()
    local = json.loads((study / "runs" / df.run_id[0] / "result.json").read_text())
    assert local["tokens"] > 0 and local["budget"] == 2.0e9
    # two runs at once share this machine's cores (threads.py)
    assert local["threads"] == max(1, available_cores() // 2) and "2 parallel runs" in local["threads_reason"]


def test_thread_share_divides_a_local_pool_and_caps_a_slurm_job(tmp_path):
    cfg = validate(LadderConfig, micro(tmp_path, submitit={"parallelism": 3, "cpus_per_task": 4}), "test")
    assert thread_share(cfg, "local") == (3, None)
    assert thread_share(cfg, "slurm") == (1, 4)
    assert thread_share(cfg, "inprocess") == (1, None)


def test_resuming_a_study_with_another_thread_count_retrains_nothing(tmp_path):
    raw = micro(tmp_path, budgets=[2.0e9], sizes=[6.0e3])
    raw["train"] = {**raw["train"], "num_threads": 1}
    study = tmp_path / "study"
    run_ladder(str(write_cfg(tmp_path, raw)), out=str(study), progress=False)
    before = {p.parent.name: p.stat().st_mtime_ns for p in study.glob("runs/*/result.json")}
    assert len(before) == 2
    raw["train"]["num_threads"] = 2
    run_ladder(str(write_cfg(tmp_path, raw, "more_threads.yaml")), out=str(study), progress=False)
    assert {p.parent.name: p.stat().st_mtime_ns for p in study.glob("runs/*/result.json")} == before
    df = _results(study)
    assert len(df) == 2 and set(df.threads) == {1}
    # the run's identity does not include how many threads trained it
    run = next(r for r in plan(validate(LadderConfig, raw, "test")) if not r.skip)
    cfg = validate(LadderConfig, raw, "test")
    one, two = (run_config(cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_threads": n})}), run)
                for n in (1, None))
    assert config_hash(one) == config_hash(two) == df.config_hash[df.run_id == run.run_id].iloc[0]


def test_learning_rate_tuned_at_one_budget_is_used_at_the_others(tmp_path, capsys):
    raw = micro(tmp_path, budgets=[2.0e9, 4.0e9], sizes=[6.0e3], lrs=[3e-4, 3e-3], lr_tune_budget=2.0e9)
    path = write_cfg(tmp_path, raw)
    study = tmp_path / "study"
    run_ladder(str(path), out=str(study), dry_run=True, progress=False)
    assert "tuned" in capsys.readouterr().out          # the plan cannot know these learning rates yet
    run_ladder(str(path), out=str(study), progress=False)
    df = _results(study)
    assert len(df) == 2 * 2 + 2 and set(df.status) == {"ok"}
    for fam in ("transformer", "mamba"):
        tuning = df[(df.family == fam) & (df.budget == 2.0e9)]
        best = tuning.sort_values("loss").lr.iloc[0]
        used = df[(df.family == fam) & (df.budget == 4.0e9)]
        assert list(used.lr) == [best] and list(used.lr_source) == ["tuned at 2e+09"]
        assert set(tuning.lr_source) == {"grid"}


def test_lr_tune_budget_must_be_one_of_the_budgets(tmp_path):
    with pytest.raises(UserError, match="lr_tune_budget: 1e\\+10 is not one of the budgets"):
        validate(LadderConfig, micro(tmp_path, lr_tune_budget=1e10), "x")


def test_growing_the_tuning_grid_retrains_runs_whose_tuned_learning_rate_changed(tmp_path):
    from ssmscale.study.state import _finished
    from ssmscale.study.tuning import tuned_lrs
    raw = micro(tmp_path, budgets=[2.0e9, 4.0e9], sizes=[6.0e3], families=["transformer"], lrs=[1e-4],
                lr_tune_budget=2.0e9)
    study = tmp_path / "study"
    run_ladder(str(write_cfg(tmp_path, raw)), out=str(study), progress=False)
    before = _results(study)
    assert list(before[before.budget == 4.0e9].lr) == [1e-4]
    raw["lrs"] = [1e-4, 3e-3]          # 3e-3 trains far better in 30 steps than 1e-4
    cfg_path = write_cfg(tmp_path, raw)
    run_ladder(str(cfg_path), out=str(study), progress=False)
    after = _results(study)
    assert len(after) == 3 and after.run_id.is_unique
    assert list(after[after.budget == 4.0e9].lr) == [3e-3]
    cfg = validate(LadderConfig, raw, "x")
    assert all(_finished(study, r) for r in plan(cfg, tuned=tuned_lrs(cfg, study)))


def test_a_tuned_rate_is_only_used_once_every_rate_of_the_grid_has_been_tried(tmp_path):
    from ssmscale.study.tuning import tuned_lrs
    raw = micro(tmp_path, budgets=[2.0e9, 4.0e9], sizes=[6.0e3], families=["transformer"], lrs=[1e-4, 3e-3],
                lr_tune_budget=2.0e9)
    cfg = validate(LadderConfig, raw, "x")
    study = tmp_path / "study"
    first = next(r for r in plan(cfg) if r.lr == 1e-4)
    from ssmscale.study.runner import _train_run
    _train_run(cfg, study, first, progress=False, position=0)   # only one of the two rates has run
    assert tuned_lrs(cfg, study) == {}
    assert [r.lr for r in plan(cfg, tuned=tuned_lrs(cfg, study)) if r.budget == 4.0e9] == [None]


def _fake_result(study, run, status="ok", loss=None):
    d = study / "runs" / run.run_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "result.json").write_text(json.dumps({"status": status, "loss": loss, "lr": run.lr, "params": run.params,
                                               "tokens": run.tokens, "flops": run.flops}))


def test_a_best_rate_at_the_edge_of_its_grid_widens_the_grid_until_it_is_inside(tmp_path):
    from ssmscale.study.tuning import plan_study, tuned_lrs, widened_lrs
    raw = micro(tmp_path, budgets=[2.0e9, 4.0e9], sizes=[6.0e3], families=["transformer"],
                lrs=[1e-3, 3e-3, 1e-2], lr_tune_budget=2.0e9, lr_widen=2)
    cfg = validate(LadderConfig, raw, "x")
    study = tmp_path / "study"
    key = ("transformer", "6e03", "")
    tuning = {r.lr: r for r in plan(cfg) if r.budget == 2.0e9}
    _fake_result(study, tuning[1e-3], loss=2.0)
    _fake_result(study, tuning[3e-3], loss=1.9)
    assert widened_lrs(cfg, study) == {}                  # 1e-2 has not run: nothing is known yet
    _fake_result(study, tuning[1e-2], loss=1.8)           # best at the top edge: one grid step (3.3x) beyond
    assert widened_lrs(cfg, study) == {key: [0.033]}
    assert tuned_lrs(cfg, study) == {}                    # the cell stays open while 0.033 is pending
    assert [r.lr for r in plan_study(cfg, study) if r.budget == 4.0e9] == [None]
    new = next(r for r in plan_study(cfg, study) if r.lr == 0.033)
    assert new.lr_source == "widened" and new.run_id.endswith("_lr0.033")
    _fake_result(study, new, loss=1.7)                    # still the edge: once more, then the cap
    assert widened_lrs(cfg, study) == {key: [0.033, 0.11]}
    assert widened_lrs(cfg.model_copy(update={"lr_widen": 1}), study) == {key: [0.033]}
    _fake_result(study, next(r for r in plan_study(cfg, study) if r.lr == 0.11), status="diverged")
    assert widened_lrs(cfg, study) == {key: [0.033, 0.11]}     # inside now: a diverged rate is the worst
    assert tuned_lrs(cfg, study) == {key: 0.033}
    assert [r.lr for r in plan_study(cfg, study) if r.budget == 4.0e9] == [0.033]
    with pytest.raises(UserError, match="lr_widen: only used with lr_tune_budget"):
        validate(LadderConfig, micro(tmp_path, lr_widen=1), "x")


def test_a_ladder_trains_the_widened_rates_before_the_other_budgets(tmp_path):
    raw = micro(tmp_path, budgets=[2.0e9, 4.0e9], sizes=[6.0e3], families=["transformer"], lrs=[1e-4],
                lr_tune_budget=2.0e9, lr_widen=1)
    study = tmp_path / "study"
    run_ladder(str(write_cfg(tmp_path, raw)), out=str(study), progress=False)
    df = _results(study)
    tuning = df[df.budget == 2.0e9].sort_values("lr")
    assert list(tuning.lr) == [1e-4, 3e-4] and list(tuning.lr_source) == ["grid", "widened"]
    assert tuning.loss.iloc[1] < tuning.loss.iloc[0]      # 1e-4 is too small for 30 steps
    assert list(df[df.budget == 4.0e9].lr) == [3e-4]


def test_noise_seeds_added_to_a_finished_study_retrain_only_each_best_run_with_the_extra_seeds(tmp_path):
    raw = micro(tmp_path, budgets=[2.0e9], sizes=[6.0e3, 1.2e4])
    study = tmp_path / "study"
    run_ladder(str(write_cfg(tmp_path, raw)), out=str(study), progress=False)
    before = {p.parent.name: p.stat().st_mtime_ns for p in study.glob("runs/*/result.json")}
    main_rows = _results(study)
    assert len(before) == 4

    raw["noise_seeds"] = [1]               # not part of the study's identity: the same directory takes it
    run_ladder(str(write_cfg(tmp_path, raw)), out=str(study), progress=False)
    df = _results(study)
    assert len(df) == 4 + 2 and df.run_id.is_unique and set(df.status) == {"ok"}
    for run_id, mtime in before.items():
        assert (study / "runs" / run_id / "result.json").stat().st_mtime_ns == mtime
    for fam in ("transformer", "mamba"):
        best = main_rows[main_rows.family == fam].sort_values("loss").iloc[0]
        extra = df[(df.family == fam) & (df.seed != 0)]
        assert list(extra.run_id) == [f"{best.run_id}_s1"]
        assert set(extra.lr) == {best.lr} and set(extra.params) == {best.params}
        assert set(extra.d_model) == {best.d_model} and set(extra.lr_source) == {f"copied from {best.run_id}"}
        assert best.loss not in set(extra.loss)          # another seed, another loss
    with pytest.raises(UserError, match="noise_seeds: 0 is already one of the seeds"):
        validate(LadderConfig, micro(tmp_path, noise_seeds=[0]), "x")


def test_parallel_local_runs_share_the_cores_and_give_the_serial_numbers(tmp_path):
    """`parallel: 2`: two worker processes at once, each sized to half the cores; with 1 thread per run
    (pinned, so that the check holds on any machine) the same losses as one run at a time."""
    one_thread = {**micro(tmp_path)["train"], "num_threads": 1}
    serial = run_ladder(str(write_cfg(tmp_path, micro(tmp_path, train=one_thread))), out=str(tmp_path / "serial"),
                        progress=False)
    pooled = run_ladder(str(write_cfg(tmp_path, micro(tmp_path, train=one_thread, parallel=2), "pooled.yaml")),
                        out=str(tmp_path / "pooled"), progress=False)
    a, b = (_results(s).set_index("run_id").sort_index() for s in (serial, pooled))
    assert len(b) == 8 and set(b.status) == {"ok"} and list(a.index) == list(b.index)
    assert (a.loss == b.loss).all()                       # 1 thread either way: bit-identical
    assert set(b.threads) == {1} and (b.train_cpu_s > 0).all()
    from ssmscale.study.runner import thread_share
    assert thread_share(validate(LadderConfig, micro(tmp_path, parallel=2), "x"), "inprocess") == (2, None)


def test_noise_budgets_limit_the_seed_noise_runs_to_the_budgets_named(tmp_path):
    from ssmscale.study.tuning import plan_study
    raw = micro(tmp_path, budgets=[2.0e9, 4.0e9], noise_seeds=[1], noise_budgets=[2.0e9])
    cfg = validate(LadderConfig, raw, "x")
    study = tmp_path / "study"
    main_runs = [r for r in plan_study(cfg, study, n_train_tokens=10**6) if not r.skip]
    for i, r in enumerate(main_runs):           # every main run finished, with distinct losses
        (study / "runs" / r.run_id).mkdir(parents=True)
        (study / "runs" / r.run_id / "result.json").write_text(json.dumps(
            {"status": "ok", "loss": 3.0 - 0.01 * i, "lr": r.lr, "params": 1e4, "tokens": 1e5, "flops": r.budget}))
    noise = [r for r in plan_study(cfg, study, n_train_tokens=10**6) if r.seed == 1]
    assert {(r.family, r.budget, r.seed) for r in noise} == {("transformer", 2.0e9, 1), ("mamba", 2.0e9, 1)}
    everywhere = plan_study(validate(LadderConfig, {**raw, "noise_budgets": None}, "x"), study, n_train_tokens=10**6)
    assert {r.budget for r in everywhere if r.seed == 1} == {2.0e9, 4.0e9}
    for bad, message in (({"noise_budgets": [3.0e9]}, "noise_budgets: 3e\\+09 is not one of the budgets"),
                         ({"noise_seeds": [], "noise_budgets": [2.0e9]}, "noise_budgets: only used with noise_seeds")):
        with pytest.raises(UserError, match=message):
            validate(LadderConfig, {**raw, **bad}, "x")
