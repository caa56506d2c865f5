"""The bootstrap: resample runs (and each run's seeds) within each family and IsoFLOP group, refit every
approach, percentile intervals. Also the full point fits the resamples start from (fit_approaches)."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager

import numpy as np

from .approach1 import fit_approach1
from .approach2 import fit_approach2
from .approach3 import fit_parametric
from .frontier import fit_frontier
from .laws import Skip, _one_blas_thread, distinct_minima
from .runs import FamilyRuns, _resample
from .wallclock import fit_wallclock

# wallclock: loss against training seconds, fitted like the frontier (not a compute-scaling approach)
APPROACHES = ("frontier", "approach1", "approach2", "parametric", "wallclock")
QUANTITIES = {"frontier": ("E", "A", "alpha"), "approach1": ("a", "b", "N0", "D0", "E", "A", "alpha"),
              "approach2": ("a", "b", "N0", "D0"), "parametric": ("E", "A", "B", "alpha", "beta", "a", "b", "G"),
              "wallclock": ("E", "A", "alpha")}
N_WARM_STARTS = 4                # bootstrap L-BFGS starts: point estimate + 3 other distinct local minima
# a fit that runs off to infinity (e.g. exp of a huge log-prefactor) fails that fit, not the whole command
NUMERICAL_ERRORS = (ValueError, np.linalg.LinAlgError, ArithmeticError)   # ArithmeticError: overflow, 0-division


def fit_approaches(runs: FamilyRuns, delta, grid, pool=None, n_chunks=1, approaches=APPROACHES) -> tuple[dict, dict]:
    """Each approach on all of `runs` from its full set of starts: ({approach: fit or {"skipped": why}},
    {approach: warm starts for the bootstrap, or None, for the approaches fitted})."""
    point, warm = {}, {}
    for approach in approaches:
        try:
            if approach == "frontier":
                r = fit_frontier(runs, delta, pool=pool, n_chunks=n_chunks)
            elif approach == "approach1":
                r = fit_approach1(runs, delta)
            elif approach == "approach2":
                r = fit_approach2(runs)
            elif approach == "parametric":
                r = fit_parametric(runs, delta, starts=grid, pool=pool, n_chunks=n_chunks)
            else:
                r = fit_wallclock(runs, delta)
        except Skip as exc:
            point[approach] = {"skipped": str(exc), **exc.details}
            continue
        except NUMERICAL_ERRORS as exc:
            point[approach] = {"skipped": f"numerical failure ({type(exc).__name__}: {exc})"}
            continue
        point[approach] = r
        warm[approach] = distinct_minima(r["theta"], r["rows"], N_WARM_STARTS) if "theta" in r else None
    return point, warm


def _fit_one(approach: str, runs: FamilyRuns, warm, delta) -> dict:
    """One approach on one resample, from the warm starts; the values the summaries and predictions need."""
    if approach == "frontier":
        r = fit_frontier(runs, delta, starts=warm)
        pts = r["points"]
        return {"E": r["E"], "A": r["A"], "alpha": r["alpha"],
                "best_loss": dict(zip(pts["budget"].tolist(), pts["loss"].tolist()))}
    if approach == "approach2":
        r = fit_approach2(runs)
        out = {k: r[k] for k in QUANTITIES["approach2"]}
        out["n_opt"] = {e["budget"]: e["n_opt"] for e in r["budgets"] if e["used"]}
        return out
    fit = {"approach1": fit_approach1, "parametric": fit_parametric, "wallclock": fit_wallclock}[approach]
    r = fit(runs, delta, starts=warm)
    return {k: r[k] for k in QUANTITIES[approach]}


def _bootstrap_chunk(payload) -> list:
    families, warm, delta, seeds = payload
    out = []
    with _one_blas_thread():
        for b, seed_seq in seeds:
            out.append((b, _bootstrap_sample(families, warm, delta, seed_seq)))
    return out


def _bootstrap_sample(families, warm, delta, seed_seq) -> dict:
    rng = np.random.default_rng(seed_seq)
    sample: dict = {}
    for name in sorted(families):
        runs = _resample(families[name], rng)
        sample[name] = {}
        for approach, starts in warm[name].items():
            try:
                sample[name][approach] = _fit_one(approach, runs, starts, delta)
            except Skip as exc:
                sample[name][approach] = str(exc)
            except NUMERICAL_ERRORS as exc:
                sample[name][approach] = f"numerical failure: {type(exc).__name__}"
    return sample


def _interval(values, ci) -> tuple[float | None, float | None]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) < 2:
        return None, None
    lo, hi = np.percentile(v, [50.0 * (1.0 - ci), 50.0 * (1.0 + ci)])
    return float(lo), float(hi)


def _q(value, samples, ci) -> dict:
    lo, hi = _interval(samples, ci) if samples is not None else (None, None)
    return {"value": None if value is None or not np.isfinite(value) else float(value), "lo": lo, "hi": hi}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker pool): fair timing on a busy machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@contextmanager
def _worker_pool(n_jobs: int):
    if n_jobs <= 1:
        yield None
        return
    # fork where there is one: workers run only numpy/scipy (never torch, whose thread pools a forked
    # child must not touch), and unlike spawn it works from scripts without an `if __name__` guard
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=multiprocessing.get_context(method)) as pool:
        yield pool


def _run_bootstrap(families, warm, delta, n_boot, seed, pool, n_jobs, progress, desc="bootstrap") -> list:
    from tqdm.auto import tqdm
    seeds = list(enumerate(np.random.SeedSequence(seed).spawn(n_boot)))
    size = max(1, min(10, n_boot // (4 * max(1, n_jobs))))
    chunks = [seeds[i:i + size] for i in range(0, n_boot, size)]
    results: list = [None] * n_boot
    with tqdm(total=n_boot, desc=desc, unit="resample", file=sys.stderr, disable=None if progress else True,
              leave=False) as bar:
        if pool is None:
            for chunk in chunks:
                for b, sample in _bootstrap_chunk((families, warm, delta, chunk)):
                    results[b] = sample
                bar.update(len(chunk))
        else:
            futures = {pool.submit(_bootstrap_chunk, (families, warm, delta, c)): len(c) for c in chunks}
            for fut in as_completed(futures):
                for b, sample in fut.result():
                    results[b] = sample
                bar.update(futures[fut])
    return results



def _boot_counts(samples: list) -> dict:
    # one reason per kind of failure: the counts after ", got" differ from resample to resample
    reasons = Counter(s.split(", got")[0] for s in samples if isinstance(s, str))
    return {"resamples": len(samples), "ok": sum(isinstance(s, dict) for s in samples),
            "failed": sum(reasons.values()), "failure_reasons": dict(reasons.most_common())}

