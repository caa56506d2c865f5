"""The fused CPU conv and the fused Mamba inner op agree with their references (outputs and every
gradient), the model gives the same numbers on either path, and the fused op keeps less for backward."""

import math

import pytest
import torch

from ssmscale.models import LM, ModelConfig
from ssmscale.ops import scan_cpu
from ssmscale.ops.conv import causal_conv1d_fused, causal_conv1d_ref
from ssmscale.ops.mamba_inner import mamba_inner_fused, mamba_inner_ref
from scan_inputs import rel_err

pytestmark = pytest.mark.skipif(not scan_cpu.available(),
                                reason=f"fused CPU kernels unavailable: {scan_cpu.unavailable_reason()}")


def _grads(fn, inputs, *args, **kw):
    """Outputs and input gradients of a loss weighting every output entry differently."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    outs = fn(*leaves, *args, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(1)
    sum(((o * torch.randn(o.shape, generator=g)).sum() for o in outs)).backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves]


@pytest.mark.parametrize("batch, channels, length, width, silu, time_dim", [
    (1, 3, 1, 4, True, 2),        # one step, one partial tile
    (2, 20, 70, 4, True, 1),      # a tile and a partial one; time blocks of 64 and 6
    (3, 40, 130, 3, False, 2),    # no activation, another kernel width
    (2, 33, 65, 4, True, 1),
])
def test_fused_conv_matches_conv1d_outputs_and_gradients(batch, channels, length, width, silu, time_dim):
    g = torch.Generator().manual_seed(0)
    shape = (batch, length, channels) if time_dim == 1 else (batch, channels, length)
    inputs = [torch.randn(shape, generator=g), torch.randn(channels, 1, width, generator=g),
              torch.randn(channels, generator=g)]
    got = _grads(causal_conv1d_fused, inputs, silu=silu, time_dim=time_dim)
    want = _grads(causal_conv1d_ref, inputs, silu=silu, time_dim=time_dim)
    for name, a, b in zip(["y", "dx", "dweight", "dbias"], got, want):
        assert rel_err(a, b) < 1e-5, name


def test_fused_conv_reads_a_strided_slice_and_its_weight_grads_do_not_depend_on_threads():
    # x is the first half of a (b, L, 2C) tensor, as the Mamba block passes in_proj's output
    g = torch.Generator().manual_seed(0)
    xz = torch.randn(2, 90, 2 * 48, generator=g)
    w, b = torch.randn(48, 1, 4, generator=g), torch.randn(48, generator=g)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            results.append(_grads(lambda t, w_, b_: causal_conv1d_fused(t[..., :48], w_, b_, time_dim=1),
                                  [xz, w, b]))
        finally:
            torch.set_num_threads(2)
    want = _grads(lambda t, w_, b_: causal_conv1d_ref(t[..., :48], w_, b_, time_dim=1), [xz, w, b])
    for got in results:
        assert all(rel_err(a, r) < 1e-5 for a, r in zip(got, want))
        assert torch.equal(got[1][..., 48:], torch.zeros(2, 90, 48))     # z's half gets no gradient
    for got in results[1:]:   # channels are split between threads whole: the same sums, bit for bit
        assert all(torch.equal(a, r) for a, r in zip(got, results[0]))


def _block_inputs(batch, d_model, d_inner, n_state, dt_rank, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return [r(batch, length, 2 * d_inner), 0.5 * r(d_inner, 1, 4), r(d_inner),
            r(dt_rank + 2 * n_state, d_inner) / math.sqrt(d_inner), r(d_inner, dt_rank) / math.sqrt(dt_rank),
            r(d_model, d_inner) / math.sqrt(d_inner), -torch.exp(0.5 * r(d_inner, n_state)), r(d_inner),
            r(d_inner) - 3.0]


BLOCK_NAMES = ["out", "last_state", "dxz", "dconv_weight", "dconv_bias", "dx_proj", "ddt_proj",
               "dout_proj", "dA", "dD", "ddelta_bias"]


@pytest.mark.parametrize("batch, d_model, d_inner, n_state, dt_rank, length", [
    (1, 8, 16, 4, 2, 1),          # one step
    (2, 12, 40, 16, 3, 70),       # tiles 16 + 16 + 8; chunks of 64 and 6
    (3, 10, 20, 5, 2, 130),       # an odd N
    (2, 24, 48, 16, 2, 64),       # exactly one chunk
])
def test_fused_block_matches_reference_outputs_and_every_gradient(batch, d_model, d_inner, n_state, dt_rank,
                                                                  length):
    inputs = _block_inputs(batch, d_model, d_inner, n_state, dt_rank, length)
    got = _grads(mamba_inner_fused, inputs, return_last_state=True)
    want = _grads(mamba_inner_ref, inputs, return_last_state=True)
    errors = {k: rel_err(a, b) for k, a, b in zip(BLOCK_NAMES, got, want)}
    assert max(errors.values()) < 1e-5, errors


def test_fused_block_without_last_state_gradient():
    inputs = _block_inputs(2, 12, 40, 16, 3, 70, seed=3)
    got = _grads(mamba_inner_fused, inputs)
    want = _grads(mamba_inner_ref, inputs)
    errors = {k: rel_err(a, b) for k, a, b in zip(["out"] + BLOCK_NAMES[2:], got, want)}
    assert max(errors.values()) < 1e-5, errors


def _model_grads(scan_impl, tokens):
    torch.manual_seed(0)
    model = LM(ModelConfig(family="mamba", d_model=40, n_layer=2, scan_impl=scan_impl))
    logits = model(tokens)
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return logits.detach(), {k: p.grad for k, p in model.named_parameters()}


def test_model_on_the_fused_block_equals_the_composition_on_the_reference_scan():
    # "fused" runs mamba_inner_fused; "ref" the module-by-module composition with the sequential scan
    tokens = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(0))
    logits, grads = _model_grads("fused", tokens)
    logits_ref, grads_ref = _model_grads("ref", tokens)
    assert rel_err(logits, logits_ref) < 1e-5
    assert grads.keys() == grads_ref.keys()
    errors = {k: rel_err(grads[k], grads_ref[k]) for k in grads}
    assert max(errors.values()) < 1e-4, errors


def _saved_bytes(scan_impl, length):
    """Bytes the autograd graph of one Mamba mixer keeps for its backward."""
    torch.manual_seed(0)
    mixer = LM(ModelConfig(family="mamba", d_model=64, n_layer=1, scan_impl=scan_impl)).blocks[0].mixer
    u = torch.randn(1, length, 64, requires_grad=True)
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mixer(u)
    return sum(seen.values())


def test_fused_block_keeps_a_fraction_of_what_the_composition_keeps_for_backward():
    length, e = 512, 128
    fused, composed = _saved_bytes("fused", length), _saved_bytes("chunked", length)
    # fused: u for in_proj, xz (2E), the x_proj output (dt_rank + 2N) and a state per CHUNK steps
    per_token = 4 * (64 + 2 * e + 4 + 32 + e * 16 / scan_cpu.CHUNK)
    assert fused < 1.1 * per_token * length + 200_000      # + the weights it saves (about 0.2 MB)
    assert composed > 3 * fused
