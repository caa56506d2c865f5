"""THE place parameter counts and FLOPs are computed: analytic, per token, term by term, per family.

Conventions (state them wherever a FLOP number is shown):
- one multiply-add = 2 FLOPs; a token's forward cost is the sum of the terms below;
- training = 3 x forward (backward = 2 x forward, Kaplan 2020 / Chinchilla App. F);
- attention scores (QK^T) and the weighted sum (AV) are counted CAUSALLY: query t attends to t + 1
  keys, so a sequence of length L costs on average (L + 1) / 2 keys per query (Chinchilla counts
  the full L; `causal=False` gives their convention). Softmax: 3 FLOPs per score (Chinchilla);
- the LM head counts the padded vocabulary (it is computed); the embedding lookup costs 0 FLOPs
  (a gather, unlike Chinchilla's one-hot matmul 2Vd);
- Mamba: the depthwise conv costs 2 * E d * d_conv; the scan core 9 * E d * N per token (the Mamba
  authors' estimate: discretise, recurrence, read-out); the D skip and z gate are elementwise;
- RMSNorm, RoPE, SiLU and residual adds are elementwise and not counted (each < 1% here).
"Parameters" N is the non-embedding count (the tied LM head shares the embedding).
"""

from __future__ import annotations

from .models.config import ModelConfig


# ----------------------------------------------------------------------------------- parameters
def param_counts(cfg: ModelConfig) -> dict:
    """Exact parameter counts of `models.LM(cfg)`: {'non_embedding', 'embedding', 'total', 'per_layer'}."""
    d = cfg.d_model
    if cfg.family == "transformer":
        per_layer = 3 * d * d + d * d + 3 * d * cfg.ffn_dim + 2 * d
    else:
        e, n, r, k = cfg.d_inner, cfg.d_state, cfg.dt_rank_, cfg.d_conv
        per_layer = (d * 2 * e            # in_proj
                     + e * k + e          # depthwise conv weight + bias
                     + e * (r + 2 * n)    # x_proj
                     + r * e + e          # dt_proj weight + bias
                     + e * n + e          # A_log, D
                     + e * d              # out_proj
                     + d)                 # RMSNorm
    non_emb = cfg.n_layer * per_layer + d  # + final RMSNorm
    emb = cfg.padded_vocab * d
    return {"non_embedding": non_emb, "embedding": emb, "total": non_emb + emb, "per_layer": per_layer}


# ---------------------------------------------------------------------------------------- FLOPs
def forward_flops_terms(cfg: ModelConfig, seq_len: int, causal: bool = True) -> dict[str, float]:
    """Forward FLOPs per token, by term, for a sequence of `seq_len` tokens (whole model)."""
    d, n_layer = cfg.d_model, cfg.n_layer
    terms: dict[str, float] = {}
    if cfg.family == "transformer":
        ctx = (seq_len + 1) / 2 if causal else seq_len     # keys attended per query, on average
        terms["attn_qkv"] = n_layer * 2 * d * 3 * d
        terms["attn_scores"] = n_layer * 2 * d * ctx
        terms["attn_softmax"] = n_layer * 3 * cfg.n_head * ctx
        terms["attn_values"] = n_layer * 2 * d * ctx
        terms["attn_out"] = n_layer * 2 * d * d
        terms["mlp"] = n_layer * 2 * 3 * d * cfg.ffn_dim
    else:
        e, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank_
        terms["in_proj"] = n_layer * 2 * d * 2 * e
        terms["conv"] = n_layer * 2 * e * cfg.d_conv
        terms["x_proj"] = n_layer * 2 * e * (r + 2 * n)
        terms["dt_proj"] = n_layer * 2 * r * e
        terms["scan"] = n_layer * 9 * e * n
        terms["out_proj"] = n_layer * 2 * e * d
    terms["lm_head"] = 2 * d * cfg.padded_vocab
    return terms


MATMUL_TERMS = {"attn_qkv", "attn_out", "mlp", "in_proj", "x_proj", "dt_proj", "out_proj", "lm_head"}


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    return float(sum(forward_flops_terms(cfg, seq_len, causal).values()))


def train_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token: forward + backward = 3 x forward."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, causal)


def six_n(cfg: ModelConfig) -> float:
    """Kaplan's approximation of training FLOPs per token: 6 x non-embedding parameters."""
    return 6.0 * param_counts(cfg)["non_embedding"]


def flops_summary(cfg: ModelConfig, seq_len: int) -> dict:
    """Everything a result row needs about a model's size and cost."""
    p = param_counts(cfg)
    train = train_flops_per_token(cfg, seq_len)
    return {"params": p["non_embedding"], "params_total": p["total"],
            "train_flops_per_token": train, "ratio_to_6n": train / six_n(cfg),
            "flops_convention": "exact-causal-3x"}


# Reference description used in reports and result rows.
CONVENTION = ("training FLOPs = 3 x forward; forward counted term by term per token (flops.py): matmuls "
              "incl. LM head over the padded vocab, causal attention (mean (L+1)/2 keys per query), "
              "softmax 3/score, Mamba conv 2*Ed*k and scan 9*Ed*N; embedding lookup and norms not counted")


def counter_check(cfg: ModelConfig, seq_len: int, batch: int = 2) -> dict:
    """Compare the matmul terms with torch's FlopCounterMode on a real forward of `cfg`.

    The counter sees linear layers and the LM head as mm; with the math SDPA backend it sees the
    attention core as two bmm over the full L x L square (so it is compared with causal=False);
    the selective scan's own internals are measured separately and removed."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from .models import LM
    from .ops import selective_scan

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}

    model = LM(cfg.replace(scan_impl="chunked"))
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        counts = count(lambda: model(tokens))
        scan_mm = 0
        if cfg.family == "mamba":
            e, n = cfg.d_inner, cfg.d_state
            one = count(lambda: selective_scan(torch.randn(batch, e, seq_len), torch.rand(batch, e, seq_len),
                                               -torch.rand(e, n), torch.randn(batch, n, seq_len),
                                               torch.randn(batch, n, seq_len), impl="chunked"))
            scan_mm = cfg.n_layer * sum(one.get(k, 0) for k in ("mm", "bmm"))
    n_tok = batch * seq_len
    terms = forward_flops_terms(cfg, seq_len, causal=False)
    analytic = sum(v for k, v in terms.items() if k in MATMUL_TERMS) * n_tok
    counted = counts.get("mm", 0) + counts.get("addmm", 0)
    if cfg.family == "mamba":
        counted += counts.get("bmm", 0) - scan_mm
    out = {"matmul_analytic": analytic, "matmul_counted": counted, "matmul_ratio": counted / analytic}
    if cfg.family == "transformer":
        attn = (terms["attn_scores"] + terms["attn_values"]) * n_tok
        out.update(attention_analytic=attn, attention_counted=counts.get("bmm", 0),
                   attention_ratio=counts.get("bmm", 0) / attn)
    return out
