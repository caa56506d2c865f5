"""Runs in: read a study's results.csv or any CSV of runs, clean it, and hold one family's runs as arrays.

A study's runs also bring, where recorded, their pure training time (train_s), the device that trained
them, and the loss curve of their eval points (runs/<run_id>/result.json, for Approach 1). Repeated
seeds of one configuration are averaged into one point that keeps every seed's loss, so the bootstrap
can resample seeds too.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import limits
from ..errors import UserError, shorten

MIN_RUNS_PER_BUDGET = 3          # a budget's "best run" or parabola means something only with >= 3 sizes
CANONICAL_COLUMNS = ("params", "tokens", "flops", "loss", "family", "budget", "status", "lr", "seed", "train_s")
_NUMERIC_COLUMNS = ("params", "tokens", "flops", "loss", "budget", "lr", "train_s")


@dataclass
class LoadedRuns:
    # family, params, tokens, flops, loss, group_flops, seed_losses (tuple: one loss per seed), train_s
    # (NaN where not recorded), run_ids (tuple), curve (eval points: array (flops, loss) rows, or None)
    table: pd.DataFrame
    source: dict
    dropped: dict
    notes: list[str] = field(default_factory=list)
    grouping: str = ""


def parse_column_mapping(specs: list[str] | None) -> dict[str, str]:
    """`["params=Model Size,flops=Training FLOP"]` -> {"params": "Model Size", "flops": "Training FLOP"}."""
    mapping: dict[str, str] = {}
    for spec in specs or []:
        for item in spec.split(","):
            if not item.strip():
                continue
            name, sep, column = item.partition("=")
            name, column = name.strip(), column.strip().strip('"').strip("'")
            if not sep or not column:
                raise UserError(f"--columns: '{item}' is not NAME=COLUMN")
            if name not in CANONICAL_COLUMNS:
                raise UserError(f"--columns: unknown name '{name}' (expected one of {', '.join(CANONICAL_COLUMNS)})")
            mapping[name] = column
    return mapping


def _csv_of(path: Path) -> tuple[Path, str]:
    if path.is_dir():
        csv = path / "results.csv"
        if not csv.is_file():
            raise UserError(f"{path}: not a study directory (no results.csv in it)")
        return csv, "study"
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    return path, "csv"


def _check_rows(csv: Path, raw: bytes, kind: str) -> None:
    """Every row has as many fields as the header (pandas would pad a short row with NaN and read a long
    one as a shifted index); a study's results.csv, always written whole, ends with a line end."""
    import csv as csvlib
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{csv}: not UTF-8 text, so not a readable CSV") from None
    rows = csvlib.reader(io.StringIO(text, newline=""))
    try:
        header = next(rows, None)
        if header is None:
            return                                     # empty: pandas says so below
        previous = None
        for row in rows:
            if previous is not None:
                _check_width(csv, previous, header, last=False)
            previous = (rows.line_num, row)
        if previous is not None:
            _check_width(csv, previous, header, last=not text.endswith(("\n", "\r")))
    except csvlib.Error as exc:
        raise UserError(f"{csv}: not a readable CSV (line {rows.line_num}: {exc})") from None
    if kind == "study" and not text.endswith(("\n", "\r")):
        raise UserError(f"{csv}: does not end with a line end, so it looks truncated; rebuild it with "
                        "`ssmscale ladder` on the study (it rewrites results.csv from the runs' result.json)")


def _check_width(csv: Path, numbered_row: tuple[int, list[str]], header: list[str], last: bool) -> None:
    line, row = numbered_row
    if not row or len(row) == len(header):             # blank lines are skipped by pandas too
        return
    if last and len(row) < len(header):
        raise UserError(f"{csv}: line {line} has {len(row)} of the header's {len(header)} fields and no line end: "
                        "the file looks truncated")
    raise UserError(f"{csv}: line {line} has {len(row)} fields, the header has {len(header)}")


