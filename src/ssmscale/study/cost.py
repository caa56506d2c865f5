"""What a ladder will cost, before it is launched: device-hours per family from its planned FLOPs.

    hours = planned training FLOPs / sustained FLOP/s of one device

The sustained rate is either an assumption stated with the estimate (a dense bf16 peak times a model
FLOPs utilisation, the same for every family), or measured: the training rows of a `ssmscale profile`
CSV, whose achieved FLOP/s (tokens/s x training FLOPs per token, flops.py's convention) is taken per
family at the sequence length nearest the study's. Evaluation, checkpoints, restarts and queueing are
not counted; a measured rate is that of the profiled model size, applied to every size.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, shorten

# H100 / H200 SXM dense bf16 peak (profile.GPU_PEAKS) at 30% MFU: small models (10M-350M) rarely
# sustain more, and the selective scan is not a matmul
ASSUMED_PEAK_FLOPS = 989e12
ASSUMED_MFU = 0.30


@dataclass(frozen=True)
class Throughput:
    flops_per_s: float        # sustained training FLOP/s of one device
    source: str               # how it was obtained, said beside the estimate
    device: str = "GPU"


def assumed_throughput(families) -> dict[str, Throughput]:
    rate = ASSUMED_PEAK_FLOPS * ASSUMED_MFU
    source = (f"assumed: {ASSUMED_PEAK_FLOPS / 1e12:.0f} TFLOP/s dense bf16 peak (H100/H200) x {ASSUMED_MFU:.0%} "
              f"MFU = {rate / 1e12:.0f} TFLOP/s per GPU")
    return {fam: Throughput(rate, source) for fam in families}


def throughput_from_profile(path: str | Path, families, seq_len: int) -> dict[str, Throughput]:
    """Per family, the achieved training FLOP/s of the `ssmscale profile` row nearest `seq_len`."""
    from ..safeload import CAPS, read_named
    path = Path(path)
    text = read_named(path, CAPS["csv"], "profile CSV not found (write one with ssmscale profile --out DIR)", text=True)
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error:
        raise UserError(f"{path}: not a CSV file") from None
    needed = {"family", "mode", "seq_len", "tokens_per_s", "flops_per_token", "status"}
    if not rows or not needed <= set(rows[0]):
        missing = sorted(needed - set(rows[0])) if rows else sorted(needed)
        raise UserError(f"{path}: not a ssmscale profile CSV (no column {missing[0]})")
    out = {}
    for fam in families:
        usable = []
        for r in rows:
            if r["family"] != fam or r["mode"] != "train" or r["status"] != "ok":
                continue
            try:
                rate, length = float(r["tokens_per_s"]) * float(r["flops_per_token"]), int(r["seq_len"])
            except (TypeError, ValueError):      # TypeError: a short row's missing fields are None
                raise UserError(f"{path}: row for {fam} at seq_len {shorten(r['seq_len'])}: unreadable "
                                "numbers") from None
            if not (length > 0 and 0 < rate < math.inf):
                raise UserError(f"{path}: row for {fam} at seq_len {length}: seq_len, tokens_per_s and "
                                "flops_per_token must be positive finite numbers")
            usable.append((abs(math.log(length / seq_len)), length, rate, r))
        if not usable:
            raise UserError(f"{path}: no successful training row for family {fam} (profile it with "
                            f"ssmscale profile --families {fam} --modes train)")
        _, length, rate, r = min(usable, key=lambda u: u[:2])
        device = "GPU" if r.get("device", "").startswith("cuda") else "CPU"
        shape = f"d_model {r['d_model']} x {r['n_layer']}" if r.get("d_model") else "its model"
        out[fam] = Throughput(rate, f"measured: {path} ({shape}, L {length}, batch {r.get('batch', '?')}: "
                                    f"{rate / 1e12:.3g} TFLOP/s)", device)
    return out


def estimate(runs, throughput: dict[str, Throughput]) -> dict[str, dict]:
    """{family: {runs, flops, hours}} over the runs that will be trained (not the skipped ones)."""
    out: dict[str, dict] = {}
    for r in runs:
        if r.skip:
            continue
        row = out.setdefault(r.family, {"runs": 0, "flops": 0.0, "hours": 0.0})
        row["runs"] += 1
        row["flops"] += r.flops
        row["hours"] += r.flops / throughput[r.family].flops_per_s / 3600
    return out


def format_estimate(runs, throughput: dict[str, Throughput]) -> str:
    per_family = estimate(runs, throughput)
    unit = {t.device for t in throughput.values()}
    unit = f"{unit.pop()}-hours" if len(unit) == 1 else "device-hours"
    sources = sorted({t.source for t in throughput.values()})
    lines = ["cost estimate: planned training FLOPs / sustained FLOP/s of one device; evaluation, restarts "
             "and queueing not included"]
    if len(sources) == 1:
        lines.append(f"  throughput: {sources[0]}")
    else:
        lines += [f"  {fam} throughput: {t.source}" for fam, t in throughput.items()]
    lines.append(f"  {'family':<12} {'runs':>5} {'FLOPs':>10} {unit:>12}")
    for fam, row in per_family.items():
        lines.append(f"  {fam:<12} {row['runs']:>5} {row['flops']:>10.3g} {_hours(row['hours']):>12}")
    total = sum(row["hours"] for row in per_family.values())
    lines.append(f"  {'total':<12} {sum(r['runs'] for r in per_family.values()):>5} "
                 f"{sum(r['flops'] for r in per_family.values()):>10.3g} {_hours(total):>12}")
    return "\n".join(lines)


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 100 else f"{h:.3g}"
