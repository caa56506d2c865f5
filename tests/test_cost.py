"""Pricing a ladder before launch: device-hours per family from an assumption or a profile CSV, the
tokens-per-parameter window, and the GPU study config's dry run (no data downloaded)."""

import csv
import re

import pandas as pd
import pytest

from ssmscale.study import cost
from ssmscale.cli import main
from ssmscale.config import LadderConfig, validate
from ssmscale.errors import UserError
from ssmscale.study.plan import plan
from ssmscale.models.config import FAMILIES
from test_ladder import micro


def _profile(tmp_path, rows):
    path = tmp_path / "profile.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["family", "mode", "seq_len", "batch", "d_model", "n_layer", "tokens_per_s",
                                          "flops_per_token", "status", "device"])
        w.writeheader()
        w.writerows(rows)
    return path


def _row(family, seq_len, tokens_per_s, mode="train", status="ok"):
    return {"family": family, "mode": mode, "seq_len": seq_len, "batch": 4, "d_model": 768, "n_layer": 12,
            "tokens_per_s": tokens_per_s, "flops_per_token": 1e9, "status": status, "device": "cuda"}


def test_hours_are_planned_flops_over_the_sustained_rate_per_family(tmp_path):
    cfg = validate(LadderConfig, micro(tmp_path), "x")
    runs = plan(cfg)
    rate = {"transformer": cost.Throughput(1e9, "a"), "mamba": cost.Throughput(2e9, "a")}
    est = cost.estimate(runs, rate)
    for fam in ("transformer", "mamba"):
        flops = sum(r.flops for r in runs if r.family == fam and not r.skip)
        assert est[fam]["flops"] == pytest.approx(flops)
        assert est[fam]["hours"] == pytest.approx(flops / rate[fam].flops_per_s / 3600)
    text = cost.format_estimate(runs, rate)
    assert "GPU-hours" in text and text.splitlines()[-1].split()[0] == "total"


def test_assumed_throughput_is_stated_with_the_estimate():
    t = cost.assumed_throughput(["transformer"])["transformer"]
    assert t.flops_per_s == pytest.approx(cost.ASSUMED_PEAK_FLOPS * cost.ASSUMED_MFU)
    assert "989 TFLOP/s" in t.source and "30% MFU" in t.source


def test_a_profile_gives_each_family_its_training_rate_nearest_the_sequence_length(tmp_path):
    path = _profile(tmp_path, [_row("transformer", 1024, 100.0), _row("transformer", 4096, 50.0),
                               _row("transformer", 2048, 999.0, mode="prefill"), _row("mamba", 2048, 30.0),
                               _row("mamba", 8192, 0, status="oom")])
    t = cost.throughput_from_profile(path, ["transformer", "mamba"], seq_len=2048)
    assert t["transformer"].flops_per_s == 100.0 * 1e9          # L 1024 and 4096 tie: the shorter wins
    assert t["mamba"].flops_per_s == 30.0 * 1e9 and "L 2048" in t["mamba"].source
    assert t["mamba"].device == "GPU"


@pytest.mark.parametrize("text, expected", [
    ("family,mode,seq_len,tokens_per_s,flops_per_token,status\ntransformer,train,2048,1,1,ok\n",
     "no successful training row for family mamba"),
    ("family\nmamba\n", "not a ssmscale profile CSV (no column flops_per_token)"),
])
def test_a_profile_that_cannot_price_the_study_is_one_line_naming_it(tmp_path, text, expected):
    path = tmp_path / "profile.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(f"{path}: {expected}")):
        cost.throughput_from_profile(path, ["transformer", "mamba"], seq_len=2048)


def test_tokens_per_param_window_skips_the_sizes_far_from_each_budgets_optimum(tmp_path):
    cfg = validate(LadderConfig, micro(tmp_path, budgets=[2.0e9, 8.0e9], sizes=[3.0e3, 6.0e3, 1.2e4],
                                       tokens_per_param=[1.0, 1.5]), "x")
    for r in plan(cfg):
        ratio = r.tokens / r.params
        assert ("ratio" in r.flags) == (not 1.0 <= ratio <= 1.5) and r.skip == ("ratio" in r.flags)
    with pytest.raises(UserError, match=r"tokens_per_param: give \[low, high\] with low < high"):
        validate(LadderConfig, micro(tmp_path, tokens_per_param=[20, 2]), "x")


