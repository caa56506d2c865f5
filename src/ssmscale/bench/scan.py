"""Selective-scan benchmark: implementations x sequence lengths x (fwd, fwdbwd), in one run.

Every point runs in a fresh process (memprobe.run_isolated): median milliseconds over the timed
repeats after one warm-up step, and the peak memory the first step needed beyond its inputs
(CPU: VmHWM after a clear_refs reset; CUDA: max_memory_allocated; see memprobe.py).
Modes: "fwd" is the forward of a training step (inputs require grad, so what the backward will
need is kept), "fwdbwd" is that forward plus the backward of a fixed random output gradient.
Inputs: u, B, C ~ N(0, 1); delta = softplus(N(-1, 1)) (already positive, no bias or softplus in the
scan); A = -(1..N) per channel (S4D-real); D = 1; no z gate, which mambapy's scan does not have.
With model_args (`--model-args`), the scan gets what the Mamba block passes it: a raw delta ~ N(0, 1)
with delta_softplus and a delta_bias at Mamba's initialisation (inverse softplus of dt log-uniform in
[1e-3, 1e-1]), D = 1 and a gate z ~ N(0, 1); the mambapy anchor then computes the same (softplus of
delta + bias before its scan, y * silu(z) after it, as mambapy's own Mamba block does).
"/ floor" is the time over the memory-bandwidth floor: the bytes any implementation must move
(min_bytes) over the bandwidth of a large copy measured in the same run (before the points and after them,
the faster). On a CPU the scan is bound by exp over the state, not memory; the column matters most on GPUs.

Two anchors are measured in the same run, so ratios never mix machines or moments:
- "ref": the sequential definition (scan_ref.py); skipped beyond --ref-max-len (it is slow);
- "mambapy": mambapy 1.2.0's parallel scan (pip install mambapy==1.2.0 --no-deps), driven with the
  same math as mambapy's own Mamba.selective_scan, in its own (batch, L, d_inner) layout:
  deltaA = exp(delta A), BX = delta B u, hs = pscan(deltaA, BX), y = hs @ C + D u.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

ANCHORS = ("ref", "mambapy")
MODES = ("fwd", "fwdbwd")
MAMBAPY_HINT = "mambapy not installed (pip install mambapy==1.2.0 --no-deps)"


@dataclass(frozen=True)
class Point:
    impl: str
    batch: int
    d_inner: int
    d_state: int
    length: int
    mode: str
    model_args: bool = False


def mambapy_selective_scan(x, delta, A, B, C, D, z=None, delta_bias=None):
    """mambapy's Mamba.selective_scan, layout (batch, L, d_inner); B, C (batch, L, N). With
    delta_bias, delta is raw: softplus(delta + delta_bias) first, and with z the output is gated
    by silu(z), both as mambapy's Mamba block does around its selective_scan."""
    import torch
    import torch.nn.functional as F
    from mambapy.pscan import pscan
    if delta_bias is not None:
        delta = F.softplus(delta + delta_bias)
    delta_a = torch.exp(delta.unsqueeze(-1) * A)                       # (b, L, d, N)
    bx = delta.unsqueeze(-1) * B.unsqueeze(2) * x.unsqueeze(-1)        # (b, L, d, N)
    hs = pscan(delta_a, bx)
    y = (hs @ C.unsqueeze(-1)).squeeze(3) + D * x
    return y if z is None else y * F.silu(z)


PRIME_SHAPE = dict(batch=2, d_inner=64, length=64)   # big enough to start the kernels' threads


