"""Export to Hugging Face: the exported model equals ours (logits and greedy generation), the tokenizer
encodes like ours, a trained run goes through `ssmscale export`, and bad input is refused in one line
with nothing written. transformers is imported only here and in ssmscale.export."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
import transformers  # noqa: E402

from ssmscale.cli import main  # noqa: E402
from ssmscale.data.tokenizer import ByteTokenizer  # noqa: E402
from ssmscale.export import hf  # noqa: E402
from ssmscale.export.hf_tokenizer import hf_tokenizer  # noqa: E402
from ssmscale.models import LM, ModelConfig  # noqa: E402
from ssmscale.models.sizing import shape_for  # noqa: E402
from ssmscale.train import run_training  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_config  # noqa: E402
from test_untrusted_input import _plant, one_error_line, within_seconds  # noqa: E402, F401

TEXTS = ["The quick brown fox.", "naïve café, 日本語 and 🙂", "  two  spaces\n\ttab\r\n", "", "Āā Ē (U+0100)",
         "def f(x):\n    return x ** 2  # it's\n", "a\x00b\x00\x00c"]
BASE = ModelConfig(family="transformer", d_model=16, n_layer=1, head_dim=16)     # configs/small.yaml's head_dim


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing may come from a hub: transformers and huggingface_hub refuse any network access."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def ladder_shape(family: str, target: float, **knobs) -> ModelConfig:
    s = shape_for(family, target, BASE)
    return ModelConfig(family=family, d_model=s.d_model, n_layer=s.n_layer, head_dim=16, **knobs)


def trained_like(cfg: ModelConfig) -> LM:
    """A model of `cfg` whose every parameter is moved off its initial value (norm gains, D and biases too)."""
    torch.manual_seed(1)
    model = LM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * p.abs().mean() * torch.randn_like(p) + 0.02 * torch.randn_like(p))
    return model


def exported(model: LM, folder: Path):
    hf.build_model(model.state_dict(), model.cfg, separator_id=0, seq_len=64).save_pretrained(folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def assert_equal_to_ours(ours: LM, theirs, vocab: int):
    tokens = torch.randint(0, vocab, (3, 41), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert hf.max_rel_diff(ours(tokens), theirs(tokens).logits) < hf.MAX_REL_DIFF
    prompt = tokens[:, :7]
    mine = ours.generate(prompt, max_new_tokens=16)
    theirs_ = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                              eos_token_id=None)       # ours does not stop at the separator either
    assert torch.equal(theirs_, mine)


LADDER_SHAPES = [
    ("transformer", 2.5e4, {}), ("transformer", 2e5, {}),
    ("mamba", 2.5e4, {}), ("mamba", 2e5, {}),
    ("mamba2", 2.5e4, {}),                      # 28 wide: 7 heads of 8 = expand x d_model -> Mamba2
    ("mamba2", 5e4, {}),                        # 42 wide: 11 heads of 8 = 88 != 84 -> NemotronH
    ("mamba2", 2e5, {"mamba2_ngroups": 2}),     # 90 wide, 2 groups: 22 heads = 176 != 180 -> NemotronH
    ("mamba2", 1e5, {"mamba2_ngroups": 2}),     # 60 wide, 2 groups: 16 heads = 128 != 120 -> NemotronH
    ("mamba2", 2.5e4, {"mamba2_ngroups": 2, "vocab_size": 300}),   # padded vocabulary (304 rows)
]


@pytest.mark.parametrize("family,target,knobs", LADDER_SHAPES)
def test_an_exported_ladder_shape_gives_our_logits_and_our_greedy_continuation(tmp_path, family, target, knobs):
    cfg = ladder_shape(family, target, **knobs)
    ours = trained_like(cfg)
    theirs = exported(ours, tmp_path / "hf")
    assert type(theirs).__name__ == hf.class_name(cfg)
    assert_equal_to_ours(ours, theirs, cfg.vocab_size)


def test_mamba2_goes_to_mamba2_where_its_inner_width_is_expand_times_d_model_else_to_nemotron_h():
    assert hf.class_name(ladder_shape("mamba2", 1e5)) == "Mamba2ForCausalLM"          # 60 wide: 120 = 15 x 8
    assert hf.class_name(ladder_shape("mamba2", 2e5)) == "NemotronHForCausalLM"       # 90 wide: 184 = 23 x 8


def test_the_head_stays_tied_where_the_class_ties_it_and_is_a_copy_where_it_cannot(tmp_path):
    for cfg, tied in ((ladder_shape("transformer", 2.5e4), True), (ladder_shape("mamba2", 5e4), False)):
        theirs = exported(trained_like(cfg), tmp_path / cfg.family / str(cfg.d_model))
        head, embedding = theirs.get_output_embeddings().weight, theirs.get_input_embeddings().weight
        assert (head is embedding) == tied and torch.equal(head, embedding)


def test_padded_vocabulary_rows_are_kept_and_never_generated():
    cfg = ladder_shape("transformer", 2.5e4, vocab_size=300)
    gen = hf.generation_config(cfg, separator_id=0)
    assert cfg.padded_vocab == 304 and gen.suppress_tokens == [300, 301, 302, 303]
    assert hf.hf_config(cfg, 0, 64).vocab_size == 304


def test_the_byte_tokenizer_exports_as_one_that_encodes_and_decodes_like_ours(tmp_path):
    hf_tokenizer(ByteTokenizer(), model_max_length=128).save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = ByteTokenizer()
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text)
        assert theirs.decode(ids) == ours.decode(ids) == text
    invalid = [0xFF, 0xC3, 0x28, 0xE2, 0x82, 0x41, 0xF0, 0x9F, 0x98, 0xED, 0xA0, 0x80, 0]
    assert theirs.decode(invalid) == ours.decode(invalid)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (0, 0, 0)    # the separator
    assert len(theirs) == 256 and theirs.model_max_length == 128


# ------------------------------------------------------------------- a trained run through `ssmscale export`
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny finished runs: a Mamba with the byte tokenizer, a transformer with a BPE (vocabulary 300)."""
    root = tmp_path_factory.mktemp("runs")
    byte = root / "mamba"
    run_training(tiny_config(root, family="mamba"), byte)
    raw = tiny_config(root, family="transformer").model_dump(mode="json")
    raw["tokenizer"] = {"kind": "bpe", "vocab_size": 300}
    from ssmscale.config import RunConfig, validate
    bpe = root / "bpe"
    run_training(validate(RunConfig, raw, "test"), bpe)
    return {"byte": byte, "bpe": bpe, "cache": root / "cache"}


