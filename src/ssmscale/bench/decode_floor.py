"""The generate rows' per-token figures for `ssmscale profile`: ms per token and per layer, and the floor a
decoded token cannot beat, reading every weight and the whole cache (KV or recurrent state) once: their bytes
over this machine's read bandwidth at that working set, timed in the run as the faster of a matrix-vector
product and a sum over as many bytes (`read_bandwidth`; torch's mv streams a large matrix at half the rate two
threads can read it). CPU only: on a GPU the floor is left empty."""

from __future__ import annotations

import time

_bandwidth: dict = {}     # (bytes, threads) -> read bandwidth measured in this process


def read_bandwidth(nbytes: int, threads=None) -> float:
    """Bytes per second of reading `nbytes` once, as batch-1 decoding reads its weights: the fastest of
    repeated matrix-vector products and sums over an fp32 matrix that size (what stays in the caches between
    repeats stays there for a model's weights between tokens too). Measured once per size and process."""
    import torch
    key = (int(nbytes), threads)
    if key not in _bandwidth:
        if threads:
            torch.set_num_threads(threads)
        cols = 1024
        W = torch.ones(max(1, int(nbytes) // (4 * cols)), cols)
        x = torch.ones(cols)
        best = float("inf")
        for _ in range(12):
            for read in (lambda: torch.mv(W, x), W.sum):
                start = time.perf_counter()
                read()
                best = min(best, time.perf_counter() - start)
        _bandwidth[key] = W.numel() * 4 / best
    return _bandwidth[key]


def decode_floor(cfg, cache_bytes: int, ms_per_token: float, threads, device: str, weights: str = "fp32") -> dict:
    """The generate row's per-token figures for the model `cfg` (a ModelConfig) whose cache holds
    `cache_bytes`: ms per token and layer, the bytes a token must read (every weight once, at 4 bytes, or 2
    with bf16 weights, and the cache), the read bandwidth at that working set and the floor those bytes take."""
    from ..flops import param_counts
    nbytes = (2 if weights == "bf16" else 4) * param_counts(cfg)["total"] + cache_bytes
    out = {"ms_per_token_layer": ms_per_token / cfg.n_layer, "read_bytes_per_token": nbytes,
           "read_gbs": float("nan"), "floor_ms_per_token": float("nan")}
    if not device.startswith("cuda"):
        bw = read_bandwidth(nbytes, threads)
        out.update(read_gbs=bw / 1e9, floor_ms_per_token=1e3 * nbytes / bw)
    return out


def format_decode_table(rows) -> str:
    """Per decoded token: ms, ms per layer, the bytes it must read and the floor they take, and the ratio."""
    bf16 = any(r["mode"] == "generate-bf16" for r in rows)
    lines = [f"{'family':<11} {'weights':<7} {'L':>6} {'tokens/s':>9} {'ms/token':>9} {'ms/tok/layer':>12} "
             f"{'reads MB':>9} {'GB/s':>6} {'floor ms':>9} {'x floor':>8}"
             + (f" {'logits vs fp32':>14} {'greedy agrees':>13}" if bf16 else "")]
    for r in rows:
        if r["mode"] not in ("generate", "generate-bf16") or r["status"] != "ok":
            continue
        ms = r["ms_per_token_layer"] * r["n_layer"]
        floor = r.get("floor_ms_per_token")
        have = floor is not None and floor == floor
        line = (f"{r['family']:<11} {'bf16' if r['mode'] == 'generate-bf16' else 'fp32':<7} {r['seq_len']:>6} "
                f"{r['tokens_per_s']:>9,.0f} {ms:>9.2f} {r['ms_per_token_layer']:>12.3f} "
                f"{r['read_bytes_per_token'] / 1e6:>9.1f} {r['read_gbs'] if have else float('nan'):>6.1f} "
                f"{floor if have else float('nan'):>9.2f} {ms / floor if have else float('nan'):>8.1f}")
        if bf16:
            err, agree = r.get("logit_rel_err"), r.get("greedy_agreement")
            line += (f" {err:>14.1e} {100 * agree:>12.0f}%" if err is not None and err == err
                     else f" {'-':>14} {'-':>13}")
        lines.append(line)
    return "\n".join(lines) if len(lines) > 1 else ""
