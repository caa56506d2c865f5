"""The README's promises about inputs and behaviour that no other test pinned, each checked through the command
line (`ssmscale.cli.main`) or the public config loading; docs/promises.md maps every promise to its test.

Tiny and fast: MQAR data (no tokenising), models of a few thousand parameters, a few optimiser steps.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from hang import alarm
from test_untrusted_input import (SYNTHETIC, files_under, ladder_raw, one_error_line, run_raw,  # noqa: F401
                                  within_seconds, write)

from ssmscale import fsutil, limits, train
from ssmscale.cli import build_parser, main
from ssmscale.config import dump_yaml, load_run_config, parse_yaml

ROOT = Path(__file__).resolve().parents[1]
PARSER_COMMANDS = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)
TIMES = {"wall_s", "train_s", "train_cpu_s", "tokens_per_s", "finished_at"}   # how long and when, not what was computed



def result_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


# ------------------------------------------------------------------------------- every command
def test_the_readme_lists_every_command_there_is():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Commands"):]
    block = block[:block.index("```", block.index("```") + 3)]
    listed = set(re.findall(r"^ssmscale ([a-z-]+)", block, re.M))
    assert listed == set(PARSER_COMMANDS), (sorted(listed), sorted(PARSER_COMMANDS))


@pytest.mark.parametrize("command", [None, *PARSER_COMMANDS])
def test_every_command_answers_help(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"] if command else ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ssmscale{' ' + command if command else ''}") and "--help" in out


# ------------------------------------------------------------------------------------ YAML 1.2
def test_configs_read_yaml_12_numbers_and_not_yaml_11s(tmp_path, capsys):
    # YAML 1.1 (PyYAML) reads 010 as 8 (octal), 1_000 and 1:30 as numbers and 1e5 as a string; YAML 1.2 does not
    text = ("model: {family: transformer, d_model: 0o100, n_layer: 02}\n"
            "train: {tokens: 1e5, lr: 3e-3, batch_size: 010, seq_len: 0x10}\n")
    cfg = load_run_config(write(tmp_path / "r.yaml", text))
    assert (cfg.model.d_model, cfg.model.n_layer) == (64, 2)
    assert (cfg.train.tokens, cfg.train.lr, cfg.train.batch_size, cfg.train.seq_len) == (1e5, 3e-3, 10, 16)
    for text in ("1_000", "1:30"):
        path = write(tmp_path / "r.yaml", f"model: {{family: transformer, params: 1e5}}\n"
                                          f"train: {{tokens: 1e5, seq_len: {text}}}\n")
        assert main(["train", str(path), "--out", str(tmp_path / "o")]) == 2
        assert f"train.seq_len: Input should be a valid integer (got '{text}')" in one_error_line(capsys)
    # what the tool writes (a study's or a run's config.yaml) reads back as the same values
    values = {"name": "010", "strings": ["1e5", "0o7", "0x1", "1_000", "1:30", "08"], "numbers": [1e-5, 1e16, 3.0, 7]}
    assert parse_yaml(dump_yaml(values), "x") == values


@pytest.mark.parametrize("text, expected", [
    ("budgets: ['1e12']", "budgets.0: Input should be a valid number (got '1e12')"),
    ("lrs: [true]", "lrs.0: Input should be a valid number (got True)"),
    ("seeds: ['0']", "seeds.0: Input should be a valid integer (got '0')"),
    ("min_steps: 2.0", "min_steps: Input should be a valid integer (got 2.0)"),
    ("fit: 1", "fit: Input should be a valid boolean (got 1)"),
])
def test_a_ladder_config_is_as_strict_about_types_as_a_run_config(tmp_path, capsys, text, expected):
    raw = ladder_raw()
    raw.pop(text.split(":")[0], None)
    path = write(tmp_path / "l.yaml", yaml.safe_dump(raw) + text + "\n")
    assert main(["ladder", str(path), "--dry-run", "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "s").exists()


# -------------------------------------------------------------------------------------- names
def test_a_study_name_may_use_every_character_the_readme_allows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "Ab_9.c-d+e=f"
    assert main(["ladder", str(write(tmp_path / "l.yaml", ladder_raw(name=name))), "--dry-run", "--no-progress"]) == 0
    assert (tmp_path / "scaling" / name / "plan.csv").is_file()


def test_a_ladder_names_its_runs_study_slash_run_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["ladder", str(write(tmp_path / "l.yaml", ladder_raw())), "--no-progress"]) == 0
    run_dirs = list((tmp_path / "scaling" / "h" / "runs").iterdir())
    assert len(run_dirs) == 1
    saved = parse_yaml((run_dirs[0] / "config.yaml").read_text(), "x")
    assert saved["name"] == f"h/{run_dirs[0].name}"


# --------------------------------------------------------------------- bounds: no request hangs
@pytest.mark.parametrize("command, over, expected", [
    ("train", {"train": {"seq_len": limits.MAX_SEQ_LEN + 1}}, "train.seq_len: must be at most"),
    ("train", {"train": {"batch_size": limits.MAX_BATCH + 1}}, "train.batch_size: must be at most"),
    ("train", {"train": {"eval_points": limits.MAX_COUNT + 1}}, "train.eval_points: must be at most"),
    ("train", {"tokenizer": {"kind": "bpe", "vocab_size": limits.MAX_VOCAB + 1}},
     "tokenizer.vocab_size: must be at most"),
    ("train", {"model": {"family": "mamba", "d_model": limits.MAX_WIDTH + 8, "n_layer": 1}},
     "model.d_model: must be at most"),
    ("train", {"model": {"family": "mamba", "d_model": 8, "n_layer": limits.MAX_LAYERS + 1}},
     "model.n_layer: must be at most"),
    ("train", {"data": {**SYNTHETIC, "max_bytes": limits.MAX_BYTES + 1}}, "data.max_bytes: must be at most"),
    ("train", {"seed": limits.MAX_SEED + 1}, "seed: must be at most"),
    ("ladder", {"budgets": [limits.MAX_FLOPS * 10]}, "budgets.0: must be at most"),
    ("ladder", {"submitit": {"mem_gb": limits.MAX_GB * 10}}, "submitit.mem_gb: must be at most"),
    ("ladder", {"sizes": [{"transformer": [65536, 200]}]},
     "sizes.0: d_model: 65536 x 200 layers is 1.03e+13 non-embedding parameters, more than 1e+13"),
    ("ladder", {"budgets": [4e6 * 1.01 ** i for i in range(100)], "seeds": list(range(400)),
                "lrs": [1e-3, 2e-3, 3e-3]},
     "the grid is 120,000 runs (families x run lengths x sizes x learning rates x seeds x sweep points), "
     "more than 100,000"),
    ("ladder", {"steps": 20, "budgets": None, "sizes": None, "widths": [16],
                "sweep": {f"train.{k}": list(range(1, 11)) for k in ("eval_points", "eval_every", "checkpoint_every",
                                                                      "eval_tokens", "batch_size", "seq_len")}},
     "the grid is 1,000,000 runs"),
    ("train", {"model": {"family": "transformer", "d_model": 65536, "n_layer": 200, "head_dim": 8}},
     "model.d_model: 65536 x 200 layers is 1.03e+13 non-embedding parameters, more than 1e+13"),
])
def test_every_bound_of_limits_py_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, within_seconds,
                                                            command, over, expected):
    monkeypatch.setattr(train, "build_module", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.chdir(tmp_path)
    raw = ladder_raw(**over) if command == "ladder" else {**run_raw(), **over}
    if command == "train" and "train" in over:
        raw["train"] = {**run_raw()["train"], **over["train"]}
    path = write(tmp_path / "c.yaml", raw)
    argv = ["ladder", str(path), "--dry-run", "--no-progress"] if command == "ladder" else ["train", str(path)]
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert expected in err and ("limits.py" in err), err
    assert files_under(tmp_path) == {"c.yaml"}


@pytest.mark.parametrize("argv, expected", [
    (["profile", "--op", "ssd", "--d-inner", str(limits.MAX_WIDTH + 8)], "--d-inner: 65544 is more than 65536"),
    (["profile", "--op", "ssd", "--seq-lens", str(limits.MAX_SEQ_LEN + 1)], "--seq-lens: 16777217 is more than"),
    (["profile", "--op", "ssd", "--batch", str(limits.MAX_BATCH + 1)], "--batch: 16777217 is more than"),
    (["profile", "--op", "scan", "--timeout", str(limits.MAX_SECONDS * 10)],
     "--timeout: expected a positive number up to 1e+07"),
])
def test_every_size_a_flag_takes_is_bounded_as_in_limits_py(tmp_path, capsys, monkeypatch, within_seconds, argv,
                                                            expected):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert expected in one_error_line(capsys)
    assert files_under(tmp_path) == set()


def test_a_huge_eval_points_count_starts_at_once_and_validates_every_step_from_a_tenth_on(tmp_path):
    # eval_points up to limits.MAX_COUNT is valid; it used to loop once per point (2^31: about 25 minutes)
    path = write(tmp_path / "r.yaml", run_raw(eval_points=limits.MAX_COUNT))
    with alarm(120):
        assert main(["train", str(path), "--out", str(tmp_path / "o")]) == 0
    assert result_of(tmp_path / "o")["eval_curve"]["step"] == [1, 2, 3, 4]      # 4 steps: 10% rounds to none


# ------------------------------------------------------------------------------- determinism
def test_same_config_seed_and_thread_count_give_bit_identical_numbers(tmp_path):
    raw = run_raw(num_threads=1, eval_points=3)
    raw["model"] = {"family": "mamba", "d_model": 16, "n_layer": 2}
    path = write(tmp_path / "r.yaml", raw)
    for out in ("a", "b"):
        assert main(["train", str(path), "--out", str(tmp_path / out)]) == 0
    a, b = (result_of(tmp_path / out) for out in ("a", "b"))
    assert {k: v for k, v in a.items() if k not in TIMES} == {k: v for k, v in b.items() if k not in TIMES}
    metrics = [[row.split(",") for row in (tmp_path / out / "metrics.csv").read_text().splitlines()] for out in "ab"]
    keep = [i for i, col in enumerate(metrics[0][0]) if col != "elapsed_s"]
    assert [[r[i] for i in keep] for r in metrics[0]] == [[r[i] for i in keep] for r in metrics[1]]
    assert len(metrics[0]) == 1 + 4 + 1 and a["threads"] == 1


# ------------------------------------------------------------------------------------- data
def test_one_text_file_is_cut_into_pieces_that_the_run_header_and_result_json_state(tmp_path, capsys):
    corpus = tmp_path / "input.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: " + "some words " * (20 + i % 7) for i in range(60)) + "\n")
    raw = run_raw()
    raw["data"] = {"source": "files", "paths": [str(corpus)], "cache_dir": str(tmp_path / "cache")}
    assert main(["train", str(write(tmp_path / "r.yaml", raw)), "--out", str(tmp_path / "o")]) == 0
    stated = result_of(tmp_path / "o")["data"]["chunking"]
    assert re.match(r"1 document cut into \d+ pieces of at most 4096 bytes", stated), stated
    assert f"data: {stated}" in capsys.readouterr().out.splitlines()


# -------------------------------------------------------------- bad input, nothing left behind
def test_a_data_path_that_does_not_exist_is_one_line_naming_it_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = run_raw()
    raw["data"] = {"source": "files", "paths": ["corpus/missing.txt"], "cache_dir": "cache"}
    path = write(tmp_path / "r.yaml", raw)
    assert main(["train", str(path)]) == 2
    assert "corpus/missing.txt: data file not found" in one_error_line(capsys)
    assert files_under(tmp_path) == {"r.yaml"}


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    fsutil.atomic_write_json(path, {"status": "ok", "loss": 1.0})
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fsutil.atomic_write_json(path, {"status": "ok", "loss": 2.0})
    assert path.read_bytes() == before and files_under(tmp_path) == {"result.json"}


# ------------------------------------------------------- what is read back from a study is checked
def _recall_study(root: Path) -> Path:
    """A fixed-length study's results.csv and config.yaml, as the ladder writes them (no training)."""
    study = root / "recall"
    study.mkdir(parents=True)
    cfg = {"name": "recall", "families": ["transformer", "mamba"], "steps": 20, "widths": [16, 32],
           "lrs": [1e-3, 1e-2], "data": {"source": "synthetic", "synthetic": {"vocab_size": 64, "num_kv_pairs": 4}},
           "train": {"seq_len": 16, "batch_size": 8}}
    (study / "config.yaml").write_text(dump_yaml(cfg))
    rows = ["run_id,family,d_model,n_layer,seq_len,lr,loss,status,val_accuracy,state_bytes,wall_s,sweep"]
    rows += [f"{f}_d{d}_lr{lr},{f},{d},2,16,{lr},{1 + lr},ok,{0.5 + lr},{d * 100},1.0,"
             for f in ("transformer", "mamba") for d in (16, 32) for lr in (0.001, 0.01)]
    (study / "results.csv").write_text("\n".join(rows) + "\n")
    return study


