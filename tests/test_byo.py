"""Bring your own architecture: plugin families through the one LM shell, their admission checks, their measured
FLOPs (which must reproduce the built-ins' analytic counts), their sizing, and that fit and report never run
their code. The compute multiplier has its own tests (test_multiplier.py)."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssmscale import flops
from ssmscale.cli import main
from ssmscale.config import LadderConfig, RunConfig, config_hash, load_ladder_config, validate
from ssmscale.errors import UserError
from ssmscale.flops_measure import count_forward, measure_mixer
from ssmscale.models import LM, ModelConfig
from ssmscale.models.admission import AdmissionError, admit, builtin_factories
from ssmscale.models.block import Block
from ssmscale.models.lm import LAYERS, state_bytes
from ssmscale.models.plugin import MixerSpec, build_mixer, load_mixer_class
from ssmscale.models.sizing import PLUGIN_MATCH, ladder_shapes, shape_for
from ssmscale.ops import scan_cpu

ROOT = Path(__file__).resolve().parents[1]
GLA = MixerSpec(f"{ROOT / 'examples' / 'gla.py'}:GatedLinearAttention", {"heads": 4})
MIXERS = Path(__file__).with_name("byo_mixers.py")


def plugin(cls: str, **kw) -> MixerSpec:
    return MixerSpec(f"{MIXERS}:{cls}", **kw)


def tiny_cfg(family="gla", spec=GLA, d_model=48, n_layer=2, **kw):
    return ModelConfig(family=family, d_model=d_model, n_layer=n_layer, head_dim=16, mixer=spec, **kw)


# ------------------------------------------------------------------------------------- the shell
# state_dict keys of every built-in family as they were before the families shared models/block.py (d 48, head 16)
KEYS = {
    "transformer": ["norm_attn.weight", "attn.qkv.weight", "attn.out_proj.weight", "norm_mlp.weight",
                    "mlp.w_gate.weight", "mlp.w_up.weight", "mlp.w_down.weight"],
    "mamba": ["norm.weight", "mixer.A_log", "mixer.D", "mixer.in_proj.weight", "mixer.conv1d.weight",
              "mixer.conv1d.bias", "mixer.x_proj.weight", "mixer.dt_proj.weight", "mixer.dt_proj.bias",
              "mixer.out_proj.weight"],
    "mamba2": ["norm.weight", "mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.in_proj.weight", "mixer.conv1d.weight",
               "mixer.conv1d.bias", "mixer.norm.weight", "mixer.out_proj.weight"],
    "attention": ["norm.weight", "attn.qkv.weight", "attn.out_proj.weight"],
}


@pytest.mark.parametrize("family, kw, kinds", [
    ("transformer", {}, ["transformer"] * 2), ("mamba", {}, ["mamba"] * 2), ("mamba2", {}, ["mamba2"] * 2),
    ("hybrid", {}, ["mamba2", "mamba2", "attention"]), ("hybrid", {"hybrid_ssm": "mamba"}, ["mamba", "mamba", "attention"]),
    ("hybrid", {"hybrid_attn_layers": [0]}, ["attention", "mamba2", "mamba2"]),
])
def test_state_dict_keys_are_those_of_the_families_before_they_shared_one_block(family, kw, kinds):
    cfg = ModelConfig(family=family, d_model=48, n_layer=len(kinds), head_dim=16, **kw)
    model = LM(cfg)
    want = ["embedding.weight"] + [f"blocks.{i}.{k}" for i, kind in enumerate(kinds) for k in KEYS[kind]]
    assert list(model.state_dict()) == want + ["norm_f.weight"]
    assert all(type(b) is Block for b in model.blocks) and [b.kind for b in model.blocks] == kinds


@pytest.mark.parametrize("family", ["transformer", "mamba", "mamba2"])
def test_builtin_mixers_meet_the_contract_standalone(family):
    """Mixer(d_model, **options) alone gives what the mixer inside the LM gives."""
    cfg = ModelConfig(family=family, d_model=32, n_layer=2, head_dim=16)
    torch.manual_seed(0)
    model = LM(cfg)
    layer = LAYERS[cfg.layer_kinds[0]](cfg)
    mixer = layer.mixer(cfg.d_model, **layer.options)
    inside = model.blocks[0].mixer_module
    mixer.load_state_dict(inside.state_dict())
    x = torch.randn(2, 9, 32)
    assert torch.equal(mixer(x), inside(x))


def test_a_plugin_family_trains_generates_and_counts_its_parameters_exactly():
    cfg = tiny_cfg()
    model = LM(cfg)
    assert flops.param_counts(cfg)["non_embedding"] == model.num_params()
    assert model.blocks[0].residual_branches == 2 and model.blocks[0].mlp is not None
    tokens = torch.randint(0, 256, (2, 21))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    out = model.generate(tokens[:, :4], max_new_tokens=5)
    with torch.no_grad():
        for t in range(4, 9):
            assert torch.equal(model(out[:, :t])[:, -1].argmax(-1), out[:, t])
    assert state_bytes(cfg, 1, 64) > 0


def test_a_plugin_without_a_cache_trains_but_says_it_cannot_generate():
    cfg = tiny_cfg("conv", plugin("CausalConv", mlp=False))
    model = LM(cfg)
    assert model.blocks[0].mlp is None and model.blocks[0].residual_branches == 1
    model(torch.randint(0, 256, (1, 7))).sum().backward()
    assert not model.can_generate and state_bytes(cfg, 1, 8) is None
    with pytest.raises(ValueError, match="has no allocate_cache, so this model cannot generate"):
        model.allocate_cache(1, 8)


def test_plugin_code_is_imported_only_when_a_model_is_built_and_once_per_version(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(MIXERS.read_text() + f"\n# {tmp_path}\n")      # content no other test has imported
    spec = MixerSpec(f"{path}:CausalConv")
    cfg = tiny_cfg("mine", spec)                          # a config: nothing imported
    assert not any(getattr(m, "__file__", None) == str(path) for m in list(sys.modules.values()))
    LM(cfg)
    LM(cfg)
    assert capsys.readouterr().err.count(f"importing plugin mixer CausalConv from {path}") == 1
    first = load_mixer_class(spec.target)
    path.write_text(path.read_text() + "# changed\n")
    assert load_mixer_class(spec.target) is not first
    assert "importing plugin mixer" in capsys.readouterr().err       # new code, new module


@pytest.mark.parametrize("target, message", [
    ("nowhere.py:Mixer", "nowhere.py: mixer file not found"),
    (f"{MIXERS}:Missing", "no Missing in"),
    (f"{MIXERS}:LEAKS", "LEAKS is not a torch.nn.Module class"),
    ("no_such_package_xyz.mod:Mixer", "importing the mixer module failed"),
])
def test_a_bad_mixer_target_is_one_clear_error(target, message):
    with pytest.raises(UserError, match=message):
        load_mixer_class(target)


def test_a_plugin_file_is_read_once_as_a_regular_file_and_the_code_that_runs_is_the_code_hashed(tmp_path):
    import hashlib
    import os
    fifo = tmp_path / "fifo.py"
    os.mkfifo(fifo)
    for call in (lambda: load_mixer_class(f"{fifo}:Mixer"), lambda: MixerSpec(f"{fifo}:Mixer").sha256()):
        with pytest.raises(UserError, match="fifo.py: a FIFO, not a regular file; refused"):
            call()                                         # refused, not waited on
    path = tmp_path / "m.py"
    path.write_text(MARKER_MIXER + "VERSION = 1\n")
    cls = load_mixer_class(f"{path}:Mixer")
    assert sys.modules[cls.__module__].VERSION == 1 and Path(sys.modules[cls.__module__].__file__) == path
    assert cls.__module__ == f"ssmscale_plugin_{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


# ------------------------------------------------------------------------------------- admission
def test_the_example_and_every_builtin_family_pass_check_family(capsys):
    assert main(["check-family", f"{ROOT / 'examples' / 'gla.py'}:GatedLinearAttention", "--options",
                 '{"heads": 4}']) == 0
    out = capsys.readouterr().out
    assert "causality: no output depends on a later input" in out and "in float64" in out
    assert "admitted: 6 checks passed" in out
    for family in ("transformer", "mamba", "mamba2", "hybrid"):
        for label, factory in builtin_factories(family, 32, {}):
            report = admit(factory, 32)
            assert report.can_generate and len(report.lines) == 6, label


@pytest.mark.parametrize("cls, check, position", [
    ("FutureToken", "causality", 0), ("SmallLeak", "causality", 0), ("SequenceNorm", "causality", 0),
    ("ChunkBoundaryLeak", "causality", 15), ("SignLeak", "causality", 0), ("ForgetfulCache", "cache", 1),
    ("WrongShape", "contract", None), ("Unseeded", "determinism", None),
])
def test_check_family_refuses_each_broken_mixer_in_one_line_naming_the_check_and_position(cls, check, position,
                                                                                         capsys):
    assert main(["check-family", f"{MIXERS}:{cls}", "--d-model", "32"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("importing plugin")]
    assert len(err) == 1
    where = f" at position {position}:" if position is not None else " check failed:"
    assert f"{check} check failed" in err[0] and where in err[0], err[0]


def test_a_leak_of_one_thousandth_is_caught_by_the_jacobian_and_one_without_gradient_by_perturbation():
    with pytest.raises(AdmissionError, match=r"depends on the input at position \d+ .* x the largest"):
        admit(lambda: build_mixer(plugin("SmallLeak"), 16), 16)
    with pytest.raises(AdmissionError, match=r"changes when the input at position 1 changes"):
        admit(lambda: build_mixer(plugin("SignLeak"), 16), 16)


def test_a_mixer_without_a_cache_is_admitted_and_told_it_cannot_generate():
    report = admit(lambda: build_mixer(plugin("CausalConv"), 16), 16)
    assert not report.can_generate and "cannot generate" in report.lines[-1]


@pytest.mark.parametrize("args, message", [
    (["nowhere.py:Mixer"], "nowhere.py: mixer file not found"),
    (["transformer", "--options", "[1]"], "--options: expected a JSON object"),
    (["transformer", "--options", "{heads"], "--options: not JSON"),
    (["not a spec"], "SPEC: expected 'path/to/file.py:ClassName'"),
])
def test_check_family_bad_arguments_exit_2(args, message, capsys):
    assert main(["check-family", *args]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ FLOPs
def _measured_model_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the whole model with every mixer measured (flops_measure) plus the elementwise
    terms it would declare as a plugin (flops.UNCOUNTED_TERMS); the MLP and the LM head analytic."""
    layer = LAYERS[cfg.layer_kinds[0]](cfg)
    m = measure_mixer(layer.mixer(cfg.d_model, **layer.options).eval(), cfg.d_model, seq_len)
    terms = flops.forward_flops_terms(cfg, seq_len)
    per_layer = sum(v for k, v in terms.items() if k in flops.UNCOUNTED_TERMS or k == "mlp") / cfg.n_layer
    return cfg.n_layer * (m["counted"] + per_layer) + terms["lm_head"]


