"""Throughput and peak memory against sequence length, for training, prefill and generation.

    ssmscale profile --families transformer,mamba --params 1e7 --seq-lens 256,...,16384 --modes train,prefill,generate

Every point (family, mode, length) is measured in a fresh process (memprobe.run_isolated): on CPU the
peak is the step's resident-set high-water mark minus the RSS before the step (/proc VmHWM after a
reset), on CUDA torch.cuda.max_memory_allocated() minus the memory allocated before; the model, the
optimiser state and the inputs are allocated before the baseline and reported separately.
- train:    forward + backward + AdamW step on (batch, L) tokens; tokens/s = batch * L / step time;
- prefill:  forward without gradients on (batch, L) tokens;
- generate: decode `gen_tokens` tokens one at a time after a context of L tokens already in the cache
            (KV caches for attention layers, conv + SSM states for Mamba and Mamba-2 layers); tokens/s
            counts decoded tokens and the memory reported adds the cache itself to the step's peak.
            Beside it: ms per token and per layer, and the floor a token cannot beat, reading every weight
            and the whole cache once (decode_floor.py).
            A plugin family whose mixer has no allocate_cache cannot generate: its rows say so
            (status "cannot-generate"), nothing is run for them.
Plugin families (a config's custom_families, `mixers`) are profiled like the built-in ones; their FLOPs
per token (for MFU) are the measured ones (flops.py).
MFU = achieved model FLOP/s (flops.py: training = 3 x forward; decoding a token at context L
attends L keys, flops.forward_flops_terms(decode=True)) over the peak: on CPU the median rate of a 2048^3
fp32 matmul timed in the measuring process right after each of its timed steps (same threads, same moments:
on a shared machine whose load drifts, a peak timed at another moment would make the ratio meaningless; the
run's header also times it once alone), on GPU the vendor's dense bf16 figure. A point that runs out of
memory is "oom".

Contention (`compete`=N): each timed step is followed by one timed while N CPU-bound competitors run
(plain busy loops in their own processes, paused in between; memprobe.Competitors), so the alone and
contended steps interleave; the row adds the contended tokens/s and its ratio to the alone figure.
Threads follow threads.py (the cores / 1 run; idle OpenMP threads sleep) unless given.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from .decode_floor import decode_floor, format_decode_table

MODES = ("train", "prefill", "generate")
# modes measured only when asked: decoding that reads bf16 copies of the projection weights (LM.decode_weights)
EXTRA_MODES = ("generate-bf16",)
GENERATE_MODES = ("generate", "generate-bf16")


def decode_weights_of(mode: str) -> str:
    return "bf16" if mode == "generate-bf16" else "fp32"
CSV_COLUMNS = ["family", "mode", "seq_len", "batch", "d_model", "n_layer", "params", "tokens_per_s",
               "step_ms", "peak_mem_bytes", "state_bytes", "mfu", "flops_per_token", "status", "error",
               "memory_method", "device", "scan_impl",
               # added with the thread policy (issue #15); older CSVs lack them
               "threads", "peak_flops", "competitors", "tokens_per_s_compete", "step_ms_compete", "compete_ratio",
               # added with the decoding floor (issue #26); generate rows only
               "ms_per_token_layer", "read_bytes_per_token", "read_gbs", "floor_ms_per_token",
               # generate-bf16 rows: the logits against fp32 decoding (teacher-forced), the greedy tokens' agreement
               "logit_rel_err", "greedy_agreement",
               # added with --rounds: how many rounds measured the point, and the spread of its step time over them
               "rounds", "step_ms_min", "step_ms_max"]

# dense bf16 tensor-core peaks (FLOP/s), by substring of torch.cuda.get_device_name()
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
             "RTX 4090": 165e12, "V100": 125e12}


# ----------------------------------------------------------------------- in the measuring child
def _config(family, d_model, n_layer, vocab_size=256, head_dim=32, scan_impl="auto", mixer=None):
    """The ModelConfig of a profiled model; `mixer`: a plugin family's MixerSpec (or its dict, from the parent)."""
    from ..models import ModelConfig
    from ..models.plugin import MixerSpec
    if isinstance(mixer, dict):
        mixer = MixerSpec(**mixer)
    return ModelConfig(family=family, d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, head_dim=head_dim,
                       scan_impl=scan_impl, mixer=mixer)


