"""The Profile section of a scaling report, from STUDY/profile/ (`ssmscale profile` wrote it): tokens/s
and peak memory against sequence length per mode, as a figure (profile.png) and as numbers with the
growth exponents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import limits
from ..errors import UserError
from .figures import _figure, _human, _minor_2_5, _mpl_ticker


def profile_figure(profile: pd.DataFrame, colors: dict):
    modes = [m for m in ("train", "prefill", "generate") if m in set(profile["mode"])]
    modes += sorted(set(profile["mode"]) - set(modes))
    fig, axes = _figure(ncols=len(modes), nrows=2, width=4.8, height=3.8)
    styles = ["-", "--", ":", "-."]
    for j, mode in enumerate(modes):
        pm = profile[profile["mode"] == mode]
        for name in sorted(set(pm["family"])):
            pf = pm[pm["family"] == name]
            batches = sorted(set(pf["batch"]))
            for k, batch in enumerate(batches):
                rows = pf[pf["batch"] == batch].sort_values("seq_len")
                ok = rows[rows["status"] == "ok"]
                bad = rows[rows["status"] != "ok"]
                label = name if len(batches) == 1 else f"{name} (batch {batch})"
                for i, (col, scale) in enumerate((("tokens_per_s", 1.0), ("peak_mem_bytes", 2.0 ** -20))):
                    ax = axes[i][j]
                    ax.plot(ok["seq_len"], ok[col] * scale, styles[k % 4], marker="o", ms=4,
                            color=colors.get(name, "#000000"), label=label)
                    for L, status in zip(bad["seq_len"], bad["status"]):
                        ax.plot(L, 0.94, "x", ms=9, mew=2, color=colors.get(name, "#000000"),
                                transform=ax.get_xaxis_transform())
                        ax.annotate(f"{name}: {status}", (L, 0.94), xycoords=("data", "axes fraction"),
                                    xytext=(-6, -4), textcoords="offset points", fontsize=8, ha="right",
                                    va="top")
        seq_lens = sorted(set(pm["seq_len"].dropna().astype(int)))
        for i, ylabel in enumerate(("throughput (tokens/s)", "peak memory added (MiB)")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(seq_lens, [str(v) for v in seq_lens])
            ax.xaxis.set_minor_formatter(_mpl_ticker().NullFormatter())
            ax.yaxis.set_major_formatter(_mpl_ticker().FuncFormatter(lambda v, _: _human(v)))
            ax.yaxis.set_minor_formatter(_minor_2_5(_human))
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}: {ylabel.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.25)
    legend = {}                  # one legend for every panel: each family (and batch) once, in drawing order
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(len(legend), 4),
                   fontsize=9, frameon=False)
    return fig


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _profile_meta(study: Path) -> dict:
    """profile.json's descriptive fields, each kept only if it has the shape the report prints (a file of
    another shape is ignored with a line saying so: the numbers themselves come from profile.csv)."""
    from ..safeload import FileRefused, read_json
    path = study / "profile" / "profile.json"
    try:
        meta = read_json(path, within=study)
    except FileNotFoundError:
        return {}
    except FileRefused as exc:
        print(f"{exc}; ignored")
        return {}
    if not isinstance(meta, dict):
        print(f"{path}: not a JSON object; ignored")
        return {}
    out = {k: meta[k] for k in ("batch", "gen_tokens", "device", "peak_note", "rounds")
           if _is_number(meta.get(k)) or isinstance(meta.get(k), str)}
    shapes, growth = meta.get("shapes"), meta.get("growth")
    if isinstance(shapes, dict) and all(isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)
                                        for v in shapes.values()):
        out["shapes"] = shapes
    if isinstance(growth, dict) and all(
            isinstance(g, dict) and all(g.get(k) is None or _is_number(g.get(k)) for k in ("time", "memory"))
            and isinstance(g.get("lengths", []), list) for g in growth.values()):
        out["growth"] = growth
    return out


def _profile_section(study: Path, profile: pd.DataFrame) -> list[str]:
    """The profile as numbers: tokens/s and peak memory per mode and length, and the growth exponents."""
    meta = _profile_meta(study)
    families = list(dict.fromkeys(profile["family"].astype(str)))
    out = ["## Profile", "", f"From `{study / 'profile' / 'profile.csv'}` (`ssmscale profile`)."]
    shapes = meta.get("shapes", {})
    if shapes:
        out.append("Models: " + "; ".join(f"{f} d_model {v[0]} x {v[1]} layers, {v[2]:,} non-embedding parameters"
                                          for f, v in shapes.items()) + ".")
    facts = [f"batch {meta['batch']}" if "batch" in meta else "",
             f"{meta['gen_tokens']} decoded tokens per generation point" if "gen_tokens" in meta else "",
             f"device {meta['device']}" if "device" in meta else "",
             f"MFU peak: {meta['peak_note']}" if "peak_note" in meta else ""]
    rounds = meta.get("rounds")
    if type(rounds) is int and 1 < rounds <= limits.MAX_COUNT:        # as `profile --rounds` takes them
        facts.append(f"{rounds} rounds (the sweep {rounds} times, the families side by side at each length, "
                     f"each point in a fresh process each time): tokens/s is each point's median, with the slowest "
                     f"and fastest round in brackets where the CSV has them")
    if any(facts):
        out.append("; ".join(f for f in facts if f) + ".")
    out += ["Peak MiB: the memory a step adds over its fresh process's baseline (weights, optimiser state and "
            "inputs excluded; generation includes the KV cache or the recurrent state).", ""]
    head = "| mode | L | " + " | ".join(f"{f} tokens/s | {f} peak MiB" for f in families) + " |"
    head += "".join(f" {f} / {families[0]} tokens/s |" for f in families[1:])
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for (mode, seq_len), grp in profile.groupby(["mode", "seq_len"], sort=False):
        cells, speed = [], {}
        for f in families:
            row = grp[grp["family"].astype(str) == f]
            if row.empty:
                cells += ["", ""]
                continue
            r = row.iloc[0]
            if r["status"] == "ok":
                speed[f] = float(r["tokens_per_s"])
                cells += [f"{r['tokens_per_s']:,.0f}{_round_range(r)}", f"{r['peak_mem_bytes'] / 2**20:,.1f}"]
            else:
                cells += [r["status"], ""]
        line = f"| {mode} | {int(seq_len)} | " + " | ".join(cells) + " |"
        first = families[0]
        line += "".join(f" {speed[f] / speed[first]:.2f}x |" if first in speed and f in speed else " |"
                        for f in families[1:])
        out.append(line)
    growth = meta.get("growth", {})
    if growth:
        out += ["", "Growth with L (log-log slope of step time and peak memory against L, over the lengths listed):",
                "", "| family / mode | time exponent | memory exponent | lengths |", "|---|---|---|---|"]
        for key, g in growth.items():
            lengths = g.get("lengths", [])
            span = f"{lengths[0]}-{lengths[-1]}" if lengths else ""
            time_, memory = ("n/a" if g.get(k) is None else f"{g[k]:.2f}" for k in ("time", "memory"))
            out.append(f"| {key} | {time_} | {memory} | {span} |")
    return out + [""]


def round_range(row) -> tuple[float, float] | None:
    """Tokens/s of a --rounds point's slowest and fastest round, from its step_ms columns (a row here, or one read
    back from a profile.csv); None for a point of one round or without those columns."""
    try:
        step, lo, hi, rounds = (float(row.get(c)) for c in ("step_ms", "step_ms_min", "step_ms_max", "rounds"))
    except (TypeError, ValueError):
        return None
    if not (rounds > 1 and 0 < lo <= step <= hi < float("inf")):
        return None
    tps = float(row["tokens_per_s"])
    return tps * step / hi, tps * step / lo


def _round_range(r) -> str:
    """' (slowest-fastest)' tokens/s over a --rounds profile's rounds; '' otherwise."""
    span = round_range(r)
    return f" ({span[0]:,.0f}-{span[1]:,.0f})" if span else ""


