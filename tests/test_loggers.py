"""Lightning's loggers beside metrics.csv: the same per-step fields, one TensorBoard run per ladder run,
strict `train.loggers` / `train.strategy` keys."""

import csv

import pytest
import yaml

from ssmscale.config import load as config_mod
from ssmscale.cli import main
from ssmscale.study.ladder import run_ladder
from ssmscale.train import METRIC_FIELDS, run_training
from test_ladder import micro, write_cfg
from test_train import tiny_config

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer  # noqa: E402


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_and_tensorboard_logs_carry_the_metrics_file_fields_at_every_step(tmp_path):
    cfg = tiny_config(tmp_path, tokens=12 * 128, eval_every=5, loggers=["csv", "tensorboard"])
    run_training(cfg, tmp_path / "run")
    own = _rows(tmp_path / "run" / "metrics.csv")
    lightning_csv = _rows(tmp_path / "run" / "logs" / "csv" / "metrics.csv")
    assert set(lightning_csv[0]) == set(METRIC_FIELDS) - {"val_accuracy"}   # text data: no accuracy to log
    key = lambda r: (int(r["step"]), r["val_loss"] != "")          # noqa: E731  (the final row repeats a step)
    assert sorted(map(key, lightning_csv)) == sorted(map(key, own))
    for mine, theirs in zip(sorted(own, key=key), sorted(lightning_csv, key=key)):
        for field in METRIC_FIELDS:
            assert (float(mine[field]) if mine[field] else None) == (float(theirs[field]) if theirs.get(field) else None)

    events = EventAccumulator(str(tmp_path / "run" / "logs" / "tensorboard"))
    events.Reload()
    fields = {"train_loss", "lr", "grad_norm", "tokens", "elapsed_s", "val_loss", "val_bpb"}
    assert fields <= set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("train_loss")]
    expected = [(int(r["step"]), float(r["train_loss"])) for r in own if r["train_loss"]]
    assert [s for s, _ in logged] == [s for s, _ in expected] == list(range(1, 13))
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [5, 10, 12]


def test_tensorboard_on_a_study_directory_shows_every_run_of_the_ladder(tmp_path):
    raw = micro(tmp_path, budgets=[5.0e8], sizes=[6.0e3])          # about 50 steps per run
    raw["train"] = {**raw["train"], "loggers": ["tensorboard"]}
    study = tmp_path / "study"
    run_ladder(str(write_cfg(tmp_path, raw)), out=str(study), progress=False)
    mux = EventMultiplexer().AddRunsFromDirectory(str(study))
    mux.Reload()
    runs = {name.split("/")[1] for name in mux.Runs() if "train_loss" in mux.Runs()[name]["scalars"]}
    assert runs == {p.name for p in (study / "runs").iterdir()} and len(runs) == 2


@pytest.mark.parametrize("override, expected", [
    ("train.loggers=[csv, mlflow]", "train.loggers.1: Input should be 'csv', 'tensorboard' or 'wandb'"),
    ("train.strategy=fsdp2", "train.strategy: Input should be 'auto' or 'ddp'"),
])
def test_unknown_logger_or_strategy_exits_2_naming_the_key(tmp_path, capsys, override, expected):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path).model_dump(mode="json")))
    assert main(["train", str(cfg), "--out", str(tmp_path / "out"), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err
    assert not (tmp_path / "out").exists()


def test_a_logger_whose_package_is_missing_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    real = config_mod.find_spec
    monkeypatch.setattr(config_mod, "find_spec", lambda name: None if name == "wandb" else real(name))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path).model_dump(mode="json")))
    assert main(["train", str(cfg), "--out", str(tmp_path / "out"), "--set", "train.loggers=[wandb]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("train.loggers: 'wandb' needs the wandb package (pip install wandb)")
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
