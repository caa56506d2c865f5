"""Mamba-2's SSD layer in its chunked matrix form (Dao & Gu 2024, Sec. 6 and the minimal listing), pure PyTorch.

Time is cut into chunks of T steps (the last one zero-padded: a padded step has dt = 0, so it neither
decays nor feeds the state). With a_t = dt_t A, cumulative sums a*_l = a_1 + ... + a_l within the chunk,
and X_t = dt_t x_t, per chunk and head:
1. intra-chunk (the quadratic, attention-like part): y_l = sum_{s <= l} (C_l . B_s) exp(a*_l - a*_s) X_s,
   a masked (T x T) matrix times X;
2. chunk states: the state each chunk leaves from a zero start, sum_s exp(a*_T - a*_s) X_s B_s^T;
3. inter-chunk recurrence: the state entering each chunk, h <- exp(a*_T) h + chunk state, a loop over
   the chunks (the listing writes it as a (chunks + 1)^2 matrix, which costs O(L^2 / T^2) per
   sequence; the loop is O(L / T) small steps);
4. state to output: y_l += exp(a*_l) C_l . (state entering the chunk).
The decays are differences of within-chunk prefix sums, as in mamba_ssm's kernels, taken in float64 so
that they are exact to fp32 rounding. The quadratic part is what a CPU pays for (memory traffic over
(heads, T, T) per chunk), so the default chunk is short: 16 here against 256 on a GPU.
Every contraction is one batched matmul that FlopCounterMode sees, so flops.py counts what is
computed. Autograd differentiates it; states and sums stay in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 16


def chunk_geometry(length: int, chunk_size: int) -> tuple[int, int]:
    """(T, chunks): the chunk length actually used (never longer than the sequence) and how many."""
    T = max(1, min(chunk_size, length))
    return T, math.ceil(length / T)


def ssd_chunked(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
                return_final_state=False, chunk_size=DEFAULT_CHUNK):
    dtype_in = x.dtype
    batch, length, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    r = heads // groups
    with torch.autocast(device_type=x.device.type, enabled=False):
        x32, dt = x.float(), dt.float()
        if dt_bias is not None:
            dt = dt + dt_bias.float()
        if dt_softplus:
            dt = F.softplus(dt)
        T, c = chunk_geometry(length, chunk_size)
        pad = c * T - length
        X, a, Bf, Cf = x32 * dt[..., None], dt * A.float(), B.float(), C.float()
        if pad:
            X, Bf, Cf = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, Bf, Cf))
            a = F.pad(a, (0, 0, 0, pad))
        X = X.view(batch, c, T, heads, p).transpose(2, 3)                 # (b, c, h, T, p)
        Bc = Bf.view(batch, c, T, groups, n).transpose(2, 3)             # (b, c, g, T, N)
        Cc = Cf.view(batch, c, T, groups, n).transpose(2, 3)
        # prefix sums in float64: the decays are their differences, which fp32 sums would round to
        # ~1e-7 of the sums' size (measured: 7e-5 relative error in dA at T = 50, 3e-6 this way)
        a_cum = a.view(batch, c, T, heads).transpose(2, 3).double().cumsum(dim=-1)  # (b, c, h, T)

        # 1. intra-chunk: (C_l . B_s) exp(a*_l - a*_s) for s <= l, times X
        scores = Cc @ Bc.transpose(-1, -2)                                # (b, c, g, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        decay = (a_cum[..., :, None] - a_cum[..., None, :]).float().masked_fill(~causal, -math.inf).exp()
        mixing = decay.view(batch, c, groups, r, T, T) * scores[:, :, :, None]
        y = mixing.view(batch, c, heads, T, T) @ X                         # (b, c, h, T, p)

        # 2. the state each chunk leaves from a zero start: (X decayed to the chunk's end)^T B
        Xd = X * torch.exp((a_cum[..., -1:] - a_cum).float())[..., None]
        states = Xd.transpose(-1, -2).reshape(batch, c, groups, r * p, T) @ Bc   # (b, c, g, r p, N)
        states = states.view(batch, c, heads, p, n)

        # 3. inter-chunk recurrence: the state entering each chunk
        chunk_decay = torch.exp(a_cum[..., -1].float())[..., None, None]   # (b, c, h, 1, 1)
        h = initial_state.float() if initial_state is not None else x32.new_zeros(batch, heads, p, n)
        entering = []
        # unbind, not indexing: one backward node for all chunks (an index's backward writes a full-size zero tensor)
        for decay_k, state_k in zip(chunk_decay.unbind(1), states.unbind(1)):
            entering.append(h)
            h = decay_k * h + state_k
        entering = torch.stack(entering, dim=1)                             # (b, c, h, p, N)

        # 4. entering state to output, decayed to each position of the chunk
        y_off = Cc @ entering.view(batch, c, groups, r * p, n).transpose(-1, -2)   # (b, c, g, T, r p)
        y_off = y_off.view(batch, c, groups, T, r, p).transpose(3, 4).reshape(batch, c, heads, T, p)
        y = y + y_off * torch.exp(a_cum.float())[..., None]
        y = y.transpose(2, 3).reshape(batch, c * T, heads, p)[:, :length]
        if D is not None:
            y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * x32
    y = y.to(dtype_in)
    return (y, h) if return_final_state else y
