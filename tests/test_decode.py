"""The fused decoding steps equal the module-by-module step in outputs and in the conv, SSM and KV caches they
leave, over several tokens: one C call per Mamba / Mamba-2 layer, and a whole model (attention layers among
them) decoded through the chain of those calls as block by block; both step aside where autograd is
wanted, and the chain follows weights that move."""

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


def _decode(model, tokens, prompt_len, fused, step_model=None):
    """Logits of a prompt then one token at a time; fused=False runs every block through its modules (those of
    `step_model` where given: the prompt goes through `model`)."""
    cache = model.allocate_cache(tokens.shape[0], tokens.shape[1])
    with torch.no_grad():
        out = [model(tokens[:, :prompt_len], cache)]
        model = step_model or model
        for t in range(prompt_len, tokens.shape[1]):
            if fused:
                assert model._decode_chain(cache) is not None
                out.append(model(tokens[:, t:t + 1], cache))
            else:
                x = model.embedding(tokens[:, t:t + 1])
                for block, c in zip(model.blocks, cache):
                    norm, mixer = getattr(block, block._names[0]), block.mixer_module
                    step = mixer.step_reference if hasattr(mixer, "step_reference") else mixer
                    x = x + step(norm(x), c)
                    if block.mlp is not None:
                        x = x + block.mlp(block.norm_mlp(x))
                out.append(model.norm_f(x) @ model.embedding.weight.t())
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("family", ["transformer", "hybrid"])
@pytest.mark.parametrize("batch", [1, 3])
def test_attention_layers_decode_in_the_chain_as_the_modules_do_in_outputs_and_kv_cache(family, batch):
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, d_model=48, n_layer=2 if family == "transformer" else 8, head_dim=16,
                      vocab_size=64)
    model = LM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():     # gains away from 1, so a dropped norm weight would show
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    tokens = torch.randint(0, 64, (batch, 8))
    got, cache = _decode(model, tokens, 3, fused=True)
    want, ref_cache = _decode(model, tokens, 3, fused=False)
    assert rel_err(got, want) < 1e-5
    kv = [(c, r) for c, r in zip(cache, ref_cache) if hasattr(c, "k")]
    assert kv
    for c, r in kv:
        assert c.pos == r.pos == 8
        assert rel_err(c.k[:, :, :8], r.k[:, :, :8]) < 1e-6 and rel_err(c.v[:, :, :8], r.v[:, :, :8]) < 1e-6


@pytest.mark.parametrize("family, kw", [("transformer", {}), ("mamba", {}), ("mamba2", {}), ("hybrid", {}),
                                        ("hybrid", {"hybrid_ssm": "mamba"})])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_model_decodes_through_the_chain_as_block_by_block(family, kw, batch):
    torch.manual_seed(0)
    model = LM(ModelConfig(family=family, d_model=48, n_layer=4, head_dim=16, vocab_size=64, **kw)).eval()
    tokens = torch.randint(0, 64, (batch, 14))
    got, cache = _decode(model, tokens, 5, fused=True)
    want, ref_cache = _decode(model, tokens, 5, fused=False)
    assert rel_err(got, want) < 1e-5
    assert all(c.pos == r.pos == 14 for c, r in zip(cache, ref_cache))


def test_the_chain_follows_weights_that_move_and_stops_at_a_full_cache():
    torch.manual_seed(0)
    model = LM(ModelConfig(family="hybrid", d_model=48, n_layer=4, head_dim=16, vocab_size=64)).eval()
    tokens = torch.randint(0, 64, (1, 8))
    cache = model.allocate_cache(1, 8)
    with torch.no_grad():
        model(tokens[:, :5], cache)
        first = model._decode_chain(cache)
        model(tokens[:, 5:6], cache)
        for p in model.parameters():           # new tensors (as .to() or a reload makes): the old ones are freed
            p.data = p.data * 1.5
        assert model._decode_chain(cache) is not first
        ref = copy.deepcopy(model)
        ref_cache = [copy.deepcopy(c) for c in cache]
        got = model(tokens[:, 6:7], cache)
        want = _decode_blocks(ref, tokens[:, 6:7], ref_cache)
        assert rel_err(got, want) < 1e-5
        model(tokens[:, 7:8], cache)
        with pytest.raises(ValueError, match="KV cache full"):
            model(tokens[:, 7:8], cache)


def test_a_cache_decoded_by_one_model_then_another_uses_the_second_models_weights():
    torch.manual_seed(0)
    cfg = ModelConfig(family="mamba2", d_model=48, n_layer=2, vocab_size=64)
    first, second = LM(cfg).eval(), LM(cfg).eval()
    tokens = torch.randint(0, 64, (1, 7))
    cache = first.allocate_cache(1, 7)
    with torch.no_grad():
        first(tokens[:, :5], cache)
        first(tokens[:, 5:6], cache)
        ref_cache = [copy.deepcopy(c) for c in cache]
        got = second(tokens[:, 6:7], cache)
        want = _decode_blocks(second, tokens[:, 6:7], ref_cache)
    assert rel_err(got, want) < 1e-5


def _decode_blocks(model, token, cache):
    with torch.no_grad():
        x = model.embedding(token)
        for block, c in zip(model.blocks, cache):
            x = block(x, c)        # (the per-block fused steps, tested against the modules above)
        return model.norm_f(x) @ model.embedding.weight.t()


def test_with_autograd_wanted_the_model_decodes_block_by_block():
    torch.manual_seed(0)
    model = LM(ModelConfig(family="transformer", d_model=48, n_layer=2, head_dim=16, vocab_size=64))
    tokens = torch.randint(0, 64, (1, 6))
    cache = model.allocate_cache(1, 6)
    with torch.no_grad():
        model(tokens[:, :5], cache)
    assert model._decode_chain(cache) is None
    model(tokens[:, 5:6], cache).sum().backward()
    assert model.embedding.weight.grad is not None


