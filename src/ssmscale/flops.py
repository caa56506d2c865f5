"""THE place parameter counts and FLOPs are computed: analytic, per token, term by term, per layer kind.

Conventions (state them wherever a FLOP number is shown):
- one multiply-add = 2 FLOPs; a token's forward cost is the sum of the terms below over the layers
  (a model is a stack of layer kinds, ModelConfig.layer_kinds);
- training = 3 x forward (backward = 2 x forward, Kaplan 2020 / Chinchilla App. F);
- attention scores (QK^T) and the weighted sum (AV) are counted CAUSALLY: query t attends to t + 1
  keys, so a sequence of length L costs on average (L + 1) / 2 keys per query (Chinchilla counts
  the full L; `causal=False` gives their convention). Softmax: 3 FLOPs per score (Chinchilla);
- the LM head counts the padded vocabulary (it is computed); the embedding lookup costs 0 FLOPs
  (a gather, unlike Chinchilla's one-hot matmul 2Vd);
- Mamba: the depthwise conv costs 2 * E d * d_conv; the scan core 9 * E d * N per token (the Mamba
  authors' estimate: discretise, recurrence, read-out); the D skip and z gate are elementwise;
- Mamba-2: in_proj, conv (2 x channels x d_conv) and out_proj as above; the SSD counted as the chunked
  form (ops/ssd_chunked.py) computes it, chunks of T = min(chunk_size, L) with the last one padded
  (a factor L_padded / L): the scores C B^T (2 T G N per token), the masked product with X (2 T e:
  the whole T x T block is computed, not its causal half), the chunk states and the state read-out
  (2 N e each), and elementwise the decay matrix (3 per score per head: difference, exp, product)
  and the chunk recurrence (2 N e / T). Decoding one token runs the SSD at L = 1;
- RMSNorm (gated or not), RoPE, SiLU, softplus and residual adds are elementwise and not counted;
- a plugin family's mixer (models/plugin.py) is MEASURED, not written down: FlopCounterMode on real
  forwards at several lengths, fitted per token as a + b L, plus the FLOPs the mixer declares with
  `extra_flops_per_token(L)` (flops_measure.py, which follows the conventions above: attention causal,
  softmax 3/score); its MLP branch and the LM head are counted as above. The built-in families keep
  these analytic counts; the measured path reproduces them (tests/test_byo.py).
"Parameters" N is the non-embedding count (the tied LM head shares the embedding); a plugin mixer's
parameters are counted on the built module.
"""

from __future__ import annotations

from collections import Counter

from .models.config import ModelConfig


# ----------------------------------------------------------------------------------- parameters
def _mlp_params(cfg: ModelConfig) -> int:
    return 3 * cfg.d_model * cfg.ffn_dim + cfg.d_model        # SwiGLU, its RMSNorm


def _layer_params(cfg: ModelConfig, kind: str) -> int:
    d = cfg.d_model
    if kind in ("transformer", "attention"):
        a = cfg.attn_dim
        attention = d * 3 * a + a * d + d                      # qkv, out, its RMSNorm
        return attention + (_mlp_params(cfg) if kind == "transformer" else 0)
    if kind == "plugin":
        from .flops_measure import plugin_params
        return plugin_params(cfg.mixer, d) + d + (_mlp_params(cfg) if cfg.mixer.mlp else 0)
    if kind == "mamba":
        e, n, r, k = cfg.d_inner, cfg.d_state, cfg.dt_rank_, cfg.d_conv
        return (d * 2 * e            # in_proj
                + e * k + e          # depthwise conv weight + bias
                + e * (r + 2 * n)    # x_proj
                + r * e + e          # dt_proj weight + bias
                + e * n + e          # A_log, D
                + e * d              # out_proj
                + d)                 # RMSNorm
    if kind == "mamba2":
        e, h, k = cfg.mamba2_d_inner, cfg.mamba2_nheads, cfg.d_conv
        conv = e + 2 * cfg.mamba2_ngroups * cfg.mamba2_d_state        # channels through the conv
        return (d * (e + conv + h)   # in_proj to z, x B C, dt
                + conv * k + conv    # depthwise conv weight + bias
                + 3 * h              # dt_bias, A_log, D
                + e                  # gated RMSNorm
                + e * d              # out_proj
                + d)                 # RMSNorm
    raise ValueError(f"layer kind: unknown {kind!r}")