@pytest.mark.parametrize("family, kw", [
    ("transformer", {}),
    pytest.param("mamba", {}, marks=pytest.mark.skipif(not scan_cpu.available(),
                                                       reason="the fused scan (C compiler) keeps the scan's "
                                                              "internals out of the counter")),
    ("mamba2", {"ssd_impl": "chunked"}),
])
@pytest.mark.parametrize("d_model, seq_len", [(32, 16), (64, 64), (96, 200)])
def test_measured_flops_reproduce_the_analytic_counts_of_the_builtin_families(family, kw, d_model, seq_len):
    cfg = ModelConfig(family=family, d_model=d_model, n_layer=2, head_dim=16, **kw)
    analytic = flops.forward_flops_per_token(cfg, seq_len)
    assert _measured_model_flops(cfg, seq_len) == pytest.approx(analytic, rel=0.01)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_is_counted_over_the_keys_each_query_sees_with_softmax(causal):
    b, h, L, e = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, L, e) for _ in range(3))

    class Attend(torch.nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    keys = L * (L + 1) // 2 if causal else L * L
    assert count_forward(Attend(), e, L) * L == b * h * keys * (4 * e + 3)


def test_a_plugins_flops_are_the_measured_fit_plus_what_it_declares():
    cfg = tiny_cfg()
    summary = flops.flops_summary(cfg, 64)
    m = summary["measured"]
    assert summary["flops_convention"] == "measured-causal-3x" and m["lengths"] == [32, 64, 128]
    assert m["max_rel_residual"] < 1e-9 and m["declared"] > 0        # GLA's count is exactly a + b L
    mlp = 2 * 3 * cfg.d_model * cfg.ffn_dim
    forward = cfg.n_layer * (m["a"] + m["b"] * 64 + m["declared"] + mlp) + 2 * cfg.d_model * cfg.padded_vocab
    assert summary["train_flops_per_token"] == pytest.approx(3 * forward, rel=1e-12)


def test_measuring_a_plugin_leaves_the_global_random_stream_alone():
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    flops.flops_summary(tiny_cfg(d_model=40), 32)
    flops.param_counts(tiny_cfg(d_model=42))
    assert torch.equal(torch.rand(3), want)


# ------------------------------------------------------------------------------------------ sizing
def test_a_plugin_is_sized_within_two_percent_of_the_transformer_at_every_target():
    base = ModelConfig(family="transformer", d_model=16, n_layer=1, head_dim=16)
    targets = [2.5e4, 5e4, 1e5, 4e5, 1e6, 1e7]
    shapes = ladder_shapes(targets, ("transformer", "gla"), base, {"gla": GLA})
    for tf, gla in zip(shapes[::2], shapes[1::2]):
        assert abs(gla.params / tf.params - 1) <= PLUGIN_MATCH
        assert gla.n_layer == tf.n_layer                              # mixer + MLP ~ one transformer layer
        built = LM(base.replace(family="gla", d_model=gla.d_model, n_layer=gla.n_layer, mixer=GLA, d_ff=gla.d_ff))
        assert built.num_params() == gla.params


def test_plugin_depth_follows_its_mlp_branch_or_a_fixed_n_layer():
    base = ModelConfig(family="transformer", d_model=16, n_layer=1, head_dim=16)
    tf = shape_for("transformer", 1e6, base)
    assert shape_for("conv", 1e6, base, mixer=plugin("CausalConv", mlp=False)).n_layer == 2 * tf.n_layer
    assert shape_for("gla", 1e6, base, mixer=MixerSpec(GLA.target, GLA.options, n_layer=5)).n_layer == 5
    with pytest.raises(ValueError, match=r"plugin family coarse: .* \(more than 2%\); lower its width_multiple"):
        shape_for("coarse", 2.5e4, base, mixer=plugin("CausalConv", mlp=False, width_multiple=64))


def test_sizes_shows_the_plugin_families_of_a_config_beside_the_builtins(capsys):
    assert main(["sizes", "1e5", "--config", str(ROOT / "configs" / "tiny.yaml"), "--head-dim", "16",
                 "--seq-len", "64"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("1e+05")]
    assert [r[1] for r in rows] == ["transformer", "mamba", "mamba2", "hybrid", "gla"]
    gla = rows[-1]
    assert abs(float(gla[6]) - 1) <= PLUGIN_MATCH


# ------------------------------------------------------------------------------------------ configs
def _ladder(tmp_path, **extra) -> LadderConfig:
    """A study config in tmp/cfg/ whose plugin file sits one folder up (named relative to the config)."""
    import yaml
    (tmp_path / "byo_mixers.py").write_text(MIXERS.read_text())
    path = tmp_path / "cfg" / "study.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"name": "s", "budgets": [1e12], "sizes": [2.5e4], **extra, "custom_families": {
        "mine": {"mixer": "../byo_mixers.py:CausalConv", "mlp": False}}}))
    return load_ladder_config(path)