def test_a_bf16_chain_follows_weights_changed_in_place():
    """bf16 decoding reads copies of the weights: after an in-place change (load_state_dict, an optimizer step), the
    next token must read the new weights, as a chain built afresh does."""
    torch.manual_seed(0)
    model = LM(ModelConfig(family="mamba2", d_model=48, n_layer=2, vocab_size=64)).eval()
    model.decode_weights = "bf16"
    tokens = torch.randint(0, 64, (1, 7))
    cache = model.allocate_cache(1, 7)
    with torch.no_grad():
        model(tokens[:, :5], cache)
        model(tokens[:, 5:6], cache)                       # the chain, with copies of these weights
        model.load_state_dict({k: v * 0.5 for k, v in model.state_dict().items()})   # in place: same pointers
        fresh = copy.deepcopy(model)
        fresh_cache = [copy.deepcopy(c) for c in cache]
        got = model(tokens[:, 6:7], cache)
        want = fresh(tokens[:, 6:7], fresh_cache)           # its own chain, built from the new weights
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["transformer", "mamba", "mamba2", "hybrid"])
def test_bf16_decoding_reads_rounded_weights_and_stays_near_fp32(family):
    torch.manual_seed(0)
    model = LM(ModelConfig(family=family, d_model=48, n_layer=4, head_dim=16, vocab_size=64)).eval()
    tokens = torch.randint(0, 64, (2, 12))
    fp32, _ = _decode(model, tokens, 4, fused=True)
    model.decode_weights = "bf16"
    bf16, _ = _decode(model, tokens, 4, fused=True)
    again, _ = _decode(model, tokens, 4, fused=True)
    assert torch.equal(bf16, again)                        # deterministic
    assert torch.equal(bf16[:, :4], fp32[:, :4])           # the prompt runs in fp32
    err = rel_err(bf16[:, 4:], fp32[:, 4:])
    assert 1e-5 < err < 3e-2                               # moved by bf16 rounding (2^-9 per weight), not more
    # the same as decoding block by block with every projection rounded to bf16 by torch
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("proj.weight", "qkv.weight", "w_gate.weight", "w_up.weight", "w_down.weight")):
                p.copy_(p.to(torch.bfloat16).float())
    model.decode_weights = ref.decode_weights = "fp32"
    want, _ = _decode(model, tokens, 4, fused=False, step_model=ref)
    assert rel_err(bf16[:, 4:], want[:, 4:]) < 1e-5


def test_bf16_decoding_refuses_a_model_it_cannot_chain_instead_of_running_fp32():
    torch.manual_seed(0)
    model = LM(ModelConfig(family="mamba2", d_model=48, n_layer=2, vocab_size=64))   # trainable: grads wanted
    model.decode_weights = "bf16"
    cache = model.allocate_cache(1, 8)
    tokens = torch.randint(0, 64, (1, 6))
    model(tokens[:, :5], cache)
    with pytest.raises(ValueError, match="decode_weights 'bf16' needs every layer's fused decoding step"):
        model(tokens[:, 5:6], cache)
    model.decode_weights = "fp16"
    with torch.no_grad(), pytest.raises(ValueError, match="decode weights: 'fp16' is not one of fp32, bf16"):
        model(tokens[:, 5:6], cache)


@pytest.mark.parametrize("family", ["transformer", "mamba", "hybrid"])
def test_the_chain_gives_the_same_tokens_on_one_thread_and_on_two(family):
    # wide enough that every projection splits its rows over 2 threads (>= 2 x 65,536 weights), so the threads
    # meet at the chain's barriers; rows and channels are split, never a sum: the results are identical
    before = torch.get_num_threads()
    torch.manual_seed(0)
    model = LM(ModelConfig(family=family, d_model=256, n_layer=3, head_dim=32, vocab_size=64)).eval()
    tokens = torch.randint(0, 64, (2, 10))
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got, cache = _decode(model, tokens, 4, fused=True)
            with torch.no_grad():
                assert model._decode_chain(cache).threads == threads
            out[threads] = got
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[1], out[2])
    want, _ = _decode(model, tokens, 4, fused=False)
    assert rel_err(out[2], want) < 1e-5


def test_the_chain_decodes_on_one_thread_for_a_while_when_its_threads_keep_waiting_for_cores():
    torch.manual_seed(0)
    model = LM(ModelConfig(family="mamba2", d_model=48, n_layer=2, vocab_size=64)).eval()
    cache = model.allocate_cache(1, 200)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache)
        chain = model._decode_chain(cache)
    chain.threads = 2
    real, seen, sleeps = chain.fn, [], iter([50, 1, 50, 50, 50] + [50] * 80 + [0] * 10)

    def fake(kinds, args, n, threads, head, slept):       # the C call, reporting how many of its waits slept
        seen.append(threads)
        code = real(kinds, args, n, threads, head, slept)
        slept._obj.value = next(sleeps)
        return code
    chain.fn = fake
    with torch.no_grad():
        for _ in range(95):
            model(torch.zeros(1, 1, dtype=torch.long), cache)
    # a stray busy token changes nothing; three in a row send the next decode.SOLO_TOKENS tokens to one thread,
    # then the team is tried again
    assert seen[:5] == [2] * 5
    assert seen[5:5 + decode.SOLO_TOKENS] == [1] * decode.SOLO_TOKENS
    assert seen[5 + decode.SOLO_TOKENS] == 2
