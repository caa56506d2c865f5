"""Pure-PyTorch selective scan that never keeps a (batch, L, d_inner, N) tensor alive.

The portable fallback (any device torch runs on). Time is cut into chunks of T steps:
- forward: per chunk, exp(delta*A) and delta*B*u are built for the chunk only, the recurrence runs
  step by step in place (one fused multiply-add per step over (batch, d_inner, N)), y is read out
  with one batched matmul; only the chunk-start states are saved (L/T x (b, d, N));
- backward: chunks in reverse; each chunk's states are recomputed from its saved start state, the
  adjoint recurrence g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1} runs in place, and all input
  gradients of the chunk come from batched contractions.
Memory is O(b d L + (L/T) b d N + T b d N) instead of O(b d L N).
The delta bias / softplus, the D skip and the z gate are cheap elementwise ops left to autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one (T, b, d, N) chunk buffer we aim for: small enough to stay in cache.
_CHUNK_ELEMS = 1 << 20


def chunk_length(batch: int, d_inner: int, d_state: int) -> int:
    per_step = max(1, batch * d_inner * d_state)
    t = 8
    while t < 128 and 2 * t * per_step <= _CHUNK_ELEMS:
        t *= 2
    return t


def _chunk_states(h0, dA, dBu):
    """Run h_t = dA_t h_{t-1} + dBu_t over a chunk in place: dBu becomes the states (T, b, d, N)."""
    dBu[0].addcmul_(dA[0], h0)
    for t in range(1, dBu.shape[0]):
        dBu[t].addcmul_(dA[t], dBu[t - 1])
    return dBu


class _ScanCore(torch.autograd.Function):
    """y_t = <h_t, C_t> for h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, time-major inputs."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        # u, delta: (L, b, d); B, C: (L, b, N); A: (d, N); all fp32 contiguous.
        length, batch, d_inner = u.shape
        d_state = A.shape[1]
        T = chunk_length(batch, d_inner, d_state)
        h = u.new_zeros(batch, d_inner, d_state)
        y = u.new_empty(length, batch, d_inner)
        starts = []
        du = delta * u
        for s in range(0, length, T):
            e = min(s + T, length)
            starts.append(h)
            dA = torch.exp(delta[s:e, :, :, None] * A)
            hs = _chunk_states(h, dA, du[s:e, :, :, None] * B[s:e, :, None, :])
            torch.matmul(hs, C[s:e, :, :, None], out=y[s:e, :, :, None])
            h = hs[-1].clone()
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts))
        ctx.T = T
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_last):
        u, delta, A, B, C, starts = ctx.saved_tensors
        T = ctx.T
        length = u.shape[0]
        du_delta = delta * u
        g_next = dh_last.float() if dh_last is not None else torch.zeros_like(starts[0])
        d_u = torch.empty_like(u)
        d_delta = torch.empty_like(delta)
        d_B = torch.empty_like(B)
        d_C = torch.empty_like(C)
        d_A = torch.zeros_like(A)
        dy = dy.contiguous()
        for ci in reversed(range(len(starts))):
            s = ci * T
            e = min(s + T, length)
            h0 = starts[ci]
            dA = torch.exp(delta[s:e, :, :, None] * A)
            hs = _chunk_states(h0, dA, du_delta[s:e, :, :, None] * B[s:e, :, None, :])
            # d_C_t = sum_d dy_t * h_t
            torch.matmul(dy[s:e, :, None, :], hs, out=d_C[s:e, :, None, :])
            # adjoint states g_t = dL/dh_t, in place over a fresh buffer
            g = dy[s:e, :, :, None] * C[s:e, :, None, :]
            g[-1].add_(g_next)
            for t in range(e - s - 2, -1, -1):
                g[t].addcmul_(dA[t + 1], g[t + 1])
            g_next = dA[0] * g[0]
            # previous states h_{t-1}: reuse hs shifted by one, h0 first
            h_prev = torch.cat([h0[None], hs[:-1]], dim=0)
            gB = torch.matmul(g, B[s:e, :, :, None]).squeeze(-1)            # sum_n g B  (T, b, d)
            d_B[s:e] = torch.matmul(du_delta[s:e, :, None, :], g).squeeze(-2)  # sum_d g delta u
            d_u[s:e] = delta[s:e] * gB
            # dL/d(delta_t A) = g_t * h_{t-1} * dA_t, elementwise; reuse the g buffer
            ga = g.mul_(h_prev).mul_(dA)
            d_delta[s:e] = u[s:e] * gB + (ga * A).sum(-1)
            d_A += torch.einsum("tbdn,tbd->dn", ga, delta[s:e])
        return d_u, d_delta, d_A, d_B, d_C


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, return_last_state=False):
    dtype_in = u.dtype
    u32, delta32 = u.float(), delta.float()
    if delta_bias is not None:
        delta32 = delta32 + delta_bias.float()[:, None]
    if delta_softplus:
        delta32 = F.softplus(delta32)
    tm = lambda t: t.float().permute(2, 0, 1).contiguous()  # (b, ·, L) -> (L, b, ·)
    y, last = _ScanCore.apply(tm(u32), tm(delta32), A.float().contiguous(), tm(B), tm(C))
    y = y.permute(1, 2, 0)
    if D is not None:
        y = y + D.float()[:, None] * u32
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y