def _model(family, d_model, n_layer, vocab_size, head_dim, scan_impl, device, mixer=None):
    import torch

    from ..models import LM
    torch.manual_seed(0)
    cfg = _config(family, d_model, n_layer, vocab_size, head_dim, scan_impl, mixer)
    return LM(cfg).to(device), cfg


def prepare_train(family, d_model, n_layer, seq_len, batch, vocab_size=256, head_dim=32, scan_impl="auto",
                  device="cpu", mixer=None):
    """One training step (forward, backward, AdamW) on random tokens; optimiser state exists already."""
    import torch
    import torch.nn.functional as F
    from ..config import TrainConfig
    from ..train import make_optimizer
    model, _ = _model(family, d_model, n_layer, vocab_size, head_dim, scan_impl, device, mixer)
    opt = make_optimizer(model, TrainConfig(lr=1e-4))      # the training loop's optimiser
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else _Null()
    gen = torch.Generator(device="cpu").manual_seed(0)

    def make_step(length):
        tokens = torch.randint(0, vocab_size, (batch, length + 1), generator=gen).to(device)

        def step():
            with autocast:
                logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    make_step(8)()          # one-time costs (kernel load, AdamW state) before the baseline
    return make_step(seq_len)


def prepare_prefill(family, d_model, n_layer, seq_len, batch, vocab_size=256, head_dim=32, scan_impl="auto",
                    device="cpu", mixer=None):
    import torch
    model, _ = _model(family, d_model, n_layer, vocab_size, head_dim, scan_impl, device, mixer)
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else _Null()
    gen = torch.Generator(device="cpu").manual_seed(0)

    def make_step(length):
        tokens = torch.randint(0, vocab_size, (batch, length), generator=gen).to(device)

        @torch.no_grad()
        def step():
            with autocast:
                model(tokens)
        return step

    make_step(8)()
    return make_step(seq_len)


def torch_no_grad_lazy(fn):
    """torch.no_grad around `fn`, torch imported when it runs (this module is imported by the CLI)."""
    def wrapped(*args, **kwargs):
        import torch
        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapped


def prepare_generate(family, d_model, n_layer, seq_len, batch, gen_tokens=32, vocab_size=256, head_dim=32,
                     scan_impl="auto", device="cpu", mixer=None, decode_weights="fp32"):
    """Decode `gen_tokens` tokens after a `seq_len`-token context; the cache is rewound between steps.
    decode_weights="bf16": the decoded tokens read bf16 copies of the projection weights (LM.decode_weights);
    step.report then says how far that moves the logits from fp32 decoding, teacher-forced on fp32's tokens."""
    import torch
    model, _ = _model(family, d_model, n_layer, vocab_size, head_dim, scan_impl, device, mixer)
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    context = torch.randint(0, vocab_size, (batch, seq_len), generator=gen).to(device)
    nxt = torch.randint(0, vocab_size, (batch, 1), generator=gen).to(device)
    with torch.no_grad():
        cache = model.allocate_cache(batch, seq_len + gen_tokens)
        # prefill in pieces where every layer can continue one (bounds the attention memory); Mamba-1
        # layers take the prompt in one scan
        piece = 4096 if model.chunked_prefill else seq_len
        for i in range(0, seq_len, piece):
            model(context[:, i:i + piece], cache)
    saved = [_snapshot(c) for c in cache]

    @torch.no_grad()
    def step():
        for c, s in zip(cache, saved):
            _restore(c, s)
        token, out = nxt, []
        for _ in range(gen_tokens):
            token = model(token, cache)[:, -1:].argmax(-1)
            out.append(token)
        step.decoded = torch.cat(out, dim=1)   # kept for the tests: what was decoded
    step.context = torch.cat([context, nxt], dim=1)
    step.report = {"decode_weights": decode_weights}
    if decode_weights != "fp32":
        step.report.update(_against_fp32(model, cache, saved, nxt, gen_tokens, decode_weights))
    model.decode_weights = decode_weights
    return step


