"""Config schema: every shipped YAML validates; bad input is one line, exit code 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssmscale.cli import main
from ssmscale.config import LadderConfig, RunConfig, parse_yaml, read_yaml, validate

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    raw = read_yaml(path)
    schema = LadderConfig if "sizes" in raw or "widths" in raw else RunConfig
    validate(schema, raw, str(path))


def test_configs_folder_has_the_documented_configs():
    names = {p.name for p in CONFIGS}
    assert {"train_tiny.yaml", "tiny.yaml", "small.yaml", "mqar.yaml"} <= names


def _write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


GOOD_RUN = """
model: {family: transformer, d_model: 32, n_layer: 1}
train: {tokens: 1000, seq_len: 16, batch_size: 2}
"""


@pytest.mark.parametrize("text, expected", [
    (GOOD_RUN + "bogus: 1\n", "bogus: unknown key"),
    (GOOD_RUN.replace("seq_len: 16", "seq_len: sixteen"), "train.seq_len: Input should be a valid integer"),
    (GOOD_RUN.replace("seq_len: 16", "seq_len: -3"), "train.seq_len: Input should be greater than 0"),
    (GOOD_RUN.replace("n_layer: 1}", "n_layer: 1, dropout: 0.1}"), "model.dropout: unknown key"),
    (GOOD_RUN + "data: {source: files, path: [a.txt]}\n", "data.path: unknown key; did you mean data.paths?"),
    (GOOD_RUN.replace("seq_len: 16", "seqlen: 16"), "train.seqlen: unknown key; did you mean train.seq_len?"),
    (GOOD_RUN.replace("model:", "modle:"), "modle: unknown key; did you mean model?"),
    (GOOD_RUN.replace("family: transformer", "family: rnn"), "model.family: unknown model family 'rnn'; known: transformer, mamba, mamba2, hybrid"),
    (GOOD_RUN.replace("n_layer: 1}", "n_layer: 1, hybrid_ssm: rwkv}"), "model.hybrid_ssm: Input should be 'mamba2' or 'mamba'"),
    (GOOD_RUN.replace("n_layer: 1}", "n_layer: 1, mamba2_chunk_size: 0}"), "model.mamba2_chunk_size: Input should be greater than 0"),
    (GOOD_RUN + "data: {source: files}\n", "data.paths: source 'files' needs at least one path"),
    (GOOD_RUN + "tokenizer: {kind: byte, vocab_size: 512}\n", "tokenizer.vocab_size: the byte tokenizer has exactly 256"),
    ("model: [1, 2]\n", "model: Input should be a valid dictionary"),
    ("- a\n- b\n", "the top level must be a mapping"),
    ("model: {family: transformer\n", "not valid YAML"),
])
def test_bad_run_config_exits_2_with_one_line_naming_the_key(tmp_path, capsys, text, expected):
    cfg = _write(tmp_path, text)
    out = tmp_path / "out"
    assert main(["train", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert expected in err and str(cfg) in err
    assert not out.exists()


def test_unknown_family_on_the_command_line_exits_2(tmp_path, capsys):
    cfg = _write(tmp_path, GOOD_RUN)
    assert main(["train", str(cfg), "--family", "rwkv", "--out", str(tmp_path / "o")]) == 2
    assert "model.family: unknown model family 'rwkv'; known: transformer, mamba, mamba2, hybrid" in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err


def test_numbers_in_yaml_exponent_form_are_numbers():
    # YAML 1.1 (PyYAML's rule) reads 1e6 and 3e-3 (no dot) as strings; the config loader follows YAML 1.2
    text = "model: {params: 1.0e+5}\ntrain: {tokens: 1e6, lr: 3e-3}\n"
    assert yaml.safe_load(text)["train"]["tokens"] == "1e6"
    raw = parse_yaml(text, "x")
    assert raw["train"] == {"tokens": 1e6, "lr": 3e-3}
    cfg = validate(RunConfig, raw, "x")
    assert cfg.train.tokens == 1e6 and cfg.train.lr == 3e-3


LADDER = """
name: t
budgets: [1.0e+11]
sizes: [2.0e+4]
train: {seq_len: 32, batch_size: 4}
"""


@pytest.mark.parametrize("text, expected", [
    (LADDER.replace("budgets: [1.0e+11]", "budgets: []"), "budgets: List should have at least 1 item"),
    (LADDER + "families: [transformer, lstm]\n", "families.1: unknown model family 'lstm'; known: transformer, mamba, mamba2, hybrid"),
    (LADDER + "families: [hybrid]\nmodel: {hybrid_attn_layers: [7]}\n", "sizes.0: hybrid_attn_layers: layer 7 is outside 0..3"),
    (LADDER.replace("[2.0e+4]", "[{mamba2: [32, 4]}]"), "sizes.0: no shape for family transformer"),
    (LADDER.replace("[2.0e+4]", "[2.0e+4, {transformer: [64, 2]}]"), "sizes.1: no shape for family mamba"),
    (LADDER + "lrs: {foo: [1.0e-3]}\n", "lrs.foo: keys are sizes"),
    (LADDER.replace("batch_size: 4}", "batch_size: 4, tokens: 5}"), "train.tokens: set by the ladder"),
    (LADDER.replace("budgets: [1.0e+11]", "budgets: [1.0e+6]"),
     "budgets.0: 1e+06 FLOPs gives the smallest size"),
])
def test_bad_ladder_config_exits_2_naming_the_entry(tmp_path, capsys, text, expected, monkeypatch):
    monkeypatch.setenv("SSMSCALE_CACHE", str(tmp_path / "cache"))
    cfg = _write(tmp_path, text + "data: {max_bytes: 100000}\n")
    out = tmp_path / "study"
    assert main(["ladder", str(cfg), "--out", str(out), "--dry-run", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (out / "plan.csv").exists()


def test_cli_help_does_not_import_heavy_libraries():
    code = ("import sys; from ssmscale.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'lightning', 'pandas', 'matplotlib', 'datasets', 'scipy', "
            "'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_only_working_subcommands():
    out = subprocess.run([sys.executable, "-m", "ssmscale.cli", "--help"], capture_output=True, text=True).stdout
    for name in ("train", "ladder"):
        assert name in out


def test_model_knobs_default_to_the_model_configs_defaults():
    import dataclasses

    from ssmscale.config import ModelDefaults
    from ssmscale.models import ModelConfig
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    knobs = ModelDefaults().knobs()
    assert set(knobs) <= set(fields)
    assert knobs == {k: fields[k] for k in knobs}


def test_shape_spec_has_a_field_per_family():
    from ssmscale.config import ShapeSpec
    from ssmscale.models import FAMILIES
    assert tuple(ShapeSpec.model_fields) == FAMILIES
    assert ShapeSpec(hybrid=(32, 4)).hybrid == (32, 4)
