"""The generate rows' per-token figures for `ssmscale profile`: ms per token and per layer, and the floor a
decoded token cannot beat, reading every weight and the whole cache (KV or recurrent state) once: their bytes
over this machine's read bandwidth at that working set, timed in the run as a matrix-vector product over as
many bytes (`read_bandwidth`). CPU only: on a GPU the floor is left empty."""

from __future__ import annotations

import time

_bandwidth: dict = {}     # (bytes, threads) -> read bandwidth measured in this process


def read_bandwidth(nbytes: int, threads=None) -> float:
    """Bytes per second of reading `nbytes` of fp32 weights once, as batch-1 decoding does: the fastest of
    repeated matrix-vector products over a matrix that size (what stays in the caches between repeats
    stays there for a model's weights between tokens too). Measured once per size and process."""
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
            start = time.perf_counter()
            torch.mv(W, x)
            best = min(best, time.perf_counter() - start)
        _bandwidth[key] = W.numel() * 4 / best
    return _bandwidth[key]


def decode_floor(cfg, cache_bytes: int, ms_per_token: float, threads, device: str) -> dict:
    """The generate row's per-token figures for the model `cfg` (a ModelConfig) whose cache holds
    `cache_bytes`: ms per token and layer, the bytes a token must read (every weight once, and the cache),
    the read bandwidth at that working set and the floor those bytes take."""
    from ..flops import param_counts
    nbytes = 4 * param_counts(cfg)["total"] + cache_bytes
    out = {"ms_per_token_layer": ms_per_token / cfg.n_layer, "read_bytes_per_token": nbytes,
           "read_gbs": float("nan"), "floor_ms_per_token": float("nan")}
    if not device.startswith("cuda"):
        bw = read_bandwidth(nbytes, threads)
        out.update(read_gbs=bw / 1e9, floor_ms_per_token=1e3 * nbytes / bw)
    return out


def format_decode_table(rows) -> str:
    """Per decoded token: ms, ms per layer, the bytes it must read and the floor they take, and the ratio."""
    lines = [f"{'family':<11} {'L':>6} {'ms/token':>9} {'ms/tok/layer':>12} {'reads MB':>9} {'GB/s':>6} "
             f"{'floor ms':>9} {'x floor':>8}"]
    for r in rows:
        if r["mode"] != "generate" or r["status"] != "ok":
            continue
        ms = r["ms_per_token_layer"] * r["n_layer"]
        floor = r.get("floor_ms_per_token")
        have = floor is not None and floor == floor
        lines.append(f"{r['family']:<11} {r['seq_len']:>6} {ms:>9.2f} {r['ms_per_token_layer']:>12.3f} "
                     f"{r['read_bytes_per_token'] / 1e6:>9.1f} {r['read_gbs'] if have else float('nan'):>6.1f} "
                     f"{floor if have else float('nan'):>9.2f} {ms / floor if have else float('nan'):>8.1f}")
    return "\n".join(lines) if len(lines) > 1 else ""