@torch_no_grad_lazy
def _against_fp32(model, cache, saved, first, tokens, weights):
    """Logits of `tokens` decoding steps with `weights` against fp32's, both fed fp32's greedy tokens: the worst
    step's max |difference| over max |fp32 logit|, and the share of steps whose greedy token agrees."""
    import torch
    runs = {}
    for w in ("fp32", weights):
        model.decode_weights = w
        for c, s in zip(cache, saved):
            _restore(c, s)
        token, logits = first, []
        feed = runs.get("fp32", (None, None))[1]
        for i in range(tokens):
            logits.append(model(token, cache)[:, -1].float())
            token = logits[-1].argmax(-1, keepdim=True) if feed is None else feed[i]
        runs[w] = (torch.stack(logits), [lg.argmax(-1, keepdim=True) for lg in logits])
    ref, got = runs["fp32"][0], runs[weights][0]
    scale = ref.abs().amax(dim=(1, 2)).clamp_min(1e-30)
    err = ((got - ref).abs().amax(dim=(1, 2)) / scale).max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    for c, s in zip(cache, saved):
        _restore(c, s)
    return {"logit_rel_err": err, "greedy_agreement": agree}


def _snapshot(c):
    if hasattr(c, "ssm"):
        return (c.conv.clone(), c.ssm.clone(), c.pos)
    return c.pos


def _restore(c, s):
    if hasattr(c, "ssm"):
        c.conv.copy_(s[0])
        c.ssm.copy_(s[1])
        c.pos = s[2]
    else:
        c.pos = s


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def state_bytes(family, d_model, n_layer, batch, max_len, vocab_size=256, head_dim=32, mixer=None) -> int | None:
    """Bytes of the generation cache: KV caches (attention layers), conv + SSM states (SSM layers); None for
    a plugin family that cannot generate."""
    from ..models.lm import state_bytes as model_state_bytes
    return model_state_bytes(_config(family, d_model, n_layer, vocab_size, head_dim, mixer=mixer), batch, max_len)


# -------------------------------------------------------------------------------- the parent side
def measure_peak_flops(device: str = "cpu", threads: int | None = None) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained): a timed 2048^3 fp32 matmul on CPU (with `threads`), a table on GPU."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak, f"{name}: dense bf16 peak {peak / 1e12:.0f} TFLOP/s (vendor table)"
        return float("nan"), f"{name}: no peak in the table (MFU not reported)"
    from .memprobe import MatmulClock
    clock = MatmulClock(2048)
    peak = max(clock.rate() for _ in range(5))
    return peak, f"fp32 2048^3 matmul, best of 5: {peak / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} threads)"


def shapes_for(families, params=None, d_model=None, n_layer=None, head_dim=32, mixers=None):
    """{family: (d_model, n_layer, params)}: one explicit shape, or sizing.py's matched pair (`mixers`:
    {plugin family: MixerSpec}; a plugin sized by params keeps the default MLP width, so its count may sit
    a few percent off the match)."""
    from ..flops import param_counts
    from ..models import ModelConfig
    from ..models.sizing import shape_for
    mixers = mixers or {}
    base = ModelConfig(family="transformer", d_model=head_dim, n_layer=1, head_dim=head_dim)
    out = {}
    if params is not None:
        tf = shape_for("transformer", params, base)
        for fam in families:
            s = tf if fam == "transformer" else shape_for(fam, params, base, match=tf.params, mixer=mixers.get(fam))
            cfg = base.replace(family=fam, d_model=s.d_model, n_layer=s.n_layer, mixer=mixers.get(fam))
            out[fam] = (s.d_model, s.n_layer, param_counts(cfg)["non_embedding"])
    else:
        for fam in families:
            cfg = base.replace(family=fam, d_model=d_model, n_layer=n_layer, mixer=mixers.get(fam))
            out[fam] = (d_model, n_layer, param_counts(cfg)["non_embedding"])
    return out


def _flops_per_token(family, d_model, n_layer, mode, seq_len, head_dim, mixer=None):
    from .. import flops
    cfg = _config(family, d_model, n_layer, head_dim=head_dim, mixer=mixer)
    if mode == "train":
        return flops.train_flops_per_token(cfg, seq_len)
    if mode == "prefill":
        return flops.forward_flops_per_token(cfg, seq_len)
    return flops.forward_flops_per_token(cfg, seq_len, decode=True)   # a new token attends all L keys


