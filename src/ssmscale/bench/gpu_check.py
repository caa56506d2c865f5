"""One prepared check for a machine with a CUDA GPU, printed as one short table (`tools/gpu_check.sh`).

    tools/gpu_check.sh [--out DIR] [--budget-s 420] [--sections scan,ssd,train,profile]

It installs and downloads nothing: the kernels get random inputs, training reads the built-in stdlib
corpus, and triton must already be installed. Sections, each a few rows:
  scan     every fast selective scan against the sequential reference (fp32, the Mamba block's
           arguments, outputs and all gradients, L up to 1024), then the fastest one's fwd and fwd+bwd
           time at L 2048 and 8192 over the memory-bandwidth floor (bench_scan: bytes that must move /
           a large copy's bandwidth, measured in the same run)
  ssd      the same for Mamba-2's state-space dual, when `ssmscale.ops.ssd` exists in this build
  train    every family (models.config.FAMILIES), a 2M-parameter model for 120 steps in bf16-mixed:
           loss finite and falling, validation loss, tokens/s
  profile  one size (1e8 parameters) of every family: training at L 2K-16K and decoding at 16K
           (tokens/s, peak memory, MFU against the vendor's bf16 peak), each point in a fresh process
Sections stop starting new measurements once the time budget is spent (the rest is reported as
skipped), so the check ends within it; planned to take about 5 minutes on an H100/H200.
`--device cpu` runs the same code as a rehearsal at tiny sizes; the tests use it.
Exit status: 0 when every row passed or was skipped, 1 when one failed, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SECTIONS = ("scan", "ssd", "train", "profile")
SCAN_TOLERANCE = 1e-4      # normwise relative error against the reference, fp32 (the tests' bound)
TRAIN_STEPS = 120


@dataclass
class Row:
    section: str
    item: str
    detail: str
    result: str
    status: str             # ok, FAIL, skipped, error


@dataclass
class Sizes:
    """What each section measures: GPU sizes, or a rehearsal's tiny ones on the CPU."""
    scan_shapes: tuple          # (batch, d_inner, N, L) compared with the reference
    scan_timing: tuple          # (batch, d_inner, N) timed at each of scan_lens
    scan_lens: tuple
    ssd_shape: tuple            # (batch, L, heads, head_dim, groups, N) compared with the reference
    ssd_timing: tuple           # the same, timed
    train: dict                 # model params, head_dim, seq_len, batch
    profile_params: float
    profile_lens: tuple


GPU = Sizes(scan_shapes=((2, 64, 16, 1), (2, 64, 16, 127), (1, 96, 16, 300), (2, 128, 16, 1024)),
            scan_timing=(8, 2048, 16), scan_lens=(2048, 8192),
            ssd_shape=(2, 300, 4, 32, 1, 64), ssd_timing=(8, 4096, 32, 64, 1, 128),
            train={"params": 2e6, "head_dim": 64, "seq_len": 1024, "batch_size": 16},
            profile_params=1e8, profile_lens=(2048, 4096, 8192, 16384))
CPU = Sizes(scan_shapes=((2, 8, 4, 1), (2, 8, 4, 33)), scan_timing=(2, 32, 4), scan_lens=(256,),
            ssd_shape=(2, 33, 2, 8, 1, 8), ssd_timing=(2, 128, 2, 8, 1, 8),
            train={"params": 2e4, "head_dim": 16, "seq_len": 64, "batch_size": 4},
            profile_params=2e4, profile_lens=(128,))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"gpu_check: error: {message} (see --help)\n")