@pytest.mark.parametrize("file, edit, said", [
    (None, None, None),
    ("config.yaml", lambda t: t.replace("families:\n- transformer\n- mamba", "families: 5"),
     "config.yaml: families: Input should be a valid list (got 5)"),
    ("config.yaml", lambda t: t + "bogus: 1\n", "config.yaml: bogus: unknown key"),
    ("results.csv", lambda t: t.replace(",1.001,ok,", ",low,ok,", 1),
     "results.csv: column 'loss', line 2: 'low' is not a number"),
    ("results.csv", lambda t: t.replace(",2,16,", ",2,x,", 1),
     "results.csv: column 'seq_len', line 2: 'x' is not a number"),
    ("results.csv", lambda t: t.replace(",2,16,", ",2,,", 1),
     "results.csv: column 'seq_len', line 2: a finished run (status ok) without a value"),
    ("results.csv", lambda t: t.replace("1.0,\n", '1.0,"{""bad"": 1"\n', 1),
     "results.csv: column 'sweep', line 2: '{\"bad\": 1' is not a sweep point of this tool"),
    ("results.csv", lambda t: t.replace("1.0,\n", "1.0,[1]\n", 1), "results.csv: column 'sweep', line 2: '[1]' is not"),
    ("results.csv", lambda t: t.replace(",ok,", ",ok,x,", 1), "results.csv: line 2 has 13 fields, the header has 12"),
])
def test_a_recall_studys_files_of_the_wrong_shape_are_refused_in_one_line(tmp_path, capsys, file, edit, said):
    study = _recall_study(tmp_path)
    if file:
        (study / file).write_text(edit((study / file).read_text()))
    code = main(["report", str(study), "--out", str(tmp_path / "r"), "--no-progress"])
    if said is None:
        assert code == 0 and (tmp_path / "r" / "recall_width.png").is_file()
    else:
        assert code == 2 and said in one_error_line(capsys)
        assert not (tmp_path / "r").exists()