def profile_models(families, shapes, seq_lens, modes, batch=1, gen_tokens=32, repeats=3, device="cpu",
                   threads=None, timeout_s=None, head_dim=32, scan_impl="auto", progress=None,
                   mem_limit_bytes=None, compete=0, mixers=None, rounds=1):
    """Measure every (family, mode, length) point, alone and (compete > 0) interleaved with steps beside
    `compete` busy processes; returns (rows, peak, peak_note).

    Within a round, the families are measured side by side at each length (mode, then length, then family), so the
    points a ratio compares are taken minutes apart at most. With rounds > 1 the whole sweep runs again that many
    times, each point in a fresh process every time, and a row reports the median over its rounds: step time,
    compete time and MFU (each round's tokens/s x FLOPs per token over that round's own matmul peak), with the
    rounds' fastest and slowest step. A point that fails in a round (timeout, out of memory, error) is reported as
    that failure and not measured again. Rows come back in (mode, family, length) order."""
    from .memprobe import run_isolated
    peak, peak_note = measure_peak_flops(device, threads)
    cpu = not device.startswith("cuda")
    if cpu:
        peak_note = (f"fp32 2048^3 matmul timed after each timed step in the measuring process (median; "
                     f"column peak_flops); alone at the run's start: {peak_note}")
    prep = {"train": "prepare_train", "prefill": "prepare_prefill", "generate": "prepare_generate",
            "generate-bf16": "prepare_generate"}
    mixers = mixers or {}
    done, points = {}, []                        # (mode, fam, L) -> finished row; the points to measure, in order
    for mode in modes:
        for fam in families:
            d, n, params = shapes[fam]
            mixer = mixers.get(fam)
            impl = _scan_name(fam, scan_impl, device, mixer)
            if mode in GENERATE_MODES and state_bytes(fam, d, n, 1, 1, head_dim=head_dim, mixer=mixer) is None:
                for L in seq_lens:
                    done[mode, fam, L] = _cannot_generate(fam, mode, L, batch, d, n, params, device, impl, threads,
                                                          compete)
                if progress:
                    progress(done[mode, fam, seq_lens[-1]])
    for mode in modes:
        points += [(mode, fam, L) for L in seq_lens for fam in families if (mode, fam, L) not in done]
    results = {pt: [] for pt in points}
    for r in range(rounds):
        for pt in points:
            if results[pt] and results[pt][-1]["status"] != "ok":
                continue                         # failed in an earlier round: reported as that failure
            mode, fam, L = pt
            d, n, _ = shapes[fam]
            kwargs = dict(family=fam, d_model=d, n_layer=n, seq_len=L, batch=batch, head_dim=head_dim,
                          scan_impl=scan_impl, device=device)
            if mixers.get(fam) is not None:
                kwargs["mixer"] = asdict(mixers[fam])
            if mode in GENERATE_MODES:
                kwargs.update(gen_tokens=gen_tokens, decode_weights=decode_weights_of(mode))
            # long points are slow on a CPU: fewer repeats there (the median of what was run)
            reps = repeats if L <= 4096 or device != "cpu" else 1
            res = run_isolated(f"ssmscale.bench.profile:{prep[mode]}", kwargs, repeats=reps,
                               warmup=1 if reps > 1 else 0, threads=threads, timeout_s=timeout_s,
                               mem_limit_bytes=mem_limit_bytes, compete=compete, matmul_peak=cpu)
            results[pt].append(res)
            if progress:
                row = _point_row(pt, [res], shapes, batch, gen_tokens, head_dim, scan_impl, device, threads,
                                 compete, peak, mixers)
                progress(dict(row, round=f"{r + 1}/{rounds}") if rounds > 1 else row)
    for pt in points:
        done[pt] = _point_row(pt, results[pt], shapes, batch, gen_tokens, head_dim, scan_impl, device, threads,
                              compete, peak, mixers)
    rows = [done[mode, fam, L] for mode in modes for fam in families for L in seq_lens]
    return rows, peak, peak_note


