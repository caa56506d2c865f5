"""The recurrent form of the fused CPU SSD ("fused-recurrent"): ssd_scan_cpu.c, compiled at first use
(cbuild.py) and called via ctypes, and its autograd function for ops.ssd.

One library per d_state (a compile-time constant of the kernel; head_dim is not). The kernel reads x,
dt, B and C channels-last through strides (x as (batch, L, heads * head_dim)), so the Mamba-2 block
(mamba2_inner.py) hands it slices of its conv and in_proj outputs without copies; the dt bias, the
softplus and the D skip run inside it. The forward keeps one state per CHUNK steps for the backward,
which recomputes a chunk at a time from it (see the comment at the top of ssd_scan_cpu.c). Work is
split into torch.get_num_threads() shares of (batch, tile) items, on torch's own OpenMP workers where
the library is built with OpenMP (cbuild.py).

When there is no compiler, the build or load fails, or SSMSCALE_NO_FUSED_SSD=1 is set, the form is
unavailable (with the reason), as the chunk form of ssd_cpu.py.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cbuild
from .scan_cpu import View, view

DISABLE_ENV = "SSMSCALE_NO_FUSED_SSD"
SOURCE = Path(__file__).with_name("ssd_scan_cpu.c")
TILE = 16                 # lanes per tile (W in cpu_common.h)
CHUNK = 32                # steps between saved states: the backward's (CHUNK + 1) x N x 16 floats stay in cache
_MIN_WORK_PER_THREAD = 1 << 15    # state updates (batch * channels * L * N) below which one thread is faster
DEFAULT_D_STATE = 16      # the default Mamba-2's: built to tell availability


class _Args(ctypes.Structure):
    """Mirror of SSDArgs in ssd_scan_cpu.c (same field order and types)."""
    _fields_ = ([(n, ctypes.c_int64) for n in
                 ("batch", "length", "heads", "head_dim", "groups", "chunk", "n_threads", "softplus")]
                + [(n, View) for n in ("x", "dt", "B", "C")]
                + [(n, ctypes.c_void_p) for n in ("A", "D", "dt_bias", "h0")]
                + [("y", View)]
                + [(n, ctypes.c_void_p) for n in ("chunk_states", "last_state")]
                + [("gy", View), ("glast", ctypes.c_void_p)]
                + [(n, View) for n in ("dx", "ddt", "dB", "dC")]
                + [(n, ctypes.c_void_p) for n in ("dA", "dD", "dbias", "dh0")])


_libs: dict[int, tuple] = {}


def load(d_state: int = DEFAULT_D_STATE):
    """The library compiled for this d_state, or None (then `unavailable_reason()` says why)."""
    if d_state not in _libs:
        lib, reason = cbuild.load(SOURCE, DISABLE_ENV, {"SSD_N": d_state})
        if lib is not None:
            for fn in (lib.ssd_scan_forward, lib.ssd_scan_backward):
                fn.argtypes = [ctypes.POINTER(_Args), ctypes.c_int64]
                fn.restype = ctypes.c_int
        _libs[d_state] = (lib, reason)
    return _libs[d_state][0]


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _libs[DEFAULT_D_STATE][1]


def n_tiles(heads: int, head_dim: int, groups: int) -> int:
    """Tiles of 16 lanes the kernel cuts the heads into (geometry() in ssd_scan_cpu.c)."""
    slot = 1 << (head_dim - 1).bit_length() if head_dim <= TILE else -(-head_dim // TILE) * TILE
    return groups * -(-(heads // groups) * slot // TILE)


def n_chunks(length: int) -> int:
    return -(-length // CHUNK)


def _threads(batch, channels, length, d_state):
    work = batch * channels * max(length, 1) * d_state
    return max(1, min(torch.get_num_threads(), work // _MIN_WORK_PER_THREAD or 1))


def _ptr(t):
    return None if t is None else t.data_ptr()


def _call(name, args, d_state):
    lib = load(d_state)
    if lib is None:
        raise RuntimeError(f"fused SSD: no kernel for d_state {d_state} ({_libs[d_state][1]})")
    code = getattr(lib, name)(ctypes.byref(args), d_state)
    if code == 1:
        raise MemoryError("fused SSD: could not allocate its per-thread buffers")
    if code != 0:
        raise RuntimeError(f"fused SSD: {name} failed with code {code}")


def _base(x, dt, A, B, C, D, dt_bias, softplus, heads, **extra):
    """The arguments both directions share: x (b, L, heads * P), dt (b, L, heads), B, C (b, L, groups * N),
    channels-last with any strides; A, dt_bias (heads,); D per channel (heads * P,); all fp32."""
    batch, length, channels = x.shape
    return dict(batch=batch, length=length, heads=heads, head_dim=channels // heads, chunk=CHUNK,
                softplus=int(softplus), x=view(x, 1), dt=view(dt, 1), B=view(B, 1), C=view(C, 1),
                A=_ptr(A), D=_ptr(D), dt_bias=_ptr(dt_bias), **extra)


def forward(x, dt, A, B, C, D, dt_bias, softplus, h0, *, groups, d_state, y=None, states=None, last=None):
    """Run the forward kernel: y into `y`, the chunk-start states into `states` (see `states_like`)
    and the final state into `last` (batch, heads, P, N) where given."""
    heads = A.shape[0]
    args = _Args(groups=groups, n_threads=_threads(x.shape[0], x.shape[2], x.shape[1], d_state),
                 h0=_ptr(h0), y=view(y, 1), chunk_states=_ptr(states), last_state=_ptr(last),
                 **_base(x, dt, A, B, C, D, dt_bias, softplus, heads))
    _call("ssd_scan_forward", args, d_state)


def states_like(x, heads, groups, d_state):
    """An empty tensor for the forward's chunk-start states."""
    batch, length, channels = x.shape
    return torch.empty(batch, n_tiles(heads, channels // heads, groups), n_chunks(length), d_state, TILE)


def backward(x, dt, A, B, C, D, dt_bias, softplus, states, gy, glast, *, groups, d_state, dx, ddt, dB, dC,
             want_dh0=False):
    """Run the backward kernel: dx, ddt (of the raw dt), dB, dC into the tensors given (channels-last,
    any strides); returns per-batch dA (b, heads), dD (b, channels) or None, ddt_bias (b, heads) or None,
    and dh0 (b, heads, P, N) or None."""
    batch, length, channels = x.shape
    heads = A.shape[0]
    dA = torch.zeros(batch, heads)
    dD = torch.zeros(batch, channels) if D is not None else None
    dbias = torch.zeros(batch, heads) if dt_bias is not None else None
    dh0 = torch.empty(batch, heads, channels // heads, d_state) if want_dh0 else None
    args = _Args(groups=groups, n_threads=_threads(batch, channels, length, d_state), chunk_states=_ptr(states),
                 gy=view(gy, 1), glast=_ptr(glast), dx=view(dx, 1), ddt=view(ddt, 1), dB=view(dB, 1),
                 dC=view(dC, 1), dA=_ptr(dA), dD=_ptr(dD), dbias=_ptr(dbias), dh0=_ptr(dh0),
                 **_base(x, dt, A, B, C, D, dt_bias, softplus, heads))
    _call("ssd_scan_backward", args, d_state)
    return dA, dD, dbias, dh0


class _RecurrentSSD(torch.autograd.Function):
    """y (with D) and the final state; fp32 inputs: x (b, L, heads * P), dt (b, L, heads), B, C
    (b, L, groups * N), A (heads,), D per channel or None, dt_bias or None, h0 (b, heads, P, N) or None."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, h0, softplus, groups):
        batch, length, channels = x.shape
        heads, d_state = A.shape[0], B.shape[2] // groups
        need_grad = any(ctx.needs_input_grad)
        y = torch.empty(batch, length, channels)
        last = torch.empty(batch, heads, channels // heads, d_state)
        states = states_like(x, heads, groups, d_state) if need_grad else None
        forward(x, dt, A, B, C, D, dt_bias, softplus, h0, groups=groups, d_state=d_state, y=y, states=states,
                last=last)
        if need_grad:
            ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, states)
            ctx.softplus, ctx.groups, ctx.has_h0 = softplus, groups, h0 is not None
        return y, last

    @staticmethod
    def backward(ctx, gy, glast):
        x, dt, A, B, C, D, dt_bias, states = ctx.saved_tensors
        gy = torch.zeros_like(x) if gy is None else gy.float()
        glast = None if glast is None else glast.float().contiguous()
        g = dict(dx=torch.empty(x.shape), ddt=torch.empty(dt.shape), dB=torch.empty(B.shape),
                 dC=torch.empty(C.shape))
        dA, dD, dbias, dh0 = backward(x, dt, A, B, C, D, dt_bias, ctx.softplus, states, gy, glast, groups=ctx.groups,
                                      d_state=B.shape[2] // ctx.groups, want_dh0=ctx.has_h0, **g)
        return (g["dx"], g["ddt"], dA.sum(0), g["dB"], g["dC"], None if dD is None else dD.sum(0),
                None if dbias is None else dbias.sum(0), dh0, None, None)


def per_channel_D(D, heads, head_dim):
    """D (heads,) or (heads, P) as one value per channel (heads * P,), fp32, differentiable."""
    D = D.float()
    return (D[:, None].expand(heads, head_dim) if D.dim() == 1 else D).reshape(heads * head_dim)


def ssd_fused_recurrent(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
                        return_final_state=False, chunk_size=None):
    """ops.ssd's semantics; `chunk_size` (the chunked forms' block) does not apply to this form."""
    if x.device.type != "cpu":
        raise ValueError(f"impl: 'fused-recurrent' runs on the CPU, got tensors on {x.device}")
    dtype_in = x.dtype
    batch, length, heads, p = x.shape
    groups = B.shape[2]
    with torch.autocast(device_type="cpu", enabled=False):
        f32 = lambda t: None if t is None else t.float()
        y, final = _RecurrentSSD.apply(
            x.float().flatten(2), f32(dt), A.float().contiguous(), B.float().flatten(2), C.float().flatten(2),
            None if D is None else per_channel_D(D, heads, p).contiguous(),
            None if dt_bias is None else dt_bias.float().contiguous(),
            None if initial_state is None else initial_state.float().contiguous(), bool(dt_softplus), groups)
    y = y.view(batch, length, heads, p).to(dtype_in)
    return (y, final) if return_final_state else y