@pytest.fixture
def small_grid(monkeypatch):
    """Approach 3 from 9 starts instead of 4,500: the fits of these tests take seconds."""
    import numpy as np

    from ssmscale.fit import laws
    monkeypatch.setattr(laws, "CHINCHILLA_GRID", np.asarray(laws.CHINCHILLA_GRID)[::500])


def test_an_isoflop_study_whose_config_yaml_is_not_text_still_fits(tmp_path, capsys, small_grid):
    from synthetic_study import SMALL_LM_LAWS, make_study
    study = make_study(tmp_path, name="s", laws=SMALL_LM_LAWS, budgets=(1e13, 3e13, 1e14), size_factors=(0.5, 1, 2),
                       noise=0.005, lrs=(1e-3,), n_bad=0, profile=False)
    (study / "config.yaml").write_bytes(b"\xff\xfe binary")
    assert main(["fit", str(study), "--n-boot", "0", "--jobs", "1", "--no-progress"]) == 0
    assert json.loads((study / "fit.json").read_text())["families"]



def test_a_resumed_run_whose_metrics_csv_holds_a_non_number_says_so_and_resumes(tmp_path, capsys, monkeypatch):
    # a run directory copied mid-run: a checkpoint to resume from and a metrics.csv that may hold anything
    path = write(tmp_path / "r.yaml", run_raw(checkpoint_every=2))
    run_dir = tmp_path / "o"
    with monkeypatch.context() as m:       # keep the checkpoint a finished run deletes: resume from it
        m.setattr(pathlib.Path, "unlink", lambda self, missing_ok=False: None)
        assert main(["train", str(path), "--out", str(run_dir)]) == 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    (run_dir / "result.json").unlink()
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    lines[1] = re.sub(r"^(1,\d+,)[^,]+", r"\1abc", lines[1])           # step 1's train_loss
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["train", str(path), "--out", str(run_dir)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "metrics.csv" in line]
    assert len(said) == 1 and "unreadable (could not convert string to float: 'abc')" in said[0], said
    assert result_of(run_dir)["status"] == "ok" and result_of(run_dir)["resumed_from_step"] == 4


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("wandb") is not None,
                    reason="needs a logger package that is not installed")