def our_model(run: Path) -> LM:
    res = json.loads((run / "result.json").read_text())
    model = LM(ModelConfig(**res["model_config"])).eval()
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    return model


def test_a_trained_run_exports_through_the_cli_and_loads_equal_with_its_tokenizer(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(trained["byte"]), str(out)]) == 0
    said = capsys.readouterr().out
    assert "as MambaForCausalLM" in said and "within" in said
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "ssmscale_export.json"):
        assert (out / name).is_file(), name
    ours = our_model(trained["byte"])
    assert_equal_to_ours(ours, transformers.AutoModelForCausalLM.from_pretrained(out).eval(), 256)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert all(tokenizer(t)["input_ids"] == ByteTokenizer().encode(t) for t in TEXTS)
    assert json.loads((out / "ssmscale_export.json").read_text())["check"]["max_rel_logit_diff"] < hf.MAX_REL_DIFF
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]                  # no temporary folder left


def test_a_bpe_run_exports_its_own_tokenizer_with_the_separator_as_special_token(trained, tmp_path, monkeypatch):
    from ssmscale.data.tokenizer import load_bpe
    monkeypatch.setenv("SSMSCALE_CACHE", str(tmp_path / "elsewhere"))     # the run's config names its cache
    out = tmp_path / "hf"
    assert main(["export", str(trained["bpe"]), str(out)]) == 0
    ours = load_bpe(next((trained["cache"] / "tokenizers").glob("bpe-300-*.json")), 300)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert theirs.decode(ids) == ours.decode(ids)
    assert theirs.eos_token_id == ours.separator_id
    assert transformers.GenerationConfig.from_pretrained(out).suppress_tokens == [300, 301, 302, 303]
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert_equal_to_ours(our_model(trained["bpe"]), model, 300)


def test_best_picks_the_finished_run_of_the_family_with_the_lowest_loss(trained, tmp_path, capsys):
    study = tmp_path / "study"
    for name, loss, status in (("a", 2.0, "ok"), ("b", 1.5, "ok"), ("c", 0.5, "diverged")):
        run = shutil.copytree(trained["byte"], study / "runs" / name)
        res = json.loads((run / "result.json").read_text())
        (run / "result.json").write_text(json.dumps({**res, "loss": loss, "status": status}))
    assert main(["export", str(study), str(tmp_path / "hf"), "--best", "mamba"]) == 0
    assert f"best mamba run of {study}: {study / 'runs' / 'b'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "ssmscale_export.json").read_text())["run_dir"] == str(study / "runs" / "b")
    assert main(["export", str(study), str(tmp_path / "hf2"), "--best", "transformer"]) == 2
    assert "no finished transformer run" in one_error_line(capsys)


