"""The recall axis: MQAR accuracy, generation-state bytes, width/sweep/fixed-length ladders, the recall report."""

from __future__ import annotations

import json
import re
import struct

import pandas as pd
import pytest
import torch
import yaml

from ssmscale.config import sweep
from ssmscale.cli import main
from ssmscale.config import LadderConfig, validate
from ssmscale.errors import UserError
from ssmscale.study.ladder import run_ladder
from ssmscale.study.plan import plan, run_config
from ssmscale.models import FAMILIES, ModelConfig
from ssmscale.models.lm import state_bytes
from ssmscale.models.sizing import LAYERS_PER_TRANSFORMER_LAYER, layers_at_width
from ssmscale.train import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------- accuracy
class EchoModel(torch.nn.Module):
    """A stand-in model that predicts its input token at every position (padded vocabulary of 16)."""

    def __init__(self, vocab_size=12):
        super().__init__()
        self.cfg = ModelConfig(family="transformer", d_model=16, n_layer=1, vocab_size=vocab_size, head_dim=16)

    def forward(self, x):
        logits = torch.zeros(*x.shape, 16)
        logits.scatter_(-1, x[..., None], 5.0)
        logits[..., 14] = 9.0          # a padded row above every real token: must not be the prediction
        return logits


def test_accuracy_is_the_fraction_of_scored_positions_predicted_exactly():
    y = torch.full((3, 4), -100)
    y[0, 1], y[1, 2], y[2, 0], y[2, 3] = 7, 8, 9, 10
    x = torch.zeros(3, 4, dtype=torch.long)                    # the model predicts x
    x[0, 1], x[1, 2], x[2, 0], x[2, 3] = 7, 3, 9, 10           # 3 of the 4 scored positions right
    x[0, 0] = 5                                                # unscored positions do not count
    ev = evaluate(EchoModel(), (x, y, None), batch_size=2, device="cpu")
    assert ev["val_accuracy"] == pytest.approx(3 / 4) and ev["val_tokens"] == 4


def test_text_data_scores_every_position_and_has_no_accuracy():
    x = torch.zeros(2, 4, dtype=torch.long)
    y = torch.ones(2, 4, dtype=torch.long)
    ev = evaluate(EchoModel(), (x, y, 8), batch_size=2, device="cpu")
    assert ev["val_accuracy"] is None and ev["val_tokens"] == 8


# ------------------------------------------------------------------------------- state bytes
def test_state_bytes_is_the_kv_cache_for_attention_and_a_fixed_state_for_mamba():
    tf = ModelConfig(family="transformer", d_model=32, n_layer=2, head_dim=16)
    mb = ModelConfig(family="mamba", d_model=32, n_layer=4)
    for L in (64, 256):
        assert state_bytes(tf, 1, L) == 2 * 2 * L * 32 * 4          # keys + values, 2 layers, fp32
        assert state_bytes(mb, 1, L) == 4 * (64 * 4 + 64 * 16) * 4  # conv (d_inner x d_conv) + SSM (d_inner x N)
    assert state_bytes(tf, 3, 64) == 3 * state_bytes(tf, 1, 64)


def test_profile_state_bytes_is_the_same_function():
    from ssmscale.bench.profile import state_bytes as profile_state_bytes
    cfg = ModelConfig(family="transformer", d_model=64, n_layer=2, head_dim=32)
    assert profile_state_bytes("transformer", 64, 2, 1, 300) == state_bytes(cfg, 1, 300)


def test_every_family_has_a_depth_rule_and_mamba_doubles_the_transformer():
    assert set(FAMILIES) <= set(LAYERS_PER_TRANSFORMER_LAYER)
    assert layers_at_width("transformer", 2) == 2 and layers_at_width("mamba", 2) == 4
    with pytest.raises(ValueError, match="no depth rule for model family 'rwkv'"):
        layers_at_width("rwkv", 2)


# ----------------------------------------------------------------------------- recall ladders
def recall_raw(tmp_path, **over):
    raw = {
        "name": "recall", "families": ["transformer", "mamba"], "steps": 12, "min_steps": 5,
        "widths": [16, 32], "lrs": [1e-3, 1e-2], "allow_repeats": True,
        "sweep": {"data.synthetic.num_kv_pairs": [2, 4], "train.seq_len": [16, 32]},
        "data": {"source": "synthetic", "synthetic": {"vocab_size": 32, "num_examples": 64}},
        "model": {"head_dim": 16},
        "train": {"batch_size": 4, "eval_tokens": 256, "progress": False},
    }
    raw.update(over)
    return raw