def test_a_study_made_with_a_logger_not_installed_here_still_reports_its_contrast(tmp_path, small_grid):
    # reading a study trains nothing: its loggers' packages are not needed to report it
    from synthetic_study import SMALL_LM_LAWS, make_study
    for name, seq_len in (("short", 128), ("long", 512)):
        study = make_study(tmp_path, name=name, laws=SMALL_LM_LAWS, budgets=(1e13, 3e13, 1e14),
                           size_factors=(0.5, 1, 2), noise=0.0, lrs=(1e-3,), n_bad=0, profile=False)
        cfg = {"name": name, "families": ["transformer", "mamba"], "budgets": [1e13, 3e13, 1e14], "sizes": [1e5],
               "train": {"seq_len": seq_len, "loggers": ["csv", "wandb"]}}
        if name == "long":
            cfg["contrast_with"] = "short"
        (study / "config.yaml").write_text(dump_yaml(cfg))
    assert main(["report", str(tmp_path / "long"), "--out", str(tmp_path / "r"), "--n-boot", "0", "--no-progress"]) == 0
    assert (tmp_path / "r" / "context.png").is_file() and "`short`" in (tmp_path / "r" / "report.md").read_text()


# --------------------------------------------------------------------------------- ladders
def test_parallel_runs_start_costliest_first(tmp_path, monkeypatch):
    import concurrent.futures

    import pandas as pd
    started = []

    class InlinePool:
        """Records the order runs are handed to the workers; trains nothing."""
        def __init__(self, max_workers, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, out_dir, run_id, *args):
            started.append(run_id)
            future = concurrent.futures.Future()
            future.set_result({"status": "failed", "message": "not trained (test)"})
            return future

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", InlinePool)
    raw = ladder_raw(budgets=[4.0e6, 8.0e6], sizes=[{"transformer": [16, 1]}, {"transformer": [32, 1]}], parallel=2)
    study = tmp_path / "s"
    assert main(["ladder", str(write(tmp_path / "l.yaml", raw)), "--out", str(study), "--no-progress"]) == 0
    flops = pd.read_csv(study / "plan.csv").set_index("run_id")["flops"]
    assert len(started) == 4 and len(set(flops[started])) > 1
    assert list(flops[started]) == sorted(flops[started], reverse=True)


