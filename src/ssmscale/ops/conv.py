"""Causal depthwise conv1d with bias, optionally followed by SiLU: the definition and the fused CPU op.

    y[b, t, c] = act(bias[c] + sum_k weight[c, 0, k] * x[b, t - K + 1 + k, c]),   x before t = 0 is 0

`causal_conv1d_ref` is the definition (PyTorch's grouped conv1d, padded and cut); `causal_conv1d_fused`
runs conv_cpu.c (built with the scan kernels, see scan_cpu.py) and recomputes the pre-activation in
its backward instead of saving it. Both take x as (batch, channels, L) (time_dim=2, conv1d's layout)
or (batch, L, channels) (time_dim=1, the layout the Mamba block's in_proj produces), any strides;
weight is nn.Conv1d's (channels, 1, K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import scan_cpu


def causal_conv1d_ref(x, weight, bias, silu=True, time_dim=2):
    """The definition: conv1d over (b, C, L) with K - 1 zeros of left padding, then SiLU."""
    xt = x if time_dim == 2 else x.transpose(1, 2)
    length, k = xt.shape[-1], weight.shape[-1]
    y = F.conv1d(xt, weight, bias, padding=k - 1, groups=xt.shape[1])[..., :length]
    y = F.silu(y) if silu else y
    return y if time_dim == 2 else y.transpose(1, 2)


def _ptr(t):
    return None if t is None else t.data_ptr()


def _args(x, weight, bias, silu, time_dim, y=None, gy=None, dx=None, dweight=None, dbias=None):
    batch, length, channels = x.shape[0], x.shape[time_dim], x.shape[3 - time_dim]
    work = batch * length * channels     # one thread below 64K elements: splitting costs more
    v = lambda t: scan_cpu.view(t, time_dim)
    return scan_cpu.ConvArgs(
        batch=batch, length=length, channels=channels, width=weight.shape[-1], silu=int(silu),
        n_threads=max(1, min(torch.get_num_threads(), work >> 16)),
        x=v(x), y=v(y), gy=v(gy), dx=v(dx), weight=_ptr(weight), bias=_ptr(bias),
        dweight=_ptr(dweight), dbias=_ptr(dbias))


def conv_forward(x, weight, bias, silu, time_dim, out):
    """Kernel call: y into `out` (x's layout convention, any strides). fp32; weight contiguous."""
    scan_cpu.call(scan_cpu.load().conv_forward, _args(x, weight, bias, silu, time_dim, y=out))


def conv_backward(x, weight, bias, silu, time_dim, gy, dx):
    """Kernel call: dx into `dx`; returns (dweight shaped like weight, dbias or None)."""
    dweight = torch.empty(weight.shape)
    dbias = None if bias is None else torch.empty(bias.shape)
    scan_cpu.call(scan_cpu.load().conv_backward,
                  _args(x, weight, bias, silu, time_dim, gy=gy, dx=dx, dweight=dweight, dbias=dbias))
    return dweight, dbias


class _FusedConv(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, silu, time_dim):
        xf, wf = x.detach().float(), weight.detach().float().contiguous()
        bf = None if bias is None else bias.detach().float().contiguous()
        out = torch.empty(x.shape)
        conv_forward(xf, wf, bf, silu, time_dim, out)
        ctx.save_for_backward(xf, wf, bf)
        ctx.silu, ctx.time_dim = silu, time_dim
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, w, b = ctx.saved_tensors
        dx = torch.empty(x.shape)
        dw, db = conv_backward(x, w, b, ctx.silu, ctx.time_dim, gy.float(), dx)
        grads = (dx, dw, db)
        return (*(None if g is None or not need else g.to(dt)
                  for g, need, dt in zip(grads, ctx.needs_input_grad, ctx.dtypes)), None, None)


def causal_conv1d_fused(x, weight, bias, silu=True, time_dim=2):
    """The fused CPU op (needs scan_cpu.available()); same arguments and result as the reference."""
    return _FusedConv.apply(x, weight, bias, bool(silu), time_dim)