def test_a_width_sweep_plans_families_x_widths_x_points_x_lrs_at_a_fixed_length(tmp_path):
    cfg = validate(LadderConfig, recall_raw(tmp_path), "x")
    runs = plan(cfg)
    assert len(runs) == 2 * 2 * 4 * 2 and len({r.run_id for r in runs}) == len(runs)
    assert all(r.steps == 12 and r.budget is None and r.tokens == 12 * 4 * json.loads(r.sweep)["train.seq_len"]
               for r in runs)
    assert {(r.family, r.d_model, r.n_layer) for r in runs} == {
        ("transformer", 16, 2), ("transformer", 32, 2), ("mamba", 16, 4), ("mamba", 32, 4)}
    ids = {r.run_id for r in runs}
    assert {"transformer_d16xL2_num_kv_pairs2_seq_len16_lr0.001", "mamba_d32xL4_num_kv_pairs4_seq_len32_lr0.01"} <= ids
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", i) for i in ids)
    run = next(r for r in runs if r.run_id == "mamba_d32xL4_num_kv_pairs4_seq_len32_lr0.01")
    rc = run_config(cfg, run)           # the point's values reach the run's config
    assert rc.train.seq_len == 32 and rc.data.synthetic.num_kv_pairs == 4 and rc.train.tokens == 12 * 4 * 32
    assert rc.model.d_model == 32 and rc.model.n_layer == 4 and rc.train.lr == 0.01


def test_width_layers_and_tokens_per_run_and_a_union_of_grids(tmp_path):
    raw = recall_raw(tmp_path, steps=None, tokens=2000, width_layers=1, lrs=[1e-3],
                     sweep=[{"train.seq_len": [16], "data.synthetic.num_kv_pairs": [2, 4]},
                            {"train.seq_len": [64], "data.synthetic.num_kv_pairs": [16]}])
    runs = plan(validate(LadderConfig, raw, "x"))
    points = list(dict.fromkeys(r.sweep for r in runs))        # in the order written
    assert [sweep.decode(p) for p in points] == [{"data.synthetic.num_kv_pairs": 2, "train.seq_len": 16},
                                                 {"data.synthetic.num_kv_pairs": 4, "train.seq_len": 16},
                                                 {"data.synthetic.num_kv_pairs": 16, "train.seq_len": 64}]
    for r in runs:
        seq_len = json.loads(r.sweep)["train.seq_len"]
        assert r.steps == round(2000 / (4 * seq_len)) and r.n_layer == (1 if r.family == "transformer" else 2)