def read_csv_checked(csv: Path, kind: str) -> tuple[pd.DataFrame, bytes]:
    """(table, raw bytes) of a CSV whose every row has the header's fields (`kind` "study": a results.csv,
    which must also end with a line end), or a UserError of one line naming the file and line."""
    from ..safeload import CAPS, read_named
    raw = read_named(csv, CAPS["csv"], "no such file", within=csv.parent if kind == "study" else None)
    _check_rows(csv, raw, kind)
    try:
        return pd.read_csv(io.BytesIO(raw)), raw
    except pd.errors.EmptyDataError:
        raise UserError(f"{csv}: empty file, expected a CSV with a header row") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{csv}: not a readable CSV ({first})") from None


def _to_numeric(df: pd.DataFrame, col: str, csv: Path) -> None:
    s = df[col]
    if pd.api.types.is_numeric_dtype(s):
        df[col] = s.astype(float)
        return
    conv = pd.to_numeric(s, errors="coerce")
    text = s.astype(str).str.strip().str.lower()
    missing_like = s.isna() | text.isin(["", "nan", "inf", "+inf", "-inf", "infinity", "-infinity", "none"])
    bad = conv.isna() & ~missing_like
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{csv}: column '{col}', line {i + 2}: {s.iloc[i]!r} is not a number")
    df[col] = conv.astype(float)


