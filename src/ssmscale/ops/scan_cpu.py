"""The fused CPU kernels ("fused"): scan_cpu.c (selective scan) and conv_cpu.c (causal depthwise conv
+ SiLU), compiled at first use into one library and called via ctypes; the selective scan's wrappers.

The kernels take (batch, time, channel) tensors through strides (cpu_common.h), so both mamba_ssm's
layout (b, d_inner, L) and the channels-last (b, L, d_inner) one the Mamba block's linears produce are
read in place, with no transposed copies. The scan never holds a (batch, L, d_inner, N) tensor: a
tile's state lives in registers and cache, the forward saves the state at every chunk start, and the
backward recomputes one chunk at a time from it (see the comment at the top of scan_cpu.c). Work is
split into torch.get_num_threads() shares of (batch, 16-channel tile) items. Where torch runs on GNU
libgomp (its Linux builds), the library is built with -fopenmp and binds to that same libgomp, so the
shares run on torch's own OpenMP workers: threads of its own would share the cores with those
workers, which spin for a few milliseconds after each torch op (measured 2x slower inside a Mamba
model). Elsewhere it starts POSIX threads per call.

Build: `$CC` (default gcc) -O3 -march=native -ffast-math, so the loops over a tile's channels
vectorise (the log of softplus through glibc's libmvec). The library is cached under $SSMSCALE_CACHE
(default ~/.cache/ssmscale)/kernels, keyed by a hash of the sources, flags, compiler version and CPU;
a new source or CPU rebuilds it, and a library is loaded only when cbuild.verified says it is the one a
build recorded (its sha256 beside it). Compiling and linking are separate steps: linking a shared library
with -ffast-math would pull in crtfastmath.o, which turns on flush-to-zero for the whole process at
load time.

When there is no compiler, or the build or load fails, or SSMSCALE_NO_FUSED_SCAN=1 is set, "fused"
reports itself unavailable (with the reason) and "auto" falls back to the pure-PyTorch "chunked".
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .cbuild import COMPILE_FLAGS, OPENMP_FLAGS, _cpu_identity, cache_dir, publish, torch_uses_libgomp, verified

DISABLE_ENV = "SSMSCALE_NO_FUSED_SCAN"
HERE = Path(__file__).parent
SOURCES = (HERE / "scan_cpu.c", HERE / "conv_cpu.c")
HEADERS = (HERE / "cpu_common.h",)
LINK_FLAGS = ("-shared", "-lm", "-lpthread")   # COMPILE_FLAGS, OPENMP_FLAGS: cbuild's, as for the SSD kernel

CHUNK = 64               # time steps recomputed at once in the backward (a state saved per CHUNK steps); 32
                         # was ~20% faster in a C harness but 1.2-1.4x slower through `profile --op scan`
TILE = 16                # channels per tile (W in cpu_common.h)
_MIN_WORK_PER_THREAD = 1 << 16   # state updates (batch*d_inner*L*N) below which one thread is faster


class View(ctypes.Structure):
    """Mirror of View in cpu_common.h: element (b, t, c) at data[b * sb + t * st + c * sc]."""
    _fields_ = [("data", ctypes.c_void_p), ("sb", ctypes.c_int64), ("st", ctypes.c_int64),
                ("sc", ctypes.c_int64)]


def view(t: torch.Tensor | None, time_dim: int = 2) -> View:
    """A (batch, X, Y) fp32 tensor as a View, its time axis being dim `time_dim` (2: mamba_ssm's
    (b, channels, L); 1: channels-last (b, L, channels)); None gives a null View."""
    if t is None:
        return View()
    assert t.dtype == torch.float32 and t.dim() == 3
    return View(t.data_ptr(), t.stride(0), t.stride(time_dim), t.stride(3 - time_dim))


class _ScanArgs(ctypes.Structure):
    """Mirror of ScanArgs in scan_cpu.c (same field order and types)."""
    _fields_ = ([(n, ctypes.c_int64) for n in
                 ("batch", "d_inner", "length", "n_state", "chunk", "n_threads", "softplus")]
                + [(n, View) for n in ("u", "delta", "z", "B", "C")]
                + [(n, ctypes.c_void_p) for n in ("A", "D", "delta_bias")]
                + [("out", View)]
                + [(n, ctypes.c_void_p) for n in ("chunk_states", "last_state")]
                + [("gout", View), ("glast", ctypes.c_void_p)]
                + [(n, View) for n in ("du", "ddelta", "dz", "dB", "dC")]
                + [(n, ctypes.c_void_p) for n in ("dA", "dD", "dbias")])


class ConvArgs(ctypes.Structure):
    """Mirror of ConvArgs in conv_cpu.c."""
    _fields_ = ([(n, ctypes.c_int64) for n in ("batch", "length", "channels", "width", "n_threads", "silu")]
                + [(n, View) for n in ("x", "y", "gy", "dx")]
                + [(n, ctypes.c_void_p) for n in ("weight", "bias", "dweight", "dbias")])


_lib = None
_reason: str | None = None
_tried = False


def _build(cc: str, openmp: bool = False) -> Path:
    """Compile the kernels into the cache (once per sources/flags/compiler/CPU); return the .so path."""
    compile_flags = COMPILE_FLAGS + (OPENMP_FLAGS if openmp else ())
    link_flags = LINK_FLAGS + (OPENMP_FLAGS if openmp else ())
    version = subprocess.run([cc, "-dumpfullversion", "-dumpversion"], capture_output=True,
                             text=True, timeout=60).stdout.strip()
    texts = [p.read_text() for p in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join(texts + [" ".join(compile_flags + link_flags), cc, version,
                                            _cpu_identity()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"scan_cpu-{key}.so"
    if verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objs = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        lib = Path(tmp) / "kernels.so"
        cmds = [[cc, *compile_flags, "-c", str(src), "-o", str(obj)] for src, obj in zip(SOURCES, objs)]
        for cmd in cmds + [[cc, *map(str, objs), "-o", str(lib), *link_flags]]:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                raise RuntimeError(f"{Path(cc).name} failed: {first}")
        publish(lib, target)
    return target


def _load_built(cc: str, openmp: bool):
    lib = ctypes.CDLL(str(_build(cc, openmp)))
    for fn, args in ((lib.ssm_scan_forward, _ScanArgs), (lib.ssm_scan_backward, _ScanArgs),
                     (lib.conv_forward, ConvArgs), (lib.conv_backward, ConvArgs)):
        fn.argtypes = [ctypes.POINTER(args)]
        fn.restype = ctypes.c_int
    return lib


def load():
    """The compiled library, or None (then `unavailable_reason()` says why). Tried once per process."""
    global _lib, _reason, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        _reason = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
        return None
    cc = os.environ.get("CC") or "gcc"
    if shutil.which(cc) is None:
        _reason = f"no C compiler ({cc!r} not found; set CC)"
        return None
    errors = (OSError, RuntimeError, subprocess.SubprocessError)
    if torch_uses_libgomp():
        try:
            _lib = _load_built(cc, openmp=True)
            return _lib
        except errors:
            pass   # e.g. a compiler without OpenMP: POSIX threads give the same results
    try:
        _lib = _load_built(cc, openmp=False)
    except errors as exc:
        _reason = f"C kernel build/load failed: {exc}"
    return _lib


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _reason


def threads_for(batch: int, d_inner: int, length: int, n_state: int) -> int:
    """Threads for one scan: torch's setting, never more than the (batch, tile) items, and fewer
    when the work is too small to split."""
    items = batch * -(-d_inner // TILE)
    work = batch * d_inner * max(length, 1) * n_state
    return max(1, min(torch.get_num_threads(), items, work // _MIN_WORK_PER_THREAD or 1))


def call(fn, args):
    if fn(ctypes.byref(args)) != 0:
        raise MemoryError(f"fused CPU kernel {fn.__name__}: could not allocate its buffers")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _dims(u, A, time_dim):
    batch, length, d_inner = u.shape[0], u.shape[time_dim], u.shape[3 - time_dim]
    return batch, d_inner, length, A.shape[1]


def scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, *, time_dim, out, states=None, last=None):
    """Run the forward kernel: y into `out`; the chunk-start states into `states` (batch, n_chunks, N,
    d_inner) and the final state into `last` (batch, d_inner, N) when given. All fp32; u, delta, z,
    out and B, C in the layout `time_dim` says (see `view`), any strides."""
    batch, d_inner, length, n_state = _dims(u, A, time_dim)
    args = _ScanArgs(batch=batch, d_inner=d_inner, length=length, n_state=n_state, chunk=CHUNK,
                     n_threads=threads_for(batch, d_inner, length, n_state), softplus=int(softplus),
                     u=view(u, time_dim), delta=view(delta, time_dim), z=view(z, time_dim),
                     B=view(B, time_dim), C=view(C, time_dim), A=_ptr(A), D=_ptr(D),
                     delta_bias=_ptr(delta_bias), out=view(out, time_dim), chunk_states=_ptr(states),
                     last_state=_ptr(last))
    call(load().ssm_scan_forward, args)


def scan_backward(u, delta, A, B, C, D, z, delta_bias, softplus, states, gout, glast, *, time_dim,
                  du, ddelta, dz, dB, dC, out=None):
    """Run the backward kernel: du, ddelta, dz, dB, dC into the tensors given (any strides; dz
    only with z), the gated output recomputed into `out` if given; returns per-batch (dA, dD, dbias)
    of shapes (batch, d_inner, N), (batch, d_inner), (batch, d_inner)."""
    batch, d_inner, length, n_state = _dims(u, A, time_dim)
    dA = torch.empty(batch, d_inner, n_state)
    dD, dbias = torch.empty(batch, d_inner), torch.empty(batch, d_inner)
    args = _ScanArgs(batch=batch, d_inner=d_inner, length=length, n_state=n_state, chunk=CHUNK,
                     n_threads=threads_for(batch, d_inner, length, n_state), softplus=int(softplus),
                     u=view(u, time_dim), delta=view(delta, time_dim), z=view(z, time_dim),
                     B=view(B, time_dim), C=view(C, time_dim), A=_ptr(A), D=_ptr(D),
                     delta_bias=_ptr(delta_bias), out=view(out, time_dim), chunk_states=_ptr(states),
                     gout=view(gout, time_dim), glast=_ptr(glast), du=view(du, time_dim),
                     ddelta=view(ddelta, time_dim), dz=view(dz, time_dim), dB=view(dB, time_dim),
                     dC=view(dC, time_dim), dA=_ptr(dA), dD=_ptr(dD), dbias=_ptr(dbias))
    call(load().ssm_scan_backward, args)
    return dA, dD, dbias


def n_chunks(length: int) -> int:
    return -(-length // CHUNK)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """fp32 as it is (a view, any strides), or an fp32 copy of another dtype."""
    return None if t is None else t.detach().float()


def _like(t: torch.Tensor) -> torch.Tensor:
    """An empty fp32 tensor of t's shape laid out as t is in memory where t is channels-last,
    (b, L, channels) in memory: the kernels then write whole cache lines; else contiguous."""
    if t.stride(1) < t.stride(2):
        return torch.empty(t.shape[0], t.shape[2], t.shape[1]).transpose(1, 2)
    return torch.empty(t.shape)


class _FusedScan(torch.autograd.Function):
    """selective_scan in mamba_ssm's layout, (b, d_inner, L) shapes with any strides."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, d_inner, length = u.shape
        need_grad = any(ctx.needs_input_grad)
        f = [_f32(t) for t in (u, delta, A, B, C, D, z, delta_bias)]
        out = _like(f[0])
        last = torch.empty(batch, d_inner, A.shape[1])
        states = torch.empty(batch, n_chunks(length), A.shape[1], d_inner) if need_grad else None
        scan_forward(*f, delta_softplus, time_dim=2, out=out, states=states, last=last)
        if need_grad:
            ctx.save_for_backward(*f, states)
            ctx.softplus = delta_softplus
            ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias)]
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, gout, glast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        gout = torch.zeros_like(u) if gout is None else gout.float()
        glast = None if glast is None else glast.float().contiguous()
        g = dict(du=_like(u), ddelta=_like(delta), dz=None if z is None else _like(z),
                 dB=_like(B), dC=_like(C))
        dA, dD, dbias = scan_backward(u, delta, A, B, C, D, z, delta_bias, ctx.softplus, states, gout,
                                      glast, time_dim=2, **g)
        result = (g["du"], g["ddelta"], dA.sum(0), g["dB"], g["dC"], None if D is None else dD.sum(0),
                  g["dz"], None if delta_bias is None else dbias.sum(0))
        result = tuple(None if (r is None or not need) else r.to(dt)
                       for r, need, dt in zip(result, ctx.needs_input_grad, ctx.dtypes))
        return (*result, None)


def selective_scan_fused(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, return_last_state=False):
    y, last = _FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (y, last) if return_last_state else y
