"""The fused Mamba-2 block (conv + recurrent SSD + gated norm + out_proj in one op) and the fused gated norm
agree with their references (outputs, final state and every gradient), the model gives the same numbers
on the fused path as on the composition, and the fused op keeps less for backward."""

import math

import pytest
import torch

from ssmscale.models import LM, ModelConfig
from ssmscale.models.norm import GatedRMSNorm
from ssmscale.ops import ssd_recurrent
from ssmscale.ops.gated_norm import gated_norm_fused
from ssmscale.ops.mamba2_inner import fused_supported, mamba2_inner_fused, mamba2_inner_ref
from scan_inputs import rel_err

pytestmark = pytest.mark.skipif(not fused_supported(torch.zeros(1)),
                                reason=f"fused CPU kernels unavailable: {ssd_recurrent.unavailable_reason()}")


def _grads(fn, inputs, **kw):
    """Outputs and input gradients of a loss weighting every output entry differently."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    outs = fn(*leaves, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(1)
    sum(((o * torch.randn(o.shape, generator=g)).sum() for o in outs)).backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves]


@pytest.mark.parametrize("batch, length, dim, groups", [(1, 1, 8, 1), (2, 7, 24, 3), (2, 33, 96, 1), (1, 5, 40, 4)])
def test_fused_gated_norm_matches_the_module_outputs_and_gradients(batch, length, dim, groups):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(batch, length, dim, generator=g)
    z = torch.randn(batch, length, 2 * dim, generator=g)[..., :dim]     # a strided slice, as in the block
    norm = GatedRMSNorm(dim, groups, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(dim, generator=g))
    results = []
    for fn in (norm, lambda a, b: gated_norm_fused(a, b, norm.weight, groups, 1e-5)):
        norm.weight.grad = None
        results.append(_grads(fn, [y, z]) + [norm.weight.grad.clone()])
    for name, a, b in zip(["out", "dy", "dz", "dweight"], *results):
        assert rel_err(a, b) < 1e-5, name


def _block_inputs(batch, length, d_model, heads, head_dim, groups, d_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    e = heads * head_dim
    channels = e + 2 * groups * d_state
    width = 2 * e + 2 * groups * d_state + heads
    return [r(batch, length, d_model), r(width, d_model) / math.sqrt(d_model), 0.5 * r(channels, 1, 4), r(channels),
            0.3 * r(heads) - 2.0, -(1 + 15 * torch.rand(heads, generator=g)), r(heads), 1 + 0.1 * r(e),
            r(d_model, e) / math.sqrt(e)]


BLOCK_NAMES = ["out", "final_state", "du", "din_proj", "dconv_weight", "dconv_bias", "ddt_bias", "dA", "dD",
               "dnorm_weight", "dout_proj"]


@pytest.mark.parametrize("batch, length, d_model, heads, head_dim, groups, d_state", [
    (1, 1, 8, 2, 4, 1, 4),          # one step
    (2, 70, 12, 4, 8, 1, 16),       # the default head_dim and N; chunks of 32 and a partial one
    (2, 37, 10, 6, 3, 3, 5),        # an odd head_dim (padded lanes), several groups, an odd N
    (1, 130, 16, 2, 20, 2, 16),     # heads wider than a tile
])
def test_fused_block_matches_reference_outputs_final_state_and_every_gradient(batch, length, d_model, heads,
                                                                              head_dim, groups, d_state):
    inputs = _block_inputs(batch, length, d_model, heads, head_dim, groups, d_state)
    kw = dict(heads=heads, groups=groups, d_state=d_state, eps=1e-5, return_final_state=True)
    got, want = _grads(mamba2_inner_fused, inputs, **kw), _grads(mamba2_inner_ref, inputs, **kw)
    errors = {k: rel_err(a, b) for k, a, b in zip(BLOCK_NAMES, got, want)}
    # 1e-4: at head_dim 20 the reference itself moves its dD and ddt_bias by up to 4e-5 when its inputs move by
    # half an ulp (sums with cancellation), so agreement to rounding is ~1e-5 there; a wrong index is O(1)
    assert max(errors.values()) < 1e-4, errors
    assert errors["out"] < 1e-5 and errors["final_state"] < 1e-5, errors


def test_fused_block_without_the_final_state():
    inputs = _block_inputs(2, 45, 12, 4, 8, 2, 6, seed=3)
    kw = dict(heads=4, groups=2, d_state=6, eps=1e-5)
    got, want = _grads(mamba2_inner_fused, inputs, **kw), _grads(mamba2_inner_ref, inputs, **kw)
    errors = {k: rel_err(a, b) for k, a, b in zip(BLOCK_NAMES[:1] + BLOCK_NAMES[2:], got, want)}
    assert max(errors.values()) < 1e-5, errors


def _model_grads(ssd_impl, tokens, **kw):
    torch.manual_seed(0)
    model = LM(ModelConfig(family="mamba2", d_model=40, n_layer=2, ssd_impl=ssd_impl, **kw))
    logits = model(tokens)
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return logits.detach(), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [{}, {"mamba2_ngroups": 2, "mamba2_head_dim": 4}])
def test_model_on_the_fused_block_equals_the_composition_on_the_reference_ssd(kw):
    # "fused-recurrent" runs mamba2_inner_fused; "ref" the module-by-module composition with the sequential SSD
    tokens = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(0))
    logits, grads = _model_grads("fused-recurrent", tokens, **kw)
    logits_ref, grads_ref = _model_grads("ref", tokens, **kw)
    assert rel_err(logits, logits_ref) < 1e-5
    assert grads.keys() == grads_ref.keys()
    errors = {k: rel_err(grads[k], grads_ref[k]) for k in grads}
    assert max(errors.values()) < 1e-4, errors


def _saved_bytes(ssd_impl, length):
    """Bytes the autograd graph of one Mamba-2 mixer keeps for its backward."""
    torch.manual_seed(0)
    mixer = LM(ModelConfig(family="mamba2", d_model=64, n_layer=1, ssd_impl=ssd_impl)).blocks[0].mixer
    u = torch.randn(1, length, 64, requires_grad=True)
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mixer(u)
    return sum(seen.values())


def test_fused_block_keeps_a_fraction_of_what_the_composition_keeps_for_backward():
    length, e, n = 512, 128, 16
    fused, composed = _saved_bytes("fused-recurrent", length), _saved_bytes("chunked", length)
    # fused: u, zxbcdt (2e + 2N + heads, padded to a multiple of 16) and a 16-lane state per tile per CHUNK steps
    per_token = 4 * (64 + 2 * e + 2 * n + e // 8 + 16 + e * n / ssd_recurrent.CHUNK)
    assert fused < 1.1 * per_token * length + 200_000      # + the weights it saves
    assert composed > 3 * fused
