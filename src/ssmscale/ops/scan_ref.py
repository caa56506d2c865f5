"""The selective scan, defined: a sequential loop over time, written to be read, not to be fast.

Semantics and layout are those of mamba_ssm's `selective_scan_fn` (Gu & Dao 2023):
    delta <- softplus(delta + delta_bias)            (bias and softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t     (Euler step for B)
    y_t   = <h_t, C_t> + D * u_t,   then y *= silu(z) when z is given
u, delta, z: (batch, d_inner, L); A: (d_inner, N); B, C: (batch, N, L); D, delta_bias: (d_inner,).
The state h is (batch, d_inner, N) and always fp32; y is returned in u's dtype.
Every other implementation is tested against this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d_inner, length = u.shape
    h = u.new_zeros(batch, d_inner, A.shape[1])
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, :, t, None] * A)                              # (b, d, n)
        dBu = delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]     # (b, d, n)
        h = dA * h + dBu
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, d_inner, 0)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y
