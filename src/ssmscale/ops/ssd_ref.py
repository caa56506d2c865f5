"""Mamba-2's state-space dual (SSD) layer, defined: a sequential loop over time, to be read, not to be fast.

Per head (scalar A per head; heads share B and C within a group, Dao & Gu 2024, arXiv 2405.21060):
    dt_t <- softplus(dt_t + dt_bias)                      (bias and softplus optional)
    h_t   = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          (state h: head_dim x d_state)
    y_t   = h_t C_t + D x_t
Layout (that of mamba_ssm's `mamba_chunk_scan_combined`):
    x (batch, L, heads, head_dim); dt (batch, L, heads); A (heads,);
    B, C (batch, L, groups, d_state), head i reading group i // (heads / groups);
    D (heads,) or (heads, head_dim); dt_bias (heads,); initial_state (batch, heads, head_dim, d_state).
The state is fp32; y is returned in x's dtype. Every other implementation is tested against this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def heads_of_groups(t, n_heads: int):
    """(batch, L, groups, N) -> (batch, L, heads, N): each group's vector repeated for its heads."""
    return t.repeat_interleave(n_heads // t.shape[2], dim=2)


def ssd_ref(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
            return_final_state=False, chunk_size=None):
    """`chunk_size` is accepted for a uniform signature; the reference has no chunks."""
    dtype_in = x.dtype
    batch, length, heads, head_dim = x.shape
    x, dt, A = x.float(), dt.float(), A.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    B, C = heads_of_groups(B.float(), heads), heads_of_groups(C.float(), heads)
    h = (initial_state.float() if initial_state is not None
         else x.new_zeros(batch, heads, head_dim, B.shape[-1]))
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]                              # (b, h, 1, 1)
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # (b, h, p, N)
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(batch, 0, heads, head_dim)
    if D is not None:
        y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * x
    y = y.to(dtype_in)
    return (y, h) if return_final_state else y