def test_a_relative_mixer_path_resolves_against_the_config_folder_and_families_default_to_all(tmp_path):
    cfg = _ladder(tmp_path)
    assert cfg.custom_families["mine"].mixer == f"{tmp_path / 'byo_mixers.py'}:CausalConv"
    assert cfg.families == ["transformer", "mamba", "mamba2", "hybrid", "mine"]
    assert cfg.mixers()["mine"].mlp is False


@pytest.mark.parametrize("raw, message", [
    ({"families": ["transformer", "theirs"]}, "families.1: unknown model family 'theirs'"),
    ({"custom_families": {"mamba": {"mixer": "m.py:M"}}}, "custom_families.mamba: a plugin family needs a name"),
    ({"custom_families": {"x": {"mixer": "m.py"}}}, "custom_families.x.mixer: expected 'path/to/file.py:ClassName'"),
    ({"custom_families": {"x": {"mixer": "m.py:M", "bogus": 1}}}, "custom_families.x.bogus: unknown key"),
    ({"families": ["transformer", "x"], "custom_families": {"x": {"mixer": "m.py:M"}},
      "sizes": [{"transformer": [32, 2]}]}, "sizes.0: explicit shapes name built-in families only"),
])
def test_bad_plugin_configs_are_refused_naming_the_key(raw, message):
    base = {"name": "s", "budgets": [1e10], "sizes": [2.5e4]}
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(LadderConfig, {**base, **raw}, "cfg.yaml")