def param_counts(cfg: ModelConfig) -> dict:
    """Exact parameter counts of `models.LM(cfg)`: {'non_embedding', 'embedding', 'total', 'per_layer',
    'per_kind'} (per_layer: the mean over layers, exact when all layers are of one kind)."""
    kinds = Counter(cfg.layer_kinds)
    per_kind = {k: _layer_params(cfg, k) for k in kinds}
    layers = sum(per_kind[k] * n for k, n in kinds.items())
    non_emb = layers + cfg.d_model      # + final RMSNorm
    emb = cfg.padded_vocab * cfg.d_model
    return {"non_embedding": non_emb, "embedding": emb, "total": non_emb + emb,
            "per_layer": layers // cfg.n_layer, "per_kind": per_kind}


# ---------------------------------------------------------------------------------------- FLOPs
def ssd_terms(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """One Mamba-2 layer's SSD, FLOPs per token of a length-`seq_len` sequence, as the chunked form computes it."""
    from .ops.ssd_chunked import chunk_geometry
    e, n, g, h = cfg.mamba2_d_inner, cfg.mamba2_d_state, cfg.mamba2_ngroups, cfg.mamba2_nheads
    T, chunks = chunk_geometry(seq_len, cfg.mamba2_chunk_size)
    pad = chunks * T / seq_len
    return {"ssd_scores": pad * 2 * T * g * n, "ssd_intra": pad * 2 * T * e,
            "ssd_states": pad * 2 * n * e, "ssd_out": pad * 2 * n * e,
            "ssd_elementwise": pad * (3 * T * h + 2 * n * e / T)}


def plugin_terms(cfg: ModelConfig, seq_len: int, decode: bool = False) -> dict[str, float]:
    """One plugin layer per token: the mixer's measured a + b L ("mixer_counted"; decoding one more token
    after seq_len costs the difference of totals, a + b (2 L + 1)), its declared extra ("mixer_declared"),
    and the SwiGLU branch ("mlp") when the family has one."""
    from .flops_measure import plugin_flops
    m = plugin_flops(cfg.mixer, cfg.d_model, seq_len)
    counted = m["a"] + m["b"] * (2 * seq_len + 1 if decode else seq_len)
    terms = {"mixer_counted": counted, "mixer_declared": m["declared"]}
    if cfg.mixer.mlp:
        terms["mlp"] = 2 * 3 * cfg.d_model * cfg.ffn_dim
    return terms


def _layer_terms(cfg: ModelConfig, kind: str, seq_len: int, causal: bool, decode: bool) -> dict[str, float]:
    d = cfg.d_model
    if kind in ("transformer", "attention"):
        a = cfg.attn_dim
        ctx = seq_len if decode or not causal else (seq_len + 1) / 2   # keys attended per query, on average
        terms = {"attn_qkv": 2 * d * 3 * a, "attn_scores": 2 * a * ctx, "attn_softmax": 3 * cfg.n_head * ctx,
                 "attn_values": 2 * a * ctx, "attn_out": 2 * a * d}
        if kind == "transformer":
            terms["mlp"] = 2 * 3 * d * cfg.ffn_dim
        return terms
    if kind == "mamba":
        e, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank_
        return {"in_proj": 2 * d * 2 * e, "conv": 2 * e * cfg.d_conv, "x_proj": 2 * e * (r + 2 * n),
                "dt_proj": 2 * r * e, "scan": 9 * e * n, "out_proj": 2 * e * d}
    if kind == "mamba2":
        e, h = cfg.mamba2_d_inner, cfg.mamba2_nheads
        conv = e + 2 * cfg.mamba2_ngroups * cfg.mamba2_d_state
        return {"in_proj": 2 * d * (e + conv + h), "conv": 2 * conv * cfg.d_conv,
                **ssd_terms(cfg, 1 if decode else seq_len), "out_proj": 2 * e * d}
    if kind == "plugin":
        return plugin_terms(cfg, seq_len, decode)
    raise ValueError(f"layer kind: unknown {kind!r}")


def forward_flops_terms(cfg: ModelConfig, seq_len: int, causal: bool = True,
                        decode: bool = False) -> dict[str, float]:
    """Forward FLOPs per token, by term, for a sequence of `seq_len` tokens (whole model).

    decode: the cost of one more token after a context of `seq_len` (attention over all seq_len
    keys, the SSD on that one token)."""
    terms: dict[str, float] = {}
    for kind, count in Counter(cfg.layer_kinds).items():
        for name, value in _layer_terms(cfg, kind, seq_len, causal, decode).items():
            terms[name] = terms.get(name, 0.0) + count * value
    terms["lm_head"] = 2 * cfg.d_model * cfg.padded_vocab
    return terms


# elementwise terms: what a FLOP counter cannot see in a built-in layer, so what its mixer would declare as a
# plugin's extra_flops_per_token (the measured path adds them to the counted matmuls: tests/test_byo.py)
UNCOUNTED_TERMS = {"conv", "scan", "ssd_elementwise"}
MATMUL_TERMS = {"attn_qkv", "attn_out", "mlp", "in_proj", "x_proj", "dt_proj", "out_proj", "lm_head"}
ATTENTION_MATMUL_TERMS = {"attn_scores", "attn_values"}
SSD_MATMUL_TERMS = {"ssd_scores", "ssd_intra", "ssd_states", "ssd_out"}


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True, decode: bool = False) -> float:
    return float(sum(forward_flops_terms(cfg, seq_len, causal, decode).values()))


def train_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token: forward + backward = 3 x forward."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, causal)


def six_n(cfg: ModelConfig) -> float:
    """Kaplan's approximation of training FLOPs per token: 6 x non-embedding parameters."""
    return 6.0 * param_counts(cfg)["non_embedding"]


def flops_summary(cfg: ModelConfig, seq_len: int) -> dict:
    """Everything a result row needs about a model's size and cost (a plugin's: "measured-causal-3x",
    with the measurement in "measured")."""
    p = param_counts(cfg)
    train = train_flops_per_token(cfg, seq_len)
    out = {"params": p["non_embedding"], "params_total": p["total"],
           "train_flops_per_token": train, "ratio_to_6n": train / six_n(cfg),
           "flops_convention": "measured-causal-3x" if cfg.is_plugin else "exact-causal-3x"}
    if cfg.is_plugin:
        from .flops_measure import plugin_flops
        out["measured"] = plugin_flops(cfg.mixer, cfg.d_model, seq_len)
    return out


# Reference description used in reports and result rows.
CONVENTION = ("training FLOPs = 3 x forward; forward counted term by term per token (flops.py): matmuls "
              "incl. LM head over the padded vocab, causal attention (mean (L+1)/2 keys per query), "
              "softmax 3/score, Mamba conv 2*Ed*k and scan 9*Ed*N, Mamba-2's SSD as its chunked form "
              "computes it; embedding lookup and norms not counted")


def counter_check(cfg: ModelConfig, seq_len: int, batch: int = 2) -> dict:
    """Compare the matmul terms with torch's FlopCounterMode on a real forward of `cfg`.

    The counter sees linear layers and the LM head as mm; with the math SDPA backend it sees the
    attention core as two bmm over the full L x L square (so it is compared with causal=False); the
    selective scan's own internals are not model terms and are measured separately and removed; the
    SSD's matmuls are terms: one SSD call is counted alone and compared with them (`ssd_ratio`)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from .models import LM
    from .ops import selective_scan, ssd

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        counts = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
        return sum(counts.get(k, 0) for k in ("mm", "addmm")), counts.get("bmm", 0)

    kinds = Counter(cfg.layer_kinds)
    model = LM(cfg.replace(scan_impl="chunked", ssd_impl="chunked"))
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    r = lambda *shape: torch.randn(*shape)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        mm, bmm = count(lambda: model(tokens))
        scan_mm = ssd_mm = 0
        if kinds["mamba"]:
            e, n = cfg.d_inner, cfg.d_state
            one = count(lambda: selective_scan(r(batch, e, seq_len), torch.rand(batch, e, seq_len), -torch.rand(e, n),
                                               r(batch, n, seq_len), r(batch, n, seq_len), impl="chunked"))
            scan_mm = kinds["mamba"] * sum(one)
        if kinds["mamba2"]:
            h, p, g, n = cfg.mamba2_nheads, cfg.mamba2_head_dim, cfg.mamba2_ngroups, cfg.mamba2_d_state
            one = count(lambda: ssd(r(batch, seq_len, h, p), torch.rand(batch, seq_len, h), -torch.rand(h),
                                    r(batch, seq_len, g, n), r(batch, seq_len, g, n),
                                    chunk_size=cfg.mamba2_chunk_size, impl="chunked"))
            ssd_mm = kinds["mamba2"] * sum(one)
    n_tok = batch * seq_len
    terms = forward_flops_terms(cfg, seq_len, causal=False)
    total = lambda names: sum(v for k, v in terms.items() if k in names) * n_tok
    leftover_bmm = bmm - scan_mm - ssd_mm
    has_attention = kinds["transformer"] + kinds["attention"] > 0
    counted = mm + (0 if has_attention else leftover_bmm)
    out = {"matmul_analytic": total(MATMUL_TERMS), "matmul_counted": counted,
           "matmul_ratio": counted / total(MATMUL_TERMS)}
    if has_attention:
        attn = total(ATTENTION_MATMUL_TERMS)
        out.update(attention_analytic=attn, attention_counted=leftover_bmm, attention_ratio=leftover_bmm / attn)
    if kinds["mamba2"]:
        analytic = total(SSD_MATMUL_TERMS)
        out.update(ssd_analytic=analytic, ssd_counted=ssd_mm, ssd_ratio=ssd_mm / analytic)
    return out
