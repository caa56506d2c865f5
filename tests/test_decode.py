"""The fused decoding step (one C call per Mamba / Mamba-2 layer and token) equals the module-by-module
step in outputs and in the conv and SSM states it leaves, over several tokens, and steps aside where
autograd is wanted."""

import copy

import pytest
import torch

from ssmscale.models import LM, ModelConfig
from ssmscale.ops import decode
from scan_inputs import rel_err

pytestmark = pytest.mark.skipif(decode.load() is None, reason=f"fused step unavailable: {decode.unavailable_reason()}")


def _mixer_and_cache(family, batch, **kw):
    torch.manual_seed(0)
    mixer = LM(ModelConfig(family=family, d_model=40, n_layer=1, **kw)).blocks[0].mixer.eval()
    cache = mixer.allocate_cache(batch, 16, torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    cache.conv.copy_(torch.randn(cache.conv.shape, generator=g))     # a state left by some earlier prompt
    cache.ssm.copy_(torch.randn(cache.ssm.shape, generator=g))
    cache.pos = 5
    return mixer, cache


@pytest.mark.parametrize("family, kw", [("mamba", {}), ("mamba", {"d_state": 5}), ("mamba2", {}),
                                        ("mamba2", {"mamba2_ngroups": 2, "mamba2_head_dim": 4, "mamba2_d_state": 5})])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_step_equals_the_module_by_module_step_in_outputs_and_states(family, kw, batch):
    mixer, cache = _mixer_and_cache(family, batch, **kw)
    ref_cache = copy.deepcopy(cache)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(6):
            u = torch.randn(batch, 1, 40, generator=g)
            assert decode.supported(mixer, u, cache)
            out, want = mixer.step(u, cache), mixer.step_reference(u, ref_cache)
            assert out.shape == want.shape == (batch, 1, 40)
            assert rel_err(out, want) < 1e-5
    assert rel_err(cache.ssm, ref_cache.ssm) < 1e-5 and rel_err(cache.conv, ref_cache.conv) < 1e-6
    assert cache.pos == ref_cache.pos == 11


def test_with_autograd_wanted_the_step_is_the_module_by_module_one():
    mixer, cache = _mixer_and_cache("mamba2", 1)
    u = torch.randn(1, 1, 40, requires_grad=True)
    assert not decode.supported(mixer, u, cache)
    mixer.step(u, cache).sum().backward()          # differentiable: it ran step_reference
    assert u.grad is not None and cache.pos == 6


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_a_decoding_block_in_one_call_equals_norm_mixer_and_residual_module_by_module(family):
    torch.manual_seed(0)
    block = LM(ModelConfig(family=family, d_model=40, n_layer=1)).blocks[0].eval()
    with torch.no_grad():
        block.norm.weight.copy_(1 + 0.2 * torch.randn(40))
    cache = block.allocate_cache(2, 16, torch.float32, "cpu")
    cache.pos = 3
    ref_cache = copy.deepcopy(cache)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(2, 1, 40, generator=g)
            got = block(x, cache)
            want = x + block.mixer.step_reference(block.norm(x), ref_cache)
            assert rel_err(got, want) < 1e-5
    assert rel_err(cache.ssm, ref_cache.ssm) < 1e-5 and cache.pos == ref_cache.pos == 7