def test_configs_without_plugins_dump_and_hash_as_before_and_plugin_code_changes_the_hash():
    cfg = validate(RunConfig, {"model": {"params": 1e5}, "train": {"tokens": 1e5}}, "x")
    assert "custom_families" not in cfg.model_dump(mode="json")
    assert config_hash(cfg) == config_hash(cfg, None) != config_hash(cfg, "ab" * 32)
    with pytest.raises(UserError, match="model.family: unknown model family 'mine'"):
        validate(RunConfig, {"model": {"family": "mine", "params": 1e5}, "train": {"tokens": 1e5}}, "x")


# ------------------------------------------------------------------------------- train and ladder
def _run_config(tmp_path, cls: str) -> RunConfig:
    return validate(RunConfig, {
        "name": "byo", "model": {"family": "mine", "d_model": 24, "n_layer": 2},
        "custom_families": {"mine": {"mixer": f"{MIXERS}:{cls}", "mlp": True}},
        "data": {"source": "stdlib", "max_bytes": 200_000, "cache_dir": str(tmp_path / "cache")},
        "train": {"tokens": 12 * 128, "seq_len": 32, "batch_size": 4, "eval_tokens": 1024, "eval_points": 0,
                  "progress": False}}, "x")


def test_a_plugin_run_records_its_mixer_code_and_a_leaky_one_is_refused_before_training(tmp_path):
    from ssmscale.train import run_training
    res = run_training(_run_config(tmp_path, "CausalConv"), tmp_path / "run")
    assert res["status"] == "ok" and res["family"] == "mine"
    sha = MixerSpec(f"{MIXERS}:CausalConv").sha256()
    assert res["mixer_sha256"] == sha == res["mixer"]["sha256"] and res["mixer"]["class"] == "CausalConv"
    assert res["flops_convention"] == "measured-causal-3x" and res["mixer"]["flops"]["counted"] > 0
    assert res["state_bytes"] is None and res["mixer"]["can_generate"] is False
    assert res["config_hash"] == config_hash(_run_config(tmp_path, "CausalConv"), sha)
    with pytest.raises(UserError, match="plugin family mine .* refused: causality check failed at position 0"):
        run_training(_run_config(tmp_path, "FutureToken"), tmp_path / "leaky")
    assert not (tmp_path / "leaky" / "result.json").exists()