def test_best_passes_over_a_run_folder_or_result_that_links_out_of_the_study(trained, tmp_path, capsys):
    study, outside = tmp_path / "study", tmp_path / "outside"
    for name, loss in (("a", 2.0), ("best_elsewhere", 0.1), ("linked_result", 0.2)):
        run = shutil.copytree(trained["byte"], (outside if name == "best_elsewhere" else study / "runs") / name)
        res = json.loads((run / "result.json").read_text())
        (run / "result.json").write_text(json.dumps({**res, "loss": loss}))
    (study / "runs" / "z").symlink_to(outside / "best_elsewhere")               # a linked run folder
    (study / "runs" / "linked_result" / "result.json").rename(outside / "result.json")
    (study / "runs" / "linked_result" / "result.json").symlink_to(outside / "result.json")
    assert main(["export", str(study), str(tmp_path / "hf"), "--best", "mamba"]) == 0
    assert f"best mamba run of {study}: {study / 'runs' / 'a'}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- bad input
def copied_run(trained, tmp_path) -> Path:
    return shutil.copytree(trained["byte"], tmp_path / "run")


def edit_result(run: Path, **changes):
    res = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(json.dumps({**res, **changes}))


def unfinished(run, tmp_path):
    (run / "result.json").unlink()


def diverged(run, tmp_path):
    edit_result(run, status="diverged", message="loss is nan at step 3")


def no_weights(run, tmp_path):
    (run / "model.pt").unlink()


def planted_weights(run, tmp_path):
    _plant(run / "model.pt", tmp_path / "pwned")


def other_model(run, tmp_path):
    torch.save({"embedding.weight": torch.zeros(3, 5)}, run / "model.pt")


def linked_weights(run, tmp_path):
    (run / "model.pt").rename(tmp_path / "elsewhere.pt")
    (run / "model.pt").symlink_to(tmp_path / "elsewhere.pt")


def fifo_weights(run, tmp_path):
    (run / "model.pt").unlink()
    os.mkfifo(run / "model.pt")


def fifo_result(run, tmp_path):
    (run / "result.json").unlink()
    os.mkfifo(run / "result.json")


def plugin_family(run, tmp_path):
    res = json.loads((run / "result.json").read_text())
    (tmp_path / "plugin.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    edit_result(run, family="mine", model_config={**res["model_config"], "family": "mine",
                                                   "mixer": {"target": f"{tmp_path / 'plugin.py'}:M"}})


def hybrid(run, tmp_path):
    res = json.loads((run / "result.json").read_text())
    edit_result(run, model_config={**res["model_config"], "family": "hybrid"})


def occupied_out(run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")


@pytest.mark.parametrize("spoil,said", [
    (unfinished, "no result.json, the run did not finish"),
    (diverged, "the run ended diverged (loss is nan at step 3); only a finished run can be exported"),
    (no_weights, "model.pt: missing"),
    (planted_weights, "refused, not a plain weights file"),
    (other_model, "refused, its weights are of another model"),
    (linked_weights, "model.pt: a link out of"),
    (fifo_weights, "model.pt: a FIFO, not a regular file; refused"),
    (fifo_result, "result.json: a FIFO, not a regular file; refused"),
    (plugin_family, "family 'mine': not exportable (a plugin family"),
    (hybrid, "family hybrid: not exportable to Hugging Face (no transformers class has the hybrid's structure"),
    (occupied_out, "exists and is not an empty folder"),
])
def test_bad_input_exits_2_in_one_line_and_writes_nothing(trained, tmp_path, capsys, within_seconds, spoil, said):
    run = copied_run(trained, tmp_path)
    spoil(run, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(run), str(tmp_path / "out")]) == 2
    assert said in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before          # no OUT_DIR, no temporary folder
    assert not (tmp_path / "pwned").exists()
    if spoil is occupied_out:
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_an_unknown_format_exits_2_in_one_line(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", str(trained["byte"]), str(tmp_path / "out"), "--format", "onnx"])
    assert stop.value.code == 2
    assert "invalid choice: 'onnx'" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
