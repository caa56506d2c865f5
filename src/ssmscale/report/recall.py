"""Recall report: the report of a fixed-length study (no FLOP budgets, no scaling law), e.g. the MQAR study.

Zoology's protocol (Arora et al. 2023): per family, width and task cell (sequence length, key-value
pairs and any other swept key), several learning rates are trained and the best accuracy counts.
Figures (PNG), one panel per task cell and a line per family:
- recall_width.png   accuracy against d_model;
- recall_state.png   accuracy against the bytes of the generation state at the cell's sequence length
                     (the KV cache for attention, the conv + SSM state for Mamba; results.csv state_bytes),
                     the comparison Zoology draws: attention buys recall with a state that grows with L.
Without accuracy (text data) the score is the validation loss (lower is better).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import sweep
from ..errors import UserError, shorten
from ..fsutil import atomic_write_bytes, atomic_write_text
from ..safeload import CAPS, read_bytes
from .colors import check_family_count, family_colors
from .figures import _figure, _png
from .provenance import _provenance, config_block

SOLVED = 0.99          # a cell counts as solved at this accuracy (Zoology plots reach ~1.0 when solved)
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_KV_KEY = "data.synthetic.num_kv_pairs"


def is_fixed_length_study(study: Path) -> bool:
    """A study whose config trains every run for `steps` or `tokens` instead of FLOP budgets."""
    from ..config import read_yaml
    study = Path(study)
    try:
        cfg = read_yaml(study / "config.yaml", within=study)
    except UserError:           # absent, not YAML, not UTF-8, not a regular file: not a fixed-length study's config
        return False
    return cfg.get("budgets") is None and (cfg.get("steps") or cfg.get("tokens")) is not None


def load_cells(study: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(every ok run, the best run per cell, facts) from the study's results.csv and config.yaml.

    A cell is (family, d_model, task): the task is the run's sweep point, completed with its sequence
    length and number of key-value pairs. The best run has the highest accuracy (ties: lower loss) or,
    without accuracy, the lowest loss; `edge` marks a best learning rate at an end of the cell's grid.
    A results.csv or config.yaml of the wrong shape is a UserError of one line naming the file (and line)."""
    from ..config import read_study_config
    from ..fit.runs import read_csv_checked
    csv = study / "results.csv"
    df, _ = read_csv_checked(csv, "study")
    need = ["family", "d_model", "n_layer", "seq_len", "lr", "loss", "status"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise UserError(f"{csv}: missing column(s) {', '.join(missing)}")
    _numbers_only(df, csv, ["d_model", "n_layer", "seq_len", "lr", "loss", "val_accuracy", "state_bytes", "wall_s"])
    check_family_count(df["family"].dropna().astype(str), csv)
    cfg = read_study_config(study / "config.yaml", within=study)
    default_kv = cfg.data.synthetic.num_kv_pairs if cfg.data.synthetic else None
    for col in ("val_accuracy", "state_bytes", "wall_s", "sweep"):
        if col not in df.columns:
            df[col] = np.nan
    ok = df[(df["status"] == "ok") & np.isfinite(df["loss"])].copy()
    if ok.empty:
        raise UserError(f"{csv}: no finished run (status ok) to report")
    for col in ("d_model", "n_layer", "seq_len", "lr"):
        if not np.isfinite(ok[col]).all():
            line = int(ok.index[~np.isfinite(ok[col])][0]) + 2
            raise UserError(f"{csv}: column '{col}', line {line}: a finished run (status ok) without a value")
        if not (ok[col] > 0).all():
            line = int(ok.index[~(ok[col] > 0)][0]) + 2
            raise UserError(f"{csv}: column '{col}', line {line}: a finished run (status ok) with "
                            f"{ok[col].loc[line - 2]:g}, not a positive number")
    ok["family"] = ok["family"].astype(str)
    points = [_sweep_point(text, csv, line) for line, text in zip(ok.index + 2, ok["sweep"])]
    ok["num_kv_pairs"] = [p.get(_KV_KEY, default_kv) for p in points]
    ok["task"] = [_task_label(p, seq_len, kv) for p, seq_len, kv in zip(points, ok["seq_len"], ok["num_kv_pairs"])]
    metric = "val_accuracy" if ok["val_accuracy"].notna().any() else "loss"
    higher = metric == "val_accuracy"
    keys = ["family", "d_model", "n_layer", "task"]
    best_rows = []
    for _, g in ok.groupby(keys, sort=False):
        order = g.sort_values([metric, "loss"], ascending=[not higher, True])
        best = order.iloc[0].copy()
        lrs = sorted(g["lr"].unique())
        best["lrs_tried"] = len(lrs)
        best["edge"] = len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1])
        best_rows.append(best)
    best = pd.DataFrame(best_rows).sort_values(["seq_len", "num_kv_pairs", "task", "family", "d_model"])
    facts = {"metric": metric, "higher_is_better": higher, "runs": len(df), "ok_runs": len(ok),
             "wall_s": float(pd.to_numeric(df["wall_s"], errors="coerce").sum()),
             "families": _family_order(cfg.families, ok["family"]), "name": cfg.name,
             "steps": cfg.steps, "tokens": cfg.tokens}
    return ok, best, facts