def test_a_ladder_over_changed_plugin_code_says_which_runs_used_other_code(tmp_path, capsys):
    from ssmscale.study.plugins import other_code_runs, preflight
    cfg = _ladder(tmp_path, families=["transformer", "mine"])
    spec = cfg.mixers()["mine"]
    for run_id, sha, family in (("mine_a", spec.sha256(), "mine"), ("mine_b", "0" * 64, "mine"),
                                ("transformer_a", None, "transformer")):
        (tmp_path / "study" / "runs" / run_id).mkdir(parents=True)
        (tmp_path / "study" / "runs" / run_id / "result.json").write_text(json.dumps(
            {"status": "diverged", "family": family, "mixer_sha256": sha}))
    assert other_code_runs(tmp_path / "study", "mine", spec.sha256()) == {"mine_b": "0" * 64}
    from ssmscale.study.plan import plan
    preflight(cfg, tmp_path / "study", plan(cfg))
    out = capsys.readouterr()
    assert "plugin family mine: CausalConv from" in out.out and "admitted, 6 checks passed" in out.out
    assert "THE CODE CHANGED: 1 finished run(s) were trained with byo_mixers.py at sha256 000000000000" in out.err


def test_profile_says_a_family_without_a_cache_cannot_generate(tmp_path):
    from ssmscale.bench.profile import CANNOT_GENERATE, profile_models
    spec = plugin("CausalConv")
    rows, _, _ = profile_models(["conv"], {"conv": (32, 2, 1)}, [64, 128], ["generate"], mixers={"conv": spec},
                                repeats=1)
    assert [r["status"] for r in rows] == [CANNOT_GENERATE] * 2
    assert "no allocate_cache" in rows[0]["error"]


