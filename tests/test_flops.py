"""flops.py against torch's FlopCounterMode on real forwards, and against Chinchilla App. F."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ssmscale import flops
from ssmscale.models import LM, ModelConfig
from ssmscale.ops import selective_scan

def _counts(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def _sum(counts, names):
    return sum(n for op, n in counts.items() if op.removeprefix("aten.") in names)


@pytest.mark.parametrize("d_model, n_layer, seq_len", [(64, 2, 64), (128, 3, 96)])
def test_transformer_terms_match_flop_counter(d_model, n_layer, seq_len):
    cfg = ModelConfig(family="transformer", d_model=d_model, n_layer=n_layer, vocab_size=256)
    model = LM(cfg)
    tokens = torch.randint(0, 256, (2, seq_len))
    # the math SDPA backend shows attention to the counter as two batched matmuls over the full square
    with sdpa_kernel(SDPBackend.MATH):
        counts = _counts(lambda: model(tokens))
    n_tok = tokens.numel()
    terms = flops.forward_flops_terms(cfg, seq_len, causal=False)
    matmul = sum(v for k, v in terms.items() if k in flops.MATMUL_TERMS) * n_tok
    assert _sum(counts, ["mm", "addmm"]) == pytest.approx(matmul, rel=0.01)
    attention = (terms["attn_scores"] + terms["attn_values"]) * n_tok   # non-causal: what the kernel computes
    assert _sum(counts, ["bmm"]) == pytest.approx(attention, rel=0.01)


@pytest.mark.parametrize("d_model, n_layer, seq_len", [(64, 2, 64), (96, 4, 80)])
def test_mamba_terms_match_flop_counter(d_model, n_layer, seq_len):
    cfg = ModelConfig(family="mamba", d_model=d_model, n_layer=n_layer, vocab_size=256, scan_impl="chunked")
    model = LM(cfg)
    tokens = torch.randint(0, 256, (2, seq_len))
    counts = _counts(lambda: model(tokens))
    # the scan's own internals are not matmul terms of the model: count one scan and remove it
    b, e, n = 2, cfg.d_inner, cfg.d_state
    scan = _counts(lambda: selective_scan(torch.randn(b, e, seq_len), torch.rand(b, e, seq_len),
                                          -torch.rand(e, n), torch.randn(b, n, seq_len),
                                          torch.randn(b, n, seq_len), impl="chunked"))
    mm_model = _sum(counts, ["mm", "addmm", "bmm"]) - n_layer * _sum(scan, ["mm", "addmm", "bmm"])
    n_tok = tokens.numel()
    terms = flops.forward_flops_terms(cfg, seq_len)
    matmul = sum(v for k, v in terms.items() if k in flops.MATMUL_TERMS) * n_tok
    assert mm_model == pytest.approx(matmul, rel=0.01)
    # the depthwise conv is d_conv shifted multiply-adds (elementwise): the counter does not see it
    assert _sum(counts, ["convolution"]) == 0 and terms["conv"] == n_layer * 2 * cfg.d_inner * cfg.d_conv


def test_transformer_terms_follow_chinchilla_appendix_f():
    # Chinchilla App. F per sequence of s tokens (h heads of size k, d = h k), non-causal
    cfg = ModelConfig(family="transformer", d_model=256, n_layer=4, vocab_size=512, head_dim=64)
    s, d, h, V, ffw = 512, 256, 4, 512, cfg.ffn_dim
    t = {k: v * s for k, v in flops.forward_flops_terms(cfg, s, causal=False).items()}
    L = cfg.n_layer
    assert t["attn_qkv"] == L * 6 * s * d * d
    assert t["attn_scores"] == L * 2 * s * s * d
    assert t["attn_softmax"] == L * 3 * h * s * s
    assert t["attn_values"] == L * 2 * s * s * d
    assert t["attn_out"] == L * 2 * s * d * d
    assert t["mlp"] == L * 2 * s * 3 * d * ffw          # SwiGLU: three matrices
    assert t["lm_head"] == 2 * s * d * V
    # causal counting charges (s + 1) / 2 keys per query
    causal = flops.forward_flops_terms(cfg, s, causal=True)
    assert causal["attn_scores"] * s == pytest.approx(t["attn_scores"] * (s + 1) / (2 * s))


def test_training_is_three_forwards_and_ratio_to_6n_is_reported():
    cfg = ModelConfig(family="mamba", d_model=128, n_layer=4)
    fwd = flops.forward_flops_per_token(cfg, 256)
    assert flops.train_flops_per_token(cfg, 256) == 3 * fwd
    s = flops.flops_summary(cfg, 256)
    assert s["ratio_to_6n"] == pytest.approx(3 * fwd / (6 * s["params"]))
    # small models: LM head and attention make the exact count exceed 6N (Porian et al.)
    tf = flops.flops_summary(ModelConfig(family="transformer", d_model=64, n_layer=2), 1024)
    assert tf["ratio_to_6n"] > 1.2


def test_mamba_scan_term_is_nine_bldn():
    cfg = ModelConfig(family="mamba", d_model=64, n_layer=3)
    assert flops.forward_flops_terms(cfg, 100)["scan"] == 3 * 9 * cfg.d_inner * cfg.d_state


@pytest.mark.parametrize("family, kw, seq_len", [
    ("mamba2", {}, 64), ("mamba2", {"mamba2_ngroups": 2, "mamba2_chunk_size": 8}, 37), ("mamba2", {}, 1),
    ("hybrid", {}, 50), ("hybrid", {"hybrid_ssm": "mamba"}, 40),
])
def test_new_families_terms_match_flop_counter_with_the_ssd_counted_as_computed(family, kw, seq_len):
    cfg = ModelConfig(family=family, d_model=46, n_layer=4, vocab_size=256, head_dim=16, **kw)
    chk = flops.counter_check(cfg, seq_len)
    assert chk["matmul_ratio"] == pytest.approx(1.0, rel=1e-9)
    if "mamba2" in cfg.layer_kinds:   # the SSD's batched matmuls, padded chunks and all, are terms
        assert chk["ssd_counted"] > 0 and chk["ssd_ratio"] == pytest.approx(1.0, rel=1e-9)
    if family == "hybrid":
        assert chk["attention_counted"] > 0 and chk["attention_ratio"] == pytest.approx(1.0, rel=1e-9)


def test_ssd_terms_follow_the_chunk_geometry():
    cfg = ModelConfig(family="mamba2", d_model=64, n_layer=1, mamba2_chunk_size=16)
    e, n, h = cfg.mamba2_d_inner, cfg.mamba2_d_state, cfg.mamba2_nheads
    t = flops.ssd_terms(cfg, 64)                        # 4 whole chunks of 16
    assert t["ssd_intra"] == 2 * 16 * e and t["ssd_scores"] == 2 * 16 * n and t["ssd_states"] == 2 * n * e
    assert t["ssd_elementwise"] == 3 * 16 * h + 2 * n * e / 16
    padded = flops.ssd_terms(cfg, 40)                   # 3 chunks of 16 for 40 tokens: 48 / 40 of the cost
    assert padded["ssd_intra"] == pytest.approx(2 * 16 * e * 48 / 40)
    short = flops.ssd_terms(cfg, 5)                     # one chunk of 5, no padding
    assert short["ssd_intra"] == 2 * 5 * e


def test_decoding_a_token_attends_the_whole_context_and_runs_the_ssd_on_one_token():
    hy = ModelConfig(family="hybrid", d_model=64, n_layer=4, head_dim=16)
    dec = flops.forward_flops_terms(hy, 1000, decode=True)
    full = flops.forward_flops_terms(hy, 1000, causal=False)
    assert dec["attn_scores"] == full["attn_scores"] == 2 * hy.attn_dim * 1000 * len(hy.attn_layers)
    one = flops.ssd_terms(hy, 1)
    assert dec["ssd_intra"] == one["ssd_intra"] * (hy.n_layer - len(hy.attn_layers))
    assert flops.forward_flops_terms(hy, 1, decode=True) == flops.forward_flops_terms(hy, 1)