def _numbers_only(df: pd.DataFrame, csv: Path, columns: list[str]) -> None:
    """Columns that hold numbers: pandas reads one with any other cell as text; name the first such cell."""
    for col in columns:
        if col in df.columns and not pd.api.types.is_numeric_dtype(df[col]):
            parsed = pd.to_numeric(df[col], errors="coerce")
            bad = (parsed.isna() & df[col].notna()).to_numpy()
            if not bad.any():           # numbers pandas did not parse (e.g. padded with spaces)
                df[col] = parsed
                continue
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"{csv}: column '{col}', line {i + 2}: {shorten(df[col].iloc[i])} is not a number")


def _sweep_point(text, csv: Path, line: int) -> dict:
    """A run's sweep point from its results.csv cell (JSON, '' without a sweep); its key-value pairs a whole number."""
    try:
        point = sweep.decode(text)
    except (ValueError, RecursionError):
        point = None
    kv = point.get(_KV_KEY) if isinstance(point, dict) else None
    if not isinstance(point, dict) or not all(isinstance(k, str) for k in point) or \
            (kv is not None and (isinstance(kv, bool) or not isinstance(kv, int))):
        raise UserError(f"{csv}: column 'sweep', line {line}: {shorten(text)} is not a sweep point of this tool")
    return point


def _family_order(configured: list, present: pd.Series) -> list[str]:
    """The config's family order, then any other family that ran, by name."""
    seen = set(present.astype(str))
    return [f for f in configured if f in seen] + sorted(seen - set(configured))


def _task_label(point: dict, seq_len, kv) -> str:
    bits = [f"L={int(seq_len)}"] + ([f"kv={int(kv)}"] if kv is not None and not _missing(kv) else [])
    bits += [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(point.items())
             if k not in (_KV_KEY, "train.seq_len")]
    return ", ".join(bits)


def _missing(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _panels(best: pd.DataFrame) -> list[list[str]]:
    """Task labels laid out one row per sequence length, in order of key-value pairs."""
    rows = []
    for _, g in best.groupby("seq_len", sort=True):
        rows.append(list(dict.fromkeys(g["task"])))
    return rows


def _metric_label(facts: dict) -> str:
    return "accuracy (best learning rate)" if facts["higher_is_better"] else "validation loss (best learning rate)"


def _panel_figure(best: pd.DataFrame, facts: dict, colors: dict, x: str, xlabel: str):
    rows = _panels(best)
    ncols = max(len(r) for r in rows)
    fig, axes = _figure(ncols=ncols, nrows=len(rows), width=3.8, height=3.2, sharey=True)
    markers = {f: _MARKERS[i % len(_MARKERS)] for i, f in enumerate(facts["families"])}
    metric = facts["metric"]
    for r, tasks in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(tasks):
                ax.set_visible(False)
                continue
            g = best[best["task"] == tasks[c]]
            for i, fam in enumerate(facts["families"]):
                f = g[g["family"] == fam].sort_values(x)
                f = f[f[x].notna()]
                if f.empty:
                    continue
                # later families thinner and smaller: where lines coincide (e.g. all at 1.0) each stays visible
                ax.plot(f[x], f[metric], "-", marker=markers[fam], color=colors[fam], ms=max(3.0, 8 - 1.5 * i),
                        lw=max(0.8, 2.4 - 0.5 * i), label=fam)
            ax.set_xscale("log", base=2 if x == "d_model" else 10)
            if x == "d_model":
                ticks = sorted(best["d_model"].unique())
                ax.set_xticks(ticks, [str(int(t)) for t in ticks])
                ax.minorticks_off()
            else:       # bytes: "10k" at powers of ten, "20k" / "50k" between (the default labels collide)
                from matplotlib.ticker import FuncFormatter

                from .figures import _minor_2_5
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos=None: _bytes_label(v)))
                ax.xaxis.set_minor_formatter(_minor_2_5(_bytes_label))
            if facts["higher_is_better"]:
                ax.set_ylim(-0.03, 1.03)
            ax.set_title(tasks[c], fontsize=10)
            ax.grid(True, which="both", alpha=0.25)
            ax.set_xlabel(xlabel)
        axes[r][0].set_ylabel(_metric_label(facts))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)
    return fig


def width_figure(best, facts, colors):
    return _panel_figure(best, facts, colors, "d_model", "model width d_model")


def state_figure(best, facts, colors):
    return _panel_figure(best, facts, colors, "state_bytes", "generation state at L (bytes, fp32)")


# ---------------------------------------------------------------------------------------------------
# report.md

def _fmt_bytes(v) -> str:
    if _missing(v) or v is None:
        return ""
    for scale, unit in ((2**20, "MiB"), (2**10, "KiB")):
        if v >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{int(v)} B"


def _score(v) -> str:
    return f"{v:.3f}" if not _missing(v) else ""