def test_profile_from_the_command_line_times_a_plugin_family_its_config_names(tmp_path, capsys):
    _ladder(tmp_path)
    out = tmp_path / "prof"
    assert main(["profile", str(tmp_path / "cfg" / "study.yaml"),
                 "--op", "model", "--families", "mine", "--d-model", "32", "--n-layer", "2", "--seq-lens", "32",
                 "--modes", "train", "--repeats", "1", "--out", str(out)]) == 0
    import pandas as pd
    rows = pd.read_csv(out / "profile.csv")
    assert list(rows["family"]) == ["mine"] and list(rows["status"]) == ["ok"]


# ----------------------------------------------------------------------- fit and report run nothing
MARKER_MIXER = '''
from pathlib import Path
Path(__file__).with_suffix(".imported").write_text("this file was imported")
import torch
class Mixer(torch.nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.lin = torch.nn.Linear(d_model, d_model)
    def forward(self, x, cache=None):
        return self.lin(x)
'''


def _marker_study(tmp_path, mixer: str | None = None):
    """A fitted-size study (synthetic results) whose config.yaml names a plugin family `mine`; the plugin file
    sits inside the study and leaves a marker beside itself when imported. `mixer`: what the config names
    (default: that file, relative to the study)."""
    import yaml
    from synthetic_study import SMALL_LM_LAWS, make_study
    study = make_study(tmp_path, "withplugin", laws={"transformer": SMALL_LM_LAWS["transformer"],
                                                      "mine": SMALL_LM_LAWS["mamba"]},
                       budgets=(1e13, 1e14, 1e15), profile=False)
    plugin_file = study / "marker_mixer.py"
    plugin_file.write_text(MARKER_MIXER)
    cfg = yaml.safe_load((study / "config.yaml").read_text())
    cfg.pop("note")                                        # as the ladder writes it: a valid ladder config
    cfg.update(sizes=[2.5e4, 5e4], custom_families={"mine": {"mixer": mixer or "marker_mixer.py:Mixer"}})
    (study / "config.yaml").write_text(yaml.safe_dump(cfg))
    return study, plugin_file.with_suffix(".imported")


