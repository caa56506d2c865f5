"""`ssmscale profile --op ssd`: the SSD and the selective scan measured in one run at the same d_inner, a CSV,
speed ratios to the scan, and one-line errors for bad input."""

import pandas as pd
import pytest

from ssmscale.bench import ssd as bench_ssd
from ssmscale.cli import main


def test_profile_ssd_measures_the_ssd_against_the_scan_and_writes_a_csv(tmp_path, capsys):
    code = main(["profile", "--op", "ssd", "--impls", "ssd-chunked,scan-chunked,ssd-ref", "--seq-lens", "9,20",
                 "--batch", "1", "--d-inner", "8", "--d-state", "2", "--ssd-head-dim", "4", "--chunk-size", "4",
                 "--modes", "fwdbwd", "--repeats", "1", "--ref-max-len", "10", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "SSD head_dim 4 (2 heads, 1 group), chunk 4" in out
    table = pd.read_csv(tmp_path / "ssd_bench.csv")
    assert list(table["impl"]) == ["ssd-chunked", "scan-chunked", "ssd-ref"] * 2
    assert list(table["status"]) == ["ok"] * 5 + ["skipped"]
    scan = table[table["impl"] == "scan-chunked"].set_index("length")["median_ms"]
    for _, r in table[table["impl"] == "ssd-chunked"].iterrows():
        assert r["speedup_vs_scan-chunked"] == pytest.approx(scan[r["length"]] / r["median_ms"])
    assert table["chunk_size"].eq(4).all() and table["head_dim"].eq(4).all()


def test_prepare_gives_an_ssd_step_that_runs_forward_and_backward():
    step = bench_ssd.prepare("ssd-chunked", batch=1, d_inner=4, d_state=3, head_dim=2, chunk_size=4, length=7,
                             mode="fwdbwd", prime=False)
    step()
    step()    # gradients are reset between steps, not accumulated


@pytest.mark.parametrize("argv, message", [
    (["--impls", "ssd-triton"], "--impls: unknown or not available on cpu: 'ssd-triton'"),
    (["--d-inner", "10", "--ssd-head-dim", "4"], "--d-inner: 10 is not a multiple of --ssd-head-dim 4"),
    (["--chunk-size", "0"], "--chunk-size: expected comma-separated positive integers"),
    (["--modes", "bwd"], "--modes: expected a comma-separated subset of fwd,fwdbwd"),
])
def test_bad_ssd_benchmark_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert main(["profile", "--op", "ssd", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("op", ["ssd", "scan", "model"])
def test_an_out_that_is_a_file_is_refused_before_any_measuring(tmp_path, capsys, op):
    (tmp_path / "afile").write_text("mine")
    assert main(["profile", "--op", op, "--seq-lens", "16", "--out", str(tmp_path / "afile")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "not a folder" in err[0], err
    assert "ms" not in captured.out and (tmp_path / "afile").read_text() == "mine"
