"""Pre-registered forecasts: a forecast of budgets not trained yet is written once and never overwritten, the
report scores it against the runs that later land (ARE, inside or outside, order, which came first), and
bad input (no study, a budget that is not a positive finite number or is already trained, a forecast
edited after it was made) is one line and exit 2."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from ssmscale import fit
from ssmscale.cli import main
from ssmscale.errors import UserError
from ssmscale.fit.forecast import make_forecast, read_forecast, score_forecasts, score_lines, summary_line
from synthetic_study import LAWS, frontier_law, make_runs, make_study

TINY_GRID = fit.CHINCHILLA_GRID[::90]
BUDGETS = (1e12, 1e13, 1e14, 1e15, 1e16)
NEW = 1e17


@pytest.fixture(scope="module")
def forecast(tmp_path_factory):
    """A two-family study on five budgets and its forecast of 1e17 FLOPs (made once for the module)."""
    root = tmp_path_factory.mktemp("forecast")
    study = make_study(root, budgets=BUDGETS, noise=0.003, lrs=(1e-3,), n_bad=0, seed=2, profile=False)
    body, path = make_forecast(study, [NEW], n_boot=8, seed=0, n_jobs=1, progress=False, parametric_grid=TINY_GRID)
    return study, body, path


def _land_runs(study, finished_at: datetime, seed: int = 11) -> None:
    """Train (draw) the forecast budget from the same laws: rows in results.csv, each with its result.json."""
    new = make_runs(budgets=(NEW,), noise=0.003, lrs=(1e-3,), n_bad=0, seed=seed)
    new["study"] = study.name
    for row in new.to_dict("records"):
        run = study / "runs" / row["run_id"]
        run.mkdir(parents=True, exist_ok=True)
        stamp = finished_at.isoformat(timespec="seconds").replace("+00:00", "Z")
        (run / "result.json").write_text(json.dumps({**row, "finished_at": stamp}))
    df = pd.concat([pd.read_csv(study / "results.csv"), new], ignore_index=True)
    df.to_csv(study / "results.csv", index=False)


def test_a_forecast_holds_calibrated_predictions_order_and_provenance(forecast):
    study, body, path = forecast
    assert path.parent == study / "forecasts" and path.name.startswith("forecast-") and path.suffix == ".json"
    assert read_forecast(path) == body                         # what is on disk is what was made, hash intact
    csv = (study / "results.csv").read_bytes()
    import hashlib
    assert body["results"]["sha256"] == hashlib.sha256(csv).hexdigest()
    assert body["source_commit"] and body["made_at"].endswith("Z") and body["budgets"] == [NEW]
    for name in ("mamba", "transformer"):
        (p,) = body["families"][name]["predictions"]
        assert p["budget"] == NEW and p["distance"] == pytest.approx(1.0)
        v = p["frontier"]["loss"]
        assert v["lo"] < v["value"] < v["hi"]                     # calibrated on the study's own backtests
        assert v["lo"] < v["centre"] < v["hi"]
        assert p["parametric"]["n_opt"]["value"] > 0 and p["approach2"]["n_opt"]["lo"] is not None
    (row,) = body["order"]
    assert row["families"] == ["mamba", "transformer"]
    for approach in ("frontier", "parametric"):
        assert row[approach]["lower"] in ("mamba", "transformer") and 0 <= row[approach]["probability"] <= 1
        assert row[approach]["resamples"] == 8


def test_forecasts_are_never_overwritten(forecast):
    from ssmscale.fit.forecast import write_forecast
    study, body, path = forecast
    with pytest.raises(UserError, match="never overwritten"):
        write_forecast(path.parent, body)
    assert read_forecast(path) == body


def test_the_report_scores_a_forecast_once_its_runs_exist(forecast, tmp_path):
    import shutil
    study, body, path = forecast
    assert score_forecasts(study, fit.load_runs(study))[0]["pending"]
    copy = tmp_path / study.name
    shutil.copytree(study, copy)
    made = datetime.fromisoformat(body["made_at"].replace("Z", "+00:00"))
    _land_runs(copy, made + timedelta(hours=2))
    (score,) = score_forecasts(copy, fit.load_runs(copy))
    assert not score["pending"]
    truth = {f: float(fit.frontier_loss(frontier_law(LAWS[f]), NEW)) for f in ("mamba", "transformer")}
    for entry in score["families"]:
        assert entry["budget"] == NEW and entry["n_runs"] == 7
        frontier = next(v for v in entry["scores"] if v["approach"] == "frontier")
        assert frontier["are"] < 0.05 and frontier["inside"] is not None
        assert entry["observed"]["loss"] == pytest.approx(truth[entry["family"]], rel=0.02)
    (order,) = score["order"]
    assert order["observed_lower"] == min(truth, key=truth.get)
    assert all(isinstance(order[a]["right"], bool) for a in ("frontier", "parametric"))
    assert score["came_first"]["verdict"] is True
    assert "made before these runs existed" in score["came_first"]["statement"]
    text = "\n".join(score_lines([score]))
    assert "Forecasts on file" in text and path.name in text and "ARE" in text
    line = summary_line(score)
    assert line.startswith(f"forecast {path.name}") and "frontier best loss mean ARE" in line
    assert "frontier order right" in line and "made before these runs existed" in line


def test_runs_that_finished_before_the_forecast_do_not_count_as_forecast(forecast, tmp_path):
    import shutil
    study, body, _ = forecast
    copy = tmp_path / study.name
    shutil.copytree(study, copy)
    made = datetime.fromisoformat(body["made_at"].replace("Z", "+00:00"))
    _land_runs(copy, made - timedelta(days=1))
    (score,) = score_forecasts(copy, fit.load_runs(copy))
    assert score["came_first"]["verdict"] is False
    assert score["came_first"]["statement"].startswith("NOT a forecast of these runs")


def test_an_edited_forecast_is_refused_with_one_line(forecast, tmp_path):
    import shutil
    study, _, path = forecast
    copy = tmp_path / study.name
    shutil.copytree(study, copy)
    target = copy / "forecasts" / path.name
    body = json.loads(target.read_text())
    body["families"]["mamba"]["predictions"][0]["frontier"]["loss"]["value"] *= 1.01   # a quiet edit
    target.write_text(json.dumps(body, indent=2))
    with pytest.raises(UserError, match="do not match its sha256"):
        score_forecasts(copy, fit.load_runs(copy))
    target.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        score_forecasts(copy, fit.load_runs(copy))


def test_a_forecast_of_the_wrong_shape_or_linked_from_elsewhere_is_one_line(forecast, tmp_path):
    import shutil

    from ssmscale.fit.forecast import content_hash
    study, _, path = forecast
    copy = tmp_path / study.name
    shutil.copytree(study, copy)
    _land_runs(copy, datetime.now(timezone.utc))
    target = copy / "forecasts" / path.name
    body = json.loads(target.read_text())
    body["order"] = [{"families": 5, "budget": NEW}]             # what make_forecast never writes...
    body["sha256"] = content_hash(body)                          # ...with a sha256 anyone can compute
    target.write_text(json.dumps(body))
    with pytest.raises(UserError, match="not a forecast of this tool \\(wrong shape\\)"):
        score_forecasts(copy, fit.load_runs(copy))
    target.unlink()
    target.symlink_to(path)                                      # a forecast that lies outside the study
    with pytest.raises(UserError, match="a link out of"):
        score_forecasts(copy, fit.load_runs(copy))


@pytest.mark.parametrize("budgets, message", [
    (["nan"], "not a positive finite number"), (["-5"], "not a positive finite number"), (["0"], "not a positive finite number"),
    (["inf"], "not a positive finite number"), (["1e17", "lots"], "is not a number"),
    (["1e16"], "already trained"),
])
def test_bad_forecast_input_gives_one_line_and_exit_2(forecast, capsys, budgets, message):
    study, _, _ = forecast
    before = sorted((study / "forecasts").iterdir())
    assert main(["forecast", str(study), "--budgets", *budgets, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert sorted((study / "forecasts").iterdir()) == before         # nothing written


def test_forecast_of_no_study_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["forecast", str(tmp_path / "nowhere"), "--budgets", "1e17"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a study directory" in err and "\n" not in err
