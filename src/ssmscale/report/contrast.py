"""The context-length contrast: one study set beside another that differs only in sequence length.

A ladder config's `contrast_with: <study name>` names a sibling study directory (same parent folder) trained
with the same protocol at another sequence length. The report of the study that names it gains a section:
per budget both studies trained, each family's best loss at each length, and each SSM family's gap to the
transformer at each length, so that it says whether the gap grows or shrinks with context (the Mamba paper
reports the SSM's advantage growing with sequence length). Reads the two studies' results only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..fit import load_runs

REFERENCE = "transformer"


def contrast_name(study: Path) -> str | None:
    """The `contrast_with` of the study's saved config.yaml (a plain name; None when absent)."""
    from ..config import read_study_config
    from ..errors import UserError
    try:
        return read_study_config(study / "config.yaml", within=study).contrast_with
    except (UserError, OSError):
        return None


def _seq_len(study: Path) -> int | None:
    from ..config import read_study_config
    from ..errors import UserError
    try:
        return read_study_config(study / "config.yaml", within=study).train.seq_len
    except (UserError, OSError):
        return None


def best_by_budget(study: Path) -> pd.DataFrame:
    """family, budget, loss (the best configuration's, averaged over its seeds), spread (max - min over the
    seeds of the budget's configuration trained with several, which need not be the best one once seeds are
    averaged; NaN where none was), params, n_seeds: one row per (family, budget)."""
    t = load_runs(study).table
    rows = []
    for (family, budget), g in t.groupby(["family", "group_flops"], sort=True):
        best = g.loc[g["loss"].idxmin()]
        spreads = [max(v) - min(v) for v in g["seed_losses"] if len(v) > 1]
        rows.append({"family": str(family), "budget": float(budget), "loss": float(best["loss"]),
                     "spread": max(spreads) if spreads else float("nan"),
                     "params": float(best["params"]), "n_seeds": len(best["seed_losses"])})
    return pd.DataFrame(rows, columns=["family", "budget", "loss", "spread", "params", "n_seeds"])


def contrast_section(study: Path, colors: dict, figure, sci) -> tuple[list[str], dict]:
    """(markdown lines, {file name: figure}); empty when the study names no contrast."""
    name = contrast_name(study)
    if not name:
        return [], {}
    other = study.parent / name
    out = ["## Context length: the same protocol at another sequence length", ""]
    if not (other / "results.csv").is_file():
        return out + [f"`contrast_with: {name}` names `{other}`, which has no results.csv yet: train it to see "
                      "this section.", ""], {}
    here_L, there_L = _seq_len(study), _seq_len(other)
    here, there = best_by_budget(study), best_by_budget(other)
    budgets = sorted(set(here["budget"]) & set(there["budget"]))
    families = [f for f in sorted(set(here["family"]) & set(there["family"]), key=lambda f: (f != REFERENCE, f))]
    if not budgets or REFERENCE not in families or len(families) < 2:
        return out + [f"This study (L = {here_L}) and `{name}` (L = {there_L}) share no budget with the "
                      f"{REFERENCE} and another family: nothing to contrast.", ""], {}

    def loss(table, family, budget):
        row = table[(table.family == family) & (table.budget == budget)]
        return (float(row["loss"].iloc[0]), float(row["spread"].iloc[0])) if len(row) else (np.nan, np.nan)

    out += [f"This study trains at sequence length {here_L}; `{name}` (`scaling/{name}`, report "
            f"`reports/{name}`) trains the same families, data and budgets at {there_L}. Best validation loss per "
            f"budget (nats/token; the best size and learning rate of each, averaged over its seeds), and each "
            f"family's gap to the {REFERENCE} (its loss minus the {REFERENCE}'s: negative = ahead). The two lengths "
            f"score different windows and spend a budget differently (attention's FLOPs per token grow with the "
            f"length, so at {max(here_L, there_L)} the {REFERENCE} trains on fewer tokens; a batch holds fewer, "
            f"longer sequences): compare the gaps, not the losses, across lengths. Seed spread: max - min over the "
            f"seeds of the budget's configuration retrained with other seeds (noise_seeds), at L={there_L} / "
            f"L={here_L}.", ""]
    header = ["budget (FLOPs)", "family", f"loss at L={there_L}", f"loss at L={here_L}",
              f"gap at L={there_L}", f"gap at L={here_L}", "gap change", "seed spread (both L)"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    verdicts = []
    for budget in budgets:
        ref_there, _ = loss(there, REFERENCE, budget)
        ref_here, _ = loss(here, REFERENCE, budget)
        for fam in families:
            l_there, s_there = loss(there, fam, budget)
            l_here, s_here = loss(here, fam, budget)
            spread = "/".join("-" if s != s else f"{s:.4f}" for s in (s_there, s_here))
            if fam == REFERENCE:
                out.append(f"| {sci(budget)} | {fam} | {l_there:.4f} | {l_here:.4f} | | | | {spread} |")
                continue
            g_there, g_here = l_there - ref_there, l_here - ref_here
            out.append(f"| {sci(budget)} | {fam} | {l_there:.4f} | {l_here:.4f} | {g_there:+.4f} | {g_here:+.4f} | "
                       f"{g_here - g_there:+.4f} | {spread} |")
            if budget == budgets[-1]:
                spreads = [v for v in (s_there, s_here, loss(there, REFERENCE, budget)[1],
                                       loss(here, REFERENCE, budget)[1]) if v == v]
                verdicts.append((fam, g_there, g_here, max(spreads) if spreads else float("nan")))
    out.append("")
    for fam, g_there, g_here, noise in verdicts:
        lead_there, lead_here = -g_there, -g_here
        moved = abs(lead_here - lead_there)
        within = " (no seed spread measured at this budget)" if noise != noise else (
            f" (within the largest seed spread of the two families at this budget, {noise:.4f} nats: not "
            "resolved)" if moved <= noise else
            f" (more than the largest seed spread of the two families at this budget, {noise:.4f} nats)")
        direction = "grows" if lead_here > lead_there else "shrinks"
        who = "ahead" if lead_here > 0 else "behind"
        out.append(f"- **{fam}** at {sci(budgets[-1])} FLOPs: {lead_there:+.4f} nats ahead of the {REFERENCE} at "
                   f"L={there_L}, {lead_here:+.4f} at L={here_L} ({who}); going from L={there_L} to {here_L} its "
                   f"lead {direction} by {moved:.4f}{within}.")
    out += ["", "![context.png](context.png)", ""]
    return out, {"context.png": _figure(here, there, here_L, there_L, families, colors, figure)}


def _figure(here, there, here_L, there_L, families, colors, figure):
    fig, axes = figure(width=7.0, height=4.6)
    ax = axes[0][0]
    for fam in families:
        for table, L, style in ((there, there_L, "--"), (here, here_L, "-")):
            rows = table[table.family == fam].sort_values("budget")
            ax.plot(rows["budget"], rows["loss"], style, marker="o", color=colors.get(fam, "#000000"),
                    label=f"{fam}, L={L}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("best validation loss (nats/token)")
    ax.set_title(f"Best loss per budget at L={there_L} (dashed) and L={here_L} (solid)", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return fig
