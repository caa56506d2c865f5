"""The scan benchmark: its mambapy anchor computes the same scan, and `ssmscale profile --op scan`
measures every implementation in one run, writes a CSV and rejects bad input with one line."""

import importlib.util

import pandas as pd
import pytest

from ssmscale.bench import scan as bench_scan
from ssmscale.cli import main
from ssmscale.ops import selective_scan_ref
from scan_inputs import make_inputs, rel_err

needs_mambapy = pytest.mark.skipif(importlib.util.find_spec("mambapy") is None, reason=bench_scan.MAMBAPY_HINT)


@needs_mambapy
def test_mambapy_anchor_is_the_same_scan_as_the_reference():
    x = make_inputs(2, 6, 4, 37, with_z=False, with_bias=False, softplus=False)
    t = lambda v: v.transpose(1, 2)   # mambapy's layout: (batch, L, channels)
    y = bench_scan.mambapy_selective_scan(t(x["u"]), t(x["delta"]), x["A"], t(x["B"]), t(x["C"]), x["D"])
    assert rel_err(t(y), selective_scan_ref(**x)) < 1e-4


@needs_mambapy
def test_mambapy_anchor_with_the_model_args_is_the_same_scan_as_the_reference():
    x = make_inputs(2, 6, 4, 37, softplus=True)
    t = lambda v: v.transpose(1, 2)
    y = bench_scan.mambapy_selective_scan(t(x["u"]), t(x["delta"]), x["A"], t(x["B"]), t(x["C"]), x["D"],
                                          t(x["z"]), x["delta_bias"])
    assert rel_err(t(y), selective_scan_ref(**x, delta_softplus=True)) < 1e-4


def test_profile_scan_with_the_model_args(tmp_path, capsys):
    code = main(["profile", "--op", "scan", "--impls", "fused,ref", "--seq-lens", "9", "--batch", "1",
                 "--d-inner", "4", "--d-state", "2", "--modes", "fwdbwd", "--repeats", "1", "--model-args",
                 "--out", str(tmp_path)])
    assert code == 0 and "model's args" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "scan_bench.csv")
    assert table["model_args"].all() and (table["status"] == "ok").all()


def test_prepare_gives_a_step_that_runs_forward_and_backward():
    step = bench_scan.prepare("ref", batch=1, d_inner=2, d_state=3, length=5, mode="fwdbwd", prime=False)
    step()
    step()   # gradients are reset between steps, not accumulated


def test_ratios_compare_each_row_with_the_anchors_at_the_same_length_and_mode():
    rows = [dict(impl=i, length=8, mode="fwd", status="ok", median_ms=ms, peak_extra_mib=mib)
            for i, ms, mib in [("fused", 2.0, 1.0), ("ref", 10.0, 4.0), ("mambapy", 40.0, 16.0)]]
    rows.append(dict(impl="fused", length=16, mode="fwd", status="ok", median_ms=1.0, peak_extra_mib=1.0))
    bench_scan.add_ratios(rows)
    assert (rows[0]["speedup_vs_mambapy"], rows[0]["speedup_vs_ref"], rows[0]["mem_vs_mambapy"]) == (20.0, 5.0, 1 / 16)
    assert rows[3]["speedup_vs_mambapy"] is None


def test_profile_scan_measures_all_impls_in_one_run_and_writes_csv(tmp_path, capsys):
    code = main(["profile", "--op", "scan", "--impls", "fused,ref,mambapy", "--seq-lens", "9",
                 "--batch", "1", "--d-inner", "4", "--d-state", "2", "--modes", "fwd,fwdbwd",
                 "--repeats", "1", "--ref-max-len", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    table = pd.read_csv(tmp_path / "scan_bench.csv")
    assert list(table["impl"]) == ["fused", "ref", "mambapy"] * 2
    assert list(table["mode"]) == ["fwd"] * 3 + ["fwdbwd"] * 3
    assert set(table[table.impl == "ref"]["status"]) == {"skipped"}   # L=9 > --ref-max-len 8
    measured = table[table.impl == "fused"]
    assert (measured["status"] == "ok").all() and (measured["median_ms"] > 0).all()
    assert (measured["peak_extra_mib"] >= 0).all()
    if importlib.util.find_spec("mambapy"):
        assert (measured["speedup_vs_mambapy"] > 0).all()
    assert "ref skipped beyond L=8" in out and "x mambapy" in out


def test_the_floor_uses_the_faster_of_the_bandwidths_measured_before_and_after_the_points(monkeypatch):
    # a shared machine's copy bandwidth moves between moments: the floor, a best case, keeps the faster
    speeds = iter([10e9, 20e9])
    monkeypatch.setattr(bench_scan, "measure_bandwidth", lambda device, threads: next(speeds))
    from ssmscale.bench import memprobe
    monkeypatch.setattr(memprobe, "run_isolated", lambda *a, **k: dict(
        status="ok", error=None, median_ms=1.0, min_ms=1.0, peak_extra_bytes=0, memory_method="VmHWM"))
    rows = bench_scan.run_benchmark(["fused"], [64], batch=1, d_inner=16, d_state=4, modes=("fwd", "fwdbwd"))
    for r in rows:
        want = 1e3 * bench_scan.min_bytes(1, 16, 4, 64, r["mode"]) / 20e9
        assert r["bandwidth_gbs"] == 20.0 and r["floor_ms"] == pytest.approx(want)
        assert r["over_floor"] == pytest.approx(1.0 / want)


@pytest.mark.parametrize("argv, message", [
    (["--seq-lens", "0"], "--seq-lens: expected comma-separated positive integers up to 16777216, got '0'"),
    (["--batch", "two"], "--batch: expected comma-separated positive integers, got 'two'"),
    (["--modes", "bwd"], "--modes: expected a comma-separated subset of fwd,fwdbwd, got 'bwd'"),
    (["--impls", "fast"], "--impls: unknown or not for cpu: 'fast'"),
    (["--impls", "triton"], "--impls: unknown or not for cpu: 'triton'"),
])
def test_profile_rejects_bad_input_with_one_line_and_exit_2(capsys, argv, message):
    assert main(["profile", "--op", "scan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
