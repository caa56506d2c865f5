"""Public entry point of the selective scan: argument checks, the implementation registry, "auto".

    y = selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False, impl="auto")

Same semantics and tensor layout as mamba_ssm's `selective_scan_fn`; the definition is
`scan_ref.selective_scan_ref`. The built-in implementations are listed in `_load_builtin_impls`
(they do not import this module); others can be added by name with `register_impl`;
`available_impls()` lists those usable in this process.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

from .scan_ref import selective_scan_ref


@dataclass(frozen=True)
class ScanImpl:
    name: str
    fn: Callable
    devices: tuple[str, ...]          # device types the implementation runs on
    available: Callable[[], bool]     # cheap check: can it run in this process?
    priority: int                     # "auto" picks the highest-priority available impl
    why_unavailable: Callable[[], str | None] = lambda: None   # reason shown when it cannot run


_REGISTRY: dict[str, ScanImpl] = {}
_announced: set[str] = set()          # devices whose "auto" choice was already printed


def register_impl(name, fn, devices=("cpu", "cuda"), available=lambda: True, priority=0,
                  why_unavailable=lambda: None):
    _REGISTRY[name] = ScanImpl(name, fn, tuple(devices), available, priority, why_unavailable)


def available_impls(device: str | None = None) -> list[str]:
    """Names of the implementations that can run here (optionally: on this device type)."""
    _load_builtin_impls()
    return [i.name for i in sorted(_REGISTRY.values(), key=lambda i: -i.priority)
            if (device is None or device in i.devices) and i.available()]


def resolve_impl(impl: str, device: str) -> ScanImpl:
    """The implementation `impl` names, or for "auto" the best one available on `device`."""
    _load_builtin_impls()
    if impl == "auto":
        names = available_impls(device)
        if not names:
            raise RuntimeError(f"no selective-scan implementation available on {device}")
        chosen = _REGISTRY[names[0]]
        if device not in _announced:
            _announced.add(device)
            print(auto_notice(device, chosen), file=sys.stderr)
        return chosen
    if impl not in _REGISTRY:
        raise ValueError(f"impl: unknown selective-scan implementation {impl!r}; "
                         f"known: {sorted(_REGISTRY)}")
    chosen = _REGISTRY[impl]
    if device not in chosen.devices or not chosen.available():
        raise ValueError(f"impl: {impl!r} is not available on {device} in this process; "
                         f"available: {available_impls(device)}")
    return chosen


def auto_notice(device: str, chosen: ScanImpl) -> str:
    """One line saying which implementation "auto" runs, and why faster ones were passed over."""
    skipped = [f"{i.name!r} unavailable: {i.why_unavailable() or 'not available here'}"
               for i in _REGISTRY.values()
               if device in i.devices and i.priority > chosen.priority and not i.available()]
    return (f"ssmscale: selective_scan on {device} runs {chosen.name!r}"
            + (f" ({'; '.join(skipped)})" if skipped else ""))


def check_float_tensors(**tensors) -> None:
    """Each argument given (not None) must be a floating-point torch.Tensor: a ValueError naming it if not."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def _check_args(u, delta, A, B, C, D, z, delta_bias):
    tensors = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    check_float_tensors(**tensors)
    if u.dim() != 3:
        raise ValueError(f"u: expected shape (batch, d_inner, L), got {tuple(u.shape)}")
    batch, d_inner, length = u.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A: expected shape (d_inner={d_inner}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    expected = {
        "delta": (batch, d_inner, length), "z": (batch, d_inner, length),
        "B": (batch, n, length), "C": (batch, n, length),
        "D": (d_inner,), "delta_bias": (d_inner,),
    }
    for name, shape in expected.items():
        t = tensors[name]
        if t is not None and tuple(t.shape) != shape:
            want = {"delta": "(batch, d_inner, L)", "z": "(batch, d_inner, L)",
                    "B": "(batch, N, L)", "C": "(batch, N, L)",
                    "D": "(d_inner,)", "delta_bias": "(d_inner,)"}[name]
            raise ValueError(f"{name}: expected shape {want} = {shape}, got {tuple(t.shape)}")
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(f"u: all tensors must be on one device, got {sorted(map(str, devices))}")
    if A.dtype != torch.float32:
        raise ValueError(f"A: expected dtype float32 (the state is fp32), got {A.dtype}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, impl="auto"):
    """Selective scan with mamba_ssm's semantics; returns y, or (y, last_state) when asked."""
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    chosen = resolve_impl(impl, u.device.type)
    return chosen.fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                     delta_softplus=delta_softplus, return_last_state=return_last_state)


_loaded = False


def _load_builtin_impls():
    """Register the implementations shipped with ssmscale (done lazily to keep imports cheap)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    # listed here, where "auto" chooses among them, so that no implementation imports this module back
    from . import scan_chunked, scan_cpu, scan_triton   # scan_triton imports triton lazily
    register_impl("ref", selective_scan_ref, devices=("cpu", "cuda"), priority=0)
    register_impl("chunked", scan_chunked.selective_scan_chunked, devices=("cpu", "cuda"), priority=10)
    register_impl("fused", scan_cpu.selective_scan_fused, devices=("cpu",), available=scan_cpu.available,
                  priority=20, why_unavailable=scan_cpu.unavailable_reason)   # the compiled CPU kernel
    register_impl("triton", scan_triton.selective_scan_triton, devices=("cuda",), available=scan_triton.available,
                  priority=30, why_unavailable=scan_triton.unavailable_reason)