def load_runs(path: str | os.PathLike, columns: dict[str, str] | None = None) -> LoadedRuns:
    """Read a study directory's results.csv or any CSV of runs, clean it, and say what was dropped.

    Needs `params` and `loss` and at least one of `tokens` / `flops` (the other follows from C = 6ND);
    optional `family` (default "all"), `budget` (IsoFLOP groups), `status`, `lr`, `seed`, `train_s`.
    Every row must have the header's number of fields. Cleaning, in order: drop rows that repeat an
    earlier row exactly; keep status == "ok"; drop rows with NaN, inf or non-positive values; average
    repeated seeds of one configuration (keeping each seed's loss); keep the lowest-loss learning rate
    per (family, params, budget).
    """
    path = Path(path)
    csv, kind = _csv_of(path)
    df, raw = read_csv_checked(csv, kind)
    columns = dict(columns or {})
    for name, col in columns.items():
        if col not in df.columns:
            raise UserError(f"--columns: {name}={col!r}: no column {col!r} in {csv} "
                            f"(columns: {', '.join(map(str, df.columns))})")
        if name != col and name in df.columns and name not in columns.values():
            raise UserError(f"--columns: {name}={col!r}: {csv} already has a column {name!r}; "
                            f"map that one too or use the CSV's own {name!r}")
    df = df.rename(columns={col: name for name, col in columns.items()})
    for name in ("params", "loss"):
        if name not in df.columns:
            raise UserError(f"{csv}: missing column '{name}' (columns: {', '.join(map(str, df.columns))}; "
                            f"map yours with --columns {name}=YOUR_COLUMN)")
    if "tokens" not in df.columns and "flops" not in df.columns:
        raise UserError(f"{csv}: missing column 'tokens' (or 'flops', from which tokens = flops / (6 params))")
    rows_read = len(df)
    if rows_read > limits.MAX_FIT_ROWS:
        raise UserError(f"{csv}: {rows_read:,} rows; ssmscale fits at most {limits.MAX_FIT_ROWS:,} (a study has one "
                        "per run; Approach 3 fits every row from 4,500 starts, so that many take hours already)")
    if kind == "study" and "run_id" in df.columns:
        _check_run_ids(csv, df["run_id"])
    for col in _NUMERIC_COLUMNS:
        if col in df.columns:
            _to_numeric(df, col, csv)

    notes: list[str] = []
    dropped: dict = {"exact_duplicates": 0, "status_not_ok": {}, "invalid_values": 0, "other_learning_rates": 0,
                     "seed_duplicates_averaged": 0}
    repeated = df.duplicated()
    if repeated.any():                 # a row pasted twice is one run, not two equal ones
        dropped["exact_duplicates"] = int(repeated.sum())
        notes.append(f"dropped {dropped['exact_duplicates']} rows that repeat an earlier row exactly")
        df = df[~repeated]
    if "status" in df.columns:
        status = df["status"].astype(str).str.strip()
        not_ok = status != "ok"
        if not_ok.any():
            dropped["status_not_ok"] = {str(k): int(v) for k, v in status[not_ok].value_counts().items()}
            parts = ", ".join(f"{v} {k}" for k, v in dropped["status_not_ok"].items())
            notes.append(f"dropped {int(not_ok.sum())} runs whose status is not 'ok' ({parts})")
        df = df[~not_ok]
    df = df.copy()
    df["family"] = df["family"].astype(str).str.strip() if "family" in df.columns else "all"
    if "flops" not in df.columns:
        df["flops"] = 6.0 * df["params"] * df["tokens"]
        notes.append("no flops column: C = 6 * params * tokens")
    if "tokens" not in df.columns:
        df["tokens"] = df["flops"] / (6.0 * df["params"])
        notes.append("no tokens column: D = flops / (6 * params)")

    checked = ["params", "tokens", "flops", "loss"] + (["budget"] if "budget" in df.columns else [])
    values = df[checked].to_numpy(dtype=float)
    valid = np.isfinite(values).all(axis=1) & (values > 0).all(axis=1)
    if not valid.all():
        dropped["invalid_values"] = int((~valid).sum())
        notes.append(f"dropped {dropped['invalid_values']} rows with NaN, inf or non-positive "
                     f"{'/'.join(checked)}")
    df = df[valid].copy()
    df["seed_losses"] = [(v,) for v in df["loss"]]
    df["run_ids"] = [(str(v),) for v in df["run_id"]] if "run_id" in df.columns else [()] * len(df)
    if "train_s" not in df.columns:
        df["train_s"] = np.nan
    time_basis = "train_s"
    if "train_cpu_s" in df.columns and "threads" in df.columns and len(df) and (df["threads"] == 1).all() \
            and np.isfinite(pd.to_numeric(df["train_cpu_s"], errors="coerce")).all():
        # 1-thread runs: their CPU seconds are their training time on a core of their own, which other
        # load on the machine (parallel runs, other users) does not inflate, unlike wall seconds
        df["train_s"] = pd.to_numeric(df["train_cpu_s"], errors="coerce")
        time_basis = "train_cpu_s"
        notes.append("training time = CPU seconds of the training steps (train_cpu_s): every run used 1 thread, "
                     "so this is its time on a core of its own, not inflated by other load on the machine")

    if "budget" in df.columns:
        df["group_flops"] = df["budget"]
        grouping = "IsoFLOP groups from the budget column"
    else:
        rounded = df["flops"].map(lambda c: float(f"{c:.1e}"))
        df["group_flops"] = np.exp(np.log(df["flops"]).groupby(rounded).transform("mean"))
        grouping = ("no budget column: IsoFLOP groups = runs whose flops agree to 2 significant digits "
                    "(C of a group = geometric mean of its runs' flops)")

    if "lr" in df.columns and len(df):
        keys = ["family", "params", "group_flops"]
        n_before = len(df)
        agg = {c: "first" for c in df.columns if c not in keys + ["lr", "loss"]}
        agg.update(loss="mean", train_s="mean", seed_losses=lambda v: sum(v, ()), run_ids=lambda v: sum(v, ()))
        df = df.groupby(keys + ["lr"], as_index=False, sort=False, dropna=False).agg(agg)
        dropped["seed_duplicates_averaged"] = n_before - len(df)
        if dropped["seed_duplicates_averaged"]:
            notes.append(f"averaged the loss over repeated seeds of the same (family, params, budget, lr): "
                         f"{dropped['seed_duplicates_averaged']} rows merged")
        best = df.groupby(keys, sort=False, dropna=False)["loss"].idxmin()
        dropped["other_learning_rates"] = len(df) - len(best)
        df = df.loc[np.sort(best.to_numpy())]
        if dropped["other_learning_rates"]:
            notes.append(f"kept the lowest-loss learning rate per (family, params, budget): "
                         f"{dropped['other_learning_rates']} runs with other learning rates set aside "
                         f"(Porian et al. 2024: compare architectures at their best LR per size)")

    table = df[["family", "params", "tokens", "flops", "loss", "group_flops", "seed_losses", "train_s",
                "run_ids"]].reset_index(drop=True)
    table["curve"] = pd.Series(_curves(csv.parent, table["run_ids"], notes) if kind == "study"
                               else [None] * len(table), dtype=object)
    source = {"path": str(path), "csv": str(csv), "kind": kind, "sha256": hashlib.sha256(raw).hexdigest(),
              "rows_read": rows_read, "columns": columns}
    for col in ("flops_convention", "device", "threads"):
        if col in df.columns:
            source[col] = sorted(df[col].dropna().astype(str).unique().tolist())
    source["time_basis"] = time_basis
    return LoadedRuns(table=table, source=source, dropped=dropped, notes=notes, grouping=grouping)


