"""The fused CPU selective scan ("fused"): scan_cpu.c, compiled at first use and called via ctypes.

Forward and backward never hold a (batch, L, d_inner, N) tensor: a row's state lives in cache,
the forward saves the state at every chunk start, and the backward recomputes one chunk at a time
from it (see the comment at the top of scan_cpu.c). Rows (batch x channel) are split into
torch.get_num_threads() shares. Where torch runs on GNU libgomp (its Linux builds), the library is
built with -fopenmp and binds to that same libgomp, so the shares run on torch's own OpenMP workers:
threads of its own would share the cores with those workers, which spin for a few milliseconds
after each torch op (measured 2x slower inside a Mamba model). Elsewhere it starts POSIX threads
per call.

Build: `$CC` (default gcc) -O3 -march=native -ffast-math, so the loops over the state and over time
vectorise (the exp and log of softplus and sigmoid through glibc's libmvec). The library is cached under $SSMSCALE_CACHE (default ~/.cache/ssmscale)/kernels,
keyed by a hash of the source, flags, compiler version and CPU; a new source or CPU rebuilds it.
Compiling and linking are separate steps: linking a shared library with -ffast-math would pull in
crtfastmath.o, which turns on flush-to-zero for the whole process at load time.

When there is no compiler, or the build or load fails, or SSMSCALE_NO_FUSED_SCAN=1 is set, "fused"
reports itself unavailable (with the reason) and "auto" falls back to the pure-PyTorch "chunked".
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .scan import register_impl

DISABLE_ENV = "SSMSCALE_NO_FUSED_SCAN"
SOURCE = Path(__file__).with_name("scan_cpu.c")
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-std=c11") + (
    # N = 16 fp32 is one 512-bit register; gcc otherwise prefers 256-bit ones (~1.25x slower here)
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ())
LINK_FLAGS = ("-shared", "-lm", "-lpthread")
OPENMP_FLAGS = ("-fopenmp",)     # compile and link, when torch's libgomp is in the process

CHUNK = 64               # time steps recomputed at once in the backward; (2K+1)*N floats per thread
_MIN_WORK_PER_THREAD = 1 << 16   # state updates (rows*L*N) below which one thread is faster


class _Args(ctypes.Structure):
    """Mirror of ScanArgs in scan_cpu.c (same field order and types)."""
    _fields_ = ([(n, ctypes.c_int64) for n in
                 ("batch", "d_inner", "length", "n_state", "chunk", "n_threads", "softplus")]
                + [(n, ctypes.c_void_p) for n in
                   ("u", "delta", "A", "Bt", "Ct", "D", "z", "delta_bias",
                    "out", "y_pre", "chunk_states", "last_state", "gout", "glast",
                    "du", "ddelta", "dz", "dA_rows", "dD_rows", "dbias_rows", "dBt", "dCt")])


_lib = None
_reason: str | None = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("SSMSCALE_CACHE") or Path.home() / ".cache" / "ssmscale") / "kernels"


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def torch_uses_libgomp() -> bool:
    """Whether torch's intra-op threads are GNU libgomp's, already loaded in this process: then a
    library linked with -fopenmp binds to that same libgomp (by its soname) and shares its pool."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(Path(line.split()[-1]).name.startswith("libgomp.so") for line in maps.splitlines())


