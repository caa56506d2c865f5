"""Scaling-law fits with bootstrap intervals: loss-vs-compute frontier, Chinchilla Approaches 1, 2 and 3,
crossover, loss against training time, seed noise, and backtests that say how far the laws extrapolate.

Modules: runs (CSV in, cleaning, one family as arrays), laws (the log-sum-exp Huber objective and multi-start
L-BFGS), frontier, approach1, approach2, approach3, wallclock (one per law), crossover, bootstrap, seeds (seed
spread beside family gaps), backtest (hold out the largest budgets, predict them), calibration (prediction
intervals calibrated on the backtests' errors), multiplier (the compute multiplier against a baseline family),
sanity (flags a law's numbers cannot hide), decision (laws against the single-scale baseline at ranking families),
forecast (pre-registered forecasts and their scores),
pipeline (fit everything, write fit.json), text (the printed summary and notes). `ssmscale.fit` re-exports the public names below.

Everything here is a pure function of a table of runs (params N, tokens D, flops C, loss L, family,
IsoFLOP group), except `load_runs` (reads a CSV), `fit_study` / `fit_path` (read, fit, write fit.json) and
forecast.py (writes a study's forecasts/, reads them back with the runs' result.json and git to score them).

Fits (all losses in nats/token, N = non-embedding parameters, C = training FLOPs):
- frontier:   L(C) = E + A * C^-alpha on the best run of each IsoFLOP budget, fitted as
              log L = logaddexp(a - alpha log C, e) with a Huber loss (delta 1e-3) on the log residuals,
              summed over points, L-BFGS from a small data-scaled grid of starts. It needs >= 3 budgets
              (3 parameters); with exactly 3 the curve passes through every point and only the bootstrap
              says how uncertain it is.
- approach2:  per budget, a least-squares parabola of L against ln N; its vertex is N_opt(C) and D_opt(C)
              is the token count at N_opt (interpolated in log-log within the budget, which equals
              C / (6 N_opt) when C = 6ND). Budgets whose vertex lies outside the sampled sizes (or whose
              parabola opens downward) are reported and left out. Then N_opt = N0 C^a, D_opt = D0 C^b by
              least squares in log-log on >= 2 budgets.
- parametric: Chinchilla Approach 3, L(N, D) = E + A/N^alpha + B/D^beta, fitted exactly as Hoffmann et al.
              and Epoch AI did: log-sum-exp form LSE(a - alpha ln N, b - beta ln D, e), Huber delta 1e-3 on
              log residuals summed over points, L-BFGS from each of the 4,500 grid starts, best kept. The
              grid runs with scipy's default L-BFGS-B tolerances and the winner is then polished with tight
              ones. Implied allocation (assumes C = 6ND): G = (alpha A / (beta B))^(1/(alpha+beta)),
              N_opt = G (C/6)^a, D_opt = (C/6)^b / G, a = beta/(alpha+beta), b = alpha/(alpha+beta).
- crossover:  for each pair of families, the C where one frontier drops below the other: roots of the
              difference inside the range both frontiers were fitted on, and (labelled extrapolated)
              up to CROSSOVER_SEARCH_FACTOR beyond it.
- approach1:  Chinchilla Approach 1 on the runs' eval-point curves (see approach1.py).
- wallclock:  loss against pure training seconds on the time-loss Pareto front, with crossovers in seconds
              (see wallclock.py); a verdict for the machine that ran the study only.
- backtest:   refit without the largest budgets (or above --holdout-above FLOPs), predict what was held out,
              ARE and interval coverage, FLAGS where a law did not extrapolate (see backtest.py).
- calibration: prediction intervals from the backtests' own errors, growing with the distance extrapolated
              (see calibration.py); the calibration table compares them with the bootstrap's.
- multiplier: each family's compute multiplier against a baseline family (the transformer by default),
              k(C) = C_base(L_fam(C)) / C from the frontiers, per budget with intervals, its trend with C and
              its backtest (see multiplier.py).

Bootstrap: resample runs with replacement within each family and within each IsoFLOP group (so every
budget keeps its number of runs), and the seeds of every run trained with several (drawn with replacement,
then averaged), refit everything, take percentile intervals. Without a budget column the groups (runs of
similar FLOPs) are a guess that may hold one run each, and a group of one run never varies: such data is
resampled over the family's runs instead. Budgets of a single run, and intervals that come out with zero
width although resamples were fitted ("collapsed"), are said in the notes, never silently reported. With one seed per configuration a frontier
point's interval says how much it depends on which runs were made, not on seed noise; a ladder's
noise_seeds add that. Each resample has its own
child of numpy's SeedSequence(seed), so results do not depend on the number of worker processes.
Shortcut, for speed: a resample does not rerun the 4,500-point grid; it starts L-BFGS from the point
estimate and the best N_WARM_STARTS - 1 other distinct local minima the full-data grid found (the frontier
likewise). Resamples where an approach cannot be fitted are counted per approach with their reasons, never
silently dropped; intervals come from the successful ones.

fit.json (written by `fit_path` / `fit_study`):
{
  "schema": 1,
  "source":    {"path", "kind": "study" | "csv", "sha256" (of the CSV bytes), "rows_read", "columns"},
  "dropped":   {"exact_duplicates": n, "status_not_ok": {status: count}, "invalid_values": n,
                "other_learning_rates": n, "seed_duplicates_averaged": n},
  "notes":     [str, ...],                      # data handling and warnings, as printed
  "settings":  {"n_boot", "seed", "ci", "huber_delta", "flops_convention", "grouping",
                "bootstrap", "warm_starts", "crossover_search_factor", "min_runs_per_budget"},
  "families":  {name: {
      "n_runs", "n_budgets", "flops_range": [lo, hi],
      "frontier":   {"E", "A", "alpha": Q, "points": [{"flops", "loss", "params", "tokens", "budget",
                     "best_at_edge"}], "range": [lo, hi], "exact_fit": bool, "objective",
                     "band": {"flops": [...], "lo": [...], "hi": [...]}, "bootstrap": B}
                    or {"skipped": reason},
      "approach2":  {"a", "b", "N0", "D0": Q, "budgets": [{"budget", "n_runs", "n_sizes", "used",
                     "reason", "parabola": [c2, c1, c0] (L = c2 x^2 + c1 x + c0, x = ln N),
                     "params_range", "n_opt", "n_opt_lo", "n_opt_hi", "d_opt", "loss_opt"}],
                     "bootstrap": B} or {"skipped": reason, "budgets": [...]},
      "parametric": {"E", "A", "B", "alpha", "beta", "a", "b", "G": Q, "objective", "n_points",
                     "bootstrap": B} or {"skipped": reason},
      "approach1":  {"a", "b", "N0", "D0", "E", "A", "alpha": Q, "envelope": {"flops", "loss", "params", "tokens",
                     "competing"}, "n_curves", "objective", "caveat", "bootstrap": B} or {"skipped": reason},
      "wallclock":  {"E", "A", "alpha": Q, "points": [{"seconds", "loss", "params", "flops"}], "n_timed", "range",
                     "objective", "band": {"seconds", "lo", "hi"}, "bootstrap": B} or {"skipped": reason},
      "seed_noise": {"configurations": [{"budget", "params", "n_seeds", "losses", "spread", "sd"}],
                     "max_spread", "median_spread"},
      "backtest":   {"holdouts": [{"k", "fit_budgets", "held_out": [{"budget", "observed": {"best_loss",
                     "best_params", "n_opt", "n_opt_note"}, "frontier": {"loss": V}, "approach2": {"n_opt": V},
                     "parametric": {"loss": V, "n_opt": V, "runs_mean_are"}}]}], "flags": [str],
                     "summary": {approach: {quantity: {"n", "mean_are", "max_are", "covered", "checked"}}}}
                    or (--holdout-above) {"threshold", "n_fit", "n_held_out", "parametric": {"mean_are",
                     "median_are", "max_are", "covered", "checked", "fit", "runs": [{"params", "tokens", "flops"} + V]}}
                    or {"skipped": reason}}},
  (frontier points also carry "loss_lo", "loss_hi" (bootstrap), "n_seeds", "seed_spread")
  "crossover": {"pairs": [{"families": [f1, f2], "fitted_range": [lo, hi] | null, "search_range": [lo, hi],
                 "crossings": [{"flops": Q, "extrapolated": bool, "lower_above": family,
                                "found_in_resamples": k}],
                 "resamples_compared", "resamples_crossing_in_range", "statement"}]},
  "wallclock": {"devices": [str], "threads": [...], "crossover": like "crossover", in seconds},
  "seed_noise": {"pairs": [{"families", "budgets": [{"budget", "loss": {f: L}, "gap", "seed_spread": {f: s | null},
                 "within_seed_noise": bool | null}]}]},
  "backtest":  {"mode": "budgets" | "threshold" | "off", "reason" (off), "holdout_above" (threshold),
                "pairs": [{"families", "held_out": [{"k", "budget", "observed_gap", "observed_lower",
                           "frontier" | "parametric": {"gap": Q, "predicted_lower", "order_matches", "gap_covered"}}]}]},
  "decision":  {"rows": [{"families", "k", "budget", "observed_lower", "frontier" | "parametric": {"lower", "right"},
                 "baseline": {"reference_budget", "lower", "right"}}], "summary": {predictor: {"right", "n"}},
                "statement"},                         # decision.py: laws against the single-scale baseline
  "calibration": {"mode": "budgets" | "threshold" | "off", "ci", "reason" (off),
                  "models": {approach: {quantity: M}},    # calibrated on every backtest error: what forecasts use
                  "table": [{"approach", "quantity", "nominal", "bootstrap": C, "calibrated": C}],
                  "inner_errors" (threshold): [{"family", "cut", "e", "d", "s0", "spread"}]},
  "multiplier": {"baseline", "definition", "skipped" (no baseline fit), "families": {name: {
                 "budgets": [P], "largest": P, "trend": {"exponent": Q, "verdict": "growing" | "flat" | "shrinking" |
                 "undetermined", "n_budgets", "resamples"}, "backtest": {"budget", "predicted": K, "observed", "are",
                 "covered", "fit_range"} or {"skipped"}, "curve": {"flops", "k", "lo", "hi", "extrapolated"}}
                 or {"skipped": reason}}}
}
Each V also holds "distance" (decades beyond the largest fitted budget or run), "s0" (the refit's in-sample
scatter), "spread" (the prediction's bootstrap spread) and "calibrated": {"lo", "hi", "covered", "n_cal",
"method"}; summaries add "calibrated": {"covered", "checked"}; threshold backtests add "inner_cuts", "s0".
Every fitted approach block holds "collapsed": [quantities whose bootstrap interval has zero width]; every
family "sanity": [{"approach", "kind", "message"}] (sanity.py: E above an observed loss, a law above the data
at the largest budgets, an exponent at the edge of its search).
M = {"n", "s0", "sigma", "tau", "center", "lean_p", "q", "method"} or {"n", "skipped"} (calibration.py).
C = {"checked", "covered", "median_abs_error", "median_width", "width_ratio"} (log scale).
(settings also holds "baseline"; fit.json files written before the multiplier existed lack both keys.)
No timings: they are printed, so refitting the same data on the same machine rewrites the same bytes.
Q = {"value": float, "lo": float | null, "hi": float | null}: point estimate and percentile interval.
B = {"resamples", "ok", "failed", "failure_reasons": {reason: count}}.
V = {"predicted": Q, "observed", "are", "covered"}: a backtest prediction against the held-out observation.
K = Q + {"unreachable": bool} (k unbounded: the baseline's frontier never reaches that loss; then value is null);
P = {"budget", "loss", "c_baseline", "k": K, "extrapolated"}: the multiplier at one budget.
"""

