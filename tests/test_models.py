"""Every family: shapes, exact parameter counts, cache == full forward, the initialisation of the papers,
the hybrid's layer pattern, and the sizing rule that matches them."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssmscale.flops import param_counts
from ssmscale.models import FAMILIES, LM, ModelConfig
from ssmscale.models.config import default_attn_layers
from ssmscale.models.sizing import ASPECT_BAND, ladder_shapes, shape_for
from ssmscale.models.transformer import apply_rotary, rotary_tables, rotate_qk

FAMS = list(FAMILIES)
# every layer kind and option that changes the code path: the hybrid over Mamba-1, Mamba-2 with groups
VARIANTS = [(f, {}) for f in FAMS] + [("hybrid", {"hybrid_ssm": "mamba"}), ("mamba2", {"mamba2_ngroups": 2}),
                                      ("hybrid", {"hybrid_attn_layers": [0]})]
VARIANT_IDS = [f + "".join(f"-{k}={v}" for k, v in kw.items()) for f, kw in VARIANTS]


def tiny(family, **kw):
    return ModelConfig(family=family, d_model=kw.pop("d_model", 64), n_layer=kw.pop("n_layer", 3 if family == "hybrid"
                                                                                         else 2), **kw)


@pytest.mark.parametrize("family", FAMS)
def test_forward_maps_tokens_to_logits_over_padded_vocab(family):
    model = LM(tiny(family, vocab_size=250))
    logits = model(torch.randint(0, 250, (3, 11)))
    assert logits.shape == (3, 11, 256) and logits.dtype == torch.float32
    assert model.embedding.weight.shape[0] == 256


@pytest.mark.parametrize("family, kw", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("d_model, n_layer, vocab", [(64, 2, 256), (96, 3, 1000), (46, 5, 77)])
def test_parameter_counts_are_exact(family, kw, d_model, n_layer, vocab):
    if family == "transformer" and d_model % 16:
        d_model = 48
    cfg = tiny(family, d_model=d_model, n_layer=n_layer, vocab_size=vocab, head_dim=16, **kw)
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


@pytest.mark.parametrize("family, kw", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("prompt_len", [1, 3, 9])
def test_cached_step_by_step_logits_equal_full_forward(family, kw, prompt_len):
    model = LM(tiny(family, **kw)).eval()
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = model.allocate_cache(2, 24)
        pieces = [model(tokens[:, :prompt_len], cache)]
        pieces += [model(tokens[:, t:t + 1], cache) for t in range(prompt_len, 24)]
    stepped = torch.cat(pieces, dim=1)
    assert (stepped - full).abs().max().item() < 1e-4 * full.abs().max().item()


@pytest.mark.parametrize("family", [f for f in FAMS if f != "mamba"])
def test_cache_accepts_multi_token_chunks_after_the_prompt(family):
    model = LM(tiny(family)).eval()
    assert model.chunked_prefill
    tokens = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = model.allocate_cache(1, 20)
        # pieces shorter and longer than the conv kernel, and single tokens between them
        stepped = torch.cat([model(tokens[:, :5], cache), model(tokens[:, 5:7], cache), model(tokens[:, 7:8], cache),
                             model(tokens[:, 8:15], cache), model(tokens[:, 15:], cache)], dim=1)
    assert torch.allclose(stepped, full, atol=1e-5)


def test_mamba_cache_takes_one_token_at_a_time_after_the_prompt():
    model = LM(tiny("mamba")).eval()
    assert not model.chunked_prefill
    cache = model.allocate_cache(1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="one at a time"):
            model(torch.zeros(1, 2, dtype=torch.long), cache)


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


def test_mamba2_init_follows_the_paper():
    cfg = tiny("mamba2", d_model=64, n_layer=4, mamba2_ngroups=2)
    model = LM(cfg)
    mixer = model.blocks[0].mixer
    h, e, g, n = cfg.mamba2_nheads, cfg.mamba2_d_inner, cfg.mamba2_ngroups, cfg.mamba2_d_state
    assert (h, e) == (2 * 64 // 8, 2 * 64) and mixer.head_dim == 8
    assert mixer.in_proj.out_features == 2 * e + 2 * g * n + h          # z, x, B, C, dt
    assert mixer.conv1d.in_channels == e + 2 * g * n and mixer.conv1d.kernel_size == (4,)
    A = torch.exp(mixer.A_log)                                             # A = -exp(A_log) in -[1, 16]
    assert A.shape == (h,) and A.min() >= 1 and A.max() <= 16 and A.std() > 1
    assert torch.all(mixer.D == 1) and mixer.D.shape == (h,)
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None and mixer.conv1d.bias is not None
    assert mixer.norm.weight.shape == (e,) and mixer.norm.groups == g
    for p in (mixer.A_log, mixer.D, mixer.dt_bias, mixer.norm.weight):
        assert getattr(p, "_no_weight_decay", False)


def test_gated_norm_normalises_y_times_silu_z_per_group():
    from ssmscale.models.norm import GatedRMSNorm
    norm = GatedRMSNorm(8, groups=2)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    y, z = torch.randn(3, 8), torch.randn(3, 8)
    g = (y * F.silu(z)).view(3, 2, 4)
    want = (g / g.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).view(3, 8) * torch.arange(1.0, 9.0)
    assert torch.allclose(norm(y, z), want, atol=1e-5)


@pytest.mark.parametrize("n_layer, every, expected", [
    (2, 8, (1,)), (4, 8, (2,)), (8, 8, (4,)), (12, 8, (3, 9)), (16, 8, (4, 12)),
    (48, 8, (4, 12, 20, 28, 36, 44)), (6, 2, (1, 3, 5)), (3, 1, (1, 2)),
])
def test_hybrid_puts_about_one_attention_layer_in_every_n_never_first(n_layer, every, expected):
    assert default_attn_layers(n_layer, every) == expected
    cfg = tiny("hybrid", n_layer=n_layer, hybrid_attn_every=every)
    model = LM(cfg)
    kinds = [b.kind for b in model.blocks]
    assert [i for i, k in enumerate(kinds) if k == "attention"] == list(expected)
    assert set(kinds) == {"attention", "mamba2"} and kinds[0] == "mamba2"


def test_hybrid_takes_explicit_attention_layers_and_mamba_layers():
    cfg = tiny("hybrid", n_layer=5, hybrid_attn_layers=[4, 0], hybrid_ssm="mamba")
    assert cfg.layer_kinds == ("attention", "mamba", "mamba", "mamba", "attention")
    # a hybrid's attention has round(d / head_dim) heads: any width works
    assert tiny("hybrid", d_model=46, head_dim=16).attn_dim == 48


@pytest.mark.parametrize("kw, message", [
    (dict(family="hybrid", n_layer=1), "n_layer: a hybrid needs at least 2 layers"),
    (dict(family="hybrid", n_layer=4, hybrid_attn_layers=[4]), "hybrid_attn_layers: layer 4 is outside 0..3"),
    (dict(family="hybrid", n_layer=2, hybrid_attn_layers=[0, 1]), "hybrid_attn_layers: a hybrid needs both"),
    (dict(family="hybrid", n_layer=2, hybrid_ssm="rwkv"), "hybrid_ssm: expected one of mamba2, mamba"),
    (dict(family="mamba2", n_layer=2, mamba2_head_dim=0), "mamba2_head_dim: must be >= 1"),
])
def test_bad_family_knobs_are_rejected_naming_the_knob(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(d_model=32, **kw)


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
    def out_std(model, kind):
        return torch.cat([w.flatten() for b in model.blocks if b.kind == kind
                          for w in b.residual_out_projections()]).std().item()
    # std scales as 1/sqrt(n_layer): 8 layers vs 2 -> ratio 1/2, for each kind of layer (their inits differ)
    kinds = {b.kind for b in shallow.blocks}
    assert kinds == {b.kind for b in deep.blocks}
    for kind in kinds:
        assert out_std(deep, kind) / out_std(shallow, kind) == pytest.approx(0.5, rel=0.1), kind


def test_transformer_init_std_and_no_biases():
    model = LM(tiny("transformer", d_model=128, n_layer=2))
    assert model.embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("family", [f for f in FAMS if f != "transformer"])
def test_ladder_of_five_sizes_is_matched_within_ten_percent(family):
    shapes = ladder_shapes([1e5, 3e5, 1e6, 3e6, 1e7], families=("transformer", family))
    tf = [s for s in shapes if s.family == "transformer"]
    mb = [s for s in shapes if s.family == family]
    assert len(tf) == len(mb) == 5
    for t, m in zip(tf, mb):
        assert abs(m.params / t.params - 1) < 0.10
        assert m.n_layer == 2 * t.n_layer
        assert t.d_model % 32 == 0
        assert ASPECT_BAND[0] <= t.aspect <= ASPECT_BAND[1]
        assert t.params == param_counts(tiny("transformer", d_model=t.d_model, n_layer=t.n_layer))["non_embedding"]
    assert [s.params for s in tf] == sorted(s.params for s in tf)


@pytest.mark.parametrize("family", ["mamba2", "hybrid"])
def test_new_families_match_the_transformer_within_six_percent_down_to_toy_sizes(family):
    base = ModelConfig(family="transformer", d_model=16, n_layer=1, head_dim=16)   # the ladders' head_dim
    for target in (2.5e4, 5e4, 1e5, 2e5, 4e5, 1e6, 1e7):
        tf = shape_for("transformer", target, base)
        s = shape_for(family, target, base, match=tf.params)
        assert abs(s.params / tf.params - 1) < 0.06, (target, s)
        assert s.params == param_counts(base.replace(family=family, d_model=s.d_model, n_layer=s.n_layer))["non_embedding"]


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
