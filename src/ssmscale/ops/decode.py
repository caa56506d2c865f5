"""Fused decoding steps for the Mamba and Mamba-2 mixers on the CPU: decode_cpu.c via ctypes.

`step(mixer, u, cache)` advances one token: the mixer's whole step (projections, conv, state update,
gate, norm) in one C call, conv and SSM state updated in place; it returns None where the fused call
does not apply (`supported`: fp32 CPU tensors, no autograd wanted, the kernel built;
SSMSCALE_NO_FUSED_STEP=1 turns it off). The definition is each mixer's module-by-module
`step_reference`. `block_step` is the mixers' hook for the whole block (models/block.py): the
block's pre-norm folded into the same call. The call's fixed part (weight pointers, sizes) is built once per mixer and reused
while the weights stay the same tensors: at batch 1 the Python around the call costs as much as a
small layer's arithmetic.
"""

from __future__ import annotations

import ctypes
import weakref
from pathlib import Path

import torch

from . import cbuild

DISABLE_ENV = "SSMSCALE_NO_FUSED_STEP"
SOURCE = Path(__file__).with_name("decode_cpu.c")
_MIN_WEIGHTS_PER_THREAD = 1 << 16    # a projection smaller than this runs on one thread


class _Args(ctypes.Structure):
    """Mirror of StepArgs in decode_cpu.c."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("kind", "batch", "d_model", "d_inner", "d_state", "d_conv", "dt_rank",
                                               "heads", "groups", "n_threads")]
                + [("eps", ctypes.c_double), ("pre_w", ctypes.c_void_p), ("pre_eps", ctypes.c_double)]
                + [(n, ctypes.c_void_p) for n in ("u", "in_w", "conv_w", "conv_b", "x_w", "dt_w", "dt_b", "A_log", "D",
                                                  "norm_w", "out_w", "conv_state", "ssm_state", "out", "work")])


_state: dict = {}


def load():
    """The library, or None (`unavailable_reason()` then says why); tried once per process."""
    if "lib" not in _state:
        lib, reason = cbuild.load(SOURCE, DISABLE_ENV)
        if lib is not None:
            lib.mixer_step.argtypes = [ctypes.POINTER(_Args)]
            lib.mixer_step.restype = ctypes.c_int
        _state.update(lib=lib, reason=reason)
    return _state["lib"]


def unavailable_reason() -> str | None:
    load()
    return _state["reason"]


_prepared: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # mixer -> (weight pointers, _Args)


def _is_mamba2(mixer) -> bool:
    """A Mamba-2 mixer (its dt bias is a parameter of its own; Mamba's is dt_proj's): told by its parts, since
    ops/ does not import models/."""
    return hasattr(mixer, "dt_bias")


def _weights(mixer) -> dict:
    """The mixer's tensors the kernel reads, by StepArgs field."""
    w = dict(in_w=mixer.in_proj.weight, conv_w=mixer.conv1d.weight, conv_b=mixer.conv1d.bias, A_log=mixer.A_log,
             D=mixer.D, out_w=mixer.out_proj.weight)
    if _is_mamba2(mixer):
        w.update(dt_b=mixer.dt_bias, norm_w=mixer.norm.weight)
    else:
        w.update(x_w=mixer.x_proj.weight, dt_w=mixer.dt_proj.weight, dt_b=mixer.dt_proj.bias)
    return w


def _prepare(mixer):
    """The call's fixed part, built once per mixer and set of weights (a new weight tensor, e.g. after .to(),
    rebuilds it): None where the weights are not fp32 contiguous CPU tensors or the kernel is missing."""
    weights = _weights(mixer)
    key = tuple(t.data_ptr() for t in weights.values())
    have = _prepared.get(mixer)
    if have is not None and have[0] == key:
        return have[1]
    ok = load() is not None and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                                    for t in weights.values())
    args = None
    if ok:
        args = _Args(d_model=mixer.in_proj.weight.shape[1], d_state=mixer.d_state, d_conv=mixer.d_conv,
                     **{k: t.data_ptr() for k, t in weights.items()})
        threads = max(1, min(torch.get_num_threads(), mixer.in_proj.weight.numel() // _MIN_WEIGHTS_PER_THREAD))
        args.n_threads = threads
        if _is_mamba2(mixer):
            args.kind, args.d_inner, args.heads, args.groups, args.eps = (2, mixer.d_inner, mixer.heads, mixer.groups,
                                                                          mixer.norm.eps)
        else:
            args.kind, args.d_inner, args.dt_rank = 1, mixer.d_inner, mixer.dt_rank
    _prepared[mixer] = (key, args)
    return args


def supported(mixer, u, cache) -> bool:
    """Whether `step` takes this call: fp32 CPU tensors, no gradient wanted, the kernel built."""
    if torch.is_grad_enabled() and (u.requires_grad or any(p.requires_grad for p in mixer.parameters())):
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (u, cache.conv, cache.ssm)):
        return False
    return cache.conv.is_contiguous() and cache.ssm.is_contiguous() and _prepare(mixer) is not None


def step(mixer, u, cache, norm=None):
    """One token through `mixer` (MambaMixer or Mamba2Mixer): u (batch, 1, d) -> (batch, 1, d), or None
    where the fused step does not apply (see `supported`; the caller then runs the mixer's own step).
    With `norm` (the block's RMSNorm), u is the block's input and the result u + mixer(norm(u)): the
    whole block in the one call."""
    if not supported(mixer, u, cache) or (norm is not None and not (
            norm.weight.dtype == torch.float32 and norm.weight.device.type == "cpu")):
        return None
    args = _prepared[mixer][1]
    batch, d = u.shape[0], u.shape[-1]
    u = u.reshape(batch, d).contiguous()
    out = torch.empty(batch, 1, d)
    width, e = mixer.in_proj.weight.shape[0], args.d_inner
    middle = args.dt_rank + 2 * args.d_state if args.kind == 1 else 2 * args.groups * args.d_state
    work = torch.empty(batch * (width + e + middle + e + d))
    args.batch, args.u, args.out, args.work = batch, u.data_ptr(), out.data_ptr(), work.data_ptr()
    args.pre_w, args.pre_eps = (None, 0.0) if norm is None else (norm.weight.data_ptr(), norm.eps)
    args.conv_state, args.ssm_state = cache.conv.data_ptr(), cache.ssm.data_ptr()
    code = load().mixer_step(ctypes.byref(args))
    args.u = args.out = args.work = args.conv_state = args.ssm_state = args.pre_w = None   # nothing dangling
    if code != 0:
        raise RuntimeError("fused decoding step failed")
    cache.pos += 1
    return out


def block_step(mixer, x, cache, norm):
    """One decoded token through a whole block, x + mixer(norm(x)), in one call: the Mamba and Mamba-2
    mixers' `block_step` (models/block.py); None before a prompt is in the cache or where `step` does not apply."""
    return step(mixer, x, cache, norm=norm) if cache.pos > 0 else None
