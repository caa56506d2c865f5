"""A finished run as export reads it: its result, model shape, weights (weights-only) and tokenizer;
and which run of a study is the best of a family.

Everything here is read from files that may come from elsewhere (a copied study folder), through safeload
(regular files of bounded size, no FIFO waited on, no link out of the run or study folder followed):
result.json and config.yaml from inside the run folder, model.pt weights-only, the BPE from this machine's
tokenizer cache (where training put it) checked against the token cache's meta.json that recorded its
sha256. A plugin family is refused from its result.json alone: export never imports plugin code. Every
problem is one line (UserError) naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, shorten
from ..fsutil import is_plain_name
from ..models.config import FAMILIES, ModelConfig
from ..safeload import FileRefused, read_json, read_result


@dataclass(frozen=True)
class FinishedRun:
    path: Path
    result: dict
    model: ModelConfig

    @property
    def seq_len(self) -> int:
        return int(self.result["seq_len"])

    @property
    def label(self) -> str:
        return str(self.result.get("run_id") or self.path.name)


def read_run(run_dir: str | Path) -> FinishedRun:
    """The run in `run_dir`, which must have ended ok (result.json says so and records its model)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path}: not a run directory")
    res, problem = read_result(path / "result.json", within=path)
    if problem:
        raise UserError(problem)
    if res is None:
        raise UserError(f"{path}: no result.json, the run did not finish (train or resume it first)")
    if res["status"] != "ok":
        why = f" ({res['message']})" if res.get("message") else ""
        raise UserError(f"{path}: the run ended {res['status']}{why}; only a finished run can be exported")
    spec = res.get("model_config")
    if not isinstance(spec, dict):
        raise UserError(f"{path / 'result.json'}: model_config is not a mapping of a model's settings")
    if spec.get("family") not in FAMILIES:      # before ModelConfig, which would describe a plugin's mixer
        raise UserError(f"{path}: family {shorten(spec.get('family'))}: not exportable (a plugin family or "
                        "none this ssmscale builds; export builds built-in families only and imports no plugin)")
    seq_len = res.get("seq_len")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise UserError(f"{path / 'result.json'}: seq_len {seq_len!r} is not a positive whole number")
    try:
        model = ModelConfig(**spec)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path / 'result.json'}: model_config is not a model this ssmscale builds ({exc})") from None
    return FinishedRun(path, res, model)


def load_run_weights(run: FinishedRun) -> dict:
    """model.pt of the run, weights-only, checked to be exactly the state dict of its model."""
    import torch

    from ..models.lm import LM
    from ..safeload import load_weights, state_dict_mismatch
    path = run.path / "model.pt"
    if not os.path.lexists(path):
        raise UserError(f"{path}: missing (studies do not commit weights; retrain the run with "
                        f"`ssmscale train {run.path / 'config.yaml'} --out DIR` and export DIR)")
    try:
        state = load_weights(path, within=run.path)
    except FileRefused as exc:
        raise UserError(str(exc)) from None
    with torch.device("meta"):
        expected = LM(run.model).state_dict()
    problem = state_dict_mismatch(state, expected)
    if problem:
        raise UserError(f"{path}: refused, {problem}")
    return state


def run_tokenizer(run: FinishedRun):
    """The tokenizer the run trained with: the byte tokenizer, or its BPE from this machine's cache."""
    from ..data.tokenizer import ByteTokenizer
    data = run.result.get("data") if isinstance(run.result.get("data"), dict) else {}
    name = data.get("tokenizer")
    if name == "byte":
        return ByteTokenizer()
    if isinstance(name, str) and name.startswith("bpe-"):
        return _bpe_of(run, data)
    raise UserError(f"{run.path}: tokenizer {name!r} is not text (a synthetic-token run such as MQAR); "
                    "there is no tokenizer to export with it")


def _bpe_of(run: FinishedRun, data: dict):
    """The cached BPE trained on the run's corpus split (the file training loaded: data/tokenizer.py)."""
    from ..config import load_run_config
    from ..data.corpus import SPLIT_RULE, split_key
    from ..data.tokenizer import bpe_path, load_bpe
    from ..data.tokens import cache_root
    result_file = run.path / "result.json"
    fingerprint, fraction = data.get("corpus_fingerprint"), data.get("val_fraction")
    if data.get("split_rule") != SPLIT_RULE or not isinstance(fingerprint, str) or not isinstance(fraction, float):
        raise UserError(f"{result_file}: data does not record the corpus split this ssmscale keys BPEs by")
    root = cache_root(load_run_config(run.path / "config.yaml", within=run.path).data.cache_dir)
    chunk_bytes = data.get("chunk_bytes")
    if chunk_bytes is not None and not isinstance(chunk_bytes, int):
        raise UserError(f"{result_file}: data.chunk_bytes is not a whole number")
    path = bpe_path(root, run.model.vocab_size, split_key(fingerprint, fraction, chunk_bytes))
    if not path.is_file():
        raise UserError(f"{path}: the run's BPE tokenizer is not in this machine's cache; copy it there from "
                        "the machine that trained the run")
    try:
        tok = load_bpe(path, run.model.vocab_size)
    except Exception as exc:  # noqa: BLE001 - tokenizers reports a bad file as a plain Exception
        raise UserError(f"{path}: unreadable BPE tokenizer ({type(exc).__name__})") from None
    recorded = _recorded_tokenizer_sha256(root, data.get("fingerprint"))
    if recorded is not None and recorded != tok.sha256:
        raise UserError(f"{path}: not the BPE the run's token cache was made with (sha256 differs)")
    return tok


def _recorded_tokenizer_sha256(root: Path, fingerprint) -> str | None:
    """The tokenizer sha256 the run's token cache recorded (None if that cache is not here)."""
    if not isinstance(fingerprint, str) or not fingerprint.isalnum():
        return None
    try:
        meta = read_json(root / "tokens" / fingerprint / "meta.json")
    except (FileNotFoundError, FileRefused):
        return None
    sha = meta.get("tokenizer_sha256") if isinstance(meta, dict) else None
    return sha if isinstance(sha, str) else None


def best_run(study_dir: str | Path, family: str) -> Path:
    """The run folder of `study_dir` whose finished `family` run has the lowest validation loss (run folders
    only: a link in runs/, or a name that is not a plain one, is passed over)."""
    study = Path(study_dir)
    runs = study / "runs"
    if not runs.is_dir():
        raise UserError(f"{study}: not a study folder (no runs/)")
    best = None
    for folder in sorted(p for p in runs.iterdir() if is_plain_name(p.name) and not p.is_symlink() and p.is_dir()):
        res, _ = read_result(folder / "result.json", within=study)
        if res is None or res["status"] != "ok" or res.get("family") != family:
            continue
        if best is None or res["loss"] < best[0]:
            best = (res["loss"], folder)
    if best is None:
        raise UserError(f"{study}: no finished {family} run (runs/*/result.json with status ok)")
    return best[1]
