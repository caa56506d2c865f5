"""Time one step of work and measure its peak extra memory in a fresh Python process.

Used by the scan benchmark (bench/scan.py) and meant for the model profiler too. A measurement
names a *prepare* function as "package.module:function". In the child process it is called with
the given keyword arguments, allocates its inputs, and returns a zero-argument callable: one step
(a forward, a training step, ...). A prepare function should first run its step once at a tiny
size, so that one-time costs (imports, kernel loading, the autograd engine's threads) are paid
before the baseline and not counted as the step's memory. The child then

1. takes the baseline: on CPU it resets the kernel's peak-RSS mark (writes "5" to
   /proc/self/clear_refs, Linux >= 4.0) and reads VmRSS from /proc/self/status; on CUDA it calls
   torch.cuda.reset_peak_memory_stats() and reads torch.cuda.memory_allocated();
2. runs the step once and reads the peak: VmHWM (CPU) or torch.cuda.max_memory_allocated();
   peak_extra_bytes = peak - baseline, i.e. what the step needed beyond its inputs;
3. runs `warmup` more steps, then `repeats` timed ones (CUDA: synchronised), reporting each.
   With `compete` = N, each timed step is followed by one more while N CPU-bound competitor processes
   run (busy loops, paused with SIGSTOP between the pairs): alone and contended steps interleave, so
   the ratio of the two holds on a machine whose other load drifts. With `matmul_peak`, each timed
   step is also followed by a 2048^3 fp32 matmul (MatmulClock), whose median rate is the peak an MFU
   of this step is measured against: taken in the same process, threads and moments as the step.

Memory is read on the first step of a fresh process, so no allocator cache or earlier run hides or
inflates it; RSS counts only pages actually touched. Where clear_refs cannot be written (not
Linux), the method falls back to getrusage's ru_maxrss, which cannot be reset: the peak is then
only a lower bound when the step uses less than the process's earlier peak (reported as
memory_method "ru_maxrss"). An allocation failure (MemoryError, torch's "can't allocate memory",
CUDA out of memory, or the child killed by SIGKILL as the OOM killer does) gives status "oom".
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

_OOM_MESSAGES = ("can't allocate memory", "out of memory", "cannot allocate memory")


def run_isolated(func_path: str, kwargs: dict | None = None, *, repeats: int = 5, warmup: int = 1,
                 threads: int | None = None, timeout_s: float | None = None,
                 env: dict | None = None, mem_limit_bytes: int | None = None, compete: int = 0,
                 matmul_peak: bool = False) -> dict:
    """Measure `func_path`'s step in a fresh process. `mem_limit_bytes` caps the address space the
    step may add beyond what prepare left (RLIMIT_AS): a point that needs more is "oom". `compete`:
    also time each repeat beside that many busy processes; `matmul_peak`: also time a reference matmul
    after each repeat (CPU). Returns a dict with status ("ok", "oom", "error", "timeout"), times_ms
    (list), median_ms, min_ms, times_compete_ms, median_compete_ms, peak_flops (None without
    matmul_peak), peak_extra_bytes, baseline_bytes, memory_method, device, error (message or None) and report
    (what the step function carries as `step.report`, a JSON-able dict, or None)."""
    kwargs = dict(kwargs or {})
    spec = dict(func_path=func_path, kwargs=kwargs, repeats=repeats, warmup=warmup, threads=threads,
                mem_limit_bytes=mem_limit_bytes, compete=compete, matmul_peak=matmul_peak)
    with tempfile.TemporaryDirectory(prefix="ssmscale-memprobe-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-c", "from ssmscale.bench.memprobe import _child_main; _child_main()",
               json.dumps(spec), str(out)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            return _failed("timeout", f"no result after {timeout_s:g} s")
        if out.exists():
            return json.loads(out.read_text())
        if done.returncode == -signal.SIGKILL:
            return _failed("oom", "child killed by SIGKILL (likely the kernel's OOM killer)")
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return _failed("error", tail)


def _failed(status: str, error: str) -> dict:
    return dict(status=status, times_ms=[], median_ms=None, min_ms=None, times_compete_ms=[],
                median_compete_ms=None, peak_flops=None, peak_extra_bytes=None, baseline_bytes=None,
                memory_method=None, device=None, error=error)


class MatmulClock:
    """The rate (FLOP/s) of an n^3 fp32 matmul on preallocated operands: what the cores can do with
    the current thread count, the peak an MFU is measured against on a CPU."""

    def __init__(self, n: int = 2048):
        import torch
        self.torch, self.flop = torch, 2 * n ** 3
        self.a, self.b, self.out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        self.rate()                                 # first call: MKL's buffers and threads

    def rate(self) -> float:
        start = time.perf_counter()
        self.torch.matmul(self.a, self.b, out=self.out)
        return self.flop / (time.perf_counter() - start)


class Competitors:
    """`n` CPU-bound busy loops, each a plain Python process (not ssmscale), for a `with` block;
    `pause()` / `resume()` stop and continue them. Each dies with the process that started it
    (PR_SET_PDEATHSIG on Linux; elsewhere it exits once its parent is gone), and the block's end
    kills them: only processes started here, by their handles."""

    CODE = ("import ctypes, os, signal\n"
            "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"      # 1 = PR_SET_PDEATHSIG
            "except (OSError, AttributeError):\n    pass\n"
            "parent = os.getppid()\n"
            "print('ready', flush=True)\n"
            "while os.getppid() == parent:\n    for _ in range(1_000_000):\n        pass\n")

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        # each in a session of its own, like a job started from another shell: where the kernel groups
        # CPU time by session (sched_autogroup), a competitor then takes its share from the machine,
        # not from the measured process's session
        self.procs = [subprocess.Popen([sys.executable, "-c", self.CODE], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
                      for _ in range(self.n)]
        for p in self.procs:       # each has armed its death signal before it can be paused
            p.stdout.readline()
            p.stdout.close()
        return self

    def _signal(self, sig):
        for p in self.procs:
            p.send_signal(sig)

    def pause(self):
        self._signal(signal.SIGSTOP)

    def resume(self):
        self._signal(signal.SIGCONT)

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []
        return False


def _child_main():
    from ..threads import configure_waiting
    configure_waiting()      # before torch is imported (see threads.py)
    spec, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    result = _measure(**spec)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)


def _measure(func_path, kwargs, repeats, warmup, threads, mem_limit_bytes=None, compete=0, matmul_peak=False):
    import torch
    if threads:
        torch.set_num_threads(threads)
    device = str(kwargs.get("device", "cpu"))
    cuda = device.startswith("cuda")
    try:
        module, _, name = func_path.partition(":")
        step = getattr(importlib.import_module(module), name)(**kwargs)
        clock = MatmulClock() if matmul_peak and not cuda else None    # part of the baseline, not the step
        if mem_limit_bytes:
            limit = _status_kib("VmSize") * 1024 + int(mem_limit_bytes)
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        probe = _CudaMemory(torch) if cuda else _HostMemory()
        probe.reset()
        step()
        if cuda:
            torch.cuda.synchronize()
        peak_extra = probe.peak_extra()
        for _ in range(warmup):
            step()

        def timed() -> float:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - start) * 1e3

        times, busy, rates = [], [], []
        with Competitors(compete) as rivals:
            rivals.pause()
            for _ in range(repeats):
                times.append(timed())
                if clock:
                    rates.append(clock.rate())
                if compete:
                    rivals.resume()
                    busy.append(timed())
                    rivals.pause()
    except Exception as exc:  # the child reports every failure as data, never a traceback
        oom = isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in _OOM_MESSAGES)
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if not oom:
            traceback.print_exc()
        return {**_failed("oom" if oom else "error", message), "device": device}
    return dict(status="ok", times_ms=times, median_ms=statistics.median(times) if times else None,
                min_ms=min(times) if times else None, times_compete_ms=busy,
                median_compete_ms=statistics.median(busy) if busy else None,
                peak_flops=statistics.median(rates) if rates else None, peak_extra_bytes=peak_extra,
                baseline_bytes=probe.baseline, memory_method=probe.method, device=device, error=None,
                report=getattr(step, "report", None))


class _HostMemory:
    """Peak resident memory of this process beyond a baseline (see the module docstring)."""

    def __init__(self):
        self.method = "VmHWM" if _can_reset_peak() else "ru_maxrss"
        self.baseline = 0

    def reset(self):
        if self.method == "VmHWM":
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = _status_kib("VmRSS") * 1024
        else:
            self.baseline = _rusage_peak_bytes()

    def peak_extra(self) -> int:
        peak = _status_kib("VmHWM") * 1024 if self.method == "VmHWM" else _rusage_peak_bytes()
        return max(0, peak - self.baseline)


class _CudaMemory:
    method = "torch.cuda.max_memory_allocated"

    def __init__(self, torch):
        self.torch = torch
        self.baseline = 0

    def reset(self):
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()
        self.baseline = self.torch.cuda.memory_allocated()

    def peak_extra(self) -> int:
        return max(0, self.torch.cuda.max_memory_allocated() - self.baseline)


def _can_reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") > 0
    except OSError:
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _rusage_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # bytes on macOS, KiB on Linux
