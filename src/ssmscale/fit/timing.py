"""Training time priced from a profile (`ssmscale fit STUDY --time-from PROFILE_CSV [--time-from ...]`): the wall-clock verdict
of a study trained on one machine, asked of another.

A study's own train_s is the time its runs took where they ran. Here each run's training time is instead
its training FLOPs (the study's exact count) over the FLOP rate its family reached in a profile
(`ssmscale profile --modes train`, profile.csv; several files pool their sizes): rate = tokens/s x FLOPs per token of the profiled model,
interpolated linearly in log(rate) against log(sequence length) at each profiled size, then against
log(parameters) between sizes. Beyond the profiled sizes or lengths the rate of the nearest one is held
(so tokens/s still falls with the FLOPs per token); how many runs needed that is recorded. Equivalently,
tokens / (the profile's tokens/s interpolated log-log in size), with FLOPs per token carrying the size
dependence outside the profiled range, where a CPU profile at 1e7 parameters says little about 1e4.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import UserError
from .runs import LoadedRuns

NEEDED = ("family", "mode", "seq_len", "params", "tokens_per_s", "flops_per_token", "status")


def read_profile(path) -> dict:
    """{family: [(params, seq_len, FLOP/s)]} from a profile.csv's ok training rows; UserError naming the file
    and column when it is not one."""
    import pandas as pd
    path = Path(path)
    try:
        raw = path.read_bytes()
        df = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"--time-from: {path}: not a readable CSV ({exc})") from None
    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise UserError(f"--time-from: {path}: missing column {missing[0]!r} (a profile.csv of `ssmscale profile` "
                        f"has {', '.join(NEEDED)})")
    df = df[(df["mode"].astype(str) == "train") & (df["status"].astype(str) == "ok")]
    points: dict = {}
    for col in ("seq_len", "params", "tokens_per_s", "flops_per_token"):
        values = pd.to_numeric(df[col], errors="coerce")
        if not (np.isfinite(values) & (values > 0)).all():
            raise UserError(f"--time-from: {path}: column {col!r} has a missing, non-numeric or non-positive value "
                            f"in a training row")
        df = df.assign(**{col: values})
    for fam, rows in df.groupby(df["family"].astype(str)):
        points[fam] = [(float(r.params), float(r.seq_len), float(r.tokens_per_s * r.flops_per_token))
                       for r in rows.itertuples()]
    if not points:
        raise UserError(f"--time-from: {path}: no training rows with status ok (profile with --modes train)")
    info = {"path": str(path), "sha256": hashlib.sha256(raw).hexdigest()}
    for col in ("device", "threads"):
        if col in df.columns:
            info[col] = sorted(df[col].dropna().astype(str).unique().tolist())
    return {"points": points, "info": info}


def flop_rate(points: list, params: float, seq_len: float) -> tuple[float, bool]:
    """(FLOP/s at this size and length, whether it lies outside the profiled sizes or lengths)."""
    sizes = sorted({p for p, _, _ in points})
    rates, outside = [], False
    for size in sizes:
        pts = sorted((L, r) for p, L, r in points if p == size)
        lens = np.log([L for L, _ in pts])
        outside |= not lens[0] - 1e-9 <= math.log(seq_len) <= lens[-1] + 1e-9
        rates.append(np.interp(math.log(seq_len), lens, np.log([r for _, r in pts])))
    logp = np.log(sizes)
    outside |= not logp[0] - 1e-9 <= math.log(params) <= logp[-1] + 1e-9
    return float(math.exp(np.interp(math.log(params), logp, rates))), bool(outside)


def _seq_lens(loaded: LoadedRuns) -> list[float]:
    """Each cleaned run's sequence length, from the runs CSV (by run id, or its one value)."""
    import pandas as pd
    csv = Path(loaded.source["csv"])
    df = pd.read_csv(csv)
    if "seq_len" not in df.columns:
        raise UserError(f"--time-from: {csv}: no seq_len column: the runs' sequence length prices their tokens")
    lens = pd.to_numeric(df["seq_len"], errors="coerce")
    if not (np.isfinite(lens) & (lens > 0)).all():
        raise UserError(f"--time-from: {csv}: column 'seq_len' has a missing, non-numeric or non-positive value")
    if lens.nunique() == 1:
        return [float(lens.iloc[0])] * len(loaded.table)
    if "run_id" not in df.columns:
        raise UserError(f"--time-from: {csv}: runs of several sequence lengths need a run_id column to tell them apart")
    by_id = dict(zip(df["run_id"].astype(str), lens))
    return [float(by_id[ids[0]]) if ids and ids[0] in by_id else math.nan for ids in loaded.table["run_ids"]]


def read_profiles(paths) -> dict:
    """read_profile over several profile.csv files (e.g. one per size), their points pooled."""
    points: dict = {}
    infos = []
    for path in paths:
        one = read_profile(path)
        for fam, pts in one["points"].items():
            points.setdefault(fam, []).extend(pts)
        infos.append(one["info"])
    info = {"path": ", ".join(i["path"] for i in infos), "sha256": [i["sha256"] for i in infos]}
    for col in ("device", "threads"):
        info[col] = sorted({v for i in infos for v in i.get(col, [])})
    return {"points": points, "info": info}


def reprice(loaded: LoadedRuns, profile_csvs) -> LoadedRuns:
    """The same runs with train_s = training FLOPs / the profiles' FLOP rate for the run's family, size and
    sequence length; source and notes say so. `profile_csvs`: one path or a list of them."""
    paths = [profile_csvs] if isinstance(profile_csvs, (str, Path)) else list(profile_csvs)
    profile = read_profiles(paths)
    table = loaded.table.copy()
    missing = sorted(set(table["family"]) - set(profile["points"]))
    if missing:
        raise UserError(f"--time-from: {profile['info']['path']}: no training rows for family {missing[0]!r} "
                        f"(profiled: {', '.join(sorted(profile['points']))})")
    seconds, outside = [], 0
    for (fam, params, flops), L in zip(table[["family", "params", "flops"]].itertuples(index=False),
                                       _seq_lens(loaded)):
        if not math.isfinite(L):
            seconds.append(math.nan)
            continue
        rate, out = flop_rate(profile["points"][fam], params, L)
        seconds.append(flops / rate)
        outside += out
    table["train_s"] = seconds
    source = dict(loaded.source, time_basis="profile", time_profile=dict(profile["info"], outside_runs=int(outside),
                                                                        runs=len(table)))
    for col in ("device", "threads"):
        source[col] = profile["info"].get(col, [])
    note = (f"training time priced from {profile['info']['path']}: each run's FLOPs over its family's FLOP rate there, "
            f"interpolated log-log in size and sequence length; {outside} of {len(table)} runs lie outside the "
            f"profiled sizes or lengths and take the nearest one's rate")
    return replace(loaded, table=table, source=source, notes=list(loaded.notes) + [note])