_PROFILE_COLUMNS = ("family", "mode", "seq_len", "batch", "tokens_per_s", "peak_mem_bytes", "status")


def _read_profile(study: Path) -> pd.DataFrame | None:
    from ..safeload import FileRefused, read_csv
    path = study / "profile" / "profile.csv"
    try:
        df = read_csv(path, within=study)
    except FileNotFoundError:
        return None
    except FileRefused as exc:
        raise UserError(str(exc)) from None
    missing = [c for c in _PROFILE_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    df["status"] = df["status"].astype(str).str.strip()
    for col in ("family", "mode"):
        df[col] = df[col].astype(str)
    for col in ("seq_len", "batch", "tokens_per_s", "peak_mem_bytes"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    usable = np.isfinite(df[["seq_len", "batch"]]).all(axis=1) & (df[["seq_len", "batch"]] >= 1).all(axis=1)
    if not usable.all():
        print(f"{path}: ignored {int((~usable).sum())} rows without a positive seq_len and batch")
    measured = (df["status"] != "ok") | (np.isfinite(df["tokens_per_s"]) & (df["tokens_per_s"] > 0))
    if not (measured | ~usable).all():
        print(f"{path}: ignored {int((usable & ~measured).sum())} ok rows without a positive tokens_per_s")
    kept = df[usable & measured]
    return kept if len(kept) else None      # nothing to draw: no profile section


def _profile_families(study: Path) -> list[str]:
    from ..safeload import FileRefused, read_csv
    try:
        return [str(f) for f in read_csv(study / "profile" / "profile.csv", within=study,
                                         usecols=["family"])["family"].dropna().unique()]
    except (FileNotFoundError, FileRefused):
        return []
