"""Both families: shapes, exact parameter counts, cache == full forward, the initialisation of the paper."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssmscale.flops import param_counts
from ssmscale.models import LM, ModelConfig
from ssmscale.models.sizing import ASPECT_BAND, ladder_shapes, shape_for
from ssmscale.models.transformer import apply_rotary, rotary_tables, rotate_qk

FAMS = ["transformer", "mamba"]


def tiny(family, **kw):
    return ModelConfig(family=family, d_model=kw.pop("d_model", 64), n_layer=kw.pop("n_layer", 2), **kw)


@pytest.mark.parametrize("family", FAMS)
def test_forward_maps_tokens_to_logits_over_padded_vocab(family):
    model = LM(tiny(family, vocab_size=250))
    logits = model(torch.randint(0, 250, (3, 11)))
    assert logits.shape == (3, 11, 256) and logits.dtype == torch.float32
    assert model.embedding.weight.shape[0] == 256


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("d_model, n_layer, vocab", [(64, 2, 256), (96, 3, 1000), (48, 1, 77)])
def test_parameter_counts_are_exact(family, d_model, n_layer, vocab):
    cfg = tiny(family, d_model=d_model, n_layer=n_layer, vocab_size=vocab, head_dim=16)
    model = LM(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["non_embedding"] == model.num_params(non_embedding=True)
    assert counts["embedding"] == model.embedding.weight.numel()


def test_lm_head_is_tied_to_embedding():
    model = LM(tiny("transformer"))
    tokens = torch.randint(0, 256, (1, 5))
    logits = model(tokens)
    with torch.no_grad():
        model.embedding.weight[7].mul_(2)
    assert not torch.allclose(model(tokens)[..., 7], logits[..., 7])


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("prompt_len", [1, 3, 9])
def test_cached_step_by_step_logits_equal_full_forward(family, prompt_len):
    model = LM(tiny(family)).eval()
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = model.allocate_cache(2, 24)
        pieces = [model(tokens[:, :prompt_len], cache)]
        pieces += [model(tokens[:, t:t + 1], cache) for t in range(prompt_len, 24)]
    stepped = torch.cat(pieces, dim=1)
    assert (stepped - full).abs().max().item() < 1e-4 * full.abs().max().item()


def test_transformer_cache_accepts_multi_token_chunks_after_the_prompt():
    model = LM(tiny("transformer")).eval()
    tokens = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = model.allocate_cache(1, 20)
        stepped = torch.cat([model(tokens[:, :5], cache), model(tokens[:, 5:12], cache),
                             model(tokens[:, 12:], cache)], dim=1)
    assert torch.allclose(stepped, full, atol=1e-5)


@pytest.mark.parametrize("family", FAMS)
def test_greedy_generation_matches_argmax_of_full_forward(family):
    model = LM(tiny(family)).eval()
    prompt = torch.randint(0, 256, (2, 4))
    out = model.generate(prompt, max_new_tokens=6)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    with torch.no_grad():
        for t in range(4, 10):  # every generated token is the argmax given what came before
            assert torch.equal(model(out[:, :t])[:, -1].argmax(-1), out[:, t])


@pytest.mark.parametrize("length", [1, 3, 17])
def test_causal_depthwise_conv_equals_padded_conv1d_outputs_and_gradients(length):
    from ssmscale.models.mamba import causal_depthwise_conv
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 6, length, requires_grad=True)
    ref = conv(x)[..., :length]
    out = causal_depthwise_conv(x, conv.weight, conv.bias)
    assert torch.allclose(out, ref, atol=1e-6)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, [x, conv.weight, conv.bias], g)
    grads = torch.autograd.grad(out, [x, conv.weight, conv.bias], g)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_mamba_init_follows_the_paper():
    cfg = tiny("mamba", d_model=64, n_layer=4)
    model = LM(cfg)
    mixer = model.blocks[0].mixer
    e, n = cfg.d_inner, cfg.d_state
    assert cfg.dt_rank_ == math.ceil(64 / 16) == mixer.dt_proj.in_features
    assert mixer.x_proj.out_features == cfg.dt_rank_ + 2 * n
    # S4D-real: A = -(1..N) on every channel, D = 1
    assert torch.allclose(-torch.exp(mixer.A_log), -torch.arange(1, n + 1).float().expand(e, n))
    assert torch.all(mixer.D == 1)
    # dt = softplus(bias) lies in [dt_min, dt_max] and is spread log-uniformly
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001
    log_dt = dt.log()
    mid = (math.log(cfg.dt_min) + math.log(cfg.dt_max)) / 2
    assert abs(log_dt.mean().item() - mid) < 0.5
    # no biases on in/out projections; conv and dt_proj have theirs
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None and mixer.x_proj.bias is None
    assert mixer.conv1d.bias is not None and mixer.conv1d.kernel_size == (4,)
    # parameters exempt from weight decay
    for p in (mixer.A_log, mixer.D, mixer.dt_proj.bias, model.blocks[0].norm.weight):
        assert getattr(p, "_no_weight_decay", False)
    assert not getattr(mixer.in_proj.weight, "_no_weight_decay", False)


@pytest.mark.parametrize("family", FAMS)
def test_residual_output_projections_are_rescaled_by_depth(family):
    torch.manual_seed(0)
    deep, shallow = LM(tiny(family, n_layer=8)), LM(tiny(family, n_layer=2))
    def out_std(model):
        return torch.cat([w.flatten() for b in model.blocks for w in b.residual_out_projections()]).std().item()
    # std scales as 1/sqrt(n_layer): 8 layers vs 2 -> ratio 1/2
    assert out_std(deep) / out_std(shallow) == pytest.approx(0.5, rel=0.1)


def test_transformer_init_std_and_no_biases():
    model = LM(tiny("transformer", d_model=128, n_layer=2))
    assert model.embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_ladder_of_five_sizes_is_matched_within_ten_percent():
    shapes = ladder_shapes([1e5, 3e5, 1e6, 3e6, 1e7])
    tf = [s for s in shapes if s.family == "transformer"]
    mb = [s for s in shapes if s.family == "mamba"]
    assert len(tf) == len(mb) == 5
    for t, m in zip(tf, mb):
        assert abs(m.params / t.params - 1) < 0.10
        assert m.n_layer == 2 * t.n_layer
        assert t.d_model % 32 == 0
        assert ASPECT_BAND[0] <= t.aspect <= ASPECT_BAND[1]
        assert t.params == param_counts(tiny("transformer", d_model=t.d_model, n_layer=t.n_layer))["non_embedding"]
    assert [s.params for s in tf] == sorted(s.params for s in tf)


def test_sizing_reproduces_gpt3_small_shape():
    # GPT-3 125M: 12 layers x 768 (85M non-embedding) -> the rule's aspect ratio 64 gives it back
    s = shape_for("transformer", 85e6, ModelConfig(family="transformer", d_model=64, n_layer=1, head_dim=64))
    assert (s.d_model, s.n_layer) == (768, 12)


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="family: unknown model family 'rnn'"):
        ModelConfig(family="rnn", d_model=64, n_layer=2)


@pytest.mark.parametrize("batch, heads, length, head_dim, offset", [(1, 2, 7, 8, 0), (2, 3, 33, 16, 5),
                                                                    (3, 1, 64, 32, 100), (1, 4, 1, 16, 250)])
def test_rotary_on_q_and_k_at_once_equals_the_reference_in_outputs_and_gradients(batch, heads, length, head_dim,
                                                                                  offset):
    base = 500.0 + length          # a base no other test used: the table cache is built here
    qk = torch.randn(2, batch, heads, length, head_dim, requires_grad=True)
    grad = torch.randn(2, batch, heads, length, head_dim)
    with torch.inference_mode():   # tables first built in inference mode must still serve training
        rotate_qk(torch.randn(2, 1, 1, 3, head_dim), 0, base)
    cos, sin = rotary_tables(length, head_dim, base, "cpu", offset)
    ref = torch.stack([apply_rotary(qk[0], cos, sin), apply_rotary(qk[1], cos, sin)])
    (g_ref,) = torch.autograd.grad(ref, qk, grad)
    out = rotate_qk(qk, offset, base)
    (g_out,) = torch.autograd.grad(out, qk, grad)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-6, atol=1e-6)
