"""Mamba-2's gated RMSNorm on the CPU: gated_norm_cpu.c (one pass over the rows each way) via ctypes.

    out = weight * rmsnorm_per_group(y * silu(z))       (the definition: models.norm.GatedRMSNorm)

`forward` / `backward` are the kernel calls the fused Mamba-2 block (mamba2_inner.py) makes on
channels-last tensors with any strides (z is read in place from the in_proj output);
`gated_norm_fused` is the same as one autograd function, for tests against the module.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cbuild
from .scan_cpu import View, view

DISABLE_ENV = "SSMSCALE_NO_FUSED_SSD"    # part of the fused Mamba-2 block: off with the fused SSD
SOURCE = Path(__file__).with_name("gated_norm_cpu.c")


class _Args(ctypes.Structure):
    """Mirror of NormArgs in gated_norm_cpu.c."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("batch", "length", "dim", "groups", "n_threads")]
                + [("eps", ctypes.c_double)] + [(n, View) for n in ("y", "z")] + [("weight", ctypes.c_void_p)]
                + [(n, View) for n in ("out", "gout", "dy", "dz")] + [("dweight", ctypes.c_void_p)])


_state: dict = {}


def load():
    """The library, or None (`unavailable_reason()` then says why); tried once per process."""
    if "lib" not in _state:
        lib, reason = cbuild.load(SOURCE, DISABLE_ENV)
        if lib is not None:
            for fn in (lib.gated_norm_forward, lib.gated_norm_backward):
                fn.argtypes = [ctypes.POINTER(_Args)]
                fn.restype = ctypes.c_int
        _state.update(lib=lib, reason=reason)
    return _state["lib"]


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _state["reason"]


def _args(y, z, weight, groups, eps, **views):
    batch, length, dim = y.shape
    rows = batch * length
    return _Args(batch=batch, length=length, dim=dim, groups=groups, eps=eps,
                 n_threads=max(1, min(torch.get_num_threads(), rows * dim >> 15)),
                 y=view(y, 1), z=view(z, 1), weight=weight.data_ptr(),
                 **{k: view(v, 1) for k, v in views.items()})


def _call(fn, args):
    if fn(ctypes.byref(args)) != 0:
        raise MemoryError("gated norm: could not allocate its buffers")


def forward(y, z, weight, groups, eps, out):
    """out <- weight * rmsnorm(y * silu(z)) per group; (b, L, dim) fp32 views, weight contiguous."""
    _call(load().gated_norm_forward, _args(y, z, weight, groups, eps, out=out))


def backward(y, z, weight, groups, eps, gout, dy, dz, out=None):
    """dy, dz into the tensors given, `out` recomputed where given; returns dweight."""
    dweight = torch.empty(weight.shape)
    args = _args(y, z, weight, groups, eps, out=out, gout=gout, dy=dy, dz=dz)
    args.dweight = dweight.data_ptr()
    _call(load().gated_norm_backward, args)
    return dweight


class _GatedNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, z, weight, groups, eps):
        out = torch.empty(y.shape)
        forward(y, z, weight, groups, eps, out)
        ctx.save_for_backward(y, z, weight)
        ctx.groups, ctx.eps = groups, eps
        return out

    @staticmethod
    def backward(ctx, gout):
        y, z, weight = ctx.saved_tensors
        dy, dz = torch.empty(y.shape), torch.empty(z.shape)
        dweight = backward(y, z, weight, ctx.groups, ctx.eps, gout.float(), dy, dz)
        return dy, dz, dweight, None, None


def gated_norm_fused(y, z, weight, groups: int, eps: float):
    """GatedRMSNorm's result for fp32 CPU tensors (batch, L, dim)."""
    return _GatedNorm.apply(y, z, weight.contiguous(), groups, eps)