@pytest.mark.parametrize("over, expected", [
    ({"sweep": {"data.synthetic.num_kvpairs": [2]}}, "sweep.data.synthetic.num_kvpairs: unknown key"),
    ({"sweep": {"train.seq_len": ["long"]}}, "sweep.train.seq_len: Input should be a valid integer"),
    ({"sweep": {"train.lr": [1e-3]}}, "sweep.train.lr: cannot be swept (use lrs"),
    ({"sweep": {"families": [["mamba"]]}}, "sweep.families: keys are dotted paths under data, tokenizer"),
    ({"sweep": {"train.seq_len": [16, 16]}}, "sweep.train.seq_len: duplicate values"),
    ({"sweep": [{"train.seq_len": [16]}, {"train.seq_len": [16]}]}, "sweep: the point seq_len16 appears twice"),
    ({"budgets": [1e9]}, "budgets: give the run length as one of budgets"),
    ({"steps": None}, "budgets: give the run length as one of budgets"),
    ({"sizes": [1e4]}, "sizes: give one of sizes (parameter counts or shapes) or widths (d_model), not both"),
    ({"widths": None, "width_layers": 2, "sizes": [1e4]}, "width_layers: only used with widths"),
    ({"steps": 3}, "steps: 3 is below min_steps 5"),
    ({"families": ["transformer", "lstm"]}, "families.1: unknown model family 'lstm'; known: transformer, mamba, mamba2, hybrid"),
    ({"lrs": {"d16": [1e-3], "bogus": [1e-2]}}, "lrs.bogus: keys are sizes"),
])
def test_bad_recall_ladders_exit_2_with_one_line_naming_the_key(tmp_path, capsys, over, expected):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recall_raw(tmp_path, **over)))
    assert main(["ladder", str(path), "--out", str(tmp_path / "s"), "--dry-run", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "s" / "plan.csv").exists()


def test_a_point_whose_task_does_not_fit_is_named(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recall_raw(tmp_path, sweep={"data.synthetic.num_kv_pairs": [2, 8],
                                                                "train.seq_len": [16]})))
    assert main(["ladder", str(path), "--out", str(tmp_path / "s"), "--dry-run", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sweep point num_kv_pairs8_seq_len16: train.seq_len: 16 cannot hold 8 key-value pairs" in err


def test_two_points_with_the_same_label_are_an_error(tmp_path):
    cfg = validate(LadderConfig, recall_raw(tmp_path, sweep={"data.hf_name": ["org/set", "orgset"]}), "x")
    with pytest.raises(UserError, match="two runs would share the id transformer_d16xL2_hf_nameorgset_lr0.001"):
        plan(cfg)


def test_a_recall_ladder_trains_scores_accuracy_reports_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = recall_raw(tmp_path, widths=[16], sweep={"data.synthetic.num_kv_pairs": [2, 4], "train.seq_len": [16]})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    study = tmp_path / "scaling" / "recall"
    run_ladder(str(path), out=str(study), progress=False)
    df = pd.read_csv(study / "results.csv")
    assert len(df) == 2 * 2 * 2 and set(df.status) == {"ok"} and df.budget.isna().all()
    assert df.val_accuracy.between(0, 1).all() and (df.state_bytes > 0).all()
    tf = df[df.family == "transformer"].state_bytes.iloc[0]
    assert tf == state_bytes(ModelConfig(family="transformer", d_model=16, n_layer=2, head_dim=16), 1, 16)
    assert {json.loads(s)["data.synthetic.num_kv_pairs"] for s in df.sweep} == {2, 4}
    res = json.loads((study / "runs" / df.run_id[0] / "result.json").read_text())
    assert res["sweep"] == {"data.synthetic.num_kv_pairs": 2, "train.seq_len": 16} and "val_accuracy" in res
    assert not (study / "fit.json").exists()                      # no scaling law for a fixed-length study
    report = tmp_path / "reports" / "recall"
    md = (report / "report.md").read_text()
    for name in ("recall_width.png", "recall_state.png"):
        data = (report / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and struct.unpack(">II", data[16:24])[0] >= 600
        assert f"![{name}]({name})" in md
    assert "| L=16, kv=2 |" in md and "Training time summed over the runs" in md
    mtimes = {p: p.stat().st_mtime_ns for p in study.glob("runs/*/result.json")}
    run_ladder(str(path), out=str(study), progress=False)          # a second call trains nothing
    assert {p: p.stat().st_mtime_ns for p in study.glob("runs/*/result.json")} == mtimes
    assert main(["fit", str(study)]) == 2
    assert "has no scaling law to fit" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the report
def _fake_study(tmp_path, rows):
    study = tmp_path / "study"
    study.mkdir()
    cfg = {"name": "fake", "steps": 100, "widths": [16, 32], "families": ["transformer", "mamba"],
           "data": {"source": "synthetic", "synthetic": {"vocab_size": 64, "num_kv_pairs": 4}}}
    (study / "config.yaml").write_text(yaml.safe_dump(cfg))
    pd.DataFrame(rows).to_csv(study / "results.csv", index=False)
    return study


def _row(family, d, lr, acc, kv=None, seq_len=64, status="ok"):
    point = {"data.synthetic.num_kv_pairs": kv, "train.seq_len": seq_len} if kv else {}
    return {"family": family, "d_model": d, "n_layer": 2, "seq_len": seq_len, "lr": lr, "loss": 1.0 - acc,
            "val_accuracy": acc, "state_bytes": d * seq_len * 16 if family == "transformer" else d * 640,
            "status": status, "wall_s": 10.0, "sweep": sweep.encode(point), "data_fingerprint": "fp",
            "commit": "c", "device": "cpu", "flops_convention": "x", "versions": "{}"}


def test_report_keeps_the_best_learning_rate_per_cell_and_flags_grid_edges(tmp_path):
    from ssmscale.report.recall import load_cells
    rows = [_row("transformer", 16, 1e-3, 0.5), _row("transformer", 16, 3e-3, 0.9), _row("transformer", 16, 1e-2, 0.7),
            _row("mamba", 16, 1e-3, 0.2), _row("mamba", 16, 3e-3, 0.3), _row("mamba", 16, 1e-2, 0.4),
            _row("mamba", 16, 3e-2, 0.99, status="diverged")]
    ok, best, facts = load_cells(_fake_study(tmp_path, rows))
    got = {r.family: (r.lr, r.val_accuracy, r.edge) for r in best.itertuples()}
    assert got == {"transformer": (3e-3, 0.9, False), "mamba": (1e-2, 0.4, True)}
    assert facts["runs"] == 7 and facts["ok_runs"] == 6 and facts["wall_s"] == 70.0
    assert set(best.task) == {"L=64, kv=4"}                  # kv from config.yaml when it is not swept


def test_report_tables_say_where_each_family_solves_recall(tmp_path):
    from ssmscale.report.scaling import write_report
    rows = []
    for kv, accs in ((4, {"transformer": (1.0, 1.0), "mamba": (0.995, 1.0)}),
                     (16, {"transformer": (0.6, 1.0), "mamba": (0.3, 0.5)})):
        for fam, (a16, a32) in accs.items():
            rows += [_row(fam, 16, 1e-3, a16, kv=kv), _row(fam, 32, 1e-3, a32, kv=kv)]
    study = _fake_study(tmp_path, rows)
    md = write_report(study, tmp_path / "out").read_text()
    assert "| L=64, kv=4 | d_model 16 | d_model 16 |" in md
    assert "| L=64, kv=16 | d_model 32 | not solved (best 0.500 at d_model 32) |" in md
    assert "| L=64, kv=16 | 16 | 0.600 (0.001) | 16 KiB | 0.300 (0.001) | 10 KiB |" in md
    for name in ("recall_width.png", "recall_state.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG_MAGIC)
    assert not (study / "fit.json").exists()