def parse_args(argv):
    p = _Parser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default); cpu: a rehearsal of the same code at tiny sizes")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=420.0, help="time budget in seconds (default 420)")
    p.add_argument("--seq-lens", help="profile: comma-separated lengths (default 2048,4096,8192,16384)")
    p.add_argument("--out", help="folder for gpu_check.csv and the training runs (default: a temporary one)")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not sections or any(s not in SECTIONS for s in sections):
        p.error(f"--sections: expected a comma-separated subset of {','.join(SECTIONS)}, got {args.sections!r}")
    if not args.budget_s > 0:
        p.error(f"--budget-s: expected a positive number of seconds, got {args.budget_s}")
    lens = None
    if args.seq_lens is not None:
        try:
            lens = tuple(int(x) for x in args.seq_lens.split(",") if x.strip())
        except ValueError:
            lens = ()
        if not lens or min(lens) < 1:
            p.error(f"--seq-lens: expected comma-separated positive integers, got {args.seq_lens!r}")
    if args.out:
        from ..errors import UserError
        from ..fsutil import check_writable_dir
        try:
            check_writable_dir(args.out, "--out")     # before the checks run, not after
        except UserError as exc:
            p.error(str(exc))
    args.sections, args.seq_lens = sections, lens
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, {built}); run it on a GPU machine, "
              "or with --device cpu for a rehearsal", file=sys.stderr)
        return 2
    sizes = GPU if args.device == "cuda" else CPU
    if args.seq_lens:
        sizes = Sizes(**{**asdict(sizes), "profile_lens": args.seq_lens})
    deadline = time.monotonic() + args.budget_s
    print(describe_machine(args.device), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.out or tmp)
        rows: list[Row] = []
        checks = {"scan": check_scan, "ssd": check_ssd, "train": check_train, "profile": check_profile}
        for name in args.sections:
            try:
                for row in checks[name](args.device, sizes, deadline, work):
                    rows.append(row)
                    print(f"  {row.section} {row.item}: {row.result} [{row.status}]", file=sys.stderr, flush=True)
            except Exception as exc:      # one broken section is a row of the table, not the end of the check
                rows.append(Row(name, "section", "", f"{type(exc).__name__}: {_first_line(exc)}", "error"))
        print(format_table(rows))
        if args.out:
            write_csv(rows, Path(args.out) / "gpu_check.csv")
    return 0 if all(r.status in ("ok", "skipped") for r in rows) else 1


def describe_machine(device: str) -> str:
    import importlib.util

    import torch
    triton = "triton not installed"
    if importlib.util.find_spec("triton"):
        import triton as _triton
        triton = f"triton {_triton.__version__}"
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU rehearsal ({torch.get_num_threads()} threads)"
    return f"gpu_check on {where}: torch {torch.__version__}, {triton}"