def test_gpu_config_dry_run_prices_every_family_without_downloading_data(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert main(["ladder", "configs/gpu.yaml", "--dry-run", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "corpus is not downloaded" in text and "989 TFLOP/s" in text
    lines = text[text.index("cost estimate"):].splitlines()
    priced = {line.split()[0]: float(line.split()[-1].replace(",", "")) for line in lines[3:]
              if line.split() and line.split()[0] in (*FAMILIES, "total")}
    assert set(priced) == {*FAMILIES, "total"} and all(h > 0 for h in priced.values())
    df = pd.read_csv(out / "plan.csv")
    trained = df[~df.skip]
    assert set(trained.family) == set(FAMILIES)
    assert trained.budget.min() == 1e17 and trained.budget.max() == 1e19
    assert 1e7 <= trained.params.min() and trained.params.max() <= 3.5e8
    # every budget trains at least 4 sizes per family, so each IsoFLOP parabola is over-determined
    assert trained.groupby(["family", "budget"]).d_model.nunique().min() >= 4
    assert priced["total"] == pytest.approx(sum(v for k, v in priced.items() if k != "total"), rel=0.01)


def test_throughput_from_a_profile_replaces_the_assumption(tmp_path, capsys):
    path = _profile(tmp_path, [_row(f, 2048, 1e5) for f in FAMILIES])
    assert main(["ladder", "configs/gpu.yaml", "--dry-run", "--out", str(tmp_path / "gpu"), "--no-progress",
                 "--throughput-from", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"measured: {path}" in text and "assumed" not in text
    assert main(["ladder", "configs/gpu.yaml", "--dry-run", "--out", str(tmp_path / "gpu"), "--no-progress",
                 "--throughput-from", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: profile CSV not found" in capsys.readouterr().err


def test_budget_sizes_train_only_each_budgets_window_and_keep_the_tuning_budget_whole(tmp_path):
    cfg = validate(LadderConfig, micro(tmp_path, budgets=[2.0e9, 8.0e9], sizes=[3.0e3, 6.0e3, 1.2e4],
                                       budget_sizes={8.0e9: [6.0e3, 1.2e4]}), "x")
    runs = plan(cfg)
    for r in runs:
        outside = r.budget == 8.0e9 and r.size == "3e03"
        assert ("window" in r.flags) == outside and (r.skip if outside else True)
    assert {r.size for r in runs if r.budget == 8.0e9 and not r.skip} == {"6e03", "1.2e04"}
    assert {r.size for r in runs if r.budget == 2.0e9 and not r.skip} == {"3e03", "6e03", "1.2e04"}
    for bad, expected in [({9.0e9: [6.0e3]}, r"budget_sizes\.9000000000: not one of the budgets"),
                          ({8.0e9: [5.0e3]}, r"budget_sizes\.8000000000\.0: 5000 is not one of the sizes"),
                          ({"big": [6.0e3]}, r"budget_sizes\.big: keys are budgets")]:
        with pytest.raises(UserError, match=expected):
            validate(LadderConfig, micro(tmp_path, budgets=[2.0e9, 8.0e9], sizes=[3.0e3, 6.0e3, 1.2e4],
                                         budget_sizes=bad), "x")
    # per family: the transformer keeps its small sizes, the others (not named) train every size
    cfg = validate(LadderConfig, micro(tmp_path, budgets=[2.0e9, 8.0e9], sizes=[3.0e3, 6.0e3, 1.2e4],
                                       budget_sizes={8.0e9: {"mamba": [6.0e3, 1.2e4]}}), "x")
    trained = {(r.family, r.size) for r in plan(cfg) if r.budget == 8.0e9 and not r.skip}
    assert ("mamba", "3e03") not in trained and ("transformer", "3e03") in trained and ("mamba", "6e03") in trained
    with pytest.raises(UserError, match=r"budget_sizes\.8000000000\.hybrid: hybrid is not one of the families"):
        validate(LadderConfig, micro(tmp_path, budgets=[2.0e9, 8.0e9], sizes=[3.0e3, 6.0e3, 1.2e4],
                                     budget_sizes={8.0e9: {"hybrid": [6.0e3]}}), "x")
    with pytest.raises(UserError, match=r"budget_sizes\.2000000000: the lr_tune_budget trains every size"):
        validate(LadderConfig, micro(tmp_path, budgets=[2.0e9, 8.0e9], sizes=[3.0e3, 6.0e3, 1.2e4],
                                     lrs=[1e-3, 3e-3], lr_tune_budget=2.0e9, budget_sizes={2.0e9: [6.0e3]}), "x")
