"""The Mamba-2 block's inner path, from the in_proj input to the out_proj output, as one op.

    z, xBC, dt = split(u @ in_proj_weight.T)     zxbcdt: (batch, L, 2 d_inner + 2 G N + H)
    x, B, C = silu(causal depthwise conv1d(xBC)) kernel K, with bias, over d_inner + 2 G N channels
    y = ssd(x, dt, A, B, C, D, dt_bias, softplus)    H heads, G groups of B and C, D per head
    out = rmsnorm_per_group(y * silu(z)) * norm_weight @ out_proj_weight.T

`mamba2_inner_ref` is the definition, composed of the reference pieces (conv1d, the sequential SSD,
the gated norm's formula). `mamba2_inner_fused` is one autograd function on the CPU kernels (after
mamba_inner.py, Mamba's): everything stays channels-last as in_proj produces it; the conv reads xBC
in place and the recurrent SSD (ssd_scan_cpu.c) reads x, B, C, dt where they lie, with the dt bias,
softplus and D inside; the gated norm is one pass (gated_norm_cpu.c). The backward recomputes the
conv output, y and the normed output instead of keeping them. Saved per token and layer: u, zxbcdt and
one SSD state per ssd_recurrent.CHUNK steps.
The in_proj product runs inside the op, against the weight padded with zero rows to a multiple of 16
outputs: the default width (2 d_inner + 2 N + heads) is rarely one, and the BLAS runs such a product
~25% slower (measured at 1630 against 1632 outputs); the padding also aligns zxbcdt's rows to cache lines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import conv, gated_norm, scan_cpu, ssd_recurrent
from .ssd_ref import ssd_ref


def _dims(zxbcdt, heads, groups, d_state):
    e = (zxbcdt.shape[-1] - 2 * groups * d_state - heads) // 2
    return e, e + 2 * groups * d_state          # d_inner, conv channels


def gated_rmsnorm_ref(y, z, weight, groups, eps):
    """models.norm.GatedRMSNorm's formula: weight * rmsnorm(y * silu(z)) within each group of channels."""
    g = (y.float() * F.silu(z.float())).unflatten(-1, (groups, -1))
    return F.rms_norm(g, (g.shape[-1],), None, eps).flatten(-2) * weight.float()


PAD = 16       # in_proj outputs are padded to a multiple of this


def mamba2_inner_ref(u, in_proj_weight, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, *,
                     heads, groups, d_state, eps, return_final_state=False):
    """The definition; returns out (batch, L, d), or (out, final SSD state (batch, heads, head_dim, N))."""
    zxbcdt = F.linear(u, in_proj_weight)
    e, conv_dim = _dims(zxbcdt, heads, groups, d_state)
    z, xBC, dt = zxbcdt.split([e, conv_dim, heads], dim=-1)
    xBC = conv.causal_conv1d_ref(xBC, conv_weight, conv_bias, silu=True, time_dim=1)
    x, B, C = xBC.split([e, groups * d_state, groups * d_state], dim=-1)
    y, last = ssd_ref(x.unflatten(-1, (heads, -1)), dt, A, B.unflatten(-1, (groups, d_state)),
                      C.unflatten(-1, (groups, d_state)), D=D, dt_bias=dt_bias, dt_softplus=True,
                      return_final_state=True)
    out = F.linear(gated_rmsnorm_ref(y.flatten(-2), z, norm_weight, groups, eps), out_proj_weight)
    return (out, last) if return_final_state else out