def _check_run_ids(csv: Path, run_ids: pd.Series) -> None:
    """A study's run ids name folders below runs/: plain names only (no '/', '..' or absolute path)."""
    from ..fsutil import is_plain_name
    for i, run_id in enumerate(run_ids):
        if not (isinstance(run_id, str) and is_plain_name(run_id)) and not pd.isna(run_id):
            raise UserError(f"{csv}: column 'run_id', line {i + 2}: {shorten(run_id)} is not a plain name (a run's "
                            "folder below runs/); rebuild results.csv with `ssmscale ladder` on the study")


def _curves(study: Path, run_ids, notes: list[str]) -> list:
    """Each configuration's eval-point curve (rows: flops, loss; its seeds averaged), from its runs'
    result.json. Runs whose validation subset differs from the most common one are left out: their
    losses are on other tokens; so are curves of the wrong shape (counted in a note)."""
    from ..safeload import FileRefused, read_json
    found, unusable = [], 0
    for ids in run_ids:
        runs = []
        for run_id in ids:
            try:
                res = read_json(study / "runs" / run_id / "result.json", within=study)
            except FileNotFoundError:
                continue
            except FileRefused:
                res = None
            curve = _eval_curve(res)
            if curve is not None:
                runs.append(curve)
            elif not isinstance(res, dict) or res.get("eval_curve") is not None:
                unusable += 1
        found.append(runs)
    if unusable:
        notes.append(f"{unusable} runs' result.json unreadable or with an eval_curve of the wrong shape: no "
                     "Approach 1 curve from them")
    sizes = Counter(c["subset_tokens"] for runs in found for c in runs)
    if not sizes:
        return [None] * len(found)
    subset = sizes.most_common(1)[0][0]
    if len(sizes) > 1:
        notes.append(f"eval-point curves on a {subset}-token validation subset used for Approach 1; "
                     f"{sum(sizes.values()) - sizes[subset]} runs with another subset size left out")
    out = []
    for runs in found:
        runs = [c for c in runs if c["subset_tokens"] == subset]
        steps = {tuple(c["step"]) for c in runs}
        if not runs or len(steps) > 1:      # seeds of one configuration share their steps
            out.append(None)
            continue
        out.append(np.array([runs[0]["flops"], np.mean([c["loss"] for c in runs], axis=0)]))
    return out


def _eval_curve(res) -> dict | None:
    """A result's eval_curve when it has the shape train.py writes (equal-length lists of finite numbers,
    a positive subset size), else None."""
    curve = res.get("eval_curve") if isinstance(res, dict) else None
    if not isinstance(curve, dict) or not curve.get("loss"):
        return None
    columns = [curve.get(k) for k in ("step", "flops", "loss")]
    subset = curve.get("subset_tokens")
    numbers = all(isinstance(c, list) and len(c) == len(columns[2]) and
                  all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in c)
                  for c in columns)
    ok = numbers and isinstance(subset, int) and not isinstance(subset, bool) and subset > 0
    return {"subset_tokens": subset, "step": columns[0], "flops": columns[1], "loss": columns[2]} if ok else None



