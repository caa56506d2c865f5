"""A study folder from a stranger runs nothing, writes nowhere else, and never hangs (issue #22).

One test per class of attack found by trying the tool as a hostile collaborator would: values that reach a
Slurm job script, result pickles and kernel libraries planted where the tool would load them, links planted
where it writes (locks, logs, checkpoints, run folders) or reads (run ids), special and endless files where
it reads (FIFOs, /dev/zero), sizes beyond what is real, signals, and configs whose values cannot work.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ssmscale import fsutil, safeload
from ssmscale.cli import main
from ssmscale.errors import UserError

from hang import alarm
from planted import RunsShell

SYNTHETIC = {"source": "synthetic", "synthetic": {"vocab_size": 64, "num_kv_pairs": 2, "num_examples": 64}}


def run_raw(**train):
    return {"name": "t", "data": SYNTHETIC, "model": {"family": "transformer", "d_model": 16, "n_layer": 1,
                                                      "head_dim": 8},
            "train": {"seq_len": 16, "batch_size": 2, "tokens": 128.0, "eval_tokens": 32, "eval_points": 0,
                      "progress": False, **train}}


def ladder_raw(**over):
    return {"name": "h", "families": ["transformer"], "budgets": [4.0e6], "sizes": [{"transformer": [16, 1]}],
            "min_steps": 1, "data": SYNTHETIC, "model": {"head_dim": 8},
            "train": {"seq_len": 16, "batch_size": 2, "eval_tokens": 32, "eval_points": 0, "progress": False},
            "fit": False, **over}


def write(path: Path, raw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the study holding a file someone cares about: nothing may change it."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.txt").write_text("precious\n")
    return folder


def unchanged(outside: Path) -> bool:
    return sorted(p.name for p in outside.iterdir()) == ["precious.txt"] and \
        (outside / "precious.txt").read_text() == "precious\n"


@pytest.fixture
def within_seconds():
    """A hang becomes a failure instead of a stuck test suite (60 s: a cold import of scipy on a busy machine
    takes 20)."""
    with alarm(60):
        yield


# ------------------------------------------------------------------ code execution: Slurm, pickles, kernels
@pytest.mark.parametrize("submitit, field", [
    ({"partition": "p\ntouch PWNED #"}, "submitit.partition"),
    ({"account": "a\rb"}, "submitit.account"),
    ({"slurm_extra": {"qos": "high\ntouch PWNED"}}, "submitit.slurm_extra.qos"),
    ({"slurm_extra": {"qos\nx": "high"}}, "submitit.slurm_extra"),
    ({"slurm_extra": {"export": "ALL,LD_PRELOAD=./evil.so"}}, "submitit.slurm_extra.export"),
    ({"slurm_extra": {"output": "/home/someone/.bashrc"}}, "submitit.slurm_extra.output"),
])
def test_a_slurm_value_that_could_end_its_sbatch_line_or_move_the_job_is_refused(tmp_path, capsys, submitit, field):
    cfg = write(tmp_path / "cfg.yaml", ladder_raw(executor="submitit", submitit={"cluster": "slurm", **submitit}))
    assert main(["ladder", str(cfg), "--dry-run", "--out", str(tmp_path / "s")]) == 2
    assert f"{field}:" in one_error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_scheduling_options_still_reach_the_job_script_one_line_each(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    from ssmscale.config import LadderConfig, validate
    extra = {"constraint": "a100&nvlink", "qos": "high", "exclusive": True, "comment": "my study (v2)"}
    cfg = validate(LadderConfig, ladder_raw(submitit={"partition": "gpu,cpu", "account": "lab-1",
                                                      "slurm_extra": extra}), "x")
    script = _make_sbatch_string(command="python job.py", folder=str(tmp_path), partition=cfg.submitit.partition,
                                 account=cfg.submitit.account, additional_parameters=dict(cfg.submitit.slurm_extra))
    head = script.split("# command")[0]
    assert all(line.startswith("#") or not line for line in head.splitlines()), head
    assert "#SBATCH --constraint='a100&nvlink'" in head and "#SBATCH --exclusive" in head


def test_a_planted_result_pickle_is_never_unpickled_and_each_ladder_gets_a_fresh_submitit_folder(tmp_path,
                                                                                                 monkeypatch):
    from submitit.slurm.slurm import SlurmJob

    from ssmscale.config import LadderConfig, validate
    from ssmscale.study import executors
    study, marker = tmp_path / "study", tmp_path / "PWNED"
    job = SlurmJob(folder=study / "submitit", job_id="4242_0")          # a guessable job id
    job.paths.result_pickle.parent.mkdir(parents=True)
    job.paths.result_pickle.write_bytes(pickle.dumps(("success", RunsShell(marker))))
    monkeypatch.setattr(executors, "_slurm_states", lambda ids: {i: "RUNNING" for i in ids})
    run_id, res, returned = next(executors._as_they_end({"r": job}, slurm=True, out_dir=study, poll_s=0))
    assert not marker.exists()                                 # the pickle was not read
    assert run_id == "r" and not returned and res["message"].startswith("job 4242_0 ended without a result")
    cfg = validate(LadderConfig, ladder_raw(), "x")
    folders = {executors._executor(cfg, study, "local").folder for _ in range(2)}
    assert len(folders) == 2 and all(f.parent == study / "submitit" for f in folders)
    assert all(f.stat().st_mode & 0o777 == 0o700 and not any(f.iterdir()) for f in folders)


def test_a_kernel_library_replaced_in_the_cache_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    import shutil

    from ssmscale.ops import cbuild
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("SSMSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cbuild, "torch_uses_libgomp", lambda: False)      # one build flavour: the one planted over
    source = tmp_path / "k.c"
    source.write_text("int answer(void) { return 42; }\n")
    built = cbuild.build(source, "gcc", openmp=False)
    assert cbuild.verified(built) and built.with_name(built.name + ".sha256").is_file()
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.c"
    evil.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void p(void) {{ '
                    f'FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\nint answer(void) {{ return 0; }}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", str(evil), "-o", str(built)], check=True)
    assert not cbuild.verified(built)
    lib, why = cbuild.load(source, "NO_SUCH_SWITCH")
    assert why is None and lib.answer() == 42 and not marker.exists()     # rebuilt, then loaded
    assert cbuild.verified(built)


# ---------------------------------------------------------------------------- links where the tool writes
def test_a_linked_ladder_lock_is_refused_and_its_target_untouched(tmp_path, capsys, outside):
    cfg = write(tmp_path / "cfg.yaml", ladder_raw())
    for target in (outside / "precious.txt", outside / "new.txt"):        # an existing file, a dangling link
        study = tmp_path / f"study-{target.stem}"
        study.mkdir()
        (study / ".ladder.lock").symlink_to(target)
        assert main(["ladder", str(cfg), "--dry-run", "--out", str(study)]) == 2
        assert ".ladder.lock: a symbolic link where ssmscale keeps its lock file" in one_error_line(capsys)
    assert unchanged(outside)


def test_a_run_lock_that_is_a_link_or_a_second_name_of_a_file_is_refused(tmp_path, outside):
    from ssmscale.study.state import _run_lock
    run = tmp_path / "study" / "runs" / "r"
    run.mkdir(parents=True)
    (run / ".run.lock").symlink_to(outside / "precious.txt")
    with pytest.raises(UserError, match="a symbolic link where ssmscale keeps its lock file"):
        _run_lock(tmp_path / "study", "r").__enter__()
    (run / ".run.lock").unlink()
    os.link(outside / "precious.txt", run / ".run.lock")
    with pytest.raises(UserError, match="a file with 2 names where ssmscale keeps its lock file"):
        _run_lock(tmp_path / "study", "r").__enter__()
    assert unchanged(outside)


@pytest.mark.parametrize("planted", ["checkpoints", "metrics.csv", "logs/csv/hparams.yaml", "checkpoints/last.ckpt"])
def test_a_link_in_a_run_folder_is_refused_before_anything_is_written(tmp_path, capsys, outside, planted):
    run = tmp_path / "run"
    (run / planted).parent.mkdir(parents=True, exist_ok=True)
    (outside / "last.ckpt").write_text("someone's file\n")
    (run / planted).symlink_to(outside if planted == "checkpoints" else outside / "precious.txt")
    cfg = write(tmp_path / "run.yaml", run_raw())
    assert main(["train", str(cfg), "--out", str(run)]) == 2
    assert f"{run / planted}: a symbolic link where ssmscale keeps a" in one_error_line(capsys)
    (outside / "last.ckpt").unlink()
    assert unchanged(outside) and not (run / "result.json").exists()


def test_a_linked_run_folder_in_a_study_is_refused(tmp_path, capsys, outside):
    cfg = write(tmp_path / "cfg.yaml", ladder_raw())
    (tmp_path / "study" / "runs").mkdir(parents=True)
    (tmp_path / "study" / "runs" / "transformer_d16xL1_C4e06").symlink_to(outside)
    assert main(["ladder", str(cfg), "--out", str(tmp_path / "study"), "--no-progress"]) == 2
    assert "transformer_d16xL1_C4e06: a symbolic link where ssmscale keeps a folder" in one_error_line(capsys)
    assert unchanged(outside)


def test_a_second_train_on_one_folder_is_refused_in_one_line(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", run_raw())
    with fsutil.FileLock(tmp_path / "run" / ".run.lock", tidy=True):
        assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert f"another run (pid {os.getpid()}) is training in this folder" in one_error_line(capsys)


def test_a_refused_train_leaves_no_folder_and_no_lock(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", run_raw(eval_tokens=2_000_000_000))
    assert main(["train", str(cfg), "--out", str(tmp_path / "a" / "run")]) == 2
    assert "train.eval_tokens: 2,000,000,000 tokens are 125,000,000 validation examples" in one_error_line(capsys)
    assert not (tmp_path / "a").exists()


def test_run_ids_that_leave_the_study_are_refused_by_fit(tmp_path, capsys, outside, within_seconds):
    study = tmp_path / "study"
    study.mkdir()
    os.mkfifo(outside / "result.json")            # reading it would hang: it must not even be opened
    rows = "".join(f"../outside,m,{n},{1e15 / (6 * n)},{2 + 1 / n},1e15,ok\n" for n in (1e6, 2e6, 4e6))
    (study / "results.csv").write_text("run_id,family,params,tokens,loss,budget,status\n" + rows)
    assert main(["fit", str(study), "--n-boot", "0", "--jobs", "1", "--no-progress"]) == 2
    assert "column 'run_id', line 2: '../outside' is not a plain name" in one_error_line(capsys)


# ------------------------------------------------------------------- special and endless files where it reads
def test_special_files_are_refused_before_a_byte_is_read(tmp_path, within_seconds):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    for path, kind in ((tmp_path / "fifo", "a FIFO"), (Path("/dev/zero"), "a character device"),
                       (tmp_path / "folder", "a folder")):
        with pytest.raises(safeload.FileRefused, match=f"{kind}, not a regular file; refused"):
            safeload.read_json(path)
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "result.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    with pytest.raises(safeload.FileRefused, match="a link out of"):
        safeload.read_json(tmp_path / "study" / "result.json", within=tmp_path / "study")
    (tmp_path / "big.json").write_bytes(b" " * 2000)
    with pytest.raises(safeload.FileRefused, match="2,000 bytes, more than the 1,000 such a file may hold"):
        safeload.read_json(tmp_path / "big.json", cap=1000)


@pytest.mark.parametrize("argv, said", [
    (["fit", "/dev/zero"], "/dev/zero: a character device, not a regular file; refused"),
    (["fit", "FIFO"], "fifo: a FIFO, not a regular file; refused"),
    (["ladder", "BIG", "--dry-run"], "more than the 1,048,576 such a file may hold"),
    (["ladder", "CFG", "--dry-run", "--throughput-from", "FIFO"], "a FIFO, not a regular file"),
])
def test_a_fifo_a_device_or_a_huge_file_given_to_a_command_is_one_line(tmp_path, capsys, within_seconds, argv, said):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big.yaml").write_text("name: h\nsizes:\n" + "- 1\n" * 300_000)
    write(tmp_path / "cfg.yaml", ladder_raw())
    names = {"FIFO": str(tmp_path / "fifo"), "BIG": str(tmp_path / "big.yaml"), "CFG": str(tmp_path / "cfg.yaml")}
    argv = [names.get(a, a) for a in argv] + ["--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert said in one_error_line(capsys)


def test_a_fifo_result_json_in_a_run_folder_refuses_the_train_and_the_ladder(tmp_path, capsys, within_seconds):
    cfg = write(tmp_path / "run.yaml", run_raw())
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / "result.json")
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "result.json: a FIFO where ssmscale keeps a file; refused" in one_error_line(capsys)
    lcfg = write(tmp_path / "cfg.yaml", ladder_raw())
    fifo = tmp_path / "study" / "runs" / "transformer_d16xL1_C4e06" / "result.json"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    assert main(["ladder", str(lcfg), "--out", str(tmp_path / "study"), "--no-progress"]) == 2
    assert "result.json: a FIFO where ssmscale keeps a file; refused" in one_error_line(capsys)


def test_fifos_among_a_studys_files_are_passed_over_by_fit_and_report(tmp_path, capsys, within_seconds):
    from synthetic_study import make_study

    from ssmscale.fit import load_runs
    from ssmscale.report import profile, scaling
    study = make_study(tmp_path, budgets=(1e13, 1e14), size_factors=(0.5, 1, 2), lrs=(1e-3,), n_bad=0)
    first = load_runs(study).table["run_ids"][0][0]
    (study / "runs" / first).mkdir(parents=True)
    os.mkfifo(study / "runs" / first / "result.json")
    (study / "runs" / first).rename(study / "runs" / "moved")
    (study / "runs" / first).symlink_to("moved")                 # a link that stays inside the study is read
    for name in ("fit.json", "profile/profile.json"):
        os.mkfifo(study / name)
    loaded = load_runs(study)
    assert "1 runs' result.json unreadable" in " ".join(loaded.notes)
    assert scaling.cached_fit(study, loaded) is None and profile._profile_meta(study) == {}
    out = capsys.readouterr().out
    assert "fit.json: a FIFO, not a regular file; refused; refitting" in out
    assert "profile.json: a FIFO, not a regular file; refused; ignored" in out


def test_profile_rows_without_a_throughput_are_left_out_of_the_report(tmp_path, capsys):
    from ssmscale.report.profile import _read_profile
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "profile.csv").write_text("family,mode,seq_len,batch,tokens_per_s,peak_mem_bytes,status\n"
                                                      "mamba,train,256,1,0,1e6,ok\nmamba,train,512,1,-3,1e6,ok\n")
    assert _read_profile(tmp_path) is None          # nothing left to draw: no profile section, no crash
    assert "ignored 2 ok rows without a positive tokens_per_s" in capsys.readouterr().out


def test_a_fifo_in_the_token_cache_is_rebuilt_over(tmp_path, within_seconds, capsys):
    from ssmscale.config import DataConfig, TokenizerConfig
    from ssmscale.data import prepare_data
    (tmp_path / "a.txt").write_text("hello world. " * 400)
    data_cfg = DataConfig(source="files", paths=[str(tmp_path / "a.txt")], cache_dir=str(tmp_path / "cache"))
    first = prepare_data(data_cfg, TokenizerConfig(), seq_len=16, eval_tokens=32, progress=False)
    meta = first.cache_dir / "meta.json"
    meta.unlink()
    os.mkfifo(meta)
    again = prepare_data(data_cfg, TokenizerConfig(), seq_len=16, eval_tokens=32, progress=False)
    assert again.fingerprint == first.fingerprint and meta.is_file()
    assert "meta.json unreadable: a FIFO" in capsys.readouterr().err


def test_a_fifo_in_place_of_a_cached_bpe_is_retrained_over(tmp_path, within_seconds, capsys):
    from ssmscale.config import DataConfig, TokenizerConfig
    from ssmscale.data import prepare_data
    (tmp_path / "a.txt").write_text("hello world, the quick brown fox. " * 400)
    data_cfg = DataConfig(source="files", paths=[str(tmp_path / "a.txt")], cache_dir=str(tmp_path / "cache"))
    bpe = TokenizerConfig(kind="bpe", vocab_size=300)
    first = prepare_data(data_cfg, bpe, seq_len=16, eval_tokens=32, progress=False)
    (path,) = (tmp_path / "cache" / "tokenizers").glob("bpe-300-*.json")
    sha = first.tokenizer.sha256
    path.unlink()
    os.mkfifo(path)
    again = prepare_data(data_cfg, bpe, seq_len=16, eval_tokens=32, progress=False)
    assert "retraining unreadable BPE tokenizer" in capsys.readouterr().err and path.is_file()
    assert again.tokenizer.sha256 == sha == hashlib.sha256(path.read_bytes()).hexdigest()   # the same merges


# ---------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("argv, said", [
    (["ladder", "CFG", "--dry-run", "--set", "train.num_threads=100000"], "train.num_threads: must be at most 1024"),
    (["profile", "--compete", "100000"], "--compete: at most"),
    (["profile", "--threads", "100000"], "--threads: 100000 is more than 1024"),
    (["profile", "--op", "ssd", "--d-inner", "2147483647", "--ssd-head-dim", "1"], "--d-inner: 2147483647 is more"),
    (["profile", "--op", "scan", "--seq-lens", "16777216", "--d-inner", "65536"], "--seq-lens: the longest point needs"),
    (["profile", "--head-dim", "3", "--families", "transformer"], "--head-dim: must be even"),
    (["train", "RUN", "--set", "train.eval_tokens=2000000000"], "at most 65,536 are generated"),
])
def test_sizes_beyond_what_a_machine_can_hold_are_refused_at_once(tmp_path, capsys, within_seconds, argv, said):
    names = {"CFG": str(write(tmp_path / "cfg.yaml", ladder_raw())), "RUN": str(write(tmp_path / "r.yaml", run_raw()))}
    assert main([names.get(a, a) for a in argv] + (["--out", str(tmp_path / "o")] if argv[0] != "profile" else [])) == 2
    assert said in one_error_line(capsys)


def test_a_report_draws_at_most_ten_families_and_refits_a_fit_of_other_families(tmp_path, capsys):
    from synthetic_study import make_study

    from ssmscale.fit import load_runs
    from ssmscale.report import scaling
    laws = {f"f{i}": {"E": 1.0, "A": 30.0, "B": 40.0, "alpha": 0.3, "beta": 0.28} for i in range(11)}
    study = make_study(tmp_path, laws=laws, budgets=(1e13,), size_factors=(1,), lrs=(1e-3,), n_bad=0, profile=False)
    assert main(["report", str(study), "--out", str(tmp_path / "r")]) == 2
    assert "11 families; a report draws at most 10" in one_error_line(capsys)
    two = make_study(tmp_path / "two", budgets=(1e13,), size_factors=(1,), lrs=(1e-3,), n_bad=0, profile=False)
    loaded = load_runs(two)
    planted = {"schema": 1, "source": {"sha256": loaded.source["sha256"]},
               "families": {f"f{i}": {} for i in range(3000)}}
    (two / "fit.json").write_text(json.dumps(planted))
    assert scaling.cached_fit(two, loaded) is None
    assert "its families are not those of results.csv, refitting" in capsys.readouterr().out


def test_an_echoed_value_is_cut_to_a_readable_line(tmp_path, capsys):
    cfg = write(tmp_path / "cfg.yaml", ladder_raw(name="n" * 50_000))
    assert main(["ladder", str(cfg), "--dry-run", "--out", str(tmp_path / "s")]) == 2
    line = one_error_line(capsys)
    assert "name: must be a plain name" in line and "..." in line and len(line) < 600


@pytest.mark.parametrize("row, said", [
    ("transformer,train,0,1000,1e6,ok,1", "seq_len, tokens_per_s and flops_per_token must be positive"),
    ("transformer,train,16,0,1e6,ok,1", "seq_len, tokens_per_s and flops_per_token must be positive"),
    ("transformer,train,16,-5,1e6,ok,1", "seq_len, tokens_per_s and flops_per_token must be positive"),
    ("transformer,train,16", "no successful training row"),
])
def test_a_throughput_file_of_impossible_rows_is_one_line_and_leaves_no_lock(tmp_path, capsys, row, said):
    cfg = write(tmp_path / "cfg.yaml", ladder_raw())
    (tmp_path / "p.csv").write_text("family,mode,seq_len,tokens_per_s,flops_per_token,status,batch\n" + row + "\n")
    assert main(["ladder", str(cfg), "--dry-run", "--out", str(tmp_path / "s"),
                 "--throughput-from", str(tmp_path / "p.csv")]) == 2
    assert said in one_error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_an_output_name_longer_than_a_file_name_may_be_is_one_line(tmp_path, capsys):
    cfg = write(tmp_path / "cfg.yaml", ladder_raw())
    assert main(["ladder", str(cfg), "--dry-run", "--out", str(tmp_path / ("s" * 300))]) == 2
    assert "File name too long" in one_error_line(capsys)


def _disk_full(monkeypatch):
    import errno

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fsutil.os, "replace", full)


def test_a_full_disk_is_one_line_and_leaves_no_empty_output_folder(tmp_path, capsys, monkeypatch):
    rows = "".join(f"{n},{c / (6 * n)},{2 + 100 / n ** 0.3 + 50 / (c / (6 * n)) ** 0.3},{c}\n"
                   for c in (1e15, 1e16, 1e17) for n in (1e6, 3e6, 1e7))
    (tmp_path / "runs.csv").write_text("params,tokens,loss,budget\n" + rows)
    from ssmscale.fit import laws
    monkeypatch.setattr(laws, "CHINCHILLA_GRID", laws.CHINCHILLA_GRID[::500])
    _disk_full(monkeypatch)
    assert main(["fit", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "a" / "b"), "--n-boot", "0",
                 "--jobs", "1", "--no-progress"]) == 2
    assert "fit.json: cannot write (No space left on device)" in one_error_line(capsys)
    assert not (tmp_path / "a").exists()
    cfg = write(tmp_path / "cfg.yaml", ladder_raw())
    assert main(["ladder", str(cfg), "--dry-run", "--out", str(tmp_path / "s")]) == 2
    assert "ssmscale ladder: error: No space left on device; what had finished is kept" in one_error_line(capsys)


# ------------------------------------------------------------------------------ configs that cannot work
@pytest.mark.parametrize("over, said", [
    ({"families": ["transformer", "transformer"]}, "families: transformer appears twice"),
    ({"sizes": [2.0e3, 2.0e3]}, "sizes: 2000 appears twice"),
    ({"sizes": [2.0e3, 2.0001e3]}, "sizes: two sizes labelled 2e03 would share the run id"),
    ({"budgets": [4.0e6, 4.0001e6]}, "budgets: 4e+06 and 4.0001e+06 would share the run id"),
    ({"seeds": [1, 1]}, "seeds: 1 appears twice"),
    ({"train": {"weight_decay": float("inf")}}, "train.weight_decay: Input should be a finite number"),
    ({"model": {"head_dim": 3}}, "model.head_dim: must be even"),
])
def test_a_config_that_cannot_work_names_its_field_up_front(tmp_path, capsys, over, said):
    raw = ladder_raw(sizes=[2.0e3])
    raw.update({k: ({**raw[k], **v} if isinstance(v, dict) else v) for k, v in over.items()})
    assert main(["ladder", str(write(tmp_path / "cfg.yaml", raw)), "--dry-run", "--out", str(tmp_path / "s")]) == 2
    assert said in one_error_line(capsys)


def test_a_head_dim_that_does_not_divide_the_width_is_refused_before_training(tmp_path, capsys):
    raw = run_raw()
    raw["model"].update(d_model=20, head_dim=6)
    assert main(["train", str(write(tmp_path / "r.yaml", raw)), "--out", str(tmp_path / "run")]) == 2
    assert "model.head_dim: 6 does not divide d_model 20" in one_error_line(capsys)


# -------------------------------------------------------------------------------------------- signals
def _stop(argv: list[str], cwd: Path, signum: int, after: str) -> subprocess.CompletedProcess:
    """Run `ssmscale ARGV`, send `signum` once `after` shows in its output and a step later, return it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "ssmscale.cli", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if after in line:
            time.sleep(3)
            proc.send_signal(signum)
            break
    out, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, "".join(seen) + out)


