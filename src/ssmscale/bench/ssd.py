"""SSD benchmark: Mamba-2's SSD implementations against Mamba-1's selective scan at the same d_inner, one run.

    ssmscale profile --op ssd --seq-lens 1024,4096 --batch 8 --d-inner 256 --head-dim 8 --d-state 16

Implementations are named "ssd-<impl>" (ops.ssd: fused, chunked, ref) and "scan-<impl>"
(ops.selective_scan: fused, chunked, triton, ref). Every point runs in a fresh process (memprobe.run_isolated): median
milliseconds over the timed repeats after one warm-up, and the peak memory the first step needed
beyond its inputs. "fwd" is a forward whose inputs require grad, "fwdbwd" adds the backward of a
fixed random output gradient. Both ops get what their block passes them:
- SSD: d_inner / head_dim heads, one group of B and C; x, B, C ~ N(0, 1); raw dt ~ N(0, 1) with
  dt_softplus and a dt bias at Mamba's initialisation; A ~ -U[1, 16] (Mamba-2's init); D = 1;
- scan: bench_scan's `model_args` inputs (softplus, delta_bias, D and the gate z; Mamba-2 gates in
  its norm, outside the SSD).
At equal d_inner and state size N the two layers hold the same state, d_inner x N per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODES = ("fwd", "fwdbwd")
PRIME_SHAPE = dict(batch=2, d_inner=16, length=32)


@dataclass(frozen=True)
class Point:
    impl: str
    batch: int
    d_inner: int
    d_state: int
    head_dim: int
    chunk_size: int
    length: int
    mode: str


def default_impls(device: str) -> list[str]:
    """Every SSD and every selective scan available on `device`, the references ("ref") last."""
    from ..ops.scan import available_impls
    from ..ops.ssd import available_ssd_impls
    return ([f"ssd-{i}" for i in available_ssd_impls(device) if i != "ref"]
            + [f"scan-{i}" for i in available_impls(device) if i != "ref"] + ["ssd-ref"])


def check_impls(impls: list[str], device: str) -> None:
    """ValueError naming the first implementation that is unknown or cannot run on `device`."""
    from ..ops.scan import available_impls
    from ..ops.ssd import available_ssd_impls
    known = [f"ssd-{i}" for i in available_ssd_impls(device)] + [f"scan-{i}" for i in available_impls(device)]
    for name in impls:
        if name not in known:
            raise ValueError(f"--impls: unknown or not available on {device}: {name!r}; choose from {','.join(known)}")


def prepare(impl: str, batch: int, d_inner: int, d_state: int, head_dim: int, chunk_size: int, length: int,
            mode: str, device: str = "cpu", seed: int = 0, prime: bool = True):
    """Allocate one point's inputs; return its step (memprobe's prepare-function contract). With
    `prime`, first runs the step once at a tiny shape (one-time costs are not the step's memory)."""
    import math

    import torch
    if impl.startswith("scan-"):
        from . import scan as bench_scan
        return bench_scan.prepare(impl.removeprefix("scan-"), batch, d_inner, d_state, length, mode, device=device,
                                  seed=seed, prime=prime, model_args=True)
    from ..ops import ssd
    if prime:
        prepare(impl, d_state=d_state, head_dim=head_dim, chunk_size=chunk_size, mode=mode, device=device,
                prime=False, **PRIME_SHAPE)()
    g = torch.Generator().manual_seed(seed)
    heads = max(1, d_inner // head_dim)
    dt = torch.exp(torch.rand(heads, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    leaves = dict(x=torch.randn(batch, length, heads, head_dim, generator=g),
                  dt=torch.randn(batch, length, heads, generator=g),
                  A=-(1 + 15 * torch.rand(heads, generator=g)),
                  B=torch.randn(batch, length, 1, d_state, generator=g),
                  C=torch.randn(batch, length, 1, d_state, generator=g),
                  D=torch.ones(heads), dt_bias=dt + torch.log(-torch.expm1(-dt)))
    leaves = {k: v.to(device).requires_grad_() for k, v in leaves.items()}
    grad_out = torch.randn(batch, length, heads, head_dim, generator=g).to(device)

    def step():
        for t in leaves.values():
            t.grad = None
        y = ssd(**leaves, dt_softplus=True, chunk_size=chunk_size, impl=impl.removeprefix("ssd-"))
        if mode == "fwdbwd":
            y.backward(grad_out)
    return step


def run_benchmark(impls, seq_lens, *, batch=8, d_inner=256, d_state=16, head_dim=8, chunk_size=8,
                  modes=MODES, repeats=3, device="cpu", ref_max_len=1024, threads=None, timeout_s=None,
                  progress=None) -> list[dict]:
    """One row per (impl, L, mode), plus speedup_vs_<impl> = that impl's ms / this row's ms at the
    same L and mode, for the fastest scan (scan-fused on a CPU with a compiler) and ssd-ref."""
    from .memprobe import run_isolated
    rows = []
    for length in seq_lens:
        for mode in modes:
            for impl in impls:
                point = Point(impl, batch, d_inner, d_state, head_dim, chunk_size, length, mode)
                row = dict(vars(point), device=device, threads=threads)
                if impl.endswith("-ref") and length > ref_max_len:
                    row.update(status="skipped", error=f"ref skipped beyond L={ref_max_len}")
                else:
                    res = run_isolated("ssmscale.bench.ssd:prepare", dict(vars(point), device=device),
                                       repeats=repeats, warmup=1, threads=threads, timeout_s=timeout_s)
                    peak = res["peak_extra_bytes"]
                    row.update(status=res["status"], error=res["error"], median_ms=res["median_ms"],
                               min_ms=res["min_ms"], peak_extra_mib=None if peak is None else peak / 2**20)
                rows.append(row)
                if progress:
                    progress(row)
    # the first scan listed (in the default list, the fastest) and the SSD's reference
    anchors = [i for i in impls if i.startswith("scan-")][:1] + [i for i in impls if i == "ssd-ref"]
    ok = {(r["impl"], r["length"], r["mode"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        for anchor in anchors:
            a = ok.get((anchor, r["length"], r["mode"]))
            r[f"speedup_vs_{anchor}"] = a["median_ms"] / r["median_ms"] if a and r["status"] == "ok" else None
    return rows


def format_table(rows: list[dict]) -> str:
    ratio_cols = sorted({k for r in rows for k in r if k.startswith("speedup_vs_")},
                        key=lambda k: k.endswith("ssd-ref"))
    header = ["impl", "L", "mode", "ms", "min ms", "peak MiB"] + [f"x {c.removeprefix('speedup_vs_')}"
                                                                  for c in ratio_cols] + ["status"]

    def cell(r, c):
        v = r.get(c)
        if c == "status":
            return v if v == "ok" else f"{v}: {r.get('error')}"
        if v is None:
            return "-"
        return f"{v:.2f}" if c.startswith("speedup_vs_") else f"{v:.1f}" if isinstance(v, float) else str(v)
    cols = ["impl", "length", "mode", "median_ms", "min_ms", "peak_extra_mib"] + ratio_cols + ["status"]
    body = [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, 2, len(cells) - 1) else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def run_and_report(impls, seq_lens, *, batch, d_inner, d_state, head_dim, chunk_size, modes, repeats, device,
                   ref_max_len, threads, timeout_s, out) -> list[dict]:
    """`ssmscale profile --op ssd`: say what is measured, measure it (a line per point on stderr), print
    the table and, with `out`, write out/ssd_bench.csv. Returns the rows."""
    print(f"SSD vs selective scan on {device}: batch {batch}, d_inner {d_inner}, "
          f"N {d_state}, SSD head_dim {head_dim} ({d_inner // head_dim} "
          f"heads, 1 group), chunk {chunk_size}; the blocks' arguments; median of {repeats} after "
          f"1 warm-up; peak = memory the first step needed beyond its inputs; each point in a fresh process",
          flush=True)

    from .scan import point_progress, write_rows
    rows = run_benchmark(
        impls, seq_lens, batch=batch, d_inner=d_inner, d_state=d_state,
        head_dim=head_dim, chunk_size=chunk_size, modes=modes, repeats=repeats,
        device=device, ref_max_len=ref_max_len, threads=threads, timeout_s=timeout_s,
        progress=point_progress(12))
    print(format_table(rows))
    if out:
        write_rows(rows, Path(out) / "ssd_bench.csv")
    return rows