@dataclass(frozen=True)
class FamilyRuns:
    params: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    loss: np.ndarray         # mean over seeds
    group: np.ndarray        # index into budgets, one per run
    budgets: np.ndarray      # C of each IsoFLOP group
    frontier_budgets: np.ndarray  # per budget: >= MIN_RUNS_PER_BUDGET sizes in the full data (fixed under resampling)
    seed_losses: tuple = ()  # per run: every seed's loss (empty: one seed each, the loss itself)
    train_s: np.ndarray | None = None   # per run: pure training time (NaN where not recorded)
    curves: tuple = ()       # per run: eval-point curve, array rows (flops, loss), or None (empty: none at all)
    # what the bootstrap resamples within: "groups" (each IsoFLOP budget keeps its number of runs) or "runs"
    # (the family's runs as one pool: groups guessed from rounded FLOPs may hold one run each, and a group
    # of one run gives back the same run in every resample)
    resample: str = "groups"

    @classmethod
    def from_table(cls, t: pd.DataFrame, resample: str = "groups") -> "FamilyRuns":
        budgets, group = np.unique(t["group_flops"].to_numpy(dtype=float), return_inverse=True)
        params = t["params"].to_numpy(float)
        sizes = np.array([len(np.unique(params[group == g])) for g in range(len(budgets))])
        seeds = tuple(np.asarray(v, float) for v in t["seed_losses"]) if "seed_losses" in t else ()
        curves = tuple(t["curve"]) if "curve" in t and t["curve"].notna().any() else ()
        return cls(params, t["tokens"].to_numpy(float), t["flops"].to_numpy(float),
                   t["loss"].to_numpy(float), group, budgets, sizes >= MIN_RUNS_PER_BUDGET,
                   seeds if any(len(v) > 1 for v in seeds) else (),
                   t["train_s"].to_numpy(float) if "train_s" in t else None, curves, resample)

    @classmethod
    def from_arrays(cls, params, tokens, loss, flops=None, budget=None) -> "FamilyRuns":
        params, tokens, loss = (np.asarray(x, float) for x in (params, tokens, loss))
        flops = 6.0 * params * tokens if flops is None else np.asarray(flops, float)
        t = pd.DataFrame({"params": params, "tokens": tokens, "flops": flops, "loss": loss,
                          "group_flops": flops if budget is None else np.asarray(budget, float)})
        return cls.from_table(t)

    def take(self, idx: np.ndarray, loss: np.ndarray | None = None) -> "FamilyRuns":
        """Runs idx (repeats allowed), optionally with other losses; budgets and their flags unchanged."""
        return FamilyRuns(self.params[idx], self.tokens[idx], self.flops[idx],
                          self.loss[idx] if loss is None else loss, self.group[idx], self.budgets,
                          self.frontier_budgets, tuple(self.seed_losses[i] for i in idx) if self.seed_losses else (),
                          None if self.train_s is None else self.train_s[idx],
                          tuple(self.curves[i] for i in idx) if self.curves else (), self.resample)

    def select(self, keep: np.ndarray) -> "FamilyRuns":
        """The runs where `keep` is true as a study of their own: budgets without runs are dropped,
        the others keep their frontier flag (judged on the full data)."""
        idx = np.flatnonzero(keep)
        used, group = np.unique(self.group[idx], return_inverse=True)
        sub = self.take(idx)
        return FamilyRuns(sub.params, sub.tokens, sub.flops, sub.loss, group, self.budgets[used],
                          self.frontier_budgets[used], sub.seed_losses, sub.train_s, sub.curves, self.resample)

    def __len__(self) -> int:
        return len(self.loss)


def _resample(runs: FamilyRuns, rng: np.random.Generator) -> FamilyRuns:
    """Draw runs with replacement within each IsoFLOP group, keeping every group's size (or, with
    resample == "runs", from all the family's runs); a run with several seeds then gets the mean of its
    seeds drawn with replacement, so intervals carry seed noise."""
    if runs.resample == "runs":
        idx = np.sort(rng.choice(len(runs), size=len(runs), replace=True))
    else:
        parts = [rng.choice(members, size=len(members), replace=True)
                 for g in range(len(runs.budgets)) if len(members := np.flatnonzero(runs.group == g))]
        idx = np.sort(np.concatenate(parts))
    if not runs.seed_losses:
        return runs.take(idx)
    loss = np.array([runs.loss[i] if len(s := runs.seed_losses[i]) < 2 else rng.choice(s, size=len(s)).mean()
                     for i in idx])
    return runs.take(idx, loss)

