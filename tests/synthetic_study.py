"""Synthetic scaling studies drawn from known laws, laid out like the ladder's scaling/<study>/ directory.

Every run's loss is L(N, D) = E + A/N^alpha + B/D^beta times log-normal noise; the sizes of each budget
are multiples of the law's compute-optimal N (so the IsoFLOP minima are inside the sampled range). With
C = 6ND the best run of a budget follows E + K C^-gamma exactly (before noise): see frontier_law.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
LAWS = {"transformer": CHINCHILLA,
        "mamba": {"E": 1.64, "A": 520.0, "B": 380.0, "alpha": 0.33, "beta": 0.29}}
# loss levels like a small byte-level LM (2-4 nats/token at 1e5-1e7 parameters): for demo reports
SMALL_LM_LAWS = {"transformer": {"E": 1.10, "A": 25.0, "B": 45.0, "alpha": 0.30, "beta": 0.27},
                 "mamba": {"E": 1.05, "A": 30.0, "B": 42.0, "alpha": 0.30, "beta": 0.28}}
# four families whose frontiers cross pairwise inside or near 1e13-1e14 (steeper alpha, higher A)
FOUR_FAMILY_LAWS = {**SMALL_LM_LAWS,
                    "mamba2": {"E": 1.00, "A": 40.0, "B": 40.0, "alpha": 0.32, "beta": 0.28},
                    "hybrid": {"E": 1.02, "A": 33.0, "B": 41.0, "alpha": 0.31, "beta": 0.28}}
SIZE_FACTORS = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0)


def law_loss(law: dict, n, d):
    return law["E"] + law["A"] / np.power(n, law["alpha"]) + law["B"] / np.power(d, law["beta"])


def allocation(law: dict) -> dict:
    """Exponents and prefactor of the compute-optimal allocation under C = 6ND."""
    s = law["alpha"] + law["beta"]
    g = (law["alpha"] * law["A"] / (law["beta"] * law["B"])) ** (1 / s)
    return {"a": law["beta"] / s, "b": law["alpha"] / s, "G": g}


def optimal_params(law: dict, c):
    al = allocation(law)
    return al["G"] * (np.asarray(c, float) / 6) ** al["a"]


def frontier_law(law: dict) -> dict:
    """min over N of L(N, C / 6N) = E + K C^-gamma, gamma = alpha beta / (alpha + beta)."""
    al = allocation(law)
    gamma = law["alpha"] * law["beta"] / (law["alpha"] + law["beta"])
    k = 6 ** gamma * (law["A"] * al["G"] ** -law["alpha"] + law["B"] * al["G"] ** law["beta"])
    return {"E": law["E"], "A": k, "alpha": gamma}


def make_runs(laws: dict = LAWS, budgets=(1e13, 1e14, 1e15), size_factors=SIZE_FACTORS, noise: float = 0.003,
              lrs=(1e-3, 3e-3), lr_penalty: float = 0.04, n_bad: int = 2, seed: int = 0) -> pd.DataFrame:
    """Rows like the ladder's results.csv; the wrong learning rate costs `lr_penalty` nats, `n_bad` runs fail."""
    rng = np.random.default_rng(seed)
    rows = []
    for family, law in laws.items():
        for budget in budgets:
            n_opt = float(optimal_params(law, budget))
            for f in size_factors:
                params = int(round(n_opt * f))
                tokens = budget / (6 * params)
                best_lr = lrs[rng.integers(len(lrs))]
                for lr in lrs:
                    loss = float(law_loss(law, params, tokens)) * math.exp(noise * rng.standard_normal())
                    if lr != best_lr:
                        loss += lr_penalty * (1 + 0.5 * rng.random())
                    rows.append(_row(family, params, budget, tokens, lr, loss))
    df = pd.DataFrame(rows)
    for i in rng.choice(len(df), size=n_bad, replace=False):
        df.loc[i, "status"] = "diverged" if i % 2 else "failed"
        df.loc[i, "loss"] = float("nan")
    return df


def _row(family, params, budget, tokens, lr, loss) -> dict:
    d_model = int(round((params / 12) ** (1 / 3) * 4))
    run_id = f"{family}-N{params:.3g}-C{budget:.3g}-lr{lr:g}"
    return {"run_id": run_id, "study": "synthetic", "family": family, "d_model": d_model, "n_layer": 4,
            "params": params, "params_total": params + 256 * d_model, "budget": budget, "flops": 6 * params * tokens,
            "tokens": tokens, "steps": int(tokens // 4096), "lr": lr, "seed": 0, "seq_len": 256, "loss": loss,
            "bpb": loss / math.log(2), "status": "ok", "wall_s": 1.0, "tokens_per_s": 1e5,
            "config_hash": "0123456789abcdef", "data_fingerprint": "synthetic-data-fp", "commit": "synthetic",
            "device": "cpu (synthetic)", "versions": json.dumps({"torch": "0.0", "ssmscale": "0.1.0"}),
            "flops_convention": "6ND (synthetic)"}


def make_profile(families=("transformer", "mamba")) -> pd.DataFrame:
    rows = []
    for family in families:
        for mode in ("train", "prefill", "generate"):
            for seq_len in (256, 512, 1024, 2048, 4096, 8192):
                attn = family == "transformer"
                tps = 2e5 / (1 + (seq_len / 2048 if attn else 0.05))
                if mode == "generate":
                    tps = 3e3 / (1 + seq_len / 1024) if attn else 1.2e4
                mem = 2e8 + (4e4 if attn else 1.5e4) * seq_len * (8 if mode == "train" else 1)
                oom = attn and mode == "train" and seq_len == 8192
                rows.append({"family": family, "mode": mode, "seq_len": seq_len, "batch": 8,
                             "tokens_per_s": float("nan") if oom else tps,
                             "peak_mem_bytes": float("nan") if oom else mem, "mfu": 0.3,
                             "status": "oom" if oom else "ok"})
    return pd.DataFrame(rows)


def make_study(root, name: str = "synthetic", profile: bool = True, **kwargs) -> Path:
    """Write scaling/<name>/ (config.yaml, plan.csv, results.csv, runs/, optional profile/) under root."""
    study = Path(root) / name
    (study / "runs").mkdir(parents=True, exist_ok=True)
    df = make_runs(**kwargs)
    df["study"] = name
    config = {"name": name, "families": sorted(df["family"].unique().tolist()),
              "budgets": sorted(float(b) for b in df["budget"].unique()),
              "lrs": sorted(float(x) for x in df["lr"].unique()), "seeds": [0],
              "note": "synthetic study drawn from known scaling laws (tests/synthetic_study.py)"}
    (study / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    plan = df[["run_id", "family", "params", "budget", "lr", "seed", "tokens", "flops"]]
    plan.to_csv(study / "plan.csv", index=False)
    df.to_csv(study / "results.csv", index=False)
    if profile:
        (study / "profile").mkdir(exist_ok=True)
        make_profile(tuple(sorted(df["family"].unique()))).to_csv(study / "profile" / "profile.csv", index=False)
    return study