def prepare(impl: str, batch: int, d_inner: int, d_state: int, length: int, mode: str,
            device: str = "cpu", seed: int = 0, prime: bool = True, model_args: bool = False):
    """Allocate one point's inputs; return its step (memprobe's prepare-function contract).
    With `prime`, first runs the step once at a tiny shape, so one-time costs (kernel build and
    load, imports, autograd engine threads) do not count as the step's memory.
    With `model_args`, the scan gets the Mamba block's arguments (see the module docstring)."""
    import math

    import torch
    import torch.nn.functional as F
    if prime:
        prepare(impl, d_state=d_state, mode=mode, device=device, prime=False, model_args=model_args,
                **PRIME_SHAPE)()
    g = torch.Generator().manual_seed(seed)
    mambapy_layout = impl == "mambapy"
    seq = (batch, length, d_inner) if mambapy_layout else (batch, d_inner, length)
    bc = (batch, length, d_state) if mambapy_layout else (batch, d_state, length)
    leaves = dict(
        u=torch.randn(seq, generator=g),
        delta=F.softplus(torch.randn(seq, generator=g) - 1.0),
        A=-torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1),
        B=torch.randn(bc, generator=g),
        C=torch.randn(bc, generator=g),
        D=torch.ones(d_inner),
    )
    if model_args:
        dt = torch.exp(torch.rand(d_inner, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        leaves.update(delta=torch.randn(seq, generator=g), z=torch.randn(seq, generator=g),
                      delta_bias=dt + torch.log(-torch.expm1(-dt)))      # softplus(bias) = dt
    leaves = {k: v.to(device).requires_grad_() for k, v in leaves.items()}
    grad_out = torch.randn(seq, generator=g).to(device)
    if mambapy_layout:
        forward = lambda: mambapy_selective_scan(leaves["u"], leaves["delta"], leaves["A"],
                                                 leaves["B"], leaves["C"], leaves["D"],
                                                 leaves.get("z"), leaves.get("delta_bias"))
    else:
        from ..ops import selective_scan
        forward = lambda: selective_scan(**leaves, delta_softplus=model_args, impl=impl)

    def step():
        for t in leaves.values():
            t.grad = None
        y = forward()
        if mode == "fwdbwd":
            y.backward(grad_out)
    return step


def skip_reason(impl: str, length: int, ref_max_len: int) -> str | None:
    if impl == "mambapy" and importlib.util.find_spec("mambapy") is None:
        return MAMBAPY_HINT
    if impl == "ref" and length > ref_max_len:
        return f"ref skipped beyond L={ref_max_len}"
    return None


def min_bytes(batch: int, d_inner: int, d_state: int, length: int, mode: str,
              model_args: bool = False) -> int:
    """Bytes any implementation must move (fp32): the forward reads u, delta, B, C and writes y;
    the backward reads them again with dy and writes du, ddelta, dB, dC (A, D: negligible).
    With model_args, the gate z is read too, and dz written."""
    seq, bc = 4 * batch * d_inner * length, 4 * batch * d_state * length
    fwd = (4 if model_args else 3) * seq + 2 * bc
    return fwd if mode == "fwd" else fwd + (7 if model_args else 5) * seq + 4 * bc


def prepare_copy(mib: int, device: str = "cpu"):
    """A step that copies `mib` MiB: its time gives the memory bandwidth (2 x mib MiB moved)."""
    import torch
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def measure_bandwidth(device: str = "cpu", threads=None, mib: int = 512) -> float | None:
    """Bytes per second of a large tensor copy (its fastest repeat: a floor wants the best case)."""
    from .memprobe import run_isolated
    res = run_isolated("ssmscale.bench.scan:prepare_copy", dict(mib=mib, device=device),
                       repeats=7, warmup=1, threads=threads)
    return 2 * mib * 2**20 / (res["min_ms"] / 1e3) if res["status"] == "ok" else None


def check_impls(impls: list[str], device: str) -> None:
    """ValueError naming the first implementation that cannot run on `device`."""
    from ..ops.scan import _REGISTRY, available_impls
    runnable = available_impls(device)
    for name in impls:
        if name == "mambapy" or name in runnable:
            continue
        if name in _REGISTRY and device in _REGISTRY[name].devices:
            why = _REGISTRY[name].why_unavailable() or "not available"
            raise ValueError(f"--impls: {name!r} cannot run on {device} here ({why})")
        raise ValueError(f"--impls: unknown or not for {device}: {name!r}; "
                         f"choose from {runnable + ['mambapy']}")


def run_benchmark(impls, seq_lens, *, batch=8, d_inner=256, d_state=16, modes=MODES, repeats=3,
                  warmup=1, device="cpu", ref_max_len=1024, threads=None, timeout_s=None,
                  progress=None, model_args=False) -> list[dict]:
    """One row per (impl, L, mode): timings, peak extra memory, status, and the memory-bandwidth
    floor (min_bytes / a copy's bandwidth, measured in the same run: before the points and again after
    them, the faster kept, as a floor wants the best case a shared machine gave); ratios added after."""
    from .memprobe import run_isolated
    before = measure_bandwidth(device, threads)
    rows = []
    for length in seq_lens:
        for mode in modes:
            for impl in impls:
                point = Point(impl, batch, d_inner, d_state, length, mode, model_args)
                row = dict(vars(point), device=device, threads=threads, bandwidth_gbs=None, floor_ms=None)
                reason = skip_reason(impl, length, ref_max_len)
                if reason:
                    row.update(status="skipped", error=reason)
                else:
                    res = run_isolated("ssmscale.bench.scan:prepare", dict(vars(point), device=device),
                                       repeats=repeats, warmup=warmup, threads=threads,
                                       timeout_s=timeout_s)
                    row.update(status=res["status"], error=res["error"], median_ms=res["median_ms"],
                               min_ms=res["min_ms"], peak_extra_mib=_mib(res["peak_extra_bytes"]),
                               memory_method=res["memory_method"])
                rows.append(row)
                if progress:
                    progress(row)
    bandwidth = max((bw for bw in (before, measure_bandwidth(device, threads)) if bw), default=None)
    if bandwidth:
        for row in rows:
            row.update(bandwidth_gbs=bandwidth / 1e9, floor_ms=1e3 * min_bytes(
                batch, d_inner, d_state, row["length"], row["mode"], model_args) / bandwidth)
    add_ratios(rows)
    return rows


def _mib(n):
    return None if n is None else n / 2**20


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_X = X's ms / this ms; mem_vs_mambapy = this peak / mambapy's, same L and mode;
    over_floor = this ms / the bandwidth floor."""
    ok = {(r["impl"], r["length"], r["mode"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        fine = r.get("status") == "ok" and r.get("floor_ms")
        r["over_floor"] = r["median_ms"] / r["floor_ms"] if fine else None
        for anchor in ANCHORS:
            a = ok.get((anchor, r["length"], r["mode"]))
            fine = a is not None and r.get("status") == "ok"
            r[f"speedup_vs_{anchor}"] = a["median_ms"] / r["median_ms"] if fine else None
        a = ok.get(("mambapy", r["length"], r["mode"]))
        fine = a is not None and r.get("status") == "ok" and a["peak_extra_mib"]
        r["mem_vs_mambapy"] = r["peak_extra_mib"] / a["peak_extra_mib"] if fine else None


COLUMNS = ("impl", "length", "mode", "median_ms", "min_ms", "peak_extra_mib", "speedup_vs_mambapy",
           "mem_vs_mambapy", "speedup_vs_ref", "floor_ms", "over_floor", "status")


def format_table(rows: list[dict]) -> str:
    def cell(r, c):
        v = r.get(c)
        if c == "status" and v != "ok":
            return f"{v}: {r.get('error')}"
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if c == "mem_vs_mambapy" else f"{v:.2f}" if c == "floor_ms" else f"{v:.1f}"
        return str(v)
    header = ["impl", "L", "mode", "ms", "min ms", "peak MiB", "x mambapy", "mem/mambapy", "x ref",
              "floor ms", "/ floor", "status"]
    body = [[cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "  ".join(c.rjust(w) if 3 <= i <= 10 else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def run_and_report(impls, seq_lens, *, batch, d_inner, d_state, modes, repeats, device, ref_max_len, threads,
                   timeout_s, model_args, out) -> list[dict]:
    """`ssmscale profile --op scan`: say what is measured, measure it (a line per point on stderr), print
    the table and, with `out`, write out/scan_bench.csv. Returns the rows."""
    model = " with the model's args (softplus, delta_bias, D, z)" if model_args else ""
    print(f"selective scan on {device}: batch {batch}, d_inner {d_inner}, "
          f"N {d_state}{model}; median of {repeats} after 1 warm-up; peak = memory the first "
          f"step needed beyond its inputs; each point in a fresh process", flush=True)

    rows = run_benchmark(
        impls, seq_lens, batch=batch, d_inner=d_inner, d_state=d_state,
        modes=modes, repeats=repeats, device=device, ref_max_len=ref_max_len,
        threads=threads, timeout_s=timeout_s, progress=point_progress(8), model_args=model_args)
    print(format_table(rows))
    if rows and rows[0].get("bandwidth_gbs"):
        print(f"/ floor: time over the memory-bandwidth floor (bytes that must move / "
              f"{rows[0]['bandwidth_gbs']:.1f} GB/s, the faster of a large copy timed before and after the points)")
    if out:
        write_rows(rows, Path(out) / "scan_bench.csv")
    return rows


def point_progress(width: int):
    """A line per measured point on stderr (the implementation's name right-aligned in `width`)."""
    def progress(row):
        took = f"{row['median_ms']:.1f} ms" if row.get("median_ms") is not None else row["status"]
        print(f"  {row['impl']:>{width}} L={row['length']} {row['mode']}: {took}", file=sys.stderr, flush=True)
    return progress


def write_rows(rows: list[dict], path: Path) -> None:
    """A benchmark's rows as a CSV, written atomically, and a line saying where."""
    import pandas as pd

    from ..fsutil import atomic_write_dataframe_csv
    atomic_write_dataframe_csv(path, pd.DataFrame(rows))
    print(f"wrote {path}")
