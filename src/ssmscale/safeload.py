"""Reading back files this process did not just write: checkpoints, weights and a study's JSON files.

Study directories are shared and copied between people and clusters, so whatever is read from one
must neither run code nor crash the reader:
- torch files load weights-only (tensors and plain containers: a pickle that names any other
  function or class, such as os.system, is refused before anything is called). A Lightning
  checkpoint of this loop needs no type beyond those, so no extra type is allowed;
- JSON must be UTF-8 JSON of the expected shape (result_problem says what a result.json must hold).
Every problem comes back as one line of text (FileRefused), never as an exception from inside a parser.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

RESULT_STATUSES = ("ok", "diverged", "failed")
# what a finished run's result.json must hold to be used (ladder resume, results.csv, `train` refusing to redo it)
_OK_FINITE = ("loss",)          # bpb is null where the data has no bytes (MQAR)
_OK_POSITIVE = ("params", "tokens", "flops", "lr")
_NUMBERS_OR_NULL = ("loss", "bpb", "lr", "params", "params_total", "tokens", "steps", "flops", "wall_s",
                    "tokens_per_s", "budget")


class FileRefused(Exception):
    """A file that is missing, unreadable, unsafe or of the wrong shape; str() is one line naming it."""


def load_torch(path: str | os.PathLike):
    """torch.load(path) weights-only, on the CPU; FileRefused (one line) for anything else in it."""
    import pickle

    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
        why = next((s for s in lines if "GLOBAL" in s or "Unsupported" in s), lines[0] if lines else "")
        raise FileRefused(f"{path}: refused, not a plain weights file ({why.rstrip('.')})") from None
    except OSError as exc:
        raise FileRefused(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:           # a truncated or foreign file: zip, struct and runtime errors alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileRefused(f"{path}: unreadable ({first})") from None


# what a Lightning checkpoint of train.py holds, by type (Lightning reads every one of them when resuming)
_CHECKPOINT_KEYS = {"epoch": int, "global_step": int, "state_dict": dict, "loops": dict, "callbacks": dict,
                    "optimizer_states": list, "lr_schedulers": list}


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint of train.py, loaded weights-only and checked for what resuming reads."""
    ckpt = load_torch(path)
    wrong = [k for k, kind in _CHECKPOINT_KEYS.items()
             if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k), kind) or isinstance(ckpt.get(k), bool)]
    if wrong or ckpt["global_step"] < 0:
        raise FileRefused(f"{path}: refused, not a checkpoint of this training loop "
                          f"({', '.join(wrong) or 'global_step'} missing or of the wrong type)")
    return ckpt


def state_dict_mismatch(saved: dict, expected: dict) -> str | None:
    """Why the weights `saved` cannot be loaded into a model whose state dict is `expected` (None: they can)."""
    import torch
    for name, tensor in expected.items():
        got = saved.get(name)
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else "missing"
            return f"its weights are of another model ({name}: {shape}, this model: {tuple(tensor.shape)})"
    extra = sorted(set(saved) - set(expected))
    return f"its weights are of another model ({extra[0]} is not in this model)" if extra else None


def load_weights(path: str | os.PathLike) -> dict:
    """A model.pt written by train.py: a state dict of tensors, loaded weights-only."""
    import torch
    state = load_torch(path)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise FileRefused(f"{path}: refused, not a state dict of tensors")
    return state


def read_json(path: str | os.PathLike):
    """The JSON value in `path` (UTF-8); FileNotFoundError if absent, FileRefused if unreadable or not JSON."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FileRefused(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FileRefused(f"{path}: not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError):
        raise FileRefused(f"{path}: not valid JSON") from None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def result_problem(res) -> str | None:
    """Why a parsed result.json cannot count as an ended run (None when it can)."""
    if not isinstance(res, dict):
        return f"holds a JSON {type(res).__name__}, not an object"
    status = res.get("status")
    if status not in RESULT_STATUSES:
        return f"status {status!r} is none of {', '.join(RESULT_STATUSES)}"
    for key in _NUMBERS_OR_NULL:
        if res.get(key) is not None and not _number(res[key]):
            return f"{key} {res[key]!r} is not a number"
    if "message" in res and not isinstance(res["message"], str):
        return "message is not text"
    if status == "ok":
        for key in _OK_FINITE:
            if not _number(res.get(key)) or not math.isfinite(res[key]):
                return f"status ok but {key} is {res.get(key)!r}, not a finite number"
        for key in _OK_POSITIVE:
            if not _number(res.get(key)) or not 0 < res[key] < math.inf:
                return f"status ok but {key} is {res.get(key)!r}, not a positive number"
    return None


def read_result(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """(result, None) for a well-formed result.json, (None, None) when there is none, (None, why) otherwise."""
    try:
        res = read_json(path)
    except FileNotFoundError:
        return None, None
    except FileRefused as exc:
        return None, str(exc)
    problem = result_problem(res)
    return (None, f"{path}: {problem}") if problem else (res, None)
