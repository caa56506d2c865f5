"""`ssmscale sizes`: the shapes a ladder would train for target sizes (sizing.py's rule, every family matched
to the transformer in parameters), with their parameter counts and training FLOPs per token (flops.py),
and with `verify` each model's matmul FLOPs counted by torch's FlopCounterMode against the analytic count.
"""

from __future__ import annotations

import os

from ..errors import UserError


def print_sizes(targets: list[float], families: list[str], *, seq_len: int, head_dim: int, vocab: int,
                verify: bool = False, mixers: dict | None = None) -> None:
    """`mixers`: {plugin family: MixerSpec} (sizing them builds their mixers: imports them)."""
    from .. import flops
    from ..models import ModelConfig
    from ..models.sizing import ladder_shapes, shape_for
    mixers = mixers or {}
    base = ModelConfig(family="transformer", d_model=head_dim, n_layer=1, head_dim=head_dim, vocab_size=vocab)
    try:
        shapes = ladder_shapes(targets, families, base, mixers)
    except ValueError as exc:
        raise UserError(f"params: {exc}") from None
    if verify:
        _check_fits_in_memory(max(s.params_total for s in shapes), "--verify")
    print(f"sizing.py: transformer n_layer from aspect ratio 64 (>= 2 layers), width a multiple of head_dim "
          f"{head_dim}; the other families 2x layers, width matched in parameters (plugins: 1x layers with their "
          f"MLP branch, within 2%). FLOPs at L={seq_len}: {flops.CONVENTION}; plugins' measured")
    head = f"{'target':>9} {'family':<11} {'d_model':>7} {'n_layer':>7} {'params':>12} {'total':>12} " \
           f"{'/ tf':>6} {'train FLOPs/tok':>15} {'/6N':>6}"
    print(head + ("  FlopCounterMode/analytic: matmul (attention) [SSD]" if verify else ""))
    anchor = {t: shape_for("transformer", t, base).params for t in targets}   # "/ tf": matched to this
    for i, s in enumerate(shapes):
        target = targets[i // len(families)]
        cfg = base.replace(family=s.family, d_model=s.d_model, n_layer=s.n_layer, mixer=mixers.get(s.family),
                           d_ff=s.d_ff)
        summ = flops.flops_summary(cfg, seq_len)
        line = (f"{target:>9.3g} {s.family:<11} {s.d_model:>7} {s.n_layer:>7} {s.params:>12,} "
                f"{s.params_total:>12,} {s.params / anchor[target]:>6.3f} {summ['train_flops_per_token']:>15,.0f} "
                f"{summ['ratio_to_6n']:>6.3f}")
        if verify and not cfg.is_plugin:      # a plugin's FLOPs are the counter's already
            chk = flops.counter_check(cfg, seq_len)
            line += f"  {chk['matmul_ratio']:.4f}"
            if "attention_ratio" in chk:
                line += f" ({chk['attention_ratio']:.4f})"
            if "ssd_ratio" in chk:
                line += f" [{chk['ssd_ratio']:.4f}]"
        print(line)


def _check_fits_in_memory(n_params: int, flag: str) -> None:
    """Refuse to build a model whose fp32 weights alone would take more than half of this machine's memory."""
    need = 4 * n_params
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have / 2:
        raise UserError(f"{flag}: builds each model; {n_params:.3g} parameters need {need / 2**30:,.0f} GiB of "
                        f"weights, more than half of this machine's {have / 2**30:,.0f} GiB")
