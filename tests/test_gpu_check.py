"""The prepared GPU check, as far as a CPU can take it: arguments, the no-GPU answer, the table, the time
budget, and a rehearsal of every section on the CPU (with a stand-in SSD module: its API is the one the
check calls)."""

import subprocess
import sys

import pytest
import torch

from ssmscale.bench import gpu_check
from ssmscale.bench.gpu_check import Row, format_table, main
from ssmscale.models.config import FAMILIES


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_a_cuda_device_it_says_so_in_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "ssmscale.bench.gpu_check"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gpu_check: no CUDA device (torch ")


@pytest.mark.parametrize("args, expected", [
    (["--sections", "scan,bogus"], "--sections: expected a comma-separated subset of scan,ssd,train,profile"),
    (["--seq-lens", "2048,x"], "--seq-lens: expected comma-separated positive integers"),
    (["--budget-s", "-1"], "--budget-s: expected a positive number of seconds"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, args, expected):
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and expected in err


def test_table_has_a_header_a_rule_a_line_per_check_and_a_verdict():
    rows = [Row("scan", "triton vs ref", "fp32", "max rel err 3.0e-07", "ok"),
            Row("profile", "mamba train L=16384", "d768x24", "oom: CUDA out of memory", "FAIL")]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["section", "item", "detail", "result", "status"]
    assert set(lines[1].replace(" ", "")) == {"-"} and len(lines) == 2 + len(rows) + 1
    assert lines[3].startswith("profile  mamba train L=16384") and lines[3].endswith("FAIL")
    assert lines[-1] == "2 checks: 1 failed"
    assert format_table(rows[:1]).splitlines()[-1] == "1 checks, none failed"


def test_a_spent_time_budget_skips_what_is_left(capsys):
    assert main(["--device", "cpu", "--sections", "train,profile", "--budget-s", "1e-9"]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.endswith("skipped")]
    assert len(skipped) == 3 * len(FAMILIES) and all("not run: time budget spent" in s for s in skipped)


def test_a_cpu_rehearsal_runs_every_section_and_passes(tmp_path, capsys, monkeypatch):
    """Kernels compared and models trained for real; the timings, which run each point in a fresh
    process (bench_scan and profile, tested in their own files), answer at once here."""
    from ssmscale.bench import profile
    from ssmscale.bench import scan as bench_scan
    monkeypatch.setattr(gpu_check, "TRAIN_STEPS", 30)
    monkeypatch.setattr(bench_scan, "measure_bandwidth", lambda device: 1e10)
    monkeypatch.setattr(bench_scan, "run_benchmark", lambda impls, lens, **kw: [
        {"impl": impls[0], "length": L, "mode": m, "status": "ok", "median_ms": 2.0, "over_floor": 4.0,
         "bandwidth_gbs": 10.0} for L in lens for m in kw["modes"]])
    monkeypatch.setattr(profile, "profile_models", lambda fams, shapes, lens, modes, **kw: ([
        {"family": fams[0], "mode": modes[0], "seq_len": lens[0], "status": "ok", "tokens_per_s": 1e3,
         "peak_mem_bytes": 2**30, "mfu": 0.25}], None, None))
    assert main(["--device", "cpu", "--seq-lens", "32,64", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("section  item"):].splitlines()
    rows = [line.split() for line in table[2:-1]]
    assert {("scan", "fused"), ("scan", "chunked"), ("ssd", "chunked")} <= {(r[0], r[1]) for r in rows}
    compared = [r[1] for r in rows if r[0] == "scan" and r[2:4] == ["vs", "ref"]]
    assert compared == ["fused", "chunked"]
    assert any(r[:3] == ["scan", "fused", "L=256"] and "4.0x the floor" in " ".join(r) for r in rows)
    assert {f for r in rows if r[0] == "train" for f in FAMILIES if r[1] == f} == set(FAMILIES)
    profiled = [(r[1], r[2], r[3]) for r in rows if r[0] == "profile"]
    assert profiled == [(f, "train", f"L={L}") for f in FAMILIES for L in (32, 64)] + \
        [(f, "generate", "L=64") for f in FAMILIES]
    assert table[-1].endswith("none failed")
    assert (tmp_path / "gpu_check.csv").read_text().startswith("section,item,detail,result,status")
