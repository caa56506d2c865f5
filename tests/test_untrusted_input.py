"""Hostile or careless input: no code runs from a planted file, nothing hangs, every bad input is one line.

Each test pins one class of problem found by trying the tool as a hostile user would (issue #14):
planted checkpoints, names that escape runs/ and scaling/, sizes beyond what can exist, files of the
wrong shape in a study directory, a schema looser than documented, and leftovers of refused commands.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from ssmscale import fsutil, safeload
from ssmscale.cli import main
from ssmscale.config import RunConfig, validate
from ssmscale.errors import UserError

from hang import alarm
from planted import RunsShell

SYNTHETIC = {"source": "synthetic", "synthetic": {"vocab_size": 64, "num_kv_pairs": 2, "num_examples": 64}}


def run_raw(**train):
    """A run of a few steps on MQAR (no tokenising): seconds, not minutes."""
    return {"name": "t", "data": SYNTHETIC, "model": {"family": "transformer", "d_model": 16, "n_layer": 1, "head_dim": 8},
            "train": {"seq_len": 16, "batch_size": 2, "tokens": 4 * 32, "eval_tokens": 32, "progress": False, **train}}


def ladder_raw(**over):
    raw = {"name": "h", "families": ["transformer"], "budgets": [4.0e6], "sizes": [{"transformer": [16, 1]}],
           "min_steps": 1, "data": SYNTHETIC, "model": {"head_dim": 8},
           "train": {"seq_len": 16, "batch_size": 2, "eval_tokens": 32, "progress": False}, "fit": False}
    raw.update(over)
    return raw


def write(path: Path, raw) -> Path:
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def within_seconds():
    """A hang becomes a failure instead of a stuck test suite."""
    with alarm(20):
        yield


# ------------------------------------------------------------------ 1. planted checkpoints run nothing
def _plant(path: Path, marker: Path):
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 3, "state_dict": {}, "payload": RunsShell(marker)}, path)


def _foreign(path: Path, marker: Path):
    """A checkpoint of the right structure holding another model's weights (it would crash Lightning's restore)."""
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "global_step": 3, "state_dict": {"model.embedding.weight": torch.zeros(3, 5)},
                "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}, path)


def test_a_planted_checkpoint_is_refused_in_one_line_and_the_run_starts_over(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    _plant(run_dir / "checkpoints" / "last.ckpt", marker)
    said = "refused, not a plain weights file (Trying to load unsupported GLOBAL posix.system"
    cfg = write(tmp_path / "run.yaml", run_raw())
    assert main(["train", str(cfg), "--out", str(run_dir)]) == 0
    assert not marker.exists()                                   # nothing in the pickle ran
    err = [line for line in capsys.readouterr().err.splitlines() if "last.ckpt" in line]
    assert len(err) == 1 and said in err[0] and re.search(r"; moved to last.ckpt.refused-\w+, starting the run over$",
                                                          err[0]), err
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok" and result["resumed_from_step"] == 0 and result["steps"] == 4
    assert len(list((run_dir / "checkpoints").glob("last.ckpt.refused-*"))) == 1    # set aside, not deleted


def test_safe_loaders_refuse_code_and_foreign_files_without_running_anything(tmp_path):
    import torch
    marker = tmp_path / "PWNED"
    _plant(tmp_path / "evil.pt", marker)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    for loader in (safeload.load_checkpoint, safeload.load_weights):
        with pytest.raises(safeload.FileRefused, match="refused, not a plain weights file"):
            loader(tmp_path / "evil.pt")
        with pytest.raises(safeload.FileRefused, match="junk.pt: (refused|unreadable)"):
            loader(tmp_path / "junk.pt")
    assert not marker.exists()
    assert safeload.load_weights(tmp_path / "weights.pt")["w"].sum() == 2
    with pytest.raises(safeload.FileRefused, match="not a checkpoint of this training loop"):
        safeload.load_checkpoint(tmp_path / "weights.pt")


def test_a_checkpoint_of_another_model_is_told_apart_before_lightning_reads_it(tmp_path):
    from ssmscale.models import LM, ModelConfig
    _foreign(tmp_path / "last.ckpt", tmp_path / "unused")
    saved = safeload.load_checkpoint(tmp_path / "last.ckpt")["state_dict"]
    model = LM(ModelConfig(family="transformer", d_model=16, n_layer=1, head_dim=8))
    expected = {f"model.{k}": v for k, v in model.state_dict().items()}
    assert "its weights are of another model (model.embedding.weight: (3, 5)" in \
        safeload.state_dict_mismatch(saved, expected)
    assert safeload.state_dict_mismatch(expected, expected) is None
    assert "model.extra is not in this model" in safeload.state_dict_mismatch(
        {**expected, "model.extra": expected["model.embedding.weight"]}, expected)


# ------------------------------------------------------------------------- 2. names are plain names
@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", ".hidden", "-rf", "x" * 101, ""])
def test_a_ladder_name_that_is_not_a_plain_name_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                                                        name):
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    cfg = write(work / "l.yaml", ladder_raw(name=name))
    assert main(["ladder", str(cfg), "--dry-run", "--no-progress"]) == 2
    assert "name: must be a plain name" in one_error_line(capsys)
    assert files_under(tmp_path) == {"deep", "deep/work", "deep/work/l.yaml"}


@pytest.mark.parametrize("name, ok", [("study/transformer_N2.5e04_C1e12", True), ("../x", False), ("a//b", False),
                                      ("a/../b", False), ("/abs", False)])
def test_run_names_are_plain_names_joined_by_slashes_as_the_ladder_writes_them(name, ok):
    raw = run_raw()
    raw["name"] = name
    if ok:
        assert validate(RunConfig, raw, "x").name == name
    else:
        with pytest.raises(UserError, match="name: must be plain names joined by '/'"):
            validate(RunConfig, raw, "x")


def test_a_nested_run_name_trains_into_its_folder_below_runs(tmp_path, monkeypatch):
    # the README: a run's name is plain names joined by '/', landing in runs/<name>-<family> below the cwd
    monkeypatch.chdir(tmp_path)
    raw = run_raw()
    raw["name"] = "exp/a"
    assert main(["train", str(write(tmp_path / "r.yaml", raw)), "--no-progress"]) == 0
    assert (tmp_path / "runs" / "exp" / "a-transformer" / "result.json").is_file()
    assert {p.name for p in tmp_path.iterdir()} == {"r.yaml", "runs"}


# -------------------------------------------------------------- 3. sizes beyond what exists: no hang
@pytest.mark.parametrize("argv, expected", [
    (["sizes", "1e300"], "params: expected a positive number up to 1e+13"),
    (["sizes", "nan"], "params: expected a positive number up to 1e+13"),
    (["sizes", "1e5", "--head-dim", "0"], "--head-dim: expected an integer from 1"),
    (["sizes", "1e5", "--seq-len", "0"], "--seq-len: expected an integer from 1"),
    (["sizes", "1e12", "--verify"], "--verify: builds each model"),
    (["profile", "--params", "1e300"], "--params: expected a positive number up to 1e+13"),
    (["profile", "--params", "inf"], "--params: expected a positive number up to 1e+13"),
    (["profile", "--d-model", "24", "--n-layer", "1"], "d_model: 24 is not a multiple of head_dim 32"),
    (["profile", "--mem-limit-gb", "-1"], "--mem-limit-gb: expected a positive number"),
    (["profile", "--op", "scan", "--timeout", "-1"], "--timeout: expected a positive number"),
    (["fit", "x.csv", "--seed", "-1"], "--seed: expected an integer from 0"),
    (["fit", "x.csv", "--jobs", "0"], "--jobs: expected an integer from 1"),
])
def test_bad_or_impossible_arguments_exit_2_in_one_line_at_once(tmp_path, capsys, monkeypatch, within_seconds,
                                                                argv, expected):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert expected in one_error_line(capsys)
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("key, value", [("params", 1e300), ("params", 1e14)])
def test_a_model_beyond_what_can_exist_is_refused_by_the_schema(tmp_path, capsys, within_seconds, key, value):
    raw = run_raw()
    raw["model"] = {"family": "mamba", key: value}
    cfg = write(tmp_path / "run.yaml", raw)
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "model.params: must be at most 1e+13, ssmscale's bound on what can exist" in one_error_line(capsys)


def test_a_ladder_size_beyond_what_can_exist_fails_the_dry_run_at_once(tmp_path, capsys, within_seconds):
    cfg = write(tmp_path / "l.yaml", ladder_raw(sizes=[1e300]))
    assert main(["ladder", str(cfg), "--dry-run", "--out", str(tmp_path / "s")]) == 2
    assert "sizes.0: must be at most 1e+13" in one_error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_the_width_search_answers_at_the_largest_size_and_refuses_beyond_it(within_seconds):
    from ssmscale.models.sizing import shape_for
    big = shape_for("mamba", 1e13)
    assert abs(big.params / 1e13 - 1) < 0.01
    with pytest.raises(ValueError, match="at most 1e\\+13"):
        shape_for("transformer", 1e300)


# ----------------------------------------------------------- 4. bad input is one line, not a traceback
def test_a_binary_config_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "bin.yaml"
    cfg.write_bytes(b"name: t\n\xff\xfe\x00\x01binary")
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "bin.yaml: not UTF-8 text" in one_error_line(capsys)


@pytest.mark.parametrize("train, expected", [
    ({"tokens": 1e300}, "train.tokens: must be at most 1e+15"),
    ({"strategy": "bogus"}, "train.strategy: Input should be 'auto' or 'ddp'"),
])
def test_impossible_training_settings_are_one_line(tmp_path, capsys, train, expected):
    cfg = write(tmp_path / "run.yaml", run_raw(**train))
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    raw = run_raw()
    raw["data"] = {"source": "stdlib", "max_bytes": 10_000, "cache_dir": str(tmp_path / "afile")}
    cfg = write(tmp_path / "run.yaml", raw)
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "data.cache_dir" in one_error_line(capsys)


@pytest.mark.parametrize("argv", [
    ["train", "{run}", "--out", "{out}"],
    ["ladder", "{ladder}", "--out", "{out}", "--no-progress"],
    ["profile", "--families", "transformer", "--d-model", "32", "--n-layer", "1", "--seq-lens", "8", "--out", "{out}"],
    ["profile", "--op", "scan", "--impls", "ref", "--seq-lens", "8", "--out", "{out}"],
    ["report", "{study}", "--out", "{out}"],
    ["fit", "{study}", "--out", "{out}"],
])
@pytest.mark.parametrize("kind", ["a file", "under a file", "a file behind a missing folder's ..", "unwritable"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch, argv,
                                                                           kind):
    from ssmscale import train
    from ssmscale.bench import profile
    from ssmscale.report import scaling as report
    for module, name in ((train, "run_training"), (profile, "profile_models"), (report, "fit_runs")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("long work started before the check"),
                            raising=False)
    import ssmscale.bench.scan as bench_scan
    monkeypatch.setattr(bench_scan, "run_benchmark", lambda *a, **k: pytest.fail("measured before the check"))
    (tmp_path / "afile").write_text("x")
    if kind == "unwritable":
        if os.geteuid() != 0:
            (tmp_path / "locked").mkdir(mode=0o555)
            out = tmp_path / "locked" / "o"
        elif Path("/proc/self").is_dir():
            out = Path("/proc/ssmscale-test-output")       # root may write anywhere, but not in /proc
        else:
            pytest.skip("no folder that root cannot write to")
    elif kind == "a file behind a missing folder's ..":
        out = tmp_path / "missing" / ".." / "afile"      # making the folders makes missing/, then finds the file
    else:
        out = tmp_path / "afile" if kind == "a file" else tmp_path / "afile" / "o"
    study = tmp_path / "study"
    study.mkdir()
    (study / "results.csv").write_text("params,tokens,loss\n1e6,2e7,3.0\n")
    paths = {"run": write(tmp_path / "run.yaml", run_raw()), "ladder": write(tmp_path / "l.yaml", ladder_raw()),
             "study": study, "out": out}
    before = files_under(tmp_path)
    assert main([a.format(**paths) for a in argv]) == 2
    err = one_error_line(capsys)
    assert str(out) in err and ("not a folder" in err or "cannot write" in err or "is a file" in err), err
    assert files_under(tmp_path) == before


# ------------------------------------------------------------ 5. study files of the wrong shape
@pytest.mark.parametrize("content, problem", [
    ("[1]", "holds a JSON list, not an object"),
    ('{"status": "ok"}', "status ok but loss is None"),
    ('{"status": "ok", "loss": "low", "bpb": 1}', "loss 'low' is not a number"),
    ('{"status": "done"}', "status 'done' is none of ok, diverged, failed"),
    ("\xff", "not UTF-8 text"),
    ("{", "not valid JSON"),
])
def test_a_malformed_result_json_counts_as_unfinished_and_is_trained_again(tmp_path, capsys, monkeypatch,
                                                                           content, problem):
    from ssmscale.config import load_ladder_config
    from ssmscale.study import executors, ladder, state
    from ssmscale.study.plan import plan
    cfg = load_ladder_config(write(tmp_path / "l.yaml", ladder_raw()))
    run = plan(cfg)[0]
    path = tmp_path / "s" / "runs" / run.run_id / "result.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode("latin-1"))
    assert state._read_result(tmp_path / "s", run.run_id) is None
    assert not state._finished(tmp_path / "s", run)
    assert len(state.collect_results(cfg, tmp_path / "s", [run])) == 0     # no empty-loss row
    trained = []
    monkeypatch.setattr(executors, "_train_run", lambda cfg, out_dir, run, *a, **k: trained.append(run.run_id) or
                        {"status": "failed", "message": "stub"})
    ladder.run_ladder(str(tmp_path / "l.yaml"), out=str(tmp_path / "s"), progress=False)
    err = [line for line in capsys.readouterr().err.splitlines() if "result.json" in line]
    assert len(err) == 1 and problem in err[0] and "counts as unfinished and is trained again" in err[0]
    assert trained == [run.run_id]


def test_a_ladder_retrains_a_run_whose_result_json_is_malformed(tmp_path, capsys):
    cfg_path = write(tmp_path / "l.yaml", ladder_raw())
    from ssmscale.config import load_ladder_config
    from ssmscale.study.plan import plan
    run = plan(load_ladder_config(cfg_path))[0]
    path = tmp_path / "s" / "runs" / run.run_id / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"status": "ok"}')
    assert main(["ladder", str(cfg_path), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    import pandas as pd
    rows = pd.read_csv(tmp_path / "s" / "results.csv")
    assert len(rows) == 1 and rows.status[0] == "ok" and 0 < rows.loss[0] < 10
    assert "counts as unfinished and is trained again" in capsys.readouterr().err


def test_result_json_holds_strict_json_with_null_for_nan(tmp_path):
    fsutil.atomic_write_json(tmp_path / "r.json", {"status": "diverged", "loss": float("nan"), "bpb": float("inf"),
                                                   "nested": [1.0, float("-inf")]})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    res = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert res == {"status": "diverged", "loss": None, "bpb": None, "nested": [1.0, None]}
    assert safeload.result_problem(res) is None            # a diverged run with a null loss has ended


def test_a_train_command_on_a_malformed_result_says_so_and_trains(tmp_path, capsys, monkeypatch):
    from ssmscale import train
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "result.json").write_text("[1]")
    trained = []
    monkeypatch.setattr(train, "run_training", lambda cfg, out: trained.append(out) or {
        "status": "failed", "message": "stub", "family": "transformer", "d_model": 16, "n_layer": 1, "params": 1,
        "tokens": 1, "flops": 1.0, "loss": math.nan, "bpb": math.nan, "tokens_per_s": 1.0, "wall_s": 0.0})
    cfg = write(tmp_path / "run.yaml", run_raw())
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 1
    assert "holds a JSON list, not an object; the run counts as unfinished" in capsys.readouterr().err
    assert trained == [tmp_path / "o"]


# ------------------------------------------------------------------------ 6. a strict schema
@pytest.mark.parametrize("text, expected", [
    ("name: t\nname: u\n", "duplicate key 'name' (line 2)"),
    ("train: {seq_len: 16, seq_len: 32}\n", "duplicate key 'seq_len' (line 1)"),
    ("model: {family: transformer, d_model: true, n_layer: 1}\ntrain: {tokens: 1000}\n",
     "model.d_model: Input should be a valid integer (got True)"),
    ("model: {family: transformer, d_model: '128', n_layer: 1}\ntrain: {tokens: 1000}\n",
     "model.d_model: Input should be a valid integer (got '128')"),
    ("model: {family: transformer, params: '1e5'}\ntrain: {tokens: 1000}\n",
     "model.params: Input should be a valid number (got '1e5')"),
    ("model: {family: transformer, params: 1e5}\ntrain: {tokens: 1000, progress: 1}\n",
     "train.progress: Input should be a valid boolean (got 1)"),
    ("a: &x [*x, *x]\n", "values once its aliases are expanded"),
])
def test_the_schema_is_as_strict_as_the_readme_says(tmp_path, capsys, text, expected):
    cfg = write(tmp_path / "run.yaml", text)
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert expected in one_error_line(capsys)


def test_unquoted_exponents_are_numbers_in_configs_and_in_set_overrides(tmp_path):
    from ssmscale.cli import _parse_overrides
    from ssmscale.config import load_run_config
    cfg = write(tmp_path / "run.yaml", "model: {family: mamba, params: 1e5}\ntrain: {tokens: 2e6, lr: 3e-3}\n")
    c = load_run_config(cfg, _parse_overrides(["train.final_lr=1e-5", "train.betas=[0.9, 0.99]"]))
    assert (c.model.params, c.train.tokens, c.train.lr, c.train.final_lr, c.train.betas) == \
        (1e5, 2e6, 3e-3, 1e-5, (0.9, 0.99))
    with pytest.raises(UserError, match="duplicate key 'a'"):
        _parse_overrides(["train.lr={a: 1, a: 2}"])


def test_size_keys_of_a_learning_rate_grid_may_be_unquoted_numbers(tmp_path):
    from ssmscale.config import load_ladder_config
    from ssmscale.study.plan import lrs_for
    cfg = load_ladder_config(write(tmp_path / "l.yaml", "name: h\nbudgets: [1e9]\nsizes: [1e5, 2e5]\n"
                                                       "lrs: {1e5: [1e-3], default: [2e-3]}\n"))
    assert lrs_for(cfg, 1e5) == [1e-3] and lrs_for(cfg, 2e5) == [2e-3]


def _csv(tmp_path, text, name="runs.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _rows() -> str:
    """Nine runs (three sizes at each of three budgets) drawn from a Chinchilla-like law, as CSV lines."""
    lines = []
    for c in (1e15, 1e16, 1e17):
        for factor in (0.3, 1.0, 3.0):
            n = 1e6 * factor * (c / 1e15) ** 0.5
            d = c / (6 * n)
            lines.append(f"{n:.6g},{d:.6g},{1.7 + 400 / n ** 0.34 + 400 / d ** 0.28:.6f},{c:g}\n")
    return "".join(lines)


ROWS = _rows()


@pytest.mark.parametrize("text, expected", [
    ("params,tokens,loss,budget\n" + ROWS + "1e6,1e9,3.0,1e15,extra\n", "line 11 has 5 fields, the header has 4"),
    ("params,tokens,loss,budget\n" + ROWS + "1e6,1e9", "line 11 has 2 of the header's 4 fields and no line end"),
    ("params,tokens,loss,budget\n1e6,1e9\n" + ROWS, "line 2 has 2 fields, the header has 4"),
])
def test_a_csv_whose_rows_do_not_match_its_header_is_named_with_its_line(tmp_path, capsys, text, expected):
    path = _csv(tmp_path, text)
    assert main(["fit", str(path), "--n-boot", "0", "--jobs", "1", "--no-progress"]) == 2
    assert expected in one_error_line(capsys)


def test_a_column_mapping_onto_a_column_that_exists_is_one_line(tmp_path, capsys):
    # found by the property test: renaming x to params beside a params column made two 'params' columns
    path = _csv(tmp_path, "params,tokens,loss,budget,x\n" + ROWS.replace("\n", ",1\n"))
    assert main(["fit", str(path), "--columns", "params=x", "--n-boot", "0", "--jobs", "1"]) == 2
    assert "--columns: params='x': " in one_error_line(capsys)


def test_a_fit_that_runs_off_to_infinity_is_skipped_with_its_reason(tmp_path):
    # found by the property test: Approach 3 on these runs ends at B = e^500, which math.exp cannot return
    from ssmscale.fit import CHINCHILLA_GRID, fit_runs, load_runs
    rows = ("1.366e16,4.843e17,2.4862 6.438e17,3.849e17,3.8811 1.888e16,1e7,1.5 4.615e17,6.818e17,3.8325 "
            "5.332e17,7.765e17,2.2798 3.203e17,1e15,1.5 6.038e17,6.694e16,1.5 6.812e17,1.974e16,1.5 "
            "7.759e17,3.245e17,1.5 1e5,1e7,4.1025 6.442e16,6.35e15,1.5 2.339e16,1e5,3.344")
    path = _csv(tmp_path, "params,tokens,loss\n" + "\n".join(rows.split()) + "\n")
    fit = fit_runs(load_runs(path), n_boot=4, n_jobs=1, progress=False,
                   parametric_grid=np.asarray(CHINCHILLA_GRID)[::500])
    # where L-BFGS ends depends on the CPU's floating point (AVX2 or AVX-512, BLAS kernels): on one machine it
    # runs off to B = e^500, on another it stops at a finite point. Either outcome is fine; a traceback is not.
    parametric = fit["families"]["all"]["parametric"]
    if "skipped" in parametric:
        assert re.fullmatch(r"numerical failure \((OverflowError|FloatingPointError|ValueError|ZeroDivisionError)"
                            r": .+\)", parametric["skipped"]), parametric["skipped"]
    else:
        assert all(math.isfinite(parametric[k]["value"]) for k in ("E", "A", "B", "alpha", "beta")), parametric


def test_a_fit_whose_optimiser_overflows_is_skipped_naming_the_failure(tmp_path, monkeypatch, capsys):
    # the overflow forced, so the path is exercised on every CPU: the fit goes on without Approach 3
    from ssmscale.fit import bootstrap

    def overflow(*args, **kwargs):
        return math.exp(1e4)
    monkeypatch.setattr(bootstrap, "fit_parametric", overflow)
    (tmp_path / "s").mkdir()
    _csv(tmp_path / "s", "params,tokens,loss,budget\n" + ROWS, "results.csv")
    assert main(["fit", str(tmp_path / "s"), "--n-boot", "0", "--jobs", "1", "--no-progress"]) == 0
    fit = json.loads((tmp_path / "s" / "fit.json").read_text())
    family = next(iter(fit["families"].values()))
    assert family["parametric"]["skipped"] == "numerical failure (OverflowError: math range error)"
    assert "skipped" not in family["frontier"]


def test_a_truncated_results_csv_of_a_study_is_refused(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    text = "params,tokens,loss,budget\n" + ROWS
    _csv(tmp_path / "s", text[:-1], "results.csv")                # cut inside the last line's last field
    assert main(["fit", str(tmp_path / "s"), "--n-boot", "0", "--jobs", "1", "--no-progress"]) == 2
    assert "results.csv: does not end with a line end, so it looks truncated" in one_error_line(capsys)


def test_exact_duplicate_rows_count_once_and_the_fit_says_so(tmp_path):
    from ssmscale.fit import load_runs
    once = load_runs(_csv(tmp_path, "params,tokens,loss,budget\n" + ROWS, "a.csv"))
    twice = load_runs(_csv(tmp_path, "params,tokens,loss,budget\n" + ROWS + ROWS.splitlines(True)[0] * 2, "b.csv"))
    assert len(twice.table) == len(once.table) == 9 and twice.dropped["exact_duplicates"] == 2
    assert "dropped 2 rows that repeat an earlier row exactly" in twice.notes


# --------------------------------------------------------- 5 (fit.json) and 7. leftovers
@pytest.fixture(scope="module")
def study_with_fit(tmp_path_factory):
    from ssmscale import fit
    from synthetic_study import SMALL_LM_LAWS, make_study
    study = make_study(tmp_path_factory.mktemp("s"), name="tiny", laws=SMALL_LM_LAWS, budgets=(1e13, 3e13, 1e14),
                       size_factors=(0.25, 0.5, 1, 2, 4), noise=0.005, profile=False)
    fit.fit_study(study, n_boot=0, n_jobs=1, progress=False, verbose=False, parametric_grid=fit.CHINCHILLA_GRID[::300])
    return study


@pytest.mark.parametrize("content, said", [
    (b"[1, 2]", "not a fit.json of this tool (wrong shape), refitting"),
    (b"\xff\xfe", "not UTF-8 text; refitting"),
    (b'{"source": 5}', "not a fit.json of this tool (wrong shape), refitting"),
    (b"{", "not valid JSON; refitting"),
])
def test_a_fit_json_of_the_wrong_shape_is_not_used_and_the_report_says_so(study_with_fit, tmp_path, capsys,
                                                                        content, said):
    import shutil

    from ssmscale.report import scaling as report
    from ssmscale.fit import load_runs
    study = shutil.copytree(study_with_fit, tmp_path / "tiny")
    loaded = load_runs(study)
    assert report.cached_fit(study, loaded) is not None
    (study / "fit.json").write_bytes(content)
    assert report.cached_fit(study, loaded) is None
    assert said in capsys.readouterr().out


def test_report_refits_when_a_fit_json_of_the_right_source_cannot_be_rendered(study_with_fit, tmp_path, capsys):
    import shutil

    from ssmscale import fit
    from ssmscale.report import scaling as report
    study = shutil.copytree(study_with_fit, tmp_path / "tiny")
    good = json.loads((study / "fit.json").read_text())
    (study / "fit.json").write_text(json.dumps({**good, "crossover": {"pairs": [{"nope": 1}]}}))
    report.write_report(study, tmp_path / "out", n_boot=0, progress=False, parametric_grid=fit.CHINCHILLA_GRID[::300])
    assert "fit.json: malformed (KeyError" in capsys.readouterr().out
    assert "| mamba vs transformer |" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((study / "fit.json").read_text())["crossover"] == good["crossover"]


def test_a_refused_fit_leaves_no_output_folder(tmp_path, capsys):
    path = _csv(tmp_path, "params,tokens,loss\n")
    assert main(["fit", str(path), "--out", str(tmp_path / "new"), "--n-boot", "0", "--jobs", "1"]) == 2
    one_error_line(capsys)
    assert not (tmp_path / "new").exists()


def test_a_refused_ladder_leaves_no_study_folder(tmp_path, capsys):
    cfg = write(tmp_path / "l.yaml", ladder_raw(budgets=[1.0e2]))
    assert main(["ladder", str(cfg), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "budgets.0: 100 FLOPs gives the smallest size" in one_error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_a_run_that_lightning_refuses_to_start_leaves_nothing(tmp_path, monkeypatch):
    import lightning

    from ssmscale.train import run_training

    class Refusing:
        def __init__(self, **kwargs):
            raise lightning.fabric.utilities.exceptions.MisconfigurationException("no such device\nmore")

    monkeypatch.setattr(lightning, "Trainer", Refusing)
    with pytest.raises(UserError, match="train: accelerator cpu.*: no such device$"):
        run_training(validate(RunConfig, run_raw(), "x"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