class _Mamba2Inner(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, in_proj_weight, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight,
                heads, groups, d_state, eps):
        batch, length, _ = u.shape
        u = u.detach()
        w_pad = _padded(in_proj_weight)
        zxbcdt = F.linear(u, w_pad)[..., :in_proj_weight.shape[0]]    # rows PAD-aligned, a view
        e, conv_dim = _dims(zxbcdt, heads, groups, d_state)
        need_grad = any(ctx.needs_input_grad)
        Dc = D.repeat_interleave(e // heads)                            # D per channel
        z, xBC, dt = zxbcdt.split([e, conv_dim, heads], dim=-1)
        xc = torch.empty(batch, length, conv_dim)
        conv.conv_forward(xBC, conv_weight, conv_bias, True, 1, xc)
        x, B, C = xc.split([e, groups * d_state, groups * d_state], dim=-1)
        y, last = torch.empty(batch, length, e), torch.empty(batch, heads, e // heads, d_state)
        states = ssd_recurrent.states_like(x, heads, groups, d_state) if need_grad else None
        ssd_recurrent.forward(x, dt, A, B, C, Dc, dt_bias, True, None, groups=groups, d_state=d_state, y=y,
                              states=states, last=last)
        del xc
        normed = torch.empty(batch, length, e)
        gated_norm.forward(y, z, norm_weight, groups, eps, normed)
        del y
        out = F.linear(normed, out_proj_weight)
        if need_grad:
            ctx.save_for_backward(u, w_pad, zxbcdt, conv_weight, conv_bias, dt_bias, A, Dc, norm_weight,
                                  out_proj_weight, states)
            ctx.dims = heads, groups, d_state, eps
        return out, last

    @staticmethod
    def backward(ctx, gout, glast):
        u, w_pad, zxbcdt, conv_weight, conv_bias, dt_bias, A, Dc, norm_weight, out_proj_weight, states = \
            ctx.saved_tensors
        heads, groups, d_state, eps = ctx.dims
        batch, length, total = zxbcdt.shape
        e, conv_dim = _dims(zxbcdt, heads, groups, d_state)
        gn = groups * d_state
        z, xBC, dt = zxbcdt.split([e, conv_dim, heads], dim=-1)
        # recompute what the forward did not keep: the conv output and y
        xc = torch.empty(batch, length, conv_dim)
        conv.conv_forward(xBC, conv_weight, conv_bias, True, 1, xc)
        x, B, C = xc.split([e, gn, gn], dim=-1)
        y = torch.empty(batch, length, e)
        ssd_recurrent.forward(x, dt, A, B, C, Dc, dt_bias, True, None, groups=groups, d_state=d_state, y=y)
        gout = torch.zeros(batch, length, out_proj_weight.shape[0]) if gout is None else gout.contiguous()
        flat = lambda t: t.reshape(batch * length, t.shape[-1])
        d_pad = torch.empty(batch, length, w_pad.shape[0])
        d_pad[..., total:] = 0.0
        d_zxbcdt = d_pad[..., :total]
        dz, d_xBC, d_dt = d_zxbcdt.split([e, conv_dim, heads], dim=-1)
        normed, dy = torch.empty(batch, length, e), torch.empty(batch, length, e)
        d_norm_w = gated_norm.backward(y, z, norm_weight, groups, eps, gout @ out_proj_weight, dy, dz, out=normed)
        d_out_w = flat(gout).t() @ flat(normed)
        del normed, y
        d_xc = torch.empty(batch, length, conv_dim)
        dx, dB, dC = d_xc.split([e, gn, gn], dim=-1)
        dA, dD, dbias, _ = ssd_recurrent.backward(
            x, dt, A, B, C, Dc, dt_bias, True, states, dy, None if glast is None else glast.float().contiguous(),
            groups=groups, d_state=d_state, dx=dx, ddt=d_dt, dB=dB, dC=dC)
        del xc, dy
        d_conv_w, d_conv_b = conv.conv_backward(xBC, conv_weight, conv_bias, True, 1, d_xc, d_xBC)
        del d_xc
        dD = dD.sum(0).view(heads, e // heads).sum(1)
        du = (flat(d_pad) @ w_pad).view(u.shape)
        d_in_w = (flat(d_pad).t() @ flat(u))[:total]
        return (du, d_in_w, d_conv_w, d_conv_b, dbias.sum(0), dA.sum(0), dD, d_norm_w, d_out_w,
                None, None, None, None)


def _padded(w):
    """w (out, in) with zero rows appended up to a multiple of PAD outputs (w itself when it is one)."""
    pad = -w.shape[0] % PAD
    return w if pad == 0 else torch.cat([w, w.new_zeros(pad, w.shape[1])])


def fused_supported(*tensors) -> bool:
    """Whether `mamba2_inner_fused` takes these: fp32 CPU tensors, and the C kernels built."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and scan_cpu.available() and ssd_recurrent.available() and gated_norm.available())


def mamba2_inner_fused(u, in_proj_weight, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, *,
                       heads, groups, d_state, eps, return_final_state=False):
    """Same arguments and results as `mamba2_inner_ref`; fp32 CPU tensors (see fused_supported)."""
    weights = [t.contiguous() for t in (in_proj_weight, conv_weight, conv_bias, dt_bias, A, D, norm_weight,
                                        out_proj_weight)]
    out, last = _Mamba2Inner.apply(u, *weights, heads, groups, d_state, eps)
    return (out, last) if return_final_state else out