def test_a_run_being_trained_elsewhere_is_waited_for_and_then_skipped(tmp_path, monkeypatch):
    # a Slurm or local-pool job whose run another process holds (a cancelled job not yet dead)
    import fcntl
    import threading

    from ssmscale.config import load_ladder_config
    from ssmscale.study import plan, runner
    study = tmp_path / "s"
    assert main(["ladder", str(write(tmp_path / "l.yaml", ladder_raw())), "--dry-run", "--out", str(study),
                 "--no-progress"]) == 0
    run = plan.plan(load_ladder_config(study / "config.yaml"))[0]
    trained = []
    monkeypatch.setattr(runner, "_train_run", lambda *a, **k: trained.append(a) or {"status": "failed"})
    (study / "runs" / run.run_id).mkdir(parents=True)
    held = os.open(study / "runs" / run.run_id / ".run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)                    # the other process, training the run
    got = []
    job = threading.Thread(target=lambda: got.append(runner.run_one(str(study), run.run_id)))
    job.start()
    job.join(timeout=1.0)
    assert job.is_alive() and not got                  # waits while the run is held
    finished = {"status": "ok", "loss": 1.5, "bpb": 2.0, "lr": run.lr, "params": run.params, "tokens": run.tokens,
                "flops": run.flops}
    fsutil.atomic_write_json(study / "runs" / run.run_id / "result.json", finished)
    os.close(held)                                      # the other process ends, having finished the run
    job.join(timeout=30)
    assert not job.is_alive() and got == [finished] and trained == []


def test_train_tokens_cannot_be_swept(tmp_path, capsys):
    path = write(tmp_path / "l.yaml", ladder_raw(sweep={"train.tokens": [64, 128]}))
    assert main(["ladder", str(path), "--dry-run", "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "sweep.train.tokens: cannot be swept (set by the ladder from budgets, steps or tokens)" in \
        one_error_line(capsys)


def test_a_fixed_length_study_has_no_scaling_law_to_fit(tmp_path, capsys):
    study = _recall_study(tmp_path)
    assert main(["fit", str(study), "--no-progress"]) == 2
    assert "a fixed-length study (steps or tokens, no budgets) has no scaling law to fit" in one_error_line(capsys)
    assert not (study / "fit.json").exists()


def test_ssmscale_fit_defaults_are_the_settings_the_ladder_fits_and_make_study_reuses():
    import inspect

    from ssmscale import fit
    defaults = {k: p.default for k, p in inspect.signature(fit.fit_study).parameters.items()}
    args = build_parser().parse_args(["fit", "scaling/x"])
    assert (args.n_boot, args.seed, args.ci, args.backtest, args.holdout_above) == \
        (defaults["n_boot"], defaults["seed"], defaults["ci"], defaults["backtest"], None)
    args = build_parser().parse_args(["report", "scaling/x"])
    assert (args.n_boot, args.seed) == (defaults["n_boot"], defaults["seed"])


# ------------------------------------------------------------------------------ weights only
def test_every_load_of_a_pickled_file_in_the_package_is_weights_only():
    src = ROOT / "src" / "ssmscale"
    risky = re.compile(r"torch\.load\(|pickle\.loads?\(|weights_only=False|allow_pickle=True")
    assert {str(p.relative_to(src)) for p in src.rglob("*.py") if risky.search(p.read_text())} == {"safeload.py"}
    assert "torch.load(f, map_location=\"cpu\", weights_only=True)" in (src / "safeload.py").read_text()
    restores = [_rest_of_call(p.read_text(), m.start()) for p in src.rglob("*.py")
                for m in re.finditer(r"ckpt_path=", p.read_text())]      # Lightning restoring a checkpoint
    assert restores and all("weights_only=True" in call for call in restores), restores


def _rest_of_call(text: str, start: int) -> str:
    """text[start:] up to the parenthesis that closes the call `start` is inside."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


# ------------------------------------------------------------------------------------ make
@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_targets_run_the_commands_the_readme_gives():
    def planned(*args) -> list[str]:
        out = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [line.split("/ssmscale ", 1)[1].strip() for line in out.splitlines() if "/ssmscale ladder" in line]
    assert planned("study") == ["ladder configs/small.yaml", "ladder configs/small512.yaml", "ladder configs/mqar.yaml"]
    assert planned("study", "OUT=scaling/rerun") == [
        "ladder configs/small.yaml --out scaling/rerun",
        "ladder configs/small512.yaml --out scaling/rerun-L512 --set contrast_with=rerun",
        "ladder configs/mqar.yaml --out scaling/rerun-mqar"]
    assert planned("tiny") == ["ladder configs/tiny.yaml"]
    test = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-m pytest" in test
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert "ddp:" in (ROOT / "pyproject.toml").read_text()           # `pytest -m ddp` runs the DDP test alone
