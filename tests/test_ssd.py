"""Mamba-2's SSD: the chunked matrix form and both fused CPU kernels (recurrent and chunked) agree with the
sequential reference (outputs, final state, every gradient), the reference with the quadratic
(semiseparable-matrix) form in float64, and a split sequence continued from its final state with the whole
one; "fused" names the form it runs."""

import pytest
import torch

from ssmscale.ops import ssd
from ssmscale.ops.ssd import available_ssd_impls
from scan_inputs import rel_err

# "fused" is one of its two forms (test_auto_resolves... checks which): the forms are tested by name
FAST_IMPLS = [i for i in available_ssd_impls("cpu") if i not in ("ref", "fused")]

SHAPES = [  # (batch, L, heads, head_dim, groups, d_state, chunk): L = 1, L not a multiple of the chunk,
    (1, 1, 1, 1, 1, 1, 4),          # several groups, a chunk longer than L, several chunks
    (2, 7, 2, 3, 1, 4, 4),
    (2, 37, 4, 2, 2, 5, 8),
    (1, 64, 6, 4, 3, 8, 16),
    (1, 50, 4, 2, 4, 3, 64),
    (2, 130, 4, 8, 1, 16, 32),
    (1, 40, 2, 12, 1, 4, 8),        # the recurrent kernel's lanes: a head_dim that is not a power of two,
    (2, 33, 4, 20, 2, 16, 8),       # heads wider than a 16-lane tile, split over tiles,
    (1, 70, 3, 40, 3, 5, 8),        # and over tiles of several groups,
    (2, 100, 64, 8, 1, 16, 8),      # many tiles (split over the threads)
]
OPTIONS = [  # (D shape: None / "h" / "hp", dt_bias, dt_softplus, initial_state)
    ("h", True, True, True),
    (None, False, False, False),
    ("hp", True, False, False),
    ("h", False, True, True),
]
NAMES = ["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"]


def make_inputs(batch, length, heads, p, groups, n, *, D="h", dt_bias=True, softplus=True, initial=True,
                dtype=torch.float32, seed=0):
    """Realistic ranges: A in -[1, 16] (Mamba-2's init), dt ~ softplus scale (positive without softplus)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    dt = 0.5 * r(batch, length, heads) - 1.0
    return dict(
        x=r(batch, length, heads, p),
        dt=dt if softplus else torch.nn.functional.softplus(dt) * 0.5,
        A=-(1 + 15 * torch.rand(heads, generator=g, dtype=dtype)),
        B=r(batch, length, groups, n), C=r(batch, length, groups, n),
        D=None if D is None else r(heads) if D == "h" else r(heads, p),
        dt_bias=0.1 * r(heads) if dt_bias else None,
        initial_state=r(batch, heads, p, n) if initial else None,
    )


def run(impl, inputs, softplus, chunk):
    """y, final state and the gradient of a loss weighting every output and state entry differently."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y, last = ssd(**{k: leaves.get(k) for k in NAMES}, dt_softplus=softplus, return_final_state=True,
                  chunk_size=chunk, impl=impl)
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g)).sum() + (last * torch.randn(last.shape, generator=g)).sum()
    loss.backward()
    return y.detach(), last.detach(), {k: t.grad for k, t in leaves.items()}


def _cases():
    for shape in SHAPES:
        for opt in OPTIONS:
            yield shape, opt


def errors(shape, opt, impl="chunked") -> dict:
    """Normwise relative error of `impl` against ref for y, the final state and every gradient."""
    *dims, chunk = shape
    D, bias, softplus, initial = opt
    inputs = make_inputs(*dims, D=D, dt_bias=bias, softplus=softplus, initial=initial)
    y_ref, h_ref, g_ref = run("ref", inputs, softplus, chunk)
    y, h, grads = run(impl, inputs, softplus, chunk)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape and h.dtype == torch.float32
    assert set(grads) == set(g_ref)
    return {"y": rel_err(y, y_ref), "final_state": rel_err(h, h_ref),
            **{"d" + k: rel_err(grads[k], g_ref[k]) for k in g_ref}}


def test_the_fused_kernel_is_there_where_a_c_compiler_is():
    import shutil
    fused = {"fused", "fused-recurrent", "fused-chunk"}
    assert (fused <= set(available_ssd_impls("cpu"))) == (shutil.which("gcc") is not None), available_ssd_impls("cpu")


