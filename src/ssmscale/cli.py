"""`ssmscale` command line: parse arguments, call one function per subcommand, map user errors to exit 2.

Heavy libraries are imported inside the handlers, never at module level, so `--help` and
config errors answer in about a second.
Over ~500 lines because each subcommand's argument table sits beside its handler (one screen per
subcommand); the work itself lives in the packages.
"""

from __future__ import annotations

import argparse
import sys

from . import limits
from .errors import Stopped, UserError, one_line, shorten, stop_on_signals
from .models.config import FAMILIES


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
    from .threads import configure_waiting
    configure_waiting()      # before anything imports torch: libgomp reads it once, when it loads
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        _check_rank_environment()
        with stop_on_signals():
            return args._run(args) or 0
    except UserError as exc:
        print(f"ssmscale {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Stopped as exc:       # SIGTERM, SIGINT: finished results stay, a study resumes where it stopped
        print(f"ssmscale {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except OSError as exc:
        import errno
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        # a full disk: every file is written whole or not at all (fsutil), so what was finished is kept
        where = f" ({one_line(exc.filename)})" if exc.filename else ""
        print(f"ssmscale {args.command}: error: {exc.strerror}{where}; what had finished is kept: free some space "
              "and run it again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ssmscale {args.command}: interrupted", file=sys.stderr)
        return 130


# process ranks a launcher sets (torchrun, Lightning, Slurm): read with int() by Lightning, torchmetrics (at its
# import) and the ladder's workers
RANK_VARIABLES = ("LOCAL_RANK", "RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID",
                  "SLURM_NTASKS")


def _check_rank_environment() -> None:
    import os
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and not value.strip().isdigit():
            raise UserError(f"environment variable {name}={shorten(value)} is not a whole number (a launcher sets "
                            "it for each process; unset it to run alone)")


def _parse_overrides(pairs: list[str]) -> dict:
    """--set key.path=value pairs; values are parsed as YAML, as in a config (3e-3, true, [0.9, 0.95])."""
    from .config import parse_yaml
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
        out[key.strip()] = parse_yaml(value, f"--set {key}")
    return out


# ------------------------------------------------------------------------------------- train
def _train_args(p):
    p.add_argument("config", help="run config (YAML), e.g. configs/train_tiny.yaml")
    p.add_argument("--family", help=f"model family: one of {', '.join(FAMILIES)} or a plugin family of the config's "
                                    "custom_families (overrides model.family)")
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
    from .fsutil import FileLock, check_no_links, check_writable_dir
    check_writable_dir(out, "run directory")
    check_no_links(out, (".run.lock", "result.json"))
    # the folder's lock, as a ladder's worker takes it: a second train on the folder is refused (the extra
    # ranks of a multi-process run, which Lightning starts with this command line, belong to rank 0's)
    from contextlib import nullcontext

    from .study.runner import _process_rank
    lock = FileLock(out / ".run.lock", tidy=True, busy=f"{out}: another run (pid {{pid}}) is training in this "
                                                      "folder; wait for it to end or use another --out")
    with lock if _process_rank() == 0 else nullcontext():
        if not args.force:
            from .safeload import read_result
            res, problem = read_result(out / "result.json", within=out)
            if res is not None:
                raise UserError(f"{out}: already holds a finished run (result.json); use --force to retrain")
            if problem:
                print(f"{problem}; the run counts as unfinished and is trained again", file=sys.stderr)
        from .train import run_training
        r = run_training(cfg, out)
    if r.get("global_rank"):     # an extra rank of a multi-process strategy: rank 0 reports
        return 0 if r["status"] == "ok" else 1
    accuracy = f", accuracy={r['val_accuracy']:.4f}" if r.get("val_accuracy") is not None else ""
    print(f"{r['status']}: {r['family']} d_model={r['d_model']} n_layer={r['n_layer']} "
          f"params={r['params']:,} tokens={r['tokens']:,} flops={r['flops']:.3g} "
          f"val loss={r['loss']:.4f} nats/token, bpb={r['bpb']:.4f}{accuracy}, {r['tokens_per_s']:,.0f} tokens/s, "
          f"{r['wall_s']:.1f} s -> {out / 'result.json'}")
    if r["status"] != "ok":
        print(f"run {r['status']}: {r['message']}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------- sizes
def _sizes_args(p):
    p.add_argument("params", nargs="+", help="target non-embedding parameter counts, e.g. 1e5 1e6 1e7")
    p.add_argument("--families", help="comma-separated families (default: every built-in one, and the --config's "
                                      "families)")
    p.add_argument("--config", help="a ladder or run config whose custom_families (plugin families) may be named in "
                                    "--families; sizing them builds their mixers (imports them)")
    p.add_argument("--seq-len", type=int, default=256, help="sequence length for FLOPs per token (default 256)")
    p.add_argument("--head-dim", type=int, default=32, help="transformer head dimension (default 32)")
    p.add_argument("--vocab", type=int, default=256, help="tokenizer vocabulary (default 256, bytes)")
    p.add_argument("--verify", action="store_true",
                   help="also count a real forward with torch's FlopCounterMode and compare the matmul terms")


def _sizes(args):
    targets = [_number(text, "params", hi=limits.MAX_PARAMS) for text in args.params]
    _in_range(args.seq_len, "--seq-len", limits.MAX_SEQ_LEN)
    _in_range(args.head_dim, "--head-dim", limits.MAX_WIDTH)
    _in_range(args.vocab, "--vocab", limits.MAX_VOCAB)
    from .config.load import config_plugins
    mixers, config_families = config_plugins(args.config)
    families = _families(args.families or ",".join(dict.fromkeys([*FAMILIES, *config_families])), mixers)
    from .study.sizes import print_sizes
    print_sizes(targets, families, seq_len=args.seq_len, head_dim=args.head_dim, vocab=args.vocab, verify=args.verify,
                mixers=mixers)
    return 0


# ------------------------------------------------------------------------------ check-family
def _check_family_args(p):
    p.add_argument("spec", help="a mixer class, path/to/file.py:Class or package.module:Class (imported: it runs "
                                "that code), or a built-in family name")
    p.add_argument("--options", default="{}", help="JSON object of constructor options: Class(d_model, **options)")
    p.add_argument("--d-model", default="64", help="width the mixer is built at (default 64)")


def _check_family(args):
    import json
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as exc:
        raise UserError(f"--options: not JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(options, dict):
        raise UserError(f"--options: expected a JSON object such as '{{\"heads\": 4}}', got {args.options!r}")
    d_model = _positive_int(args.d_model, "--d-model", limits.MAX_WIDTH)
    from .threads import apply, choose
    apply(choose(None))
    from .models.admission import check_family
    check_family(args.spec, options, d_model)
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
    from .study.ladder import run_ladder
    run_ladder(args.config, out=args.out, dry_run=args.dry_run, executor=args.executor,
               progress=not args.no_progress, overrides=_parse_overrides(args.set),
               throughput_from=args.throughput_from)
    return 0


# ----------------------------------------------------------------------------------- profile
def _profile_args(p):
    p.add_argument("config", nargs="?", help="--op loop: the run config whose model and batch are timed; --op model: "
                                             "a config whose plugin families (custom_families) --families may name")
    p.add_argument("--op", choices=["model", "scan", "ssd", "loop"], default="model",
                   help="model: the families against sequence length (default); scan: the selective-scan "
                        "implementations; ssd: Mamba-2's SSD against the selective scan at the same d_inner; "
                        "loop: the Lightning training loop against a bare PyTorch loop")
    p.add_argument("--families", default=",".join(FAMILIES), help="model: comma-separated families (default: all)")
    p.add_argument("--params", help="model: target non-embedding parameters of a matched pair (default 1e7)")
    p.add_argument("--d-model", help="model: explicit width (with --n-layer) instead of --params")
    p.add_argument("--n-layer", help="model: explicit depth (with --d-model)")
    p.add_argument("--head-dim", default="32", help="model: transformer head dimension (default 32; "
                                                    "nanoGPT-style models use 64)")
    p.add_argument("--gen-tokens", default="32", help="model: tokens decoded per generation measurement")
    p.add_argument("--mem-limit-gb", help="model: cap on the memory a point may add (beyond it: oom)")
    p.add_argument("--family", help="loop: the family to time (default: the config's)")
    p.add_argument("--steps", default="60", help="loop: timed steps per round (after 10 warm-up steps)")
    p.add_argument("--impls", help="scan: comma-separated implementations (default: all available on the "
                                   "device, plus the mambapy anchor); ssd: ssd-<impl> and scan-<impl> names "
                                   "(default: every SSD and scan available, the references last)")
    p.add_argument("--seq-lens", help="comma-separated sequence lengths (model default 256,...,16384; "
                                      "scan default 1024,4096)")
    p.add_argument("--batch", help="batch size (model default 1, scan default 8)")
    p.add_argument("--d-inner", default="256", help="scan, ssd: channels (Mamba's expand * d_model)")
    p.add_argument("--d-state", default="16", help="scan, ssd: state size N")
    p.add_argument("--ssd-head-dim", default="8", help="ssd: the SSD's head dimension (d_inner / it heads)")
    p.add_argument("--chunk-size", default="8", help="ssd: the SSD's chunk length (default 8)")
    p.add_argument("--modes", help="model: train,prefill,generate (default all three), and generate-bf16 (decoding "
                                   "that reads bf16 copies of the weights, against fp32's logits); scan, ssd: "
                                   "fwd,fwdbwd (default both)")
    p.add_argument("--repeats", default="3", help="timed repeats per point (median reported)")
    p.add_argument("--rounds", default="1",
                   help="model: measure the whole sweep this many times, each point in a fresh process each time, "
                        "and report each point's median over the rounds with their fastest and slowest step "
                        "(default 1); ratios between families then rest on several moments of a busy machine")
    p.add_argument("--threads", help="torch threads in each measuring process (default: the thread policy, "
                                     "the cores this process may use)")
    p.add_argument("--compete", default="0", metavar="N",
                   help="model: measure every point alone and again beside N CPU-bound competitor processes "
                        "(busy loops), reporting the share of the alone tokens/s kept (default 0: alone only)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--ref-max-len", default="1024", help="scan, ssd: skip the slow references beyond this length")
    p.add_argument("--timeout", default=None, help="seconds allowed per point (default: no limit)")
    p.add_argument("--model-args", action="store_true",
                   help="scan: give it the Mamba block's arguments, delta_softplus with delta_bias, D and "
                        "the gate z (the anchors compute the same)")
    p.add_argument("--out", help="folder for the CSV (model: profile.csv, .json, .png; scan: scan_bench.csv; "
                                 "ssd: ssd_bench.csv)")


def _profile(args):
    if args.config and args.op not in ("loop", "model"):
        raise UserError(f"{args.config}: a config file is only used with --op loop or --op model")
    if args.impls and args.op not in ("scan", "ssd"):
        raise UserError("--impls: only used with --op scan or ssd")
    args.compete = _count(args.compete, "--compete")
    args.rounds = _positive_int(args.rounds, "--rounds", limits.MAX_COUNT)
    if args.rounds > 1 and args.op != "model":
        raise UserError("--rounds: only used with --op model")
    if args.compete and args.op != "model":
        raise UserError("--compete: only used with --op model")
    from .threads import available_cores
    if args.compete > 4 * available_cores():     # busy loops beyond a few per core measure nothing more
        raise UserError(f"--compete: at most {4 * available_cores()} competitors (4 per core this process may use), "
                        f"got {args.compete}")
    if args.out:
        from .fsutil import check_writable_dir
        check_writable_dir(args.out, "--out")      # every op's, before the measuring, not after it
    return {"scan": _profile_scan, "ssd": _profile_ssd, "model": _profile_model, "loop": _profile_loop}[args.op](args)


def _count(text, flag: str) -> int:
    """A whole number >= 0 and at most limits.MAX_COUNT (e.g. --compete)."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise UserError(f"{flag}: expected a whole number >= 0, got {text!r}") from None
    if not 0 <= value <= limits.MAX_COUNT:
        raise UserError(f"{flag}: expected a whole number from 0 to {limits.MAX_COUNT}, got {text!r}")
    return value


def _number(text, flag: str, hi: float) -> float:
    """A positive finite number no larger than `hi` (limits.py), or a UserError naming the flag."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{flag}: expected a number such as 1e6, got {text!r}") from None
    if not 0 < value <= hi:
        raise UserError(f"{flag}: expected a positive number up to {hi:g}, got {text!r}")
    return value


def _in_range(value: int, flag: str, hi: int, lo: int = 1) -> int:
    """An integer argument within [lo, hi] (argparse has checked that it is an integer)."""
    if not lo <= value <= hi:
        raise UserError(f"{flag}: expected an integer from {lo} to {hi}, got {value}")
    return value


def _fits_in_memory(floats: int) -> None:
    """Refuse a kernel benchmark whose largest point's tensors (about `floats` fp32 values, inputs and
    outputs) cannot fit in this machine's memory: it would only die there, point after point."""
    import os
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * floats > memory:
        raise UserError(f"--seq-lens: the longest point needs about {4 * floats / 2**30:,.0f} GiB of tensors; this "
                        f"machine has {memory / 2**30:,.1f} GiB (lower --seq-lens, --batch or --d-inner)")


def _seconds(text):
    if text is None:
        return None
    return _number(text, "--timeout", hi=limits.MAX_SECONDS)


def _profile_model(args):
    from .bench.profile import CANNOT_GENERATE, EXTRA_MODES, MODES, run_profile
    from .config.load import config_plugins
    mixers, _ = config_plugins(args.config)
    families = _families(args.families, mixers)
    modes = [m.strip() for m in (args.modes or ",".join(MODES)).split(",") if m.strip()]
    if not modes or any(m not in MODES + EXTRA_MODES for m in modes):
        raise UserError(f"--modes: expected a comma-separated subset of {','.join(MODES + EXTRA_MODES)}, "
                        f"got {args.modes!r}")
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu or cuda, got {args.device!r}")
    if (args.d_model is None) != (args.n_layer is None):
        raise UserError("--d-model: give both --d-model and --n-layer, or --params")
    if args.d_model is not None and args.params is not None:
        raise UserError("--params: give either --params or --d-model/--n-layer")
    params = _number(args.params or "1e7", "--params", hi=limits.MAX_PARAMS) if args.d_model is None else None
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device in this process")
    mem = None
    if args.mem_limit_gb is not None:
        mem = int(_number(args.mem_limit_gb, "--mem-limit-gb", hi=limits.MAX_GB) * 2**30)
    sizes = dict(
        seq_lens=_positive_ints(args.seq_lens or "256,512,1024,2048,4096,8192,16384", "--seq-lens",
                                limits.MAX_SEQ_LEN),
        d_model=_positive_int(args.d_model, "--d-model", limits.MAX_WIDTH) if args.d_model else None,
        n_layer=_positive_int(args.n_layer, "--n-layer", limits.MAX_LAYERS) if args.n_layer else None,
        batch=_positive_int(args.batch or "1", "--batch", limits.MAX_BATCH),
        gen_tokens=_positive_int(args.gen_tokens, "--gen-tokens", limits.MAX_SEQ_LEN),
        repeats=_positive_int(args.repeats, "--repeats"),
        threads=_positive_int(args.threads, "--threads", limits.MAX_THREADS) if args.threads else None,
        timeout_s=_seconds(args.timeout),
        head_dim=_positive_int(args.head_dim, "--head-dim", limits.MAX_WIDTH))
    if sizes["head_dim"] % 2 and {"transformer", "hybrid"} & set(families):
        raise UserError(f"--head-dim: must be even (rotary position embeddings turn channels in pairs), "
                        f"got {sizes['head_dim']}")
    from .bench.profile import shapes_for
    try:
        shapes_for(families, params, sizes["d_model"], sizes["n_layer"], sizes["head_dim"], mixers)
    except ValueError as exc:
        raise UserError(f"--head-dim: {exc}") from None
    seq_lens = sizes.pop("seq_lens")
    rows = run_profile(families, seq_lens, modes, params=params, device=args.device, out=args.out,
                       mem_limit_bytes=mem, compete=args.compete, mixers=mixers, rounds=args.rounds, **sizes)
    for fam in dict.fromkeys(r["family"] for r in rows if r["status"] == CANNOT_GENERATE):
        print(f"{fam}: cannot generate: its mixer has no allocate_cache (it trains; generation is not measured)")
    return 0 if all(r["status"] in ("ok", "oom", CANNOT_GENERATE) for r in rows) else 1


def _profile_loop(args):
    if not args.config:
        raise UserError("--op loop: give a run config, e.g. ssmscale profile --op loop configs/train_tiny.yaml")
    from .config import load_run_config
    cfg = load_run_config(args.config, {"model.family": args.family} if args.family else None)  # errors first
    from . import threads
    explicit = _positive_int(args.threads, "--threads", limits.MAX_THREADS) if args.threads else None
    choice = threads.choose(explicit or cfg.train.num_threads,
                            explicit_name="--threads" if explicit else "train.num_threads")
    print(threads.apply(choice).describe(), flush=True)
    from .bench.loop import format_loop_overhead, loop_overhead
    r = loop_overhead(args.config, args.family, steps=_positive_int(args.steps, "--steps", limits.MAX_COUNT))
    print(format_loop_overhead(r))
    return 0


def _families(text: str, plugins=()) -> list[str]:
    """--families: a comma-separated subset of FAMILIES and of the plugin families a --config defines."""
    families = [f.strip() for f in text.split(",") if f.strip()]
    known = [*FAMILIES, *plugins]
    bad = [f for f in families if f not in known]
    if bad or not families:
        more = "" if plugins else " (a plugin family: name it in a config's custom_families and pass --config)"
        raise UserError(f"--families: unknown family {bad[0] if bad else text!r}; choose from {','.join(known)}{more}")
    return families


def _positive_ints(text: str, flag: str, hi: int = limits.MAX_COUNT) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag}: expected comma-separated positive integers up to {hi}, got {text!r}")
    if max(values) > hi:
        raise UserError(f"{flag}: {max(values)} is more than {hi}, ssmscale's bound on what can exist (limits.py)")
    return values


def _positive_int(text: str, flag: str, hi: int = limits.MAX_COUNT) -> int:
    values = _positive_ints(text, flag, hi)
    if len(values) != 1:
        raise UserError(f"{flag}: expected one positive integer, got {text!r}")
    return values[0]


def _profile_scan(args):
    from .bench import scan as bench_scan
    args.batch = args.batch or "8"
    args.seq_lens = args.seq_lens or "1024,4096"
    args.modes = args.modes or "fwd,fwdbwd"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in bench_scan.MODES for m in modes):
        raise UserError(f"--modes: expected a comma-separated subset of {','.join(bench_scan.MODES)}, "
                        f"got {args.modes!r}")
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu or cuda, got {args.device!r}")
    bounds = {"batch": limits.MAX_BATCH, "d_inner": limits.MAX_WIDTH, "d_state": limits.MAX_WIDTH,
              "repeats": limits.MAX_COUNT, "ref_max_len": limits.MAX_SEQ_LEN}
    sizes = {k: _positive_int(getattr(args, k), "--" + k.replace("_", "-"), hi) for k, hi in bounds.items()}
    threads = _positive_int(args.threads, "--threads", limits.MAX_THREADS) if args.threads is not None else None
    timeout = _seconds(args.timeout)
    seq_lens = _positive_ints(args.seq_lens, "--seq-lens", limits.MAX_SEQ_LEN)
    _fits_in_memory(sizes["batch"] * max(seq_lens) * sizes["d_inner"] * 8)
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
    rows = bench_scan.run_and_report(
        impls, seq_lens, batch=sizes["batch"], d_inner=sizes["d_inner"], d_state=sizes["d_state"],
        modes=modes, repeats=sizes["repeats"], device=args.device, ref_max_len=sizes["ref_max_len"],
        threads=threads, timeout_s=timeout, model_args=args.model_args, out=args.out)
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


def _profile_ssd(args):
    from .bench import ssd as bench_ssd
    modes = [m.strip() for m in (args.modes or "fwd,fwdbwd").split(",") if m.strip()]
    if not modes or any(m not in bench_ssd.MODES for m in modes):
        raise UserError(f"--modes: expected a comma-separated subset of {','.join(bench_ssd.MODES)}, got {args.modes!r}")
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu or cuda, got {args.device!r}")
    bounds = {"batch": limits.MAX_BATCH, "d_inner": limits.MAX_WIDTH, "d_state": limits.MAX_WIDTH,
              "ssd_head_dim": limits.MAX_WIDTH, "chunk_size": limits.MAX_SEQ_LEN, "repeats": limits.MAX_COUNT,
              "ref_max_len": limits.MAX_SEQ_LEN}
    sizes = {k: _positive_int(getattr(args, k) or ("8" if k == "batch" else None), "--" + k.replace("_", "-"), hi)
             for k, hi in bounds.items()}
    if sizes["d_inner"] % sizes["ssd_head_dim"]:
        raise UserError(f"--d-inner: {sizes['d_inner']} is not a multiple of --ssd-head-dim {sizes['ssd_head_dim']}")
    threads = _positive_int(args.threads, "--threads", limits.MAX_THREADS) if args.threads is not None else None
    seq_lens = _positive_ints(args.seq_lens or "1024,4096", "--seq-lens", limits.MAX_SEQ_LEN)
    _fits_in_memory(sizes["batch"] * max(seq_lens) * sizes["d_inner"] * 8)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device in this process")
    impls = [x.strip() for x in args.impls.split(",") if x.strip()] if args.impls else bench_ssd.default_impls(args.device)
    try:
        bench_ssd.check_impls(impls, args.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    rows = bench_ssd.run_and_report(
        impls, seq_lens, batch=sizes["batch"], d_inner=sizes["d_inner"], d_state=sizes["d_state"],
        head_dim=sizes["ssd_head_dim"], chunk_size=sizes["chunk_size"], modes=modes, repeats=sizes["repeats"],
        device=args.device, ref_max_len=sizes["ref_max_len"], threads=threads, timeout_s=_seconds(args.timeout),
        out=args.out)
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
    p.add_argument("--backtest", action=argparse.BooleanOptionalAction, default=True,
                   help="refit each law without the largest IsoFLOP budgets and predict them (default on when the "
                        "runs have budgets; --no-backtest skips it)")
    p.add_argument("--baseline", default="transformer",
                   help="family the compute multipliers are stated against (default transformer)")
    p.add_argument("--holdout-above", type=float, metavar="FLOPS",
                   help="backtest for a CSV of single runs: fit Approach 3 on the runs at or below FLOPS, "
                        "predict the rest (e.g. 1e21 for Chinchilla's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--time-from", metavar="PROFILE_CSV", action="append",
                   help="price each run's training time from a profile.csv of `ssmscale profile --modes train` (its "
                        "families' FLOP rates by size and sequence length; repeat it to pool profiles of several "
                        "sizes) instead of the time it took; writes fit_timed.json beside fit.json")


def _fit(args):
    _check_fit_args(args)
    from pathlib import Path

    from .report.recall import is_fixed_length_study
    if is_fixed_length_study(Path(args.path)):
        raise UserError(f"{args.path}: a fixed-length study (steps or tokens, no budgets) has no scaling law to "
                        "fit; ssmscale report draws its recall report")
    from .fit import fit_path, format_fit, parse_column_mapping
    result, target = fit_path(args.path, out=args.out, columns=parse_column_mapping(args.columns),
                              n_boot=args.n_boot, seed=args.seed, ci=args.ci, n_jobs=args.jobs,
                              progress=not args.no_progress, backtest=args.backtest,
                              holdout_above=args.holdout_above, baseline=args.baseline, time_from=args.time_from)
    print(format_fit(result))
    print(f"wrote {target}")


# ------------------------------------------------------------------------------------- report
def _report_args(p):
    p.add_argument("study_dir", help="study directory (scaling/<study>)")
    p.add_argument("--out", help="report folder (default: reports/<study>)")
    p.add_argument("--refit", action="store_true", help="refit even if the study's fit.json is up to date")
    p.add_argument("--baseline", default="transformer",
                   help="family the compute multipliers are stated against (default transformer; another refits)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples when fitting (default 200)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed when fitting (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_fit_args(args):
    import os
    _in_range(args.n_boot, "--n-boot", limits.MAX_COUNT, lo=0)
    _in_range(args.seed, "--seed", limits.MAX_SEED, lo=0)
    if getattr(args, "jobs", None) is not None:
        _in_range(args.jobs, "--jobs", os.cpu_count() or 1)
    ci = getattr(args, "ci", 0.95)
    if not 0 < ci < 1:
        raise UserError(f"--ci: expected a coverage between 0 and 1, got {ci}")


def _report(args):
    _check_fit_args(args)
    from .report.scaling import write_report
    path = write_report(args.study_dir, args.out, refit=args.refit, n_boot=args.n_boot, seed=args.seed,
                        progress=not args.no_progress, baseline=args.baseline)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------- forecast
def _forecast_args(p):
    p.add_argument("study_dir", help="study directory (scaling/<study>) with results.csv")
    p.add_argument("--budgets", nargs="+", required=True, metavar="C",
                   help="compute budgets (FLOPs) not trained yet, e.g. 2.2e13 4.6e13")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples (default 200, as fit)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0, as fit)")
    p.add_argument("--jobs", type=int, help="worker processes (default: every available core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _forecast(args):
    _check_fit_args(args)
    from .fit.forecast import forecast_lines, make_forecast, parse_budget
    budgets = [parse_budget(b) for b in args.budgets]
    body, path = make_forecast(args.study_dir, budgets, n_boot=args.n_boot, seed=args.seed, n_jobs=args.jobs,
                               progress=not args.no_progress)
    print("\n".join(forecast_lines(body, path)))


# ------------------------------------------------------------------------------------- export
def _export_args(p):
    from .export.command import add_arguments
    add_arguments(p)


def _export(args):
    from .export.command import run
    return run(args)


COMMANDS: list = [
    ("sizes", "matched shapes, parameter counts and FLOPs per token for target sizes", _sizes_args, _sizes),
    ("train", "train one model on its token budget (writes DIR/result.json)", _train_args, _train),
    ("check-family", "admission checks of a mixer (causality, cached continuation, finite, shapes, determinism); "
                     "exit 2 naming the first failure", _check_family_args, _check_family),
    ("ladder", "plan and run a ladder (resumable): IsoFLOP budgets, or fixed-length runs over widths and "
               "swept config keys (recall); then fit and report", _ladder_args, _ladder),
    ("profile", "throughput, peak memory and MFU against sequence length (training, prefill, generation); "
                "--op scan: the selective-scan kernels; --op ssd: Mamba-2's SSD against them; "
                "--op loop: Lightning overhead",
     _profile_args, _profile),
    ("fit", "fit scaling laws with bootstrap intervals to a study or a CSV of runs (writes fit.json)",
     _fit_args, _fit),
    ("report", "figures and report.md for a study, regenerated from its directory alone", _report_args, _report),
    ("forecast", "predict each family's best loss and N_opt at budgets not trained yet, with calibrated "
                 "intervals (writes STUDY/forecasts/; the report scores it once the runs exist)",
     _forecast_args, _forecast),
    ("export", "write a finished run as a Hugging Face model folder (transformers, lm-evaluation-harness) "
               "that equals it", _export_args, _export),
]


if __name__ == "__main__":
    sys.exit(main())
