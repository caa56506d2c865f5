"""The fused CPU SSD ("fused"): ssd_cpu.c, compiled at first use (cbuild.py) and called via ctypes.

One library per (head_dim, d_state): the kernel takes both as compile-time constants (a model uses
one pair; each new pair costs one compile of about a second, then comes from the cache).

Forward and backward run one (batch, head) row at a time, chunk by chunk, with a chunk's work in
cache: the forward saves the state entering every chunk, the backward recomputes each chunk from it
(the math is in ssd_cpu.c's header). The dt bias and softplus and the D skip stay in PyTorch (cheap
elementwise work that autograd differentiates). Rows split over torch.get_num_threads() OpenMP
threads where the library is built with OpenMP (see cbuild.py), else run on one thread.

When there is no compiler, or the build or load fails, or SSMSCALE_NO_FUSED_SSD=1 is set, "fused"
is unavailable (with the reason) and "auto" runs the pure-PyTorch "chunked" form.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from . import cbuild
from .ssd_chunked import DEFAULT_CHUNK

DISABLE_ENV = "SSMSCALE_NO_FUSED_SSD"
SOURCE = Path(__file__).with_name("ssd_cpu.c")


class _Args(ctypes.Structure):
    """Mirror of SSDArgs in ssd_cpu.c (same field order and types)."""
    _fields_ = ([(n, ctypes.c_int64) for n in
                 ("batch", "length", "heads", "head_dim", "groups", "d_state", "chunk", "n_threads")]
                + [(n, ctypes.c_void_p) for n in
                   ("x", "dt", "A", "B", "C", "h0", "y", "states", "dy", "dfinal",
                    "dx", "ddt", "dA_rows", "dBh", "dCh", "dh0")])


DEFAULT_SHAPE = (8, 16)         # (head_dim, d_state) of the default Mamba-2: built to tell availability
_libs: dict[tuple[int, int], tuple] = {}


def load(head_dim: int = DEFAULT_SHAPE[0], d_state: int = DEFAULT_SHAPE[1]):
    """The library compiled for this (head_dim, d_state), or None (then `unavailable_reason()` says
    why). Tried once per pair and process."""
    key = (head_dim, d_state)
    if key not in _libs:
        lib, reason = cbuild.load(SOURCE, DISABLE_ENV, {"SSD_P": head_dim, "SSD_N": d_state})
        if lib is not None:
            for fn in (lib.ssd_forward, lib.ssd_backward):
                fn.argtypes = [ctypes.POINTER(_Args)]
                fn.restype = ctypes.c_int
        _libs[key] = (lib, reason)
    return _libs[key][0]


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _libs[DEFAULT_SHAPE][1]


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _call(name: str, args: _Args):
    lib = load(args.head_dim, args.d_state)
    if lib is None:
        raise RuntimeError(f"fused SSD: no kernel for head_dim {args.head_dim}, d_state {args.d_state} "
                           f"({_libs[(args.head_dim, args.d_state)][1]})")
    code = getattr(lib, name)(ctypes.byref(args))
    if code == 1:
        raise MemoryError("fused SSD: could not allocate its per-thread buffers")
    if code != 0:
        raise RuntimeError(f"fused SSD: {name} failed with code {code}")


class _FusedSSD(torch.autograd.Function):
    """y (without D) and the final state of the SSD with dt already positive; fp32 contiguous inputs in
    the kernel's head-major layout: x (batch, heads, L, P), dt (batch, heads, L), B, C (batch, groups, L, N)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, chunk):
        batch, heads, length, p = x.shape
        groups, n = B.shape[1], B.shape[3]
        n_chunks = -(-length // chunk)
        y = torch.empty_like(x)
        states = torch.empty(batch, heads, n_chunks + 1, p, n)
        args = _Args(batch=batch, length=length, heads=heads, head_dim=p, groups=groups, d_state=n, chunk=chunk,
                     n_threads=max(1, min(torch.get_num_threads(), batch * heads)),
                     x=_ptr(x), dt=_ptr(dt), A=_ptr(A), B=_ptr(B), C=_ptr(C), h0=_ptr(h0), y=_ptr(y),
                     states=_ptr(states))
        _call("ssd_forward", args)
        ctx.save_for_backward(x, dt, A, B, C, states)
        ctx.chunk, ctx.has_h0 = chunk, h0 is not None
        return y, states[:, :, -1].clone()

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, states = ctx.saved_tensors
        batch, heads, length, p = x.shape
        groups, n = B.shape[1], B.shape[3]
        dy = torch.zeros_like(x) if dy is None else dy.float().contiguous()
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        g = dict(dx=torch.empty_like(x), ddt=torch.empty_like(dt), dA_rows=torch.empty(batch, heads),
                 dBh=torch.empty(batch, heads, length, n), dCh=torch.empty(batch, heads, length, n),
                 dh0=torch.empty(batch, heads, p, n))
        args = _Args(batch=batch, length=length, heads=heads, head_dim=p, groups=groups, d_state=n,
                     chunk=ctx.chunk, n_threads=max(1, min(torch.get_num_threads(), batch * heads)),
                     x=_ptr(x), dt=_ptr(dt), A=_ptr(A), B=_ptr(B), C=_ptr(C), states=_ptr(states),
                     dy=_ptr(dy), dfinal=_ptr(dfinal), **{k: _ptr(v) for k, v in g.items()})
        _call("ssd_backward", args)
        per_group = lambda t: t.view(batch, groups, heads // groups, length, n).sum(2)
        return (g["dx"], g["ddt"], g["dA_rows"].sum(0), per_group(g["dBh"]), per_group(g["dCh"]),
                g["dh0"] if ctx.has_h0 else None, None)


def ssd_fused(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
              return_final_state=False, chunk_size=DEFAULT_CHUNK):
    if x.device.type != "cpu":
        raise ValueError(f"impl: 'fused' runs on the CPU, got tensors on {x.device}")
    dtype_in = x.dtype
    with torch.autocast(device_type="cpu", enabled=False):
        x32, dt32 = x.float(), dt.float()
        if dt_bias is not None:
            dt32 = dt32 + dt_bias.float()
        if dt_softplus:
            dt32 = F.softplus(dt32)
        f32 = lambda t: None if t is None else t.float().contiguous()
        heads_major = lambda t: t.float().transpose(1, 2).contiguous()    # (batch, L, k, ...) -> (batch, k, L, ...)
        y, final = _FusedSSD.apply(heads_major(x32), heads_major(dt32), f32(A), heads_major(B), heads_major(C),
                                   f32(initial_state), max(1, min(chunk_size, x.shape[1])))
        y = y.transpose(1, 2)
        if D is not None:
            y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * x32
    y = y.to(dtype_in)
    return (y, final) if return_final_state else y