@pytest.mark.skipif("fused-recurrent" not in FAST_IMPLS, reason="no fused SSD here")
def test_auto_resolves_to_a_fused_form_by_shape_and_says_which_once(capsys):
    from ssmscale.ops.ssd import fused_form, resolve_ssd_impl
    assert resolve_ssd_impl("auto", "cpu") == "fused"
    shape = (5, 7)     # a shape no other test announces first
    assert resolve_ssd_impl("auto", "cpu", shape) == fused_form(*shape) == "fused-recurrent"
    resolve_ssd_impl("fused", "cpu", shape)
    err = capsys.readouterr().err.splitlines()
    assert err == ["ssmscale: ssd on cpu runs 'fused-recurrent' (head_dim 5, d_state 7, chosen by auto)"]


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}L{}h{}p{}g{}n{}T{}".format(*s))
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: "D{}bias{}sp{}h0{}".format(*map(str, o)))
def test_fast_ssd_matches_reference_outputs_final_state_and_every_gradient(impl, shape, opt):
    errs = errors(shape, opt, impl)
    expected = {"y", "final_state", "dx", "ddt", "dA", "dB", "dC"} | {
        name for name, on in (("dD", opt[0]), ("ddt_bias", opt[1]), ("dinitial_state", opt[3])) if on}
    assert set(errs) == expected
    assert max(errs.values()) < 1e-4, errs


def test_reference_equals_the_quadratic_semiseparable_form_computed_in_float64():
    b, L, h, p, g, n = 2, 9, 4, 3, 2, 5
    inp = make_inputs(b, L, h, p, g, n, D=None, dt_bias=False, softplus=False, dtype=torch.float64)
    y, last = ssd(**{k: inp.get(k) for k in NAMES}, return_final_state=True, impl="ref")
    # y_l = sum_{s <= l} (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s + exp(a_1 + ... + a_l) C_l h0
    a = inp["dt"] * inp["A"]                                               # (b, L, h)
    cum = a.cumsum(1)
    Bh, Ch = (inp[k].repeat_interleave(h // g, dim=2) for k in ("B", "C"))
    want = torch.zeros_like(y)
    for l in range(L):
        want[:, l] = torch.einsum("bhn,bhpn->bhp", Ch[:, l], inp["initial_state"]) * torch.exp(cum[:, l])[..., None]
        for s in range(l + 1):
            w = (Ch[:, l] * Bh[:, s]).sum(-1) * torch.exp(cum[:, l] - cum[:, s]) * inp["dt"][:, s]   # (b, h)
            want[:, l] += w[..., None] * inp["x"][:, s]
    assert last.dtype == torch.float32            # the reference keeps its state in fp32, whatever comes in
    assert rel_err(y, want) < 1e-6


@pytest.mark.parametrize("impl", ["ref"] + FAST_IMPLS)
def test_a_split_sequence_continued_from_its_final_state_equals_the_whole(impl):
    inp = make_inputs(2, 45, 4, 3, 2, 6, D="h", initial=False)
    whole, last = ssd(**{k: inp.get(k) for k in NAMES}, dt_softplus=True, return_final_state=True,
                      chunk_size=8, impl=impl)
    cut = 19
    part = lambda sl: {k: (v[:, sl] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    y1, h1 = ssd(**{k: part(slice(0, cut)).get(k) for k in NAMES}, dt_softplus=True, return_final_state=True,
                 chunk_size=8, impl=impl)
    rest = part(slice(cut, None))
    rest["initial_state"] = h1
    y2, h2 = ssd(**{k: rest.get(k) for k in NAMES}, dt_softplus=True, return_final_state=True, chunk_size=8,
                 impl=impl)
    assert rel_err(torch.cat([y1, y2], dim=1), whole) < 1e-5 and rel_err(h2, last) < 1e-5


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_fast_ssd_keeps_fp32_state_under_bf16_inputs(impl):
    inp = make_inputs(1, 20, 2, 4, 1, 4, D="h")
    y_ref = ssd(**{k: inp.get(k) for k in NAMES}, dt_softplus=True, impl="ref")
    low = {k: (v.bfloat16() if k in ("x", "B", "C") else v) for k, v in inp.items()}
    y = ssd(**{k: low.get(k) for k in NAMES}, dt_softplus=True, impl=impl)
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), y_ref) < 3e-2


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.zeros(2, 5, 4)), "x: expected shape (batch, L, heads, head_dim)"),
    (dict(B=torch.zeros(2, 5, 3, 6)), "B: expected shape (batch=2, L=5, groups dividing 4 heads"),
    (dict(dt=torch.zeros(2, 5, 3)), "dt: expected shape (2, 5, 4)"),
    (dict(A=torch.zeros(4, 6)), "A: expected shape (4,)"),
    (dict(D=torch.zeros(3)), "D: expected shape (4,) or (4, 3)"),
    (dict(initial_state=torch.zeros(2, 4, 3, 5)), "initial_state: expected shape (2, 4, 3, 6)"),
    (dict(chunk_size=0), "chunk_size: expected a positive integer"),
    (dict(impl="triton"), "impl: unknown SSD implementation 'triton'"),
])
def test_bad_arguments_name_the_argument(change, message):
    inp = {k: v for k, v in make_inputs(2, 5, 4, 3, 2, 6).items()}
    inp.update(change)
    with pytest.raises(ValueError) as exc:
        ssd(**inp)
    assert str(exc.value).startswith(message), str(exc.value)