# ------------------------------------------------------------------------------------ helpers
def rel_err(a, b) -> float:
    """Normwise relative error max|a - b| / max|b|."""
    scale = b.abs().max().item()
    diff = (a.double() - b.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def _grads_of(fn, leaves: dict, seed: int = 1):
    """Output and every leaf's gradient of a loss weighting each output entry differently."""
    import torch
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    y = fn(**leaves)
    g = torch.Generator().manual_seed(seed)
    (y.float() * torch.randn(y.shape, generator=g).to(y.device)).sum().backward()
    return y.detach(), {k: t.grad for k, t in leaves.items()}


def _worst(fn_a, fn_b, leaves) -> float:
    ya, ga = _grads_of(fn_a, leaves)
    yb, gb = _grads_of(fn_b, leaves)
    return max([rel_err(ya, yb)] + [rel_err(ga[k], gb[k]) for k in gb])


def _timed_ms(step, device: str, repeats: int = 5) -> float:
    """Median milliseconds of `step` after one warm-up call (synchronised on CUDA)."""
    import statistics

    import torch
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _out_of_time(deadline: float, section: str, item: str) -> Row | None:
    if time.monotonic() < deadline:
        return None
    return Row(section, item, "", "not run: time budget spent", "skipped")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


# --------------------------------------------------------------------------------------- scan
def scan_inputs(batch, d_inner, n_state, length, device, seed=0) -> dict:
    """The Mamba block's scan arguments at their usual scale: raw delta with a bias and softplus, D, z."""
    import torch
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)     # noqa: E731
    dt = torch.exp(torch.rand(d_inner, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = dict(u=r(batch, d_inner, length), delta=r(batch, d_inner, length),
                  A=-torch.arange(1, n_state + 1, dtype=torch.float32).repeat(d_inner, 1),
                  B=r(batch, n_state, length), C=r(batch, n_state, length), D=torch.ones(d_inner),
                  z=r(batch, d_inner, length), delta_bias=dt + torch.log(-torch.expm1(-dt)))
    return {k: v.to(device) for k, v in inputs.items()}


def check_scan(device, sizes: Sizes, deadline, work):
    from functools import partial

    from . import scan as bench_scan
    from ..ops import available_impls, selective_scan
    from ..ops.scan import _REGISTRY, resolve_impl
    impls = [i for i in available_impls(device) if i != "ref"]
    if device == "cuda" and "triton" not in impls:
        why = _REGISTRY["triton"].why_unavailable() if "triton" in _REGISTRY else "not registered"
        yield Row("scan", "triton", "", f"not available: {why}", "FAIL")
    longest = max(s[3] for s in sizes.scan_shapes)
    for impl in impls:
        stop = _out_of_time(deadline, "scan", f"{impl} vs ref")
        if stop:
            yield stop
            continue
        fast = partial(selective_scan, delta_softplus=True, impl=impl)
        ref = partial(selective_scan, delta_softplus=True, impl="ref")
        worst = max(_worst(fast, ref, scan_inputs(*shape, device)) for shape in sizes.scan_shapes)
        yield Row("scan", f"{impl} vs ref", f"fp32, {len(sizes.scan_shapes)} shapes, L <= {longest}, out + grads",
                  f"max rel err {worst:.1e}", "ok" if worst < SCAN_TOLERANCE else "FAIL")
    best = resolve_impl("auto", device).name
    stop = _out_of_time(deadline, "scan", f"{best} speed")
    if stop:
        yield stop
        return
    batch, d_inner, n_state = sizes.scan_timing
    rows = bench_scan.run_benchmark([best], list(sizes.scan_lens), batch=batch, d_inner=d_inner, d_state=n_state,
                                    modes=bench_scan.MODES, repeats=5, device=device, timeout_s=120,
                                    model_args=True)
    for r in rows:
        ok = r["status"] == "ok"
        floor = (f" = {r['over_floor']:.1f}x the floor at {r['bandwidth_gbs']:.0f} GB/s"
                 if ok and r["over_floor"] else "")
        yield Row("scan", f"{best} L={r['length']} {r['mode']}", f"b{batch} d_inner {d_inner} N{n_state}",
                  f"{r['median_ms']:.2f} ms{floor}" if ok else f"{r['status']}: {r.get('error')}",
                  "ok" if ok else "FAIL")


# ---------------------------------------------------------------------------------------- ssd
def ssd_inputs(batch, length, heads, head_dim, groups, n_state, device, seed=0) -> dict:
    """Mamba-2's SSD arguments at their usual scale (mamba_ssm's layout): dt raw with a bias and softplus."""
    import torch
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)     # noqa: E731
    inputs = dict(x=r(batch, length, heads, head_dim), dt=r(batch, length, heads),
                  A=-torch.exp(torch.rand(heads, generator=g) * math.log(16)),
                  B=r(batch, length, groups, n_state), C=r(batch, length, groups, n_state),
                  D=torch.ones(heads), dt_bias=torch.full((heads,), -2.0))
    return {k: v.to(device) for k, v in inputs.items()}


def check_ssd(device, sizes: Sizes, deadline, work):
    try:
        from ..ops.ssd import available_ssd_impls as listing
        from ..ops.ssd import ssd as entry
    except ImportError:
        yield Row("ssd", "ssmscale.ops.ssd", "", "not available in this build", "skipped")
        return
    from functools import partial

    from . import scan as bench_scan
    impls = [i for i in listing(device) if i != "ref"]
    fastest = None
    for impl in impls:
        stop = _out_of_time(deadline, "ssd", f"{impl} vs ref")
        if stop:
            yield stop
            continue
        fast, ref = (partial(entry, dt_softplus=True, impl=i) for i in (impl, "ref"))
        worst = _worst(fast, ref, ssd_inputs(*sizes.ssd_shape, device))
        fastest = fastest or impl
        yield Row("ssd", f"{impl} vs ref", f"fp32, (b, L, h, p, g, N) = {sizes.ssd_shape}, out + grads",
                  f"max rel err {worst:.1e}", "ok" if worst < SCAN_TOLERANCE else "FAIL")
    if fastest is None or _out_of_time(deadline, "ssd", "speed"):
        return
    b, L, h, p, g, n = sizes.ssd_timing
    leaves = {k: v.requires_grad_() for k, v in ssd_inputs(*sizes.ssd_timing, device).items()}
    grad = ssd_inputs(*sizes.ssd_timing, device, seed=1)["x"]
    bandwidth = bench_scan.measure_bandwidth(device)
    seq, bc = 4 * b * L * h * p, 4 * b * L * g * n
    moved = {"fwd": 2 * seq + 2 * bc + 4 * b * L * h, "fwdbwd": 5 * seq + 4 * bc + 8 * b * L * h}
    steps = {"fwd": lambda: entry(**leaves, dt_softplus=True, impl=fastest),
             "fwdbwd": lambda: entry(**leaves, dt_softplus=True, impl=fastest).backward(grad)}
    for mode, step in steps.items():
        ms = _timed_ms(step, device)
        floor = f" = {ms / (1e3 * moved[mode] / bandwidth):.1f}x the floor" if bandwidth else ""
        yield Row("ssd", f"{fastest} L={L} {mode}", f"b{b} h{h} p{p} g{g} N{n}", f"{ms:.2f} ms{floor}", "ok")


# -------------------------------------------------------------------------------------- train
def check_train(device, sizes: Sizes, deadline, work):
    import csv

    from ..config import RunConfig, validate
    from ..models.config import FAMILIES
    from ..train import run_training
    t = sizes.train
    for family in FAMILIES:
        stop = _out_of_time(deadline, "train", f"{family} bf16-mixed")
        if stop:
            yield stop
            continue
        raw = {"name": "gpu_check", "data": {"source": "stdlib", "max_bytes": 4_000_000,
                                             "cache_dir": str(work / "cache")},
               "model": {"family": family, "params": t["params"], "head_dim": t["head_dim"]},
               "train": {"seq_len": t["seq_len"], "batch_size": t["batch_size"],
                         "tokens": TRAIN_STEPS * t["seq_len"] * t["batch_size"], "lr": 2e-3,
                         "warmup_fraction": 0.1, "eval_tokens": 16 * t["seq_len"], "precision": "bf16-mixed",
                         "accelerator": "gpu" if device == "cuda" else "cpu", "progress": False}}
        run_dir = work / "train" / family
        r = run_training(validate(RunConfig, raw, "gpu_check"), run_dir)
        with open(run_dir / "metrics.csv", newline="") as f:
            losses = [float(row["train_loss"]) for row in csv.DictReader(f) if row["train_loss"]]
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        good = r["status"] == "ok" and all(map(math.isfinite, losses)) and math.isfinite(r["loss"]) and last < first
        yield Row("train", f"{family} bf16-mixed",
                  f"d{r['d_model']}x{r['n_layer']}, L {t['seq_len']}, batch {t['batch_size']}, {r['steps']} steps",
                  f"loss {first:.2f} -> {last:.2f}, val {r['loss']:.3f}, {r['tokens_per_s']:,.0f} tok/s",
                  "ok" if good else "FAIL")


# ------------------------------------------------------------------------------------ profile
def check_profile(device, sizes: Sizes, deadline, work):
    from ..models.config import FAMILIES
    from .profile import profile_models, shapes_for
    head_dim = sizes.train["head_dim"]
    shapes = shapes_for(FAMILIES, params=sizes.profile_params, head_dim=head_dim)
    longest = max(sizes.profile_lens)
    points = [(fam, "train", L) for fam in FAMILIES for L in sizes.profile_lens]
    points += [(fam, "generate", longest) for fam in FAMILIES]
    for fam, mode, L in points:
        item = f"{fam} {mode} L={L}"
        stop = _out_of_time(deadline, "profile", item)
        if stop:
            yield stop
            continue
        rows, _, _ = profile_models([fam], shapes, [L], [mode], batch=1, repeats=3, device=device,
                                    timeout_s=max(10.0, min(120.0, deadline - time.monotonic())),
                                    head_dim=head_dim)
        r = rows[0]
        d, n, params = shapes[fam]
        ok = r["status"] == "ok"
        mfu = f", MFU {100 * r['mfu']:.0f}%" if ok and r["mfu"] == r["mfu"] else ""
        result = (f"{r['tokens_per_s']:,.0f} tok/s, {r['peak_mem_bytes'] / 2**30:.2f} GiB{mfu}" if ok
                  else f"{r['status']}: {r.get('error') or ''}".strip())
        yield Row("profile", item, f"d{d}x{n} ({params / 1e6:.1f}M), batch 1", result,
                  "ok" if ok or r["status"] == "oom" else "FAIL")


# -------------------------------------------------------------------------------------- output
COLUMNS = ("section", "item", "detail", "result", "status")


def format_table(rows: list[Row]) -> str:
    """One fixed-width table: a header, a rule, a line per row."""
    body = [[str(getattr(r, c)) for c in COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(COLUMNS, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()   # noqa: E731
    failed = sum(r.status not in ("ok", "skipped") for r in rows)
    summary = f"{len(rows)} checks: {failed} failed" if failed else f"{len(rows)} checks, none failed"
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(b) for b in body] + [summary])


def write_csv(rows: list[Row], path: Path) -> None:
    import pandas as pd

    from ..fsutil import atomic_write_dataframe_csv
    atomic_write_dataframe_csv(path, pd.DataFrame([asdict(r) for r in rows], columns=list(COLUMNS)))


if __name__ == "__main__":
    sys.exit(main())