from .approach1 import fit_approach1
from .approach2 import fit_approach2
from .approach3 import fit_parametric, parametric_allocation, parametric_quantities
from .bootstrap import APPROACHES, QUANTITIES, default_jobs
from .crossover import CROSSOVER_SEARCH_FACTOR, find_crossings
from .frontier import fit_frontier, frontier_loss, frontier_points
from .laws import CHINCHILLA_GRID, HUBER_DELTA, Skip, lse_huber, multistart_fit
from .multiplier import DEFAULT_BASELINE, fit_multipliers
from .pipeline import (DEFAULT_CI, DEFAULT_N_BOOT, FIGURE_EXTRAPOLATION, FLOPS_CONVENTION, fit_json, fit_path,
                       fit_runs, fit_study, is_default_fit, json_safe)
from .runs import MIN_RUNS_PER_BUDGET, FamilyRuns, LoadedRuns, load_runs, parse_column_mapping
from .text import E_UNIDENTIFIED, fit_notes, fmt_k, fmt_value, format_fit, multiplier_lines, quantity_rows
from .wallclock import fit_wallclock

__all__ = [
    "APPROACHES", "CHINCHILLA_GRID", "CROSSOVER_SEARCH_FACTOR", "DEFAULT_BASELINE", "DEFAULT_CI", "DEFAULT_N_BOOT",
    "E_UNIDENTIFIED", "fit_multipliers", "fmt_k", "multiplier_lines",
    "FIGURE_EXTRAPOLATION", "FLOPS_CONVENTION", "HUBER_DELTA", "MIN_RUNS_PER_BUDGET", "QUANTITIES", "FamilyRuns",
    "LoadedRuns", "Skip", "default_jobs", "find_crossings", "fit_approach1", "fit_approach2", "fit_frontier", "fit_json", "fit_notes",
    "fit_parametric", "fit_path", "fit_runs", "fit_study", "fit_wallclock", "fmt_value", "format_fit", "frontier_loss",
    "is_default_fit",
    "frontier_points", "json_safe", "load_runs", "lse_huber", "multistart_fit", "parametric_allocation",
    "parametric_quantities", "parse_column_mapping", "quantity_rows",
]
