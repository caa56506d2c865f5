"""`ssmscale` command line: parse arguments, call one function per subcommand, map user errors to exit 2.

Heavy libraries are imported inside the handlers, never at module level, so `--help` and
config errors answer in about a second.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


# Each subcommand: `_<name>_args(parser)` declares its arguments, `_<name>(args)` runs it, and one
# entry in COMMANDS (bottom of the file) lists it. Only commands that work are listed.

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad arguments: one line and exit code 2 (argparse's default also prints the usage)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(
        prog="ssmscale",
        description="Matched Transformer++ vs Mamba scaling studies: train, ladder, fit, report, profile.")
    parser.add_argument("--version", action="version", version=f"ssmscale {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_, configure, run in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        configure(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return args._run(args) or 0
    except UserError as exc:
        print(f"ssmscale {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ssmscale {args.command}: interrupted", file=sys.stderr)
        return 130


def _parse_overrides(pairs: list[str]) -> dict:
    """--set key.path=value pairs; values are parsed as YAML scalars (3e-3, true, [0.9, 0.95])."""
    import yaml
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {key}: cannot parse value {value!r}") from None
    return out


# ------------------------------------------------------------------------------------- train
def _train_args(p):
    p.add_argument("config", help="run config (YAML), e.g. configs/train_tiny.yaml")
    p.add_argument("--family", help="model family: transformer or mamba (overrides model.family)")
    p.add_argument("--out", help="run directory (default: runs/<name>-<family>)")
    p.add_argument("--seed", type=int, help="overrides seed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-3")
    p.add_argument("--force", action="store_true", help="retrain even if the run directory holds a result")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train(args):
    from pathlib import Path

    from .config import load_run_config
    overrides = _parse_overrides(args.set)
    if args.family is not None:
        overrides["model.family"] = args.family
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.no_progress:
        overrides["train.progress"] = False
    cfg = load_run_config(args.config, overrides)
    out = Path(args.out or f"runs/{cfg.name}-{cfg.model.family}")
    if (out / "result.json").exists() and not args.force:
        raise UserError(f"{out}: already holds a finished run (result.json); use --force to retrain")
    from .train import run_training
    r = run_training(cfg, out)
    if r.get("global_rank"):     # an extra rank of a multi-process strategy: rank 0 reports
        return 0 if r["status"] == "ok" else 1
    print(f"{r['status']}: {r['family']} d_model={r['d_model']} n_layer={r['n_layer']} "
          f"params={r['params']:,} tokens={r['tokens']:,} flops={r['flops']:.3g} "
          f"val loss={r['loss']:.4f} nats/token, bpb={r['bpb']:.4f}, {r['tokens_per_s']:,.0f} tokens/s, "
          f"{r['wall_s']:.1f} s -> {out / 'result.json'}")
    if r["status"] != "ok":
        print(f"run {r['status']}: {r['message']}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------- sizes
def _sizes_args(p):
    p.add_argument("params", nargs="+", help="target non-embedding parameter counts, e.g. 1e5 1e6 1e7")
    p.add_argument("--families", default="transformer,mamba", help="comma-separated families")
    p.add_argument("--seq-len", type=int, default=256, help="sequence length for FLOPs per token (default 256)")
    p.add_argument("--head-dim", type=int, default=32, help="transformer head dimension (default 32)")
    p.add_argument("--vocab", type=int, default=256, help="tokenizer vocabulary (default 256, bytes)")
    p.add_argument("--verify", action="store_true",
                   help="also count a real forward with torch's FlopCounterMode and compare the matmul terms")


def _sizes(args):
    targets = []
    for text in args.params:
        try:
            targets.append(float(text))
        except ValueError:
            raise UserError(f"params: expected numbers such as 1e6, got {text!r}") from None
    if min(targets) <= 0:
        raise UserError("params: must be positive")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in ("transformer", "mamba")]
    if bad or not families:
        raise UserError(f"--families: unknown family {bad[0] if bad else args.families!r}; use transformer,mamba")
    from . import flops
    from .models import ModelConfig
    from .models.sizing import ladder_shapes
    base = ModelConfig(family="transformer", d_model=args.head_dim, n_layer=1, head_dim=args.head_dim,
                       vocab_size=args.vocab)
    shapes = ladder_shapes(targets, families, base)
    print(f"sizing.py: transformer n_layer from aspect ratio 64 (>= 2 layers), width a multiple of head_dim "
          f"{args.head_dim}; Mamba 2x layers, width matched in parameters. FLOPs at L={args.seq_len}: {flops.CONVENTION}")
    head = f"{'target':>9} {'family':<11} {'d_model':>7} {'n_layer':>7} {'params':>12} {'total':>12} " \
           f"{'train FLOPs/tok':>15} {'/6N':>6}"
    print(head + ("  FlopCounterMode matmul (attention)" if args.verify else ""))
    for i, s in enumerate(shapes):
        cfg = base.replace(family=s.family, d_model=s.d_model, n_layer=s.n_layer)
        summ = flops.flops_summary(cfg, args.seq_len)
        line = (f"{targets[i // len(families)]:>9.3g} {s.family:<11} {s.d_model:>7} {s.n_layer:>7} {s.params:>12,} "
                f"{s.params_total:>12,} {summ['train_flops_per_token']:>15,.0f} {summ['ratio_to_6n']:>6.3f}")
        if args.verify:
            chk = flops.counter_check(cfg, args.seq_len)
            line += f"  {chk['matmul_ratio']:.4f}"
            if "attention_ratio" in chk:
                line += f" ({chk['attention_ratio']:.4f})"
        print(line)
    return 0


# ------------------------------------------------------------------------------------ ladder
def _ladder_args(p):
    p.add_argument("config", help="ladder config (YAML), e.g. configs/small.yaml")
    p.add_argument("--out", help="study directory (default: scaling/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan table, write plan.csv, train nothing")
    p.add_argument("--executor", help="local (in-process) or submitit (local pool / Slurm job array)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.seq_len=64")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--throughput-from", metavar="PROFILE_CSV",
                   help="price the plan in device-hours from a `ssmscale profile` CSV (training rows per family) "
                        "instead of the stated GPU assumption")


def _ladder(args):
    if args.executor not in (None, "local", "submitit"):
        raise UserError(f"--executor: unknown executor {args.executor!r}; use local or submitit")
    from .ladder import run_ladder
    run_ladder(args.config, out=args.out, dry_run=args.dry_run, executor=args.executor,
               progress=not args.no_progress, overrides=_parse_overrides(args.set),
               throughput_from=args.throughput_from)
    return 0


# ----------------------------------------------------------------------------------- profile
def _profile_args(p):
    p.add_argument("config", nargs="?", help="--op loop: the run config whose model and batch are timed")
    p.add_argument("--op", choices=["model", "scan", "loop"], default="model",
                   help="model: both families against sequence length (default); scan: the selective-scan "
                        "implementations; loop: the Lightning training loop against a bare PyTorch loop")
    p.add_argument("--families", default="transformer,mamba", help="model: comma-separated families")
    p.add_argument("--params", help="model: target non-embedding parameters of a matched pair (default 1e7)")
    p.add_argument("--d-model", help="model: explicit width (with --n-layer) instead of --params")
    p.add_argument("--n-layer", help="model: explicit depth (with --d-model)")
    p.add_argument("--gen-tokens", default="32", help="model: tokens decoded per generation measurement")
    p.add_argument("--mem-limit-gb", help="model: cap on the memory a point may add (beyond it: oom)")
    p.add_argument("--family", help="loop: the family to time (default: the config's)")
    p.add_argument("--steps", default="60", help="loop: timed steps per round (after 10 warm-up steps)")
    p.add_argument("--impls", help="scan: comma-separated implementations (default: all available on the "
                                   "device, plus the mambapy anchor)")
    p.add_argument("--seq-lens", help="comma-separated sequence lengths (model default 256,...,16384; "
                                      "scan default 1024,4096)")
    p.add_argument("--batch", help="batch size (model default 1, scan default 8)")
    p.add_argument("--d-inner", default="256", help="scan: channels (Mamba's expand * d_model)")
    p.add_argument("--d-state", default="16", help="scan: state size N")
    p.add_argument("--modes", help="model: train,prefill,generate (default all); scan: fwd,fwdbwd (default both)")
    p.add_argument("--repeats", default="3", help="timed repeats per point (median reported)")
    p.add_argument("--threads", help="torch threads in each measuring process (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--ref-max-len", default="1024", help="scan: skip the slow reference beyond this length")
    p.add_argument("--timeout", default=None, help="seconds allowed per point (default: no limit)")
    p.add_argument("--model-args", action="store_true",
                   help="scan: give it the Mamba block's arguments, delta_softplus with delta_bias, D and "
                        "the gate z (the anchors compute the same)")
    p.add_argument("--out", help="folder for the CSV (model: profile.csv, .json, .png; scan: scan_bench.csv)")


def _profile(args):
    if args.config and args.op != "loop":
        raise UserError(f"{args.config}: a config file is only used with --op loop")
    if args.impls and args.op != "scan":
        raise UserError("--impls: only used with --op scan")
    return {"scan": _profile_scan, "model": _profile_model, "loop": _profile_loop}[args.op](args)


def _seconds(text):
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--timeout: expected seconds, got {text!r}") from None
    if value <= 0:
        raise UserError(f"--timeout: expected a positive number of seconds, got {text!r}")
    return value


def _profile_model(args):
    from .profile import MODES, run_profile
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in ("transformer", "mamba")]
    if bad or not families:
        raise UserError(f"--families: unknown family {bad[0] if bad else args.families!r}; use transformer,mamba")
    modes = [m.strip() for m in (args.modes or ",".join(MODES)).split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise UserError(f"--modes: expected a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu or cuda, got {args.device!r}")
    if (args.d_model is None) != (args.n_layer is None):
        raise UserError("--d-model: give both --d-model and --n-layer, or --params")
    if args.d_model is not None and args.params is not None:
        raise UserError("--params: give either --params or --d-model/--n-layer")
    params = None
    if args.d_model is None:
        try:
            params = float(args.params or 1e7)
        except ValueError:
            raise UserError(f"--params: expected a number such as 1e7, got {args.params!r}") from None
        if params <= 0:
            raise UserError("--params: must be positive")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device in this process")
    mem = None
    if args.mem_limit_gb is not None:
        try:
            mem = int(float(args.mem_limit_gb) * 2**30)
        except ValueError:
            raise UserError(f"--mem-limit-gb: expected a number, got {args.mem_limit_gb!r}") from None
    rows = run_profile(
        families, _positive_ints(args.seq_lens or "256,512,1024,2048,4096,8192,16384", "--seq-lens"), modes,
        params=params, d_model=_positive_int(args.d_model, "--d-model") if args.d_model else None,
        n_layer=_positive_int(args.n_layer, "--n-layer") if args.n_layer else None,
        batch=_positive_int(args.batch or "1", "--batch"), gen_tokens=_positive_int(args.gen_tokens, "--gen-tokens"),
        repeats=_positive_int(args.repeats, "--repeats"), device=args.device,
        threads=_positive_int(args.threads, "--threads") if args.threads else None,
        timeout_s=_seconds(args.timeout), out=args.out, mem_limit_bytes=mem)
    return 0 if all(r["status"] in ("ok", "oom") for r in rows) else 1


def _profile_loop(args):
    if not args.config:
        raise UserError("--op loop: give a run config, e.g. ssmscale profile --op loop configs/train_tiny.yaml")
    from .config import load_run_config
    load_run_config(args.config, {"model.family": args.family} if args.family else None)  # errors first
    from .profile import loop_overhead
    r = loop_overhead(args.config, args.family, steps=_positive_int(args.steps, "--steps"))
    print(f"{r['family']} d_model {r['d_model']} x {r['n_layer']} layers, {r['tokens_per_step']} tokens/step, "
          f"median of {r['steps']} steps x {r['rounds']} alternating rounds:")
    print(f"  bare PyTorch loop: {r['bare_ms']:.1f} ms/step, {r['bare_tokens_per_s']:,.0f} tokens/s")
    print(f"  Lightning loop:    {r['lightning_ms']:.1f} ms/step, {r['lightning_tokens_per_s']:,.0f} tokens/s")
    print(f"  Lightning overhead: {100 * r['overhead']:+.1f}% per step")
    return 0


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return values


def _positive_int(text: str, flag: str) -> int:
    values = _positive_ints(text, flag)
    if len(values) != 1:
        raise UserError(f"{flag}: expected one positive integer, got {text!r}")
    return values[0]


def _profile_scan(args):
    from pathlib import Path

    from . import bench_scan
    args.batch = args.batch or "8"
    args.seq_lens = args.seq_lens or "1024,4096"
    args.modes = args.modes or "fwd,fwdbwd"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in bench_scan.MODES for m in modes):
        raise UserError(f"--modes: expected a comma-separated subset of {','.join(bench_scan.MODES)}, "
                        f"got {args.modes!r}")
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu or cuda, got {args.device!r}")
    sizes = {k: _positive_int(getattr(args, k), "--" + k.replace("_", "-"))
             for k in ("batch", "d_inner", "d_state", "repeats", "ref_max_len")}
    threads = _positive_int(args.threads, "--threads") if args.threads is not None else None
    timeout = None
    if args.timeout is not None:
        try:
            timeout = float(args.timeout)
        except ValueError:
            raise UserError(f"--timeout: expected seconds, got {args.timeout!r}") from None
    from .ops import available_impls
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device in this process")
    impls = ([x.strip() for x in args.impls.split(",") if x.strip()] if args.impls
             else available_impls(args.device) + ["mambapy"])
    try:
        bench_scan.check_impls(impls, args.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    seq_lens = _positive_ints(args.seq_lens, "--seq-lens")
    model_args = " with the model's args (softplus, delta_bias, D, z)" if args.model_args else ""
    print(f"selective scan on {args.device}: batch {sizes['batch']}, d_inner {sizes['d_inner']}, "
          f"N {sizes['d_state']}{model_args}; median of {sizes['repeats']} after 1 warm-up; peak = memory the first "
          f"step needed beyond its inputs; each point in a fresh process", flush=True)

    def progress(row):
        took = f"{row['median_ms']:.1f} ms" if row.get("median_ms") is not None else row["status"]
        print(f"  {row['impl']:>8} L={row['length']} {row['mode']}: {took}", file=sys.stderr, flush=True)

    rows = bench_scan.run_benchmark(
        impls, seq_lens, batch=sizes["batch"], d_inner=sizes["d_inner"], d_state=sizes["d_state"],
        modes=modes, repeats=sizes["repeats"], device=args.device, ref_max_len=sizes["ref_max_len"],
        threads=threads, timeout_s=timeout, progress=progress, model_args=args.model_args)
    print(bench_scan.format_table(rows))
    if rows and rows[0].get("bandwidth_gbs"):
        print(f"/ floor: time over the memory-bandwidth floor (bytes that must move / "
              f"{rows[0]['bandwidth_gbs']:.1f} GB/s, a large copy measured in this run)")
    if args.out:
        import pandas as pd

        from .fsutil import atomic_write_dataframe_csv
        path = Path(args.out) / "scan_bench.csv"
        atomic_write_dataframe_csv(path, pd.DataFrame(rows))
        print(f"wrote {path}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


# ------------------------------------------------------------------------------------- fit
def _fit_args(p):
    p.add_argument("path", help="a study directory (scaling/<study>, reads its results.csv) or any CSV with "
                                "columns params, tokens (or flops), loss and optional flops, family, budget")
    p.add_argument("--out", help="folder for fit.json (default: the study directory, or the CSV's folder)")
    p.add_argument("--columns", action="append", metavar="NAME=COLUMN[,...]",
                   help='use other column names, e.g. --columns params="Model Size",flops="Training FLOP"')
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples (default 200; 0: no intervals)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--ci", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--jobs", type=int, help="worker processes (default: every available core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fit(args):
    from .fit import fit_path, format_fit, parse_column_mapping
    result, target = fit_path(args.path, out=args.out, columns=parse_column_mapping(args.columns),
                              n_boot=args.n_boot, seed=args.seed, ci=args.ci, n_jobs=args.jobs,
                              progress=not args.no_progress)
    print(format_fit(result))
    print(f"wrote {target}")


# ------------------------------------------------------------------------------------- report
def _report_args(p):
    p.add_argument("study_dir", help="study directory (scaling/<study>)")
    p.add_argument("--out", help="report folder (default: reports/<study>)")
    p.add_argument("--refit", action="store_true", help="refit even if the study's fit.json is up to date")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples when fitting (default 200)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed when fitting (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _report(args):
    from .report import write_report
    path = write_report(args.study_dir, args.out, refit=args.refit, n_boot=args.n_boot, seed=args.seed,
                        progress=not args.no_progress)
    print(f"wrote {path}")


COMMANDS: list = [
    ("sizes", "matched shapes, parameter counts and FLOPs per token for target sizes", _sizes_args, _sizes),
    ("train", "train one model on its token budget (writes DIR/result.json)", _train_args, _train),
    ("ladder", "plan and run an IsoFLOP ladder (resumable), then fit and report", _ladder_args, _ladder),
    ("profile", "throughput, peak memory and MFU against sequence length (training, prefill, generation); "
                "--op scan: the selective-scan kernels; --op loop: Lightning overhead",
     _profile_args, _profile),
    ("fit", "fit scaling laws with bootstrap intervals to a study or a CSV of runs (writes fit.json)",
     _fit_args, _fit),
    ("report", "figures and report.md for a study, regenerated from its directory alone", _report_args, _report),
]


if __name__ == "__main__":
    sys.exit(main())
