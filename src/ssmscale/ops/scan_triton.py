"""The Triton selective scan for CUDA ("triton"): autograd wrapper around scan_triton_kernels.py.

Registered for CUDA only, and available only where triton imports and CUDA is present; triton
itself is imported on the first call, so `import ssmscale.ops` stays fast. With
TRITON_INTERPRET=1 the same kernels run on CPU tensors through Triton's interpreter, which is how
the tests check them on machines without a GPU (slow: keep shapes tiny).
"""

from __future__ import annotations

import importlib.util

import torch

CHUNK = 64      # steps recomputed at once in the backward (scratch: CHUNK+1 states per program)
BLOCK_D = 32    # channels per program


def _kernels():
    from . import scan_triton_kernels
    return scan_triton_kernels


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    return torch.cuda.is_available() and _triton_importable()


def unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _triton_importable():
        return "triton is not installed"
    return None


def _blocks(d_inner: int, n_state: int):
    import triton
    return min(BLOCK_D, triton.next_power_of_2(d_inner)), triton.next_power_of_2(n_state)


def _flags(D, z, delta_bias, softplus):
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(softplus))


class _TritonScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        k = _kernels()
        u, delta, A, B, C, D, z, delta_bias = (None if t is None else t.detach().contiguous()
                                               for t in (u, delta, A, B, C, D, z, delta_bias))
        batch, d_inner, length = u.shape
        n_state = A.shape[1]
        block_d, block_n = _blocks(d_inner, n_state)
        n_chunks = -(-length // CHUNK)
        need_grad = any(ctx.needs_input_grad)
        f32 = dict(dtype=torch.float32, device=u.device)
        out = torch.empty_like(u)
        last = torch.empty(batch, d_inner, n_state, **f32)
        states = torch.empty(batch, d_inner, n_chunks, n_state, **f32) if need_grad else last
        y_pre = torch.empty(batch, d_inner, length, **f32) if need_grad and z is not None else out
        grid = (batch, -(-d_inner // block_d))
        k.scan_fwd_kernel[grid](
            u, delta, A, B, C, _or(D, u), _or(z, u), _or(delta_bias, u), out, y_pre, states, last,
            d_inner, length, n_state, n_chunks, CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n,
            SAVE=need_grad, **_flags(D, z, delta_bias, delta_softplus))
        if need_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states,
                                  y_pre if z is not None else None)
            ctx.softplus, ctx.chunk = delta_softplus, CHUNK
        return out, last

    @staticmethod
    def backward(ctx, gout, glast):
        k = _kernels()
        u, delta, A, B, C, D, z, delta_bias, states, y_pre = ctx.saved_tensors
        batch, d_inner, length = u.shape
        n_state = A.shape[1]
        block_d, block_n = _blocks(d_inner, n_state)
        n_dblocks = -(-d_inner // block_d)
        n_chunks = states.shape[2]
        f32 = dict(dtype=torch.float32, device=u.device)
        gout = torch.zeros(u.shape, **f32) if gout is None else gout.contiguous()
        glast = None if glast is None else glast.float().contiguous()
        du, ddelta = torch.empty(u.shape, **f32), torch.empty(u.shape, **f32)
        dz = torch.empty(u.shape, **f32) if z is not None else None
        dA_rows = torch.empty(batch, d_inner, n_state, **f32)
        dD_rows, dbias_rows = torch.empty(batch, d_inner, **f32), torch.empty(batch, d_inner, **f32)
        dB_part = torch.empty(batch, n_dblocks, length, n_state, **f32)
        dC_part = torch.empty(batch, n_dblocks, length, n_state, **f32)
        scratch = torch.empty(batch * n_dblocks * (ctx.chunk + 1) * block_d * block_n, **f32)
        k.scan_bwd_kernel[(batch, n_dblocks)](
            u, delta, A, B, C, _or(D, u), _or(z, u), _or(delta_bias, u), _or(y_pre, u), states,
            gout, _or(glast, u), scratch, du, ddelta, _or(dz, du), dA_rows, dD_rows, dbias_rows,
            dB_part, dC_part, d_inner, length, n_state, n_chunks,
            CHUNK=ctx.chunk, BLOCK_D=block_d, BLOCK_N=block_n, HAS_GLAST=glast is not None,
            **_flags(D, z, delta_bias, ctx.softplus))
        grads = (du, ddelta, dA_rows.sum(0), dB_part.sum(1).transpose(1, 2),
                 dC_part.sum(1).transpose(1, 2), None if D is None else dD_rows.sum(0), dz,
                 None if delta_bias is None else dbias_rows.sum(0))
        inputs = (u, delta, A, B, C, D, z, delta_bias)
        return (*(None if (g is None or not need) else g.to(x.dtype)
                  for g, need, x in zip(grads, ctx.needs_input_grad, inputs)), None)


def _or(t, dummy):
    """Triton needs a pointer even for an absent input; its HAS_* flag keeps it unread."""
    return dummy if t is None else t


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False):
    y, last = _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (y, last) if return_last_state else y