def _point_row(pt, results, shapes, batch, gen_tokens, head_dim, scan_impl, device, threads, compete, peak,
               mixers) -> dict:
    """One point's row from its rounds' results (memprobe.run_isolated's dicts): medians over the rounds, or the
    failure of the round that failed."""
    import statistics
    mode, fam, L = pt
    d, n, params = shapes[fam]
    mixer = mixers.get(fam)
    generate = mode in GENERATE_MODES
    failed = [res for res in results if res["status"] != "ok"]
    res = failed[0] if failed else results[0]
    ok = not failed
    fpt = _flops_per_token(fam, d, n, mode, L, head_dim, mixer)
    tokens = batch * (gen_tokens if generate else L)
    times = [x["median_ms"] for x in results] if ok else []
    step_ms = statistics.median(times) if ok else res.get("median_ms")
    tps = tokens / (step_ms / 1e3) if ok else float("nan")
    peaks = [x.get("peak_flops") or peak for x in results]
    cache = state_bytes(fam, d, n, batch, L + gen_tokens, head_dim=head_dim, mixer=mixer) if generate else 0
    row = {"family": fam, "mode": mode, "seq_len": L, "batch": batch, "d_model": d, "n_layer": n,
           "params": params, "tokens_per_s": tps, "step_ms": step_ms,
           "peak_mem_bytes": (max(x["peak_extra_bytes"] for x in results) + cache) if ok else None,
           "state_bytes": cache if generate else None,
           "mfu": float("nan"), "flops_per_token": fpt, "status": res["status"], "error": res.get("error"),
           "memory_method": res.get("memory_method"), "device": device, "scan_impl": _scan_name(fam, scan_impl, device,
                                                                                                mixer),
           "threads": threads, "peak_flops": statistics.median(peaks) if all(p == p for p in peaks) else float("nan"),
           "competitors": compete, "tokens_per_s_compete": float("nan"), "step_ms_compete": None,
           "compete_ratio": float("nan"), "rounds": len(results),
           "step_ms_min": min(times) if ok else None, "step_ms_max": max(times) if ok else None}
    if ok and all(p == p for p in peaks):
        row["mfu"] = statistics.median(tokens / (t / 1e3) * fpt / p for t, p in zip(times, peaks))
    if ok and generate:
        row.update(decode_floor(_config(fam, d, n, head_dim=head_dim, mixer=mixer), cache,
                                row["step_ms"] / gen_tokens, threads, device, decode_weights_of(mode)))
        report = res.get("report") or {}
        row.update(logit_rel_err=report.get("logit_rel_err"), greedy_agreement=report.get("greedy_agreement"))
    if ok and compete:
        row["step_ms_compete"] = statistics.median(x["median_compete_ms"] for x in results)
        row["tokens_per_s_compete"] = tokens / (row["step_ms_compete"] / 1e3)
        row["compete_ratio"] = row["tokens_per_s_compete"] / tps
    return row


def _scan_name(family, scan_impl, device, mixer=None):
    from ..models.lm import kernel_impl
    cfg = _config(family, 64, 2, scan_impl=scan_impl, mixer=mixer)
    return kernel_impl(cfg, "cuda" if device.startswith("cuda") else "cpu")


CANNOT_GENERATE = "cannot-generate"


def _cannot_generate(fam, mode, L, batch, d, n, params, device, impl, threads, compete) -> dict:
    """The row of a generation point a family cannot run: its mixer has no allocate_cache."""
    return {"family": fam, "mode": mode, "seq_len": L, "batch": batch, "d_model": d, "n_layer": n,
            "params": params, "tokens_per_s": float("nan"), "step_ms": None, "peak_mem_bytes": None,
            "state_bytes": None, "mfu": float("nan"), "flops_per_token": None, "status": CANNOT_GENERATE,
            "error": "its mixer has no allocate_cache: this family trains but cannot generate",
            "memory_method": None, "device": device, "scan_impl": impl, "threads": threads, "peak_flops": None,
            "competitors": compete, "tokens_per_s_compete": float("nan"), "step_ms_compete": None,
            "compete_ratio": float("nan")}


