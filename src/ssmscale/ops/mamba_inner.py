"""The Mamba block's inner path, from the in_proj output to the out_proj output, as one op.

    x, z = xz[..., :E], xz[..., E:]              xz: (batch, L, 2E), the in_proj output
    x = silu(causal depthwise conv1d(x))         kernel K, with bias
    dt, B, C = x @ x_proj_weight.T               E -> dt_rank + 2N
    delta = dt @ dt_proj_weight.T                dt_rank -> E (its bias enters the scan)
    y = selective_scan(x, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
    out = y @ out_proj_weight.T                  E -> d

`mamba_inner_ref` is the definition, composed of the reference pieces (conv1d, the sequential scan).
`mamba_inner_fused` is one autograd function on the CPU kernels (after mamba_ssm's mamba_inner_fn):
everything stays in the channels-last layout the linears produce, the conv and the scan read their
inputs in place through strides (no transposed copies), and the backward recomputes the conv
output, delta and the gated scan output y instead of keeping them. Saved per token and layer: xz
(2E floats), the x_proj output (dt_rank + 2N) and one scan state per scan_cpu.CHUNK steps, against
the ~12 E floats an autograd composition of the same ops keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import conv, scan_cpu
from .scan_ref import selective_scan_ref


def _split(dbc, dt_rank, n_state):
    return dbc.split([dt_rank, n_state, n_state], dim=-1)


def mamba_inner_ref(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight,
                    A, D, delta_bias, return_last_state=False):
    """The definition; returns out (batch, L, d), or (out, last SSM state (batch, E, N))."""
    e, n = xz.shape[-1] // 2, A.shape[1]
    x, z = xz[..., :e], xz[..., e:]
    x = conv.causal_conv1d_ref(x, conv_weight, conv_bias, silu=True, time_dim=1)
    dt, B, C = _split(F.linear(x, x_proj_weight), dt_proj_weight.shape[1], n)
    delta = F.linear(dt, dt_proj_weight)
    y, last = selective_scan_ref(x.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                 C.transpose(1, 2), D, z.transpose(1, 2), delta_bias,
                                 delta_softplus=True, return_last_state=True)
    out = F.linear(y.transpose(1, 2), out_proj_weight)
    return (out, last) if return_last_state else out


class _MambaInner(torch.autograd.Function):

    @staticmethod
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight,
                A, D, delta_bias):
        batch, length, two_e = xz.shape
        e, n, r = two_e // 2, A.shape[1], dt_proj_weight.shape[1]
        xz = xz.detach()
        need_grad = any(ctx.needs_input_grad)
        xc = torch.empty(batch, length, e)
        conv.conv_forward(xz[..., :e], conv_weight, conv_bias, True, 1, xc)
        dbc = F.linear(xc, x_proj_weight)                               # (b, L, r + 2N)
        delta = F.linear(dbc[..., :r], dt_proj_weight)                  # (b, L, E)
        y, last = torch.empty(batch, length, e), torch.empty(batch, e, n)
        states = torch.empty(batch, scan_cpu.n_chunks(length), n, e) if need_grad else None
        _, B, C = _split(dbc, r, n)
        scan_cpu.scan_forward(xc, delta, A, B, C, D, xz[..., e:], delta_bias, True, time_dim=1,
                              out=y, states=states, last=last)
        del xc, delta
        out = F.linear(y, out_proj_weight)
        if need_grad:
            ctx.save_for_backward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                  out_proj_weight, A, D, delta_bias, dbc, states)
        return out, last

    @staticmethod
    def backward(ctx, gout, glast):
        xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, A, D, delta_bias, \
            dbc, states = ctx.saved_tensors
        batch, length, two_e = xz.shape
        e, n, r = two_e // 2, A.shape[1], dt_proj_weight.shape[1]
        x, z = xz[..., :e], xz[..., e:]
        # recompute what the forward did not keep: the conv output and delta
        xc = torch.empty(batch, length, e)
        conv.conv_forward(x, conv_weight, conv_bias, True, 1, xc)
        delta = F.linear(dbc[..., :r], dt_proj_weight)
        gout = torch.zeros(batch, length, out_proj_weight.shape[0]) if gout is None else gout.contiguous()
        gy = gout @ out_proj_weight                                     # dLoss/dy, (b, L, E)
        dxz, d_dbc = torch.empty(batch, length, two_e), torch.empty(batch, length, r + 2 * n)
        du, ddelta, y = torch.empty(batch, length, e), torch.empty(batch, length, e), torch.empty(batch, length, e)
        _, B, C = _split(dbc, r, n)
        _, dB, dC = _split(d_dbc, r, n)
        dA, dD, dbias = scan_cpu.scan_backward(
            xc, delta, A, B, C, D, z, delta_bias, True, states, gy,
            None if glast is None else glast.contiguous(), time_dim=1,
            du=du, ddelta=ddelta, dz=dxz[..., e:], dB=dB, dC=dC, out=y)
        del delta, gy
        flat = lambda t: t.reshape(batch * length, t.shape[-1])
        d_out_w = flat(gout).t() @ flat(y)
        del y
        d_dbc[..., :r] = ddelta @ dt_proj_weight
        d_dt_w = flat(ddelta).t() @ flat(dbc[..., :r])
        del ddelta
        flat(du).addmm_(flat(d_dbc), x_proj_weight)                     # + the path through x_proj
        d_x_w = flat(d_dbc).t() @ flat(xc)
        del xc
        d_conv_w, d_conv_b = conv.conv_backward(x, conv_weight, conv_bias, True, 1, du, dxz[..., :e])
        return dxz, d_conv_w, d_conv_b, d_x_w, d_dt_w, d_out_w, dA.sum(0), dD.sum(0), dbias.sum(0)


def fused_supported(*tensors) -> bool:
    """Whether `mamba_inner_fused` takes these: fp32 CPU tensors, and the C kernels built."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and scan_cpu.available())


def mamba_inner_fused(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight,
                      A, D, delta_bias, return_last_state=False):
    """Same arguments and results as `mamba_inner_ref`; fp32 CPU tensors (see fused_supported)."""
    weights = [t.contiguous() for t in (conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                        out_proj_weight, A, D, delta_bias)]
    out, last = _MambaInner.apply(xz, *weights)
    return (out, last) if return_last_state else out
