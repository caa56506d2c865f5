"""Every selective-scan implementation agrees with the sequential reference, and the reference with float64."""

import math

import numpy as np
import pytest
import torch

from ssmscale.ops import available_impls, selective_scan, selective_scan_ref
from scan_inputs import make_inputs, rel_err

FAST_IMPLS = [name for name in available_impls("cpu") if name != "ref"]
SHAPES = [  # (batch, d_inner, d_state, L): L = 1, L not a multiple of any chunk, long-ish L
    (1, 3, 1, 1),
    (2, 5, 4, 7),
    (2, 8, 16, 37),
    (3, 16, 8, 130),
    (1, 32, 16, 300),
]
OPTIONS = [  # (with_D, with_z, with_bias, softplus)
    (True, True, True, True),
    (False, False, False, False),
    (True, False, True, False),
    (False, True, False, True),
]
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def _run(impl, inputs, softplus, return_last_state):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out = selective_scan(**{k: leaves.get(k) for k in NAMES}, delta_softplus=softplus,
                         return_last_state=return_last_state, impl=impl)
    y, last = out if return_last_state else (out, None)
    # a loss that weights every position and state entry differently
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g)).sum()
    if last is not None:
        loss = loss + (last * torch.randn(last.shape, generator=g)).sum()
    loss.backward()
    grads = {k: t.grad for k, t in leaves.items()}
    return y.detach(), (None if last is None else last.detach()), grads


def test_there_is_a_fast_cpu_implementation():
    assert FAST_IMPLS, "only the reference is available"


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}d{}n{}L{}".format(*s))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "D{}z{}bias{}sp{}".format(*map(int, o)))
def test_fast_scan_matches_reference_outputs_and_every_gradient(impl, shape, options):
    with_D, with_z, with_bias, softplus = options
    inputs = make_inputs(*shape, with_D=with_D, with_z=with_z, with_bias=with_bias, softplus=softplus)
    last_state = shape[3] % 2 == 1
    y_ref, h_ref, g_ref = _run("ref", inputs, softplus, last_state)
    y, h, g = _run(impl, inputs, softplus, last_state)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < 1e-4
    if last_state:
        assert h.dtype == torch.float32 and rel_err(h, h_ref) < 1e-4
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert g[name].shape == g_ref[name].shape, name
        assert rel_err(g[name], g_ref[name]) < 1e-4, name


def _numpy_recurrence(inputs, softplus):
    """The scan as a float64 loop over every (batch, channel, state, time) element."""
    u, delta, A, B, C = (inputs[k].double().numpy() for k in ("u", "delta", "A", "B", "C"))
    D, z, bias = (None if inputs[k] is None else inputs[k].double().numpy() for k in ("D", "z", "delta_bias"))
    b, d, L = u.shape
    n = A.shape[1]
    y = np.zeros((b, d, L))
    h_last = np.zeros((b, d, n))
    for i in range(b):
        for c in range(d):
            h = np.zeros(n)
            for t in range(L):
                dt = delta[i, c, t] + (bias[c] if bias is not None else 0.0)
                if softplus:
                    dt = math.log1p(math.exp(dt))
                h = np.exp(dt * A[c]) * h + dt * B[i, :, t] * u[i, c, t]
                out = float(h @ C[i, :, t]) + (D[c] * u[i, c, t] if D is not None else 0.0)
                if z is not None:
                    out *= z[i, c, t] / (1.0 + math.exp(-z[i, c, t]))
                y[i, c, t] = out
            h_last[i, c] = h
    return torch.from_numpy(y), torch.from_numpy(h_last)


@pytest.mark.parametrize("shape", [(1, 2, 3, 1), (2, 3, 4, 19)])
@pytest.mark.parametrize("softplus", [True, False])
def test_reference_matches_float64_recurrence(shape, softplus):
    inputs = make_inputs(*shape, softplus=softplus)
    y, h = selective_scan_ref(**inputs, delta_softplus=softplus, return_last_state=True)
    y64, h64 = _numpy_recurrence(inputs, softplus)
    assert rel_err(y, y64) < 1e-5
    assert rel_err(h, h64) < 1e-5


def test_reference_state_is_fp32_and_output_keeps_input_dtype():
    inputs = make_inputs(2, 4, 3, 5, dtype=torch.bfloat16)
    y, h = selective_scan(**inputs, delta_softplus=True, return_last_state=True, impl="ref")
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_fast_scan_accepts_bf16_inputs_and_keeps_fp32_state(impl):
    inputs = make_inputs(2, 8, 4, 21, dtype=torch.bfloat16)
    y, h = selective_scan(**inputs, delta_softplus=True, return_last_state=True, impl=impl)
    y_ref, h_ref = selective_scan(**inputs, delta_softplus=True, return_last_state=True, impl="ref")
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert rel_err(h, h_ref) < 1e-4
    assert rel_err(y.float(), y_ref.float()) < 1e-2  # both rounded to bf16 at the end


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_fast_scan_accepts_non_contiguous_inputs(impl):
    inputs = make_inputs(2, 6, 4, 33)
    # same values, transposed storage
    nc = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if v is not None and v.dim() == 3 else v)
          for k, v in inputs.items()}
    assert not nc["u"].is_contiguous()
    y = selective_scan(**nc, delta_softplus=True, impl=impl)
    assert rel_err(y, selective_scan(**inputs, delta_softplus=True, impl="ref")) < 1e-4


@pytest.mark.parametrize("arg, bad, expected", [
    ("u", torch.zeros(2, 4), "u: expected shape (batch, d_inner, L)"),
    ("delta", torch.zeros(2, 4, 6), "delta: expected shape (batch, d_inner, L)"),
    ("A", torch.zeros(5, 3), "A: expected shape (d_inner=4, N)"),
    ("B", torch.zeros(2, 2, 5), "B: expected shape (batch, N, L)"),
    ("C", torch.zeros(2, 3, 4), "C: expected shape (batch, N, L)"),
    ("D", torch.zeros(3), "D: expected shape (d_inner,)"),
    ("z", torch.zeros(1, 4, 5), "z: expected shape (batch, d_inner, L)"),
    ("delta_bias", torch.zeros(4, 1), "delta_bias: expected shape (d_inner,)"),
    ("u", torch.zeros(2, 4, 5, dtype=torch.int64), "u: expected a floating-point tensor"),
    ("A", torch.zeros(4, 3, dtype=torch.float64), "A: expected dtype float32"),
])
def test_bad_arguments_raise_value_error_naming_argument_and_shape(arg, bad, expected):
    inputs = make_inputs(2, 4, 3, 5)
    inputs[arg] = bad
    with pytest.raises(ValueError) as info:
        selective_scan(**inputs)
    assert str(info.value).startswith(expected)


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match="impl: unknown selective-scan implementation 'nope'"):
        selective_scan(**make_inputs(1, 2, 2, 3), impl="nope")


def test_available_impls_lists_reference_and_auto_resolves_to_a_fast_one():
    from ssmscale.ops.scan import resolve_impl
    names = available_impls("cpu")
    assert "ref" in names and "chunked" in names
    assert resolve_impl("auto", "cpu").name != "ref"