def test_sigterm_stops_train_with_exit_code_143_and_one_line(tmp_path):
    write(tmp_path / "run.yaml", run_raw(tokens=4.0e6))
    done = _stop(["train", "run.yaml", "--out", "run"], tmp_path, signal.SIGTERM, after="tokens in")
    assert done.returncode == 143, done.stdout[-2000:]         # Lightning alone would end with exit code 0
    assert done.stdout.strip().splitlines()[-1] == "ssmscale train: terminated"
    assert "Traceback" not in done.stdout and not (tmp_path / "run" / "result.json").exists()


def test_sigint_stops_a_ladder_of_worker_processes_with_130_and_it_resumes(tmp_path):
    write(tmp_path / "cfg.yaml", ladder_raw(budgets=[4.0e6, 4.0e9], parallel=2, allow_repeats=True))
    done = _stop(["ladder", "cfg.yaml", "--out", "study", "--no-progress"], tmp_path, signal.SIGINT, after="[1/2]")
    assert done.returncode == 130, done.stdout[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "ssmscale ladder: interrupted" and "Traceback" not in done.stdout
    results = list((tmp_path / "study" / "runs").glob("*/result.json"))
    assert [p.parent.name for p in results] == ["transformer_d16xL1_C4e06"]       # the finished run is kept
    again = subprocess.run([sys.executable, "-m", "ssmscale.cli", "ladder", "cfg.yaml", "--out", "study",
                            "--dry-run"], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr           # the lock is free, the study intact