def growth_exponents(rows, min_len=1024) -> dict:
    """Least-squares slope of log(time per step) and log(peak memory) against log(L), per family and mode,
    over the points with L >= min_len (the asymptotic regime; all points when fewer than 2 qualify)."""
    import numpy as np
    out = {}
    keys = sorted({(r["family"], r["mode"]) for r in rows})
    for fam, mode in keys:
        pts = [r for r in rows if r["family"] == fam and r["mode"] == mode and r["status"] == "ok"]
        use = [r for r in pts if r["seq_len"] >= min_len]
        use = use if len(use) >= 2 else pts
        if len(use) < 2:
            continue
        x = np.log([r["seq_len"] for r in use])
        res = {}
        for name, col in (("time", "step_ms"), ("memory", "peak_mem_bytes")):
            y = np.log([max(r[col], 1) for r in use])
            res[name] = float(np.polyfit(x, y, 1)[0])
        res["lengths"] = [int(r["seq_len"]) for r in use]
        out[f"{fam}/{mode}"] = res
    return out


def format_table(rows) -> str:
    compete = max((r.get("competitors") or 0 for r in rows), default=0)
    rounds = max((r.get("rounds") or 1 for r in rows), default=1)
    extra = f" {f'w/ {compete} busy':>10} {'kept':>6}" if compete else ""
    extra += f" {f'{rounds} rounds: ms':>19}" if rounds > 1 else ""
    lines = [f"{'family':<11} {'mode':<8} {'L':>6} {'tokens/s':>10} {'step ms':>9} {'peak MiB':>9} "
             f"{'MFU':>6}{extra}  status"]
    for r in rows:
        ok = r["status"] == "ok"
        tps = f"{r['tokens_per_s']:,.0f}" if ok else "-"
        ms = f"{r['step_ms']:.1f}" if ok else "-"
        mem = f"{r['peak_mem_bytes'] / 2**20:.1f}" if ok else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if ok and r["mfu"] == r["mfu"] else "-"
        cells = ""
        if compete:
            busy, kept = r.get("tokens_per_s_compete"), r.get("compete_ratio")
            cells = (f" {busy:>10,.0f} {100 * kept:>5.0f}%" if ok and busy == busy
                     else f" {'-':>10} {'-':>6}")
        if rounds > 1:
            spread = f"{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}" if ok else "-"
            cells += f" {spread:>19}"
        lines.append(f"{r['family']:<11} {r['mode']:<8} {r['seq_len']:>6} {tps:>10} {ms:>9} {mem:>9} "
                     f"{mfu:>6}{cells}  {r['status']}")
    return "\n".join(lines)


