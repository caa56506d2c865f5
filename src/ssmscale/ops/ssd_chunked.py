"""Mamba-2's SSD layer in its chunked matrix form (Dao & Gu 2024, Sec. 6 and the minimal listing), pure PyTorch.

Time is cut into chunks of T steps (the last one zero-padded: a padded step has dt = 0, so it neither
decays nor feeds the state). With a_t = dt_t A, cumulative sums a*_l = a_1 + ... + a_l within the chunk,
and X_t = dt_t x_t, per chunk and head:
1. intra-chunk (the quadratic, attention-like part): y_l = sum_{s <= l} (C_l . B_s) exp(a*_l - a*_s) X_s,
   a masked (T x T) matrix times X;
2. chunk states: the state each chunk leaves from a zero start, sum_s exp(a*_T - a*_s) X_s B_s^T;
3. inter-chunk recurrence: the state entering each chunk, h <- exp(a*_T) h + chunk state, a loop over
   the chunks with its own backward (the listing writes it as a (chunks + 1)^2 matrix, which costs
   O(L^2 / T^2) per sequence; the loop is O(L / T) small in-place steps);
4. state to output: y_l += exp(a*_l) C_l . (state entering the chunk).
The decays are differences of within-chunk prefix sums, as in mamba_ssm's kernels, taken in float64 so
that they are exact to fp32 rounding. The quadratic part is what a CPU pays for (memory traffic over
(heads, T, T) per chunk), so the default chunk is short: 8 here against 256 on a GPU.
Every contraction is one batched matmul that FlopCounterMode sees, so flops.py counts what is
computed. Autograd differentiates all but step 3; states and sums stay in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 8


def chunk_geometry(length: int, chunk_size: int) -> tuple[int, int]:
    """(T, chunks): the chunk length actually used (never longer than the sequence) and how many."""
    T = max(1, min(chunk_size, length))
    return T, math.ceil(length / T)


class _ChunkRecurrence(torch.autograd.Function):
    """H_0 = h0, H_{k+1} = decay_k H_k + S_k over the chunks k, in place: (H_0 .. H_{c-1}) and H_c.

    Its own backward, because autograd through a Python loop over the chunks costs a few graph nodes
    per chunk (1024 chunks per layer at L = 16K): adjoint G_c = dH_c, G_k = dH_k + decay_k G_{k+1};
    then dS_k = G_{k+1}, d decay_k = <G_{k+1}, H_k>, dh0 = G_0."""

    @staticmethod
    def forward(ctx, decay, states, h0):
        # decay (b, c, h); states (b, c, h, p, N); h0 (b, h, p, N)
        c = states.shape[1]
        H = states.new_empty(states.shape[0], c + 1, *states.shape[2:])
        H[:, 0] = h0
        d = decay[..., None, None]
        for k in range(c):
            torch.addcmul(states[:, k], d[:, k], H[:, k], out=H[:, k + 1])
        ctx.save_for_backward(decay, H)
        return H[:, :c], H[:, c]

    @staticmethod
    def backward(ctx, d_entering, d_final):
        decay, H = ctx.saved_tensors
        c = decay.shape[1]
        G = torch.empty_like(H)
        G[:, c] = d_final if d_final is not None else 0.0
        if d_entering is None:
            G[:, :c] = 0.0
        else:
            G[:, :c] = d_entering
        d = decay[..., None, None]
        for k in range(c - 1, -1, -1):
            G[:, k].addcmul_(d[:, k], G[:, k + 1])
        d_decay = (G[:, 1:] * H[:, :c]).sum(dim=(-2, -1))
        return d_decay, G[:, 1:], G[:, 0]


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
        h0 = initial_state.float() if initial_state is not None else x32.new_zeros(batch, heads, p, n)
        entering, h = _ChunkRecurrence.apply(torch.exp(a_cum[..., -1].float()), states, h0)   # (b, c, h, p, N)

        # 4. entering state to output, decayed to each position of the chunk
        y_off = Cc @ entering.view(batch, c, groups, r * p, n).transpose(-1, -2)   # (b, c, g, T, r p)
        y_off = y_off.view(batch, c, groups, T, r, p).transpose(3, 4).reshape(batch, c, heads, T, p)
        y = y + y_off * torch.exp(a_cum.float())[..., None]
        y = y.transpose(2, 3).reshape(batch, c * T, heads, p)[:, :length]
        if D is not None:
            y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * x32
    y = y.to(dtype_in)
    return (y, h) if return_final_state else y
