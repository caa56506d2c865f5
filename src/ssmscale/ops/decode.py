"""Fused decoding steps for the Mamba and Mamba-2 mixers on the CPU: decode_cpu.c via ctypes.

`step(mixer, u, cache)` advances one token: the mixer's whole step (projections, conv, state update,
gate, norm) in one C call, conv and SSM state updated in place. The definition is each mixer's
module-by-module `step_reference`; `supported` says when the fused call applies (fp32 CPU tensors,
no autograd wanted, the kernel built; SSMSCALE_NO_FUSED_STEP=1 turns it off).
"""

from __future__ import annotations

import ctypes
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
                + [("eps", ctypes.c_double)]
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


def supported(mixer, u, cache) -> bool:
    """Whether `step` takes this call: fp32 CPU tensors, no gradient wanted, the kernel built."""
    params = list(mixer.parameters())
    if torch.is_grad_enabled() and (u.requires_grad or any(p.requires_grad for p in params)):
        return False
    tensors = params + [u, cache.conv, cache.ssm]
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and load() is not None


def _p(t):
    return None if t is None else t.data_ptr()


def step(mixer, u, cache):
    """One token through `mixer` (MambaMixer or Mamba2Mixer): u (batch, 1, d) -> (batch, 1, d)."""
    from ..models.mamba2 import Mamba2Mixer
    batch, d = u.shape[0], u.shape[-1]
    u = u.reshape(batch, d).contiguous()
    out = torch.empty(batch, d)
    c = lambda t: t.detach().contiguous()
    threads = max(1, min(torch.get_num_threads(), mixer.in_proj.weight.numel() // _MIN_WEIGHTS_PER_THREAD))
    common = dict(batch=batch, d_model=d, d_state=mixer.d_state, d_conv=mixer.d_conv, n_threads=threads,
                  u=_p(u), in_w=_p(c(mixer.in_proj.weight)), conv_w=_p(c(mixer.conv1d.weight)),
                  conv_b=_p(c(mixer.conv1d.bias)), A_log=_p(c(mixer.A_log)), D=_p(c(mixer.D)),
                  out_w=_p(c(mixer.out_proj.weight)), conv_state=_p(cache.conv), ssm_state=_p(cache.ssm), out=_p(out))
    if isinstance(mixer, Mamba2Mixer):
        e, cd = mixer.d_inner, mixer.conv_dim
        work = torch.empty(batch * (mixer.in_proj.weight.shape[0] + cd + e))
        args = _Args(kind=2, d_inner=e, heads=mixer.heads, groups=mixer.groups, eps=mixer.norm.eps,
                     dt_b=_p(c(mixer.dt_bias)), norm_w=_p(c(mixer.norm.weight)), work=_p(work), **common)
    else:
        e, r = mixer.d_inner, mixer.dt_rank
        work = torch.empty(batch * (2 * e + e + r + 2 * mixer.d_state + e))
        args = _Args(kind=1, d_inner=e, dt_rank=r, x_w=_p(c(mixer.x_proj.weight)), dt_w=_p(c(mixer.dt_proj.weight)),
                     dt_b=_p(c(mixer.dt_proj.bias)), work=_p(work), **common)
    assert cache.conv.is_contiguous() and cache.ssm.is_contiguous()
    if load().mixer_step(ctypes.byref(args)) != 0:
        raise RuntimeError("fused decoding step failed")
    cache.pos += 1
    return out.view(batch, 1, d)