def plot(rows, path: Path, title: str):
    """Two rows (tokens/s, peak memory) x one column per mode, log-log, every family on every axis; with
    --rounds, bars from the slowest to the fastest round around each median."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fsutil import atomic_write_bytes
    modes = [m for m in MODES + EXTRA_MODES if any(r["mode"] == m for r in rows)]
    from ..report.colors import family_colors
    from ..report.profile import round_range
    families = list(dict.fromkeys(r["family"] for r in rows))
    colors = family_colors(families)
    fig, axes = plt.subplots(2, len(modes), figsize=(4.6 * len(modes), 7.2), squeeze=False)
    labels = {"train": "training (fwd+bwd+AdamW)", "prefill": "prefill (forward)",
              "generate": "generation (decode at context L)",
              "generate-bf16": "generation, bf16 weights"}
    for j, mode in enumerate(modes):
        for fam in families:
            pts = sorted((r for r in rows if r["mode"] == mode and r["family"] == fam), key=lambda r: r["seq_len"])
            ok = [r for r in pts if r["status"] == "ok"]
            c = colors.get(fam)
            axes[0, j].plot([r["seq_len"] for r in ok], [r["tokens_per_s"] for r in ok], "o-", color=c, label=fam)
            spread = [(r, span) for r in ok if (span := round_range(r))]
            if spread:          # --rounds: the rounds' slowest and fastest step around the median
                axes[0, j].errorbar([r["seq_len"] for r, _ in spread], [r["tokens_per_s"] for r, _ in spread],
                                    fmt="none", ecolor=c, capsize=3,
                                    yerr=[[r["tokens_per_s"] - slow for r, (slow, _) in spread],
                                          [fast - r["tokens_per_s"] for r, (_, fast) in spread]])
            axes[1, j].plot([r["seq_len"] for r in ok], [r["peak_mem_bytes"] / 2**20 for r in ok], "o-",
                            color=c, label=fam)
            for r in pts:
                if r["status"] != "ok":
                    axes[1, j].annotate(r["status"], (r["seq_len"], axes[1, j].get_ylim()[1]), color=c,
                                        ha="center", va="top", fontsize=8)
        axes[0, j].set_title(labels[mode])
        axes[0, j].set_ylabel("decoded tokens / s" if mode in GENERATE_MODES else "tokens / s")
        axes[1, j].set_ylabel("peak memory (MiB)" + (", cache included" if mode in GENERATE_MODES else ""))
        for i in range(2):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length L (tokens)" if mode in GENERATE_MODES else "sequence length L (tokens)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run_profile(families, seq_lens, modes, *, params=None, d_model=None, n_layer=None, batch=1,
                gen_tokens=32, repeats=3, device="cpu", threads=None, timeout_s=None, out=None,
                head_dim=32, scan_impl="auto", mem_limit_bytes=None, compete=0, mixers=None, rounds=1) -> list[dict]:
    import pandas as pd

    from .. import threads as thread_policy
    from ..fsutil import atomic_write_dataframe_csv, atomic_write_json
    from ..provenance import provenance
    try:
        shapes = shapes_for(families, params, d_model, n_layer, head_dim, mixers)
    except ValueError as exc:      # e.g. a width that is not a multiple of the head dimension
        raise UserError(f"model shape: {exc}") from None
    for fam, (d, n, p) in shapes.items():
        print(f"{fam}: d_model {d}, n_layer {n}, {p:,} non-embedding parameters", flush=True)
    choice = thread_policy.choose(threads, explicit_name="--threads")
    print(f"{choice.describe()}" + (f"; each timed step alone, then one beside {compete} CPU-bound competitor"
                                     f"{'s' if compete != 1 else ''}" if compete else "")
          + (f"; {rounds} rounds, the families side by side at each length in each, medians reported"
             if rounds > 1 else ""), flush=True)

    def progress(r):
        took = f"{r['tokens_per_s']:,.0f} tokens/s" if r["status"] == "ok" else f"{r['status']}: {r['error']}"
        if r["tokens_per_s_compete"] == r["tokens_per_s_compete"]:
            took += f", {r['tokens_per_s_compete']:,.0f} beside {compete} busy ({100 * r['compete_ratio']:.0f}%)"
        where = f" (round {r['round']})" if "round" in r else ""
        print(f"  {r['family']:>11} {r['mode']:<8} L={r['seq_len']:<6} {took}{where}", file=sys.stderr, flush=True)

    rows, peak, note = profile_models(families, shapes, seq_lens, modes, batch=batch, gen_tokens=gen_tokens,
                                      repeats=repeats, device=device, threads=choice.threads, timeout_s=timeout_s,
                                      head_dim=head_dim, scan_impl=scan_impl, progress=progress,
                                      mem_limit_bytes=mem_limit_bytes, compete=compete, mixers=mixers, rounds=rounds)
    print(f"peak for MFU: {note}")
    print(format_table(rows))
    if decode := format_decode_table(rows):
        print("decoding, per token: the floor reads every weight (4 bytes, bf16: 2) and the whole cache (KV or "
              "state) once, at the read bandwidth of a matrix-vector product or a sum over as many bytes, the "
              "faster, timed in this run")
        print(decode)
    growth = growth_exponents(rows)
    if growth:
        print("growth with L (log-log slope, L >= 1024): " + "; ".join(
            f"{k}: time {v['time']:.2f}, memory {v['memory']:.2f}" for k, v in growth.items()))
    if out:
        out = Path(out)
        atomic_write_dataframe_csv(out / "profile.csv", pd.DataFrame(rows, columns=CSV_COLUMNS))
        atomic_write_json(out / "profile.json", {"peak_flops": peak, "peak_note": note, "growth": growth,
                                                 "shapes": shapes, "batch": batch, "gen_tokens": gen_tokens,
                                                 "threads": choice.threads, "threads_reason": choice.reason,
                                                 "thread_waiting": thread_policy.waiting(), "competitors": compete,
                                                 "rounds": rounds,
                                                 **provenance(device)})
        plot(rows, out / "profile.png",
             f"{' vs '.join(f'{f} {shapes[f][2] / 1e6:.1f}M' for f in families)} params, batch {batch}, "
             f"{device}")
        print(f"wrote {out / 'profile.csv'}, {out / 'profile.json'}, {out / 'profile.png'}")
    return rows
