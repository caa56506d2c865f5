"""Reading back files this process did not just write: checkpoints, weights, a study's JSON and CSV files,
configs, caches, and any file a user names.

Study directories are shared and copied between people and clusters, so whatever is read from one
must neither run code, nor hang, nor crash the reader:
- every file is opened by open_regular: a regular file only (a FIFO, device, socket or folder is refused
  before a byte is read, and O_NONBLOCK keeps a FIFO from blocking the open itself), no larger than the
  cap of its kind (CAPS: /dev/zero or a 50 GB file is refused, not read until memory runs out), and, when
  read from inside a folder (`within`: a study, a run), not through a link that leaves that folder;
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
import stat
from pathlib import Path

# The most bytes a file of each kind may hold: far beyond what the tool writes (a result.json is a few KB,
# results.csv ~600 bytes a run, a config a few KB), far below what would exhaust a machine's memory
CAPS = {
    "json": 64 << 20,           # result.json, fit.json, profile.json, the token cache's meta.json
    "csv": 256 << 20,           # results.csv, plan.csv, profile.csv, metrics.csv, a CSV of runs, --throughput-from
    "yaml": 1 << 20,            # a config, before it is parsed (100,000 values, load.py's other bound)
    "text": 16 << 20,           # config.yaml shown verbatim in a report, the tail of a job's log
    "checkpoint": 1 << 40,      # checkpoints/last.ckpt, model.pt
}
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symbolic link"}


RESULT_STATUSES = ("ok", "diverged", "failed")
# what a finished run's result.json must hold to be used (ladder resume, results.csv, `train` refusing to redo it)
_OK_FINITE = ("loss",)          # bpb is null where the data has no bytes (MQAR)
_OK_POSITIVE = ("params", "tokens", "flops", "lr")
_NUMBERS_OR_NULL = ("loss", "bpb", "lr", "params", "params_total", "tokens", "steps", "flops", "wall_s",
                    "tokens_per_s", "budget")


class FileRefused(Exception):
    """A file that is missing, unreadable, unsafe or of the wrong shape; str() is one line naming it."""

    @property
    def reason(self) -> str:
        """The line without the file's name in front ("{path}: {reason}"), for a message that names it already."""
        return str(self).split(": ", 1)[-1]


def kind_of(mode: int) -> str:
    """What a file of this st_mode is, in words ("a FIFO", "a folder", ...)."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: str | os.PathLike, cap: int, within: str | os.PathLike | None = None) -> int:
    """A read-only file descriptor of `path`, which must be a regular file of at most `cap` bytes and, with
    `within`, lie inside that folder once links are resolved (a link inside it is followed; one that leaves
    it is refused). FileNotFoundError when absent; FileRefused (one line) for anything else."""
    path = Path(path)
    target = path
    if within is not None:
        real, root = os.path.realpath(path), os.path.realpath(within)
        if os.path.commonpath([real, root]) != root:
            raise FileRefused(f"{path}: a link out of {within}; refused (files of a study or run are read from "
                              "inside it only)")
        target = Path(real)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if within is not None else 0)
    try:
        fd = os.open(target, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FileRefused(f"{path}: cannot read ({exc.strerror or exc})") from None
    st = os.fstat(fd)
    problem = (f"{kind_of(st.st_mode)}, not a regular file" if not stat.S_ISREG(st.st_mode) else
               f"{st.st_size:,} bytes, more than the {cap:,} such a file may hold" if st.st_size > cap else None)
    if problem:
        os.close(fd)
        raise FileRefused(f"{path}: {problem}; refused")
    return fd


def read_bytes(path: str | os.PathLike, cap: int, within: str | os.PathLike | None = None) -> bytes:
    """The bytes of a regular file of at most `cap` bytes (see open_regular)."""
    fd = open_regular(path, cap, within)
    chunks, size = [], 0
    try:
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:       # a file that grows while it is read
                raise FileRefused(f"{path}: more than the {cap:,} bytes such a file may hold; refused")
    except OSError as exc:
        raise FileRefused(f"{path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_text(path: str | os.PathLike, cap: int, within: str | os.PathLike | None = None) -> str:
    """The UTF-8 text of a regular file (a BOM is dropped); FileRefused when it is not UTF-8."""
    try:
        return read_bytes(path, cap, within).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise FileRefused(f"{path}: not UTF-8 text") from None


def read_named(path: str | os.PathLike, cap: int, missing: str, within: str | os.PathLike | None = None,
               text: bool = False):
    """A file a command was given (or a study's own), as read_bytes (text=True: read_text) does, with a
    UserError of one line when it is absent ("{path}: {missing}") or refused."""
    from .errors import UserError
    try:
        return (read_text if text else read_bytes)(path, cap, within)
    except FileNotFoundError:
        raise UserError(f"{path}: {missing}") from None
    except FileRefused as exc:
        raise UserError(str(exc)) from None


def load_torch(path: str | os.PathLike, within: str | os.PathLike | None = None):
    """torch.load(path) weights-only, on the CPU, of a regular file (open_regular); FileRefused (one line) for
    anything else in it."""
    import pickle

    import torch
    try:
        fd = open_regular(path, CAPS["checkpoint"], within)
    except FileNotFoundError as exc:
        raise FileRefused(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
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


def load_checkpoint(path: str | os.PathLike, within: str | os.PathLike | None = None) -> dict:
    """A Lightning checkpoint of train.py, loaded weights-only and checked for what resuming reads."""
    ckpt = load_torch(path, within)
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


def load_weights(path: str | os.PathLike, within: str | os.PathLike | None = None) -> dict:
    """A model.pt written by train.py: a state dict of tensors, loaded weights-only."""
    import torch
    state = load_torch(path, within)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise FileRefused(f"{path}: refused, not a state dict of tensors")
    return state


def read_json(path: str | os.PathLike, within: str | os.PathLike | None = None, cap: int = CAPS["json"]):
    """The JSON value in `path` (UTF-8, a regular file of at most `cap` bytes, see open_regular);
    FileNotFoundError if absent, FileRefused if unreadable or not JSON."""
    text = read_text(path, cap, within)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise FileRefused(f"{path}: not valid JSON") from None


def read_csv(path: str | os.PathLike, within: str | os.PathLike | None = None, **kwargs):
    """pandas.read_csv of a regular file (open_regular, CAPS["csv"]); FileRefused when pandas cannot read it."""
    import io

    import pandas as pd
    raw = read_bytes(path, CAPS["csv"], within)
    try:
        return pd.read_csv(io.BytesIO(raw), **kwargs)
    except pd.errors.EmptyDataError:
        raise FileRefused(f"{path}: empty file, expected a CSV with a header row") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileRefused(f"{path}: not a readable CSV ({first[:200]})") from None


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


def read_result(path: str | os.PathLike, within: str | os.PathLike | None = None
                ) -> tuple[dict | None, str | None]:
    """(result, None) for a well-formed result.json, (None, None) when there is none, (None, why) otherwise."""
    try:
        res = read_json(path, within)
    except FileNotFoundError:
        return None, None
    except FileRefused as exc:
        return None, str(exc)
    problem = result_problem(res)
    return (None, f"{path}: {problem}") if problem else (res, None)
