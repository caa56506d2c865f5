"""export_run: a finished run -> a new folder in a format other tools load, checked equal before it appears.

The folder is written under a hidden temporary name beside OUT_DIR, loaded back and compared with the
run's own model, and only then renamed to OUT_DIR: a failed or refused export leaves nothing that
looks finished. Refusals that need no weights (family, tokenizer, OUT_DIR) come before anything heavy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from ..fsutil import _umask, atomic_write_json, check_writable_dir
from . import hf
from .run import FinishedRun, load_run_weights, read_run, run_tokenizer

FORMATS = ("hf",)
PROVENANCE_FILE = "ssmscale_export.json"


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; export writes a new one")
    check_writable_dir(out, "OUT_DIR")


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "hf", quiet: bool = False) -> dict:
    """Export the finished run in `run_dir` to the new folder `out_dir`; returns what was written and
    the check's max relative logit difference (see hf.py for what equal means). `quiet`: silence
    transformers' progress bars and notes for the rest of the process (the command line sets it)."""
    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    out = Path(out_dir)
    check_out_dir(out)
    run = read_run(run_dir)
    if (why := hf.refusal(run.model)) is not None:
        raise UserError(f"{run.path}: {why}")
    if importlib.util.find_spec("transformers") is None:
        raise UserError("--format hf: needs transformers (pip install 'ssmscale[hf]')")
    tokenizer = run_tokenizer(run)
    state = load_run_weights(run)
    if quiet:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    return _write_hf(run, state, tokenizer, out)


def _write_hf(run: FinishedRun, state: dict, tokenizer, out: Path) -> dict:
    import torch
    import transformers

    from .. import __version__
    from ..models.lm import LM
    from ..provenance import git_commit
    from .hf_tokenizer import hf_tokenizer
    ours = LM(run.model)
    ours.load_state_dict(state)
    model = hf.build_model(state, run.model, tokenizer.separator_id, run.seq_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        hf_tokenizer(tokenizer, run.seq_len).save_pretrained(tmp)
        diff = hf.check_folder(tmp, ours, run.model)
        if not diff <= hf.MAX_REL_DIFF:
            raise UserError(f"{run.path}: the exported model's logits differ from the run's by {diff:.2e} "
                            f"(relative; at most {hf.MAX_REL_DIFF:g} allowed): nothing written")
        summary = {
            "run": run.label, "run_dir": str(run.path), "family": run.model.family,
            "class": hf.class_name(run.model), "tokenizer": tokenizer.name, "seq_len": run.seq_len,
            "config_hash": run.result.get("config_hash"), "loss": run.result.get("loss"),
            "bpb": run.result.get("bpb"),
            "check": {"tokens": [hf.CHECK_BATCH, hf.CHECK_LEN], "max_rel_logit_diff": diff},
            "versions": {"ssmscale": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "commit": git_commit(),
        }
        atomic_write_json(tmp / PROVENANCE_FILE, summary)
        for path in (tmp, *tmp.iterdir()):      # mkdtemp makes 0700, save_pretrained some files 0600
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
        os.rename(tmp, out)                      # replaces an empty OUT_DIR; refuses a non-empty one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "out": str(out)}
