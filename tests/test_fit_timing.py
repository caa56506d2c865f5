"""`ssmscale fit --time-from`: each run's training time priced from a profile's FLOP rate per family, size and
sequence length (log-log interpolation, the nearest rate outside the profiled range), written to
fit_timed.json with the basis stated; a bad profile is one clear line and exit 2."""

import json
import math

import pandas as pd
import pytest

from ssmscale import fit
from ssmscale.cli import main
from ssmscale.fit.runs import load_runs
from ssmscale.fit.timing import flop_rate, reprice
from synthetic_study import make_study

TINY_GRID = fit.laws.CHINCHILLA_GRID[::300]


def _profile(path, rows):
    cols = ["family", "mode", "seq_len", "params", "tokens_per_s", "flops_per_token", "status", "device", "threads"]
    pd.DataFrame([dict(zip(cols, r + ("cpu (elsewhere)", 2))) for r in rows]).to_csv(path, index=False)
    return path


def test_the_flop_rate_is_log_log_between_profiled_points_and_held_beyond_them():
    pts = [(1e5, 256, 1e9), (1e5, 1024, 4e9), (1e7, 256, 1e10), (1e7, 1024, 4e10)]
    rate, outside = flop_rate(pts, 1e6, 512)            # the geometric middle of both axes
    assert math.isclose(rate, math.sqrt(1e9 * 4e9 * 1e10 * 4e10) ** 0.5, rel_tol=1e-9) and not outside
    assert flop_rate(pts, 1e4, 256) == (pytest.approx(1e9), True)       # smaller than profiled: its nearest rate
    assert flop_rate(pts, 1e7, 8192) == (pytest.approx(4e10), True)


def test_reprice_sets_each_runs_time_to_its_flops_over_its_familys_rate(tmp_path):
    study = make_study(tmp_path, budgets=(1e13, 1e14), profile=False)        # seq_len 256, transformer and mamba
    prof = _profile(tmp_path / "profile.csv", [("transformer", "train", 256, 1e6, 1e4, 6e6, "ok"),
                                               ("mamba", "train", 256, 1e6, 2e4, 6e6, "ok"),
                                               ("mamba", "generate", 256, 1e6, 9e9, 2e6, "ok")])
    loaded = reprice(load_runs(study), prof)
    rate = {"transformer": 6e10, "mamba": 1.2e11}
    t = loaded.table
    assert all(math.isclose(s, c / rate[f]) for f, c, s in zip(t["family"], t["flops"], t["train_s"]))
    assert loaded.source["time_basis"] == "profile" and loaded.source["device"] == ["cpu (elsewhere)"]
    assert loaded.source["time_profile"]["outside_runs"] == len(t)      # every run is at another size than 1e6
    assert any("priced from" in n for n in loaded.notes)


def test_fit_time_from_writes_fit_timed_json_and_states_the_basis(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fit.laws, "CHINCHILLA_GRID", TINY_GRID)
    study = make_study(tmp_path, budgets=(1e13, 1e14, 1e15), profile=False)
    small = _profile(tmp_path / "a.csv", [("transformer", "train", 256, 1e5, 1e5, 6e5, "ok"),
                                          ("mamba", "train", 256, 1e5, 3e5, 6e5, "ok")])
    large = _profile(tmp_path / "b.csv", [("transformer", "train", 256, 1e7, 1e3, 6e7, "ok"),
                                          ("mamba", "train", 256, 1e7, 1e3, 6e7, "ok")])
    code = main(["fit", str(study), "--time-from", str(small), "--time-from", str(large), "--n-boot", "0",
                 "--no-progress", "--jobs", "1", "--no-backtest"])
    assert code == 0
    out = capsys.readouterr().out
    assert not (study / "fit.json").exists()                 # the study's own fit is not replaced
    result = json.loads((study / "fit_timed.json").read_text())
    wc = result["wallclock"]
    assert wc["time_basis"] == "profile" and wc["time_from"]["path"] == f"{small}, {large}"
    assert "priced from the profile" in out and not fit.is_default_fit(result)


def test_the_report_sets_the_repriced_verdict_beside_the_measured_one_for_the_same_results(tmp_path, monkeypatch):
    from ssmscale.report.trust import _timed_fit, _wallclock_section
    monkeypatch.setattr(fit.laws, "CHINCHILLA_GRID", TINY_GRID)
    study = make_study(tmp_path, budgets=(1e13, 1e14, 1e15), profile=False)
    prof = _profile(tmp_path / "p.csv", [("transformer", "train", 256, 1e5, 1e5, 6e5, "ok"),
                                         ("mamba", "train", 256, 1e5, 3e5, 6e5, "ok")])
    args = ["--n-boot", "0", "--no-progress", "--jobs", "1", "--no-backtest"]
    assert main(["fit", str(study), *args]) == 0 and main(["fit", str(study), "--time-from", str(prof), *args]) == 0
    measured = json.loads((study / "fit.json").read_text())
    assert "skipped" in measured["families"]["mamba"]["wallclock"]      # the synthetic runs record no train_s:
    timed = json.loads((study / "fit_timed.json").read_text())          # stand in measured times for the priced
    measured["families"] = timed["families"]
    measured["wallclock"] = {**timed["wallclock"], "time_basis": "train_s", "time_from": None}
    text = "\n".join(_wallclock_section(measured, False, _timed_fit(study, measured)))
    assert "**Verdict**: At equal" in text and f"**Re-priced** (fit_timed.json" in text and str(prof) in text
    stale = {**measured, "source": {**measured["source"], "sha256": "0" * 64}}   # fit.json of other results
    assert _timed_fit(study, stale) is None
    assert "Re-priced" not in "\n".join(_wallclock_section(stale, False, _timed_fit(study, stale)))


@pytest.mark.parametrize("rows, message", [
    ([("transformer", "train", 256, 1e6, 1e4, 6e6, "ok")], "no training rows for family 'mamba'"),
    ([("mamba", "train", 256, 1e6, -1.0, 6e6, "ok"), ("transformer", "train", 256, 1e6, 1e4, 6e6, "ok")],
     "column 'tokens_per_s' has a missing, non-numeric or non-positive value"),
    ([("mamba", "generate", 256, 1e6, 1e4, 6e6, "ok")], "no training rows with status ok"),
])
def test_a_bad_profile_is_one_line_and_exit_2(tmp_path, capsys, rows, message):
    study = make_study(tmp_path, budgets=(1e13, 1e14), profile=False)
    prof = _profile(tmp_path / "profile.csv", rows)
    assert main(["fit", str(study), "--time-from", str(prof), "--n-boot", "0", "--no-progress", "--jobs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "--time-from" in err[0]
    assert not (study / "fit_timed.json").exists()


def test_a_profile_without_the_columns_names_the_first_missing_one(tmp_path, capsys):
    study = make_study(tmp_path, budgets=(1e13, 1e14), profile=False)
    (tmp_path / "p.csv").write_text("family,mode\nmamba,train\n")
    assert main(["fit", str(study), "--time-from", str(tmp_path / "p.csv"), "--n-boot", "0", "--jobs", "1"]) == 2
    assert "missing column 'seq_len'" in capsys.readouterr().err