def _solved_table(best, facts) -> list[str]:
    """Per task and family: the smallest width that solves it, or the best score reached."""
    fams = facts["families"]
    lines = ["| task | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for task in [t for row in _panels(best) for t in row]:
        cells = []
        for fam in fams:
            g = best[(best["task"] == task) & (best["family"] == fam)].sort_values("d_model")
            if g.empty:
                cells.append("")
                continue
            hit = g[g["val_accuracy"] >= SOLVED]
            if len(hit):
                cells.append(f"d_model {int(hit['d_model'].iloc[0])}")
            else:
                top = g.loc[g["val_accuracy"].idxmax()]
                cells.append(f"not solved (best {top['val_accuracy']:.3f} at d_model {int(top['d_model'])})")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def _cell_table(best, facts) -> list[str]:
    fams = facts["families"]
    name = "accuracy" if facts["higher_is_better"] else "loss"
    head = "| task | d_model | " + " | ".join(f"{f} {name} (lr) | {f} state" for f in fams) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(fams)]
    for (task, d), g in best.groupby(["task", "d_model"], sort=False):
        cells = []
        for fam in fams:
            row = g[g["family"] == fam]
            if row.empty:
                cells += ["", ""]
                continue
            r = row.iloc[0]
            edge = ", edge" if r["edge"] else ""
            cells += [f"{_score(r[facts['metric']])} ({r['lr']:.3g}{edge})", _fmt_bytes(r["state_bytes"])]
        lines.append(f"| {task} | {int(d)} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(study: Path, ok, best, facts, figures: list[str]) -> str:
    fams = facts["families"]
    length = (f"{facts['steps']} optimiser steps" if facts["steps"] else f"{facts['tokens']:.3g} tokens"
              if facts["tokens"] else "an equal length")
    lines = [f"# Recall study `{facts['name']}`", "",
             f"Regenerate with `ssmscale report {study}`: everything below comes from that directory alone "
             "(results.csv, config.yaml).", "",
             f"Every run trains {length}. Zoology's protocol (Arora et al. 2023): per family, width and task, "
             "every learning rate of the grid is trained and the best "
             f"{'accuracy' if facts['higher_is_better'] else 'validation loss'} counts. "
             + ("Accuracy: the fraction of query positions whose argmax prediction is the right value, on the "
                "fixed validation set." if facts["higher_is_better"] else "No run recorded an accuracy (text "
                                                                          "data): the score is the loss."), "",
             "## Summary", "",
             f"- {facts['ok_runs']} of {facts['runs']} runs finished (status ok); {len(best)} cells "
             f"(family x width x task); families: {', '.join(fams)}.",
             f"- Training time summed over the runs: {facts['wall_s']:.0f} s ({facts['wall_s'] / 60:.1f} min).",
             ]
    edges = int(best["edge"].sum())
    if edges:
        lines.append(f"- **{edges} of {len(best)} cells have their best learning rate at an end of the grid** "
                     "(marked `edge` below): the optimum may lie outside it.")
    if facts["higher_is_better"]:
        lines += ["", f"Smallest width that solves each task (accuracy >= {SOLVED}):", ""]
        lines += _solved_table(best, facts)
    lines += ["", "## Figures", ""]
    captions = {
        "recall_width.png": "Accuracy against model width, one panel per task (sequence length L, key-value "
                            "pairs kv), a line per family; each point is the best learning rate of its cell.",
        "recall_state.png": "The same cells against the bytes of the generation state at the task's sequence "
                            "length (fp32; log scale): the KV cache for attention layers, the conv and SSM "
                            "state for recurrent ones (`LM.allocate_cache`, batch 1).",
    }
    for name in figures:
        lines += [f"![{name}]({name})", "", captions[name], ""]
    lines += ["## Every cell", "",
              "Best score per family, width and task, the learning rate that reached it (`edge`: at an end of "
              "the grid) and the generation state at that sequence length.", ""]
    lines += _cell_table(best, facts)
    lines += ["", "## Configuration", ""]
    lines += config_block(study)
    sha = hashlib.sha256(read_bytes(study / "results.csv", CAPS["csv"], within=study)).hexdigest()
    lines += ["## Provenance", ""] + _provenance(study / "results.csv", {"source": {"sha256": sha}}) + [""]
    return "\n".join(lines)


def write_recall_report(study: Path, out: Path) -> Path:
    """<out>/report.md with recall_width.png and recall_state.png; returns report.md's path."""
    study, out = Path(study), Path(out)
    ok, best, facts = load_cells(study)
    colors = family_colors(facts["families"])
    figures = {"recall_width.png": width_figure(best, facts, colors)}
    if best["state_bytes"].notna().any():
        figures["recall_state.png"] = state_figure(best, facts, colors)
    for name, fig in figures.items():
        atomic_write_bytes(out / name, _png(fig))
    atomic_write_text(out / "report.md", render_markdown(study, ok, best, facts, list(figures)))
    return out / "report.md"


def _bytes_label(v: float) -> str:
    """5000 -> '5k', 20000 -> '20k', 2e6 -> '2M' (decimal, as the axis is in bytes)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:g}{unit}"
    return f"{v:g}"