def test_fit_report_forecast_and_a_dry_run_of_a_study_never_import_its_plugin_and_train_does(tmp_path, monkeypatch,
                                                                                              capsys):
    from ssmscale.fit import laws
    monkeypatch.setattr(laws, "CHINCHILLA_GRID", laws.CHINCHILLA_GRID[::90])      # speed: Approach 3 is not checked
    study, marker = _marker_study(tmp_path)
    assert main(["fit", str(study), "--n-boot", "4", "--jobs", "1", "--no-progress", "--out", str(tmp_path / "fit")]) == 0
    assert main(["report", str(study), "--n-boot", "4", "--no-progress", "--out", str(tmp_path / "report")]) == 0
    assert main(["forecast", str(study), "--budgets", "1e16", "--n-boot", "4", "--jobs", "1", "--no-progress"]) == 0
    assert main(["ladder", str(study / "config.yaml"), "--dry-run", "--out", str(tmp_path / "plan")]) == 2
    out = capsys.readouterr()
    assert "--dry-run: this config lies in a study or run folder and names plugin families (mine)" in out.err
    assert "importing plugin" not in out.out + out.err
    assert "multiplier" in json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert (tmp_path / "report" / "report.md").is_file() and list((study / "forecasts").glob("forecast-*.json"))
    assert not marker.exists() and not (tmp_path / "plan").exists()
    # training is running the code, on purpose: a run config of the user's naming the same file imports it
    import yaml
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(yaml.safe_dump({
        "name": "marker", "model": {"family": "mine", "d_model": 16, "n_layer": 1, "head_dim": 8},
        "custom_families": {"mine": {"mixer": f"{study / 'marker_mixer.py'}:Mixer"}},
        "data": {"source": "synthetic", "synthetic": {"vocab_size": 32, "num_examples": 64, "num_kv_pairs": 2}},
        "train": {"tokens": 4 * 4 * 16, "seq_len": 16, "batch_size": 4, "eval_tokens": 256, "eval_points": 0,
                  "progress": False}}))
    assert main(["train", str(run_cfg), "--out", str(tmp_path / "run")]) == 0
    assert marker.exists() and "importing plugin mixer Mixer from" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["absolute", "dotdot", "module", "link"])
def test_a_study_config_cannot_point_the_tool_at_plugin_code_outside_its_folder(tmp_path, capsys, where):
    from test_untrusted_input import one_error_line
    outside = tmp_path / "elsewhere.py"
    outside.write_text(MARKER_MIXER)
    mixer = {"absolute": f"{outside}:Mixer", "dotdot": "../../elsewhere.py:Mixer", "module": "json.decoder:Mixer",
             "link": "inside.py:Mixer"}[where]
    study, marker = _marker_study(tmp_path, mixer)
    (study / "inside.py").symlink_to(outside)
    assert main(["ladder", str(study / "config.yaml"), "--out", str(tmp_path / "resumed")]) == 2
    said = one_error_line(capsys)
    assert f"{study / 'config.yaml'}: custom_families.mine.mixer: this config lies in the study or run folder" in said
    assert "To run that code, name it yourself: --set custom_families.mine.mixer=" in said
    # a run's saved config in the study is held to the same rule (train runs the code it names)
    (study / "runs" / "r").mkdir(parents=True, exist_ok=True)
    mixer = mixer if where in ("absolute", "module") else f"../../{mixer}"      # relative to runs/r/
    (study / "runs" / "r" / "config.yaml").write_text(
        f"model: {{family: mine, params: 1e5}}\ntrain: {{tokens: 1e5}}\ncustom_families: {{mine: {{mixer: '{mixer}'}}}}\n")
    assert main(["train", str(study / "runs" / "r" / "config.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "custom_families.mine.mixer: this config lies in the study or run folder" in one_error_line(capsys)
    assert not marker.exists() and not outside.with_suffix(".imported").exists()
    assert not (tmp_path / "resumed").exists() and not (tmp_path / "r").exists()


def test_code_a_user_names_is_theirs_to_run_and_a_config_of_their_own_may_point_anywhere(tmp_path, capsys):
    from ssmscale.config.origin import check_plugin_origin, shared_folder
    study, marker = _marker_study(tmp_path, f"{tmp_path / 'elsewhere.py'}:Mixer")
    (tmp_path / "elsewhere.py").write_text(MARKER_MIXER)
    cfg_path = study / "config.yaml"
    cfg = load_ladder_config(cfg_path, {"custom_families.mine.mixer": f"{tmp_path / 'elsewhere.py'}:Mixer"})
    check_plugin_origin(cfg, cfg_path, {"custom_families.mine.mixer": "x"})      # named on the command line
    assert shared_folder(cfg_path) == study and shared_folder(study / "runs" / "any" / "config.yaml") == study
    own = tmp_path / "configs" / "mine.yaml"                 # the user's own folder: ../ and absolute paths alike
    own.parent.mkdir()
    own.write_text(cfg_path.read_text())
    assert shared_folder(own) is None and load_ladder_config(own).custom_families["mine"].mixer.startswith(str(tmp_path))
    assert not marker.exists()

