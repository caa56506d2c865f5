"""Public entry point of Mamba-2's SSD layer: argument checks and the choice of implementation.

    y = ssd(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
            return_final_state=False, chunk_size=64, impl="auto")

Semantics and layout: `ssd_ref.ssd_ref` (the definition). Implementations:
- "ref": the sequential loop (slow; the tests' yardstick);
- "chunked": the chunked matrix form (ssd_chunked.py), pure PyTorch, any device;
- "fused-recurrent": the C kernel of the recurrent form (ssd_scan_cpu.c): a step per token, vectorised
  over channels, one multiply and two multiply-adds per state element;
- "fused-chunk": the C kernel of the chunked form (ssd_cpu.c): the chunked algorithm's small matrix
  products, one (batch, head) row at a time;
- "fused": whichever of the two `fused_form` picks for the shape (both need a C compiler);
- "auto": "fused" for CPU tensors where it is available, else "chunked".
The first time "auto" or "fused" resolves for a shape in a process, one line on stderr names the form.
Returns y, or (y, final_state) with return_final_state; final_state is (batch, heads, head_dim, d_state), fp32.
"""

from __future__ import annotations

import sys

from . import ssd_cpu, ssd_recurrent
from .scan import check_float_tensors
from .ssd_chunked import DEFAULT_CHUNK, ssd_chunked
from .ssd_ref import ssd_ref

FUSED_FORMS = {"fused-recurrent": ssd_recurrent.ssd_fused_recurrent, "fused-chunk": ssd_cpu.ssd_fused}
IMPLS = {"ref": ssd_ref, "chunked": ssd_chunked, "fused": None, **FUSED_FORMS}
_announced: set = set()     # (device, shape) whose form was printed


def fused_form(head_dim: int, d_state: int) -> str:
    """The fused form for this shape: the recurrent one at every shape measured on a CPU. It costs ~3 multiply-adds
    per state element and token each way, while the chunked form's T x T blocks add work that its loops over
    small matrices do not win back (1 thread, batch 2, d_inner 256, L 1024, forward + backward, recurrent
    against chunked-form kernel: 4.2x at head_dim 8 / N 16, 1.9x at 16 / 64, 2.0x at 64 / 64, 1.06x at
    64 / 128; docs/speed.md). A shape where the chunked form wins would get a rule here."""
    return "fused-recurrent"


def available_ssd_impls(device: str = "cpu") -> list[str]:
    """The implementations that can run on `device` in this process, fastest first."""
    fused = (["fused", "fused-recurrent", "fused-chunk"]
             if device == "cpu" and ssd_cpu.available() and ssd_recurrent.available() else [])
    return fused + ["chunked", "ref"]


def resolve_ssd_impl(impl: str, device: str = "cpu", shape: tuple[int, int] | None = None) -> str:
    """The implementation `impl` names on `device` ("auto": the fastest available there). With `shape`
    (head_dim, d_state), "fused" resolves further to its form, announced once per process and shape."""
    if impl == "auto":
        impl = available_ssd_impls(device)[0]
        auto = True
    else:
        auto = False
        if impl not in IMPLS:
            raise ValueError(f"impl: unknown SSD implementation {impl!r}; known: auto, {', '.join(IMPLS)}")
        if impl not in available_ssd_impls(device):
            why = ((ssd_cpu.unavailable_reason() or ssd_recurrent.unavailable_reason()) if device == "cpu"
                   else "it runs on the CPU only")
            raise ValueError(f"impl: {impl!r} is not available on {device} in this process ({why})")
    if impl != "fused" or shape is None:
        return impl
    form = fused_form(*shape)
    if (device, shape) not in _announced:
        _announced.add((device, shape))
        print(f"ssmscale: ssd on {device} runs {form!r} (head_dim {shape[0]}, d_state {shape[1]}"
              f"{', chosen by auto' if auto else ''})", file=sys.stderr)
    return form


def _check_args(x, dt, A, B, C, D, dt_bias, initial_state, chunk_size):
    tensors = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, initial_state=initial_state)
    check_float_tensors(**tensors)
    if x.dim() != 4:
        raise ValueError(f"x: expected shape (batch, L, heads, head_dim), got {tuple(x.shape)}")
    batch, length, heads, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (batch, length) or heads % B.shape[2]:
        raise ValueError(f"B: expected shape (batch={batch}, L={length}, groups dividing {heads} heads, "
                         f"d_state), got {tuple(B.shape)}")
    groups, n = B.shape[2], B.shape[3]
    expected = {"dt": (batch, length, heads), "A": (heads,), "C": (batch, length, groups, n),
                "dt_bias": (heads,), "initial_state": (batch, heads, p, n)}
    for name, shape in expected.items():
        t = tensors[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) not in ((heads,), (heads, p)):
        raise ValueError(f"D: expected shape ({heads},) or ({heads}, {p}), got {tuple(D.shape)}")
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x: all tensors must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")


def ssd(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
        return_final_state=False, chunk_size=DEFAULT_CHUNK, impl="auto"):
    """SSD with the semantics of ssd_ref; returns y, or (y, final_state) when asked."""
    _check_args(x, dt, A, B, C, D, dt_bias, initial_state, chunk_size)
    fn = IMPLS[resolve_ssd_impl(impl, x.device.type, (x.shape[3], B.shape[3]))]
    return fn(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
              return_final_state=return_final_state, chunk_size=chunk_size)