def _build(cc: str, openmp: bool = False) -> Path:
    """Compile scan_cpu.c into the cache (once per source/flags/compiler/CPU); return the .so path."""
    compile_flags = COMPILE_FLAGS + (OPENMP_FLAGS if openmp else ())
    link_flags = LINK_FLAGS + (OPENMP_FLAGS if openmp else ())
    version = subprocess.run([cc, "-dumpfullversion", "-dumpversion"], capture_output=True,
                             text=True, timeout=60).stdout.strip()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(compile_flags + link_flags),
                                    cc, version, _cpu_identity()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"scan_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "scan_cpu.o", Path(tmp) / "scan_cpu.so"
        for cmd in ([cc, *compile_flags, "-c", str(SOURCE), "-o", str(obj)],
                    [cc, str(obj), "-o", str(lib), *link_flags]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                raise RuntimeError(f"{Path(cc).name} failed: {first}")
        os.replace(lib, target)   # atomic: concurrent processes may race to build the same key
    return target


def _load_built(cc: str, openmp: bool):
    lib = ctypes.CDLL(str(_build(cc, openmp)))
    for fn in (lib.ssm_scan_forward, lib.ssm_scan_backward):
        fn.argtypes = [ctypes.POINTER(_Args)]
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


def threads_for(rows: int, length: int, n_state: int) -> int:
    """Threads for one call: torch's setting, fewer when the work is too small to split."""
    work = rows * max(length, 1) * n_state
    return max(1, min(torch.get_num_threads(), rows, work // _MIN_WORK_PER_THREAD or 1))


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


def _call(fn, args: _Args):
    if fn(ctypes.byref(args)) != 0:
        raise MemoryError("fused selective scan: could not allocate its per-thread buffers")


class _FusedScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, d_inner, length = u.shape
        n_state = A.shape[1]
        rows = batch * d_inner
        need_grad = any(ctx.needs_input_grad)
        f = dict(u=_f32(u), delta=_f32(delta), A=_f32(A), D=_f32(D), z=_f32(z),
                 delta_bias=_f32(delta_bias),
                 Bt=B.detach().float().transpose(1, 2).contiguous(),
                 Ct=C.detach().float().transpose(1, 2).contiguous())
        out = torch.empty(batch, d_inner, length)
        last = torch.empty(batch, d_inner, n_state)
        n_chunks = -(-length // CHUNK)
        states = torch.empty(batch, d_inner, n_chunks, n_state) if need_grad else None
        y_pre = torch.empty(batch, d_inner, length) if need_grad and z is not None else None
        args = _Args(batch=batch, d_inner=d_inner, length=length, n_state=n_state, chunk=CHUNK,
                     n_threads=threads_for(rows, length, n_state), softplus=int(delta_softplus),
                     out=_ptr(out), y_pre=_ptr(y_pre), chunk_states=_ptr(states), last_state=_ptr(last),
                     **{k: _ptr(v) for k, v in f.items()})
        _call(load().ssm_scan_forward, args)
        if need_grad:
            ctx.save_for_backward(f["u"], f["delta"], f["A"], f["Bt"], f["Ct"], f["D"], f["z"],
                                  f["delta_bias"], states, y_pre)
            ctx.softplus, ctx.chunk = delta_softplus, CHUNK
            ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias)]
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, gout, glast):
        u, delta, A, Bt, Ct, D, z, delta_bias, states, y_pre = ctx.saved_tensors
        batch, d_inner, length = u.shape
        n_state = A.shape[1]
        rows = batch * d_inner
        gout = torch.zeros_like(u) if gout is None else gout.float().contiguous()
        glast = None if glast is None else glast.float().contiguous()
        grads = dict(du=torch.empty_like(u), ddelta=torch.empty_like(delta),
                     dz=None if z is None else torch.empty_like(z),
                     dA_rows=torch.empty(batch, d_inner, n_state), dD_rows=torch.empty(batch, d_inner),
                     dbias_rows=torch.empty(batch, d_inner),
                     dBt=torch.zeros(batch, length, n_state), dCt=torch.zeros(batch, length, n_state))
        args = _Args(batch=batch, d_inner=d_inner, length=length, n_state=n_state, chunk=ctx.chunk,
                     n_threads=threads_for(rows, length, n_state), softplus=int(ctx.softplus),
                     u=_ptr(u), delta=_ptr(delta), A=_ptr(A), Bt=_ptr(Bt), Ct=_ptr(Ct), D=_ptr(D),
                     z=_ptr(z), delta_bias=_ptr(delta_bias), y_pre=_ptr(y_pre),
                     chunk_states=_ptr(states), gout=_ptr(gout),
                     glast=_ptr(glast),
                     **{k: _ptr(v) for k, v in grads.items()})
        _call(load().ssm_scan_backward, args)
        g = grads
        result = (g["du"], g["ddelta"], g["dA_rows"].sum(0), g["dBt"].transpose(1, 2),
                  g["dCt"].transpose(1, 2), None if D is None else g["dD_rows"].sum(0), g["dz"],
                  None if delta_bias is None else g["dbias_rows"].sum(0))
        result = tuple(None if (r is None or not need) else r.to(dt)
                       for r, need, dt in zip(result, ctx.needs_input_grad, ctx.dtypes))
        return (*result, None)


def selective_scan_fused(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, return_last_state=False):
    y, last = _FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (y, last) if return_last_state else y


register_impl("fused", selective_scan_fused, devices=("cpu",), available=available, priority=20,
              why_unavailable=unavailable_reason)
