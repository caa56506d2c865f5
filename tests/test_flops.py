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
