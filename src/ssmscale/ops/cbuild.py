"""Compile a C kernel of ops/ into a shared library at first use, cache it, and load it with ctypes.

Used by the fused SSD (ssd_cpu.py); the conventions are those of the fused selective scan
(scan_cpu.py, which has its own copy of them): `$CC` (default gcc) -O3 -march=native -ffast-math,
so loops vectorise (exp through glibc's libmvec); compiling and linking are separate steps, because
linking a shared library with -ffast-math pulls in crtfastmath.o, which turns on flush-to-zero for the
whole process at load time; -fopenmp where torch runs on GNU libgomp, so the kernel's threads are
torch's own OpenMP workers (a second pool would share the cores with workers that spin after every
torch op). The library is cached under $SSMSCALE_CACHE (default ~/.cache/ssmscale)/kernels, keyed by
a hash of the source, flags, compiler version and CPU; a new source or CPU rebuilds it, and
concurrent processes racing to build the same key each rename a complete file into place.

A cached library is loaded only when it is the one a build put there (`verified`): the build records the
sha256 of each library in `<name>.so.sha256` beside it (publish), and before a library is loaded its bytes
must match that record and both files must belong to this user and be writable by no one else; anything
else (a library copied in or replaced, a shared cache writable by others) is rebuilt over. A user who can
write this user's files can write the record too: the check keeps out what others put in a cache, and
what a copy or an interrupted build left, not this user's own processes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-std=c11") + (
    # a row of d_state = 16 fp32 is one 512-bit register; gcc otherwise prefers 256-bit ones
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ())
LINK_FLAGS = ("-shared", "-lm", "-lpthread")   # pthread: cpu_common.h's fallback without OpenMP
OPENMP_FLAGS = ("-fopenmp",)


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
    """Whether torch's intra-op threads are GNU libgomp's, already loaded in this process."""
    import torch
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(Path(line.split()[-1]).name.startswith("libgomp.so") for line in maps.splitlines())


def local_headers(source: Path) -> list[Path]:
    """The headers beside `source` that it includes ("name.h"): part of the cache key, so an edit rebuilds."""
    names = re.findall(r'^\s*#\s*include\s+"([^"]+)"', source.read_text(), flags=re.M)
    return [source.with_name(n) for n in names if source.with_name(n).is_file()]


def build(source: Path, cc: str, openmp: bool, defines: dict | None = None) -> Path:
    """Compile `source` (with -D`defines`) into the cache, once per source/flags/compiler/CPU; return the .so path."""
    compile_flags = COMPILE_FLAGS + (OPENMP_FLAGS if openmp else ()) + tuple(
        f"-D{k}={v}" for k, v in sorted((defines or {}).items()))
    link_flags = LINK_FLAGS + (OPENMP_FLAGS if openmp else ())
    version = subprocess.run([cc, "-dumpfullversion", "-dumpversion"], capture_output=True,
                             text=True, timeout=60).stdout.strip()
    key = hashlib.sha256("\0".join([source.read_text(), *(h.read_text() for h in local_headers(source)),
                                    " ".join(compile_flags + link_flags), cc, version,
                                    _cpu_identity()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if verified(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / f"{source.stem}.o", Path(tmp) / f"{source.stem}.so"
        for cmd in ([cc, *compile_flags, "-c", str(source), "-o", str(obj)],
                    [cc, str(obj), "-o", str(lib), *link_flags]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                raise RuntimeError(f"{Path(cc).name} failed: {first}")
        publish(lib, target)
    return target


def _record(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _sha256(path: Path) -> str:
    from ..safeload import CAPS, read_bytes
    return hashlib.sha256(read_bytes(path, CAPS["checkpoint"])).hexdigest()


def _private(path: Path) -> bool:
    """A regular file (not a link) of this user that no one else may write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def publish(built: Path, target: Path) -> None:
    """Put a freshly built library in the cache at `target`, its sha256 recorded beside it first (a
    process that sees the new record with the old library rebuilds, never loads a mismatch)."""
    from ..fsutil import atomic_write_text
    atomic_write_text(_record(target), _sha256(built) + "\n")
    os.chmod(built, 0o755 & ~0o022)
    os.replace(built, target)       # atomic: concurrent processes may race to build the same key


def verified(target: Path) -> bool:
    """Whether the cached library at `target` is the one a build recorded (see the module's docstring)."""
    from ..safeload import CAPS, FileRefused, read_text
    if not (_private(target) and _private(_record(target))):
        return False
    try:
        return read_text(_record(target), CAPS["text"]).strip() == _sha256(target)
    except (OSError, FileRefused):
        return False


def load(source: Path, disable_env: str, defines: dict | None = None):
    """(library, None) or (None, why not): built with OpenMP where torch uses libgomp, else without."""
    if os.environ.get(disable_env, "") not in ("", "0"):
        return None, f"disabled by {disable_env}={os.environ[disable_env]}"
    cc = os.environ.get("CC") or "gcc"
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc!r} not found; set CC)"
    errors = (OSError, RuntimeError, subprocess.SubprocessError)
    if torch_uses_libgomp():
        try:
            return ctypes.CDLL(str(build(source, cc, openmp=True, defines=defines))), None
        except errors:
            pass   # e.g. a compiler without OpenMP: one thread gives the same results
    try:
        return ctypes.CDLL(str(build(source, cc, openmp=False, defines=defines))), None
    except errors as exc:
        return None, f"C kernel build/load failed: {exc}"
