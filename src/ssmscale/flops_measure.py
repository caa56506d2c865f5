"""FLOPs and parameters of a plugin mixer, measured (flops.py owns this module and is its only caller).

A plugin's FLOPs cannot be written down in advance, so they are counted: a forward of the mixer alone, on
the CPU in fp32 at batch 1, under torch's FlopCounterMode, at sequence lengths L/2, L and 2L around the
run's L (a chunked mixer pads to whole chunks: lengths that are multiples of each other keep that padding
alike). The counts per token are fitted as a + b L by least squares (a: the per-token work, b L: the work
that grows with the context, as attention's does) and the fit at L is the count; the fit's largest
relative residual is kept, so a count that is not of that form says so. To the fit the mixer's own `extra_flops_per_token(L)`
is added where it defines one: the elementwise work (scans, gates, decays) FlopCounterMode does not see.

What the counter sees: torch ops only (a kernel of one's own, in C, Triton or CUDA, is invisible to it: declare
its FLOPs in extra_flops_per_token); among them matmuls (mm, addmm, bmm, baddbmm), convolutions, and attention through
scaled_dot_product_attention, which is given flops.py's convention here (torch's own formula counts
the full L x L square and nothing for the CPU kernel): QK^T and AV over the keys each query sees, the
causal half (L + 1) / 2 on average when is_causal, and softmax 3 FLOPs per score. With that, the
transformer's and Mamba's mixers measured this way reproduce flops.py's analytic counts
(tests/test_byo.py): the measured path is trusted where the answer is known.

Parameters: the mixer built once at each width (memoised, on the meta device where it can be), counted.
Building and measuring run under a forked RNG, so they never change what a later `torch.manual_seed`
model initialisation draws.
"""

from __future__ import annotations

import math

MEASURE_FACTORS = (0.5, 1, 2)          # measure at L / 2, L and 2 L
_PARAMS: dict = {}
_MEASURED: dict = {}


def _attention_flops(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    """flops.py's attention convention for an SDPA kernel, from shapes (batch, heads, L, head_dim)."""
    b, h, lq, e = query
    lk, ev = key[-2], value[-1]
    if is_causal:        # query i sees keys 0..i (+ lk - lq when the queries are the last of the keys)
        keys = sum(min(lk, lk - lq + i + 1) for i in range(lq))
    else:
        keys = lq * lk
    return b * h * keys * (2 * e + 2 * ev + 3)


def _efficient_attention_flops(query, key, value, attn_bias=None, compute_log_sumexp=False, dropout_p=0.0,
                               is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query, key, value, dropout_p, is_causal)


def _sdpa_mapping() -> dict:
    import torch
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
            aten._scaled_dot_product_flash_attention: _attention_flops,
            aten._scaled_dot_product_efficient_attention: _efficient_attention_flops}


def measure_lengths(seq_len: int) -> list[int]:
    return sorted({max(1, int(seq_len * f)) for f in MEASURE_FACTORS})


def count_forward(mixer, d_model: int, seq_len: int, batch: int = 1) -> float:
    """FLOPs per token FlopCounterMode sees in one forward of `mixer` on (batch, seq_len, d_model)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(batch, seq_len, d_model)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_sdpa_mapping()) as counter:
        mixer(x)
    return counter.get_total_flops() / (batch * seq_len)


def fit_per_token(lengths, per_token) -> tuple[float, float, float]:
    """(a, b, largest relative residual) of per-token counts against a + b L (b = 0 from one length)."""
    n = len(lengths)
    if n == 1:
        return float(per_token[0]), 0.0, 0.0
    mx, my = sum(lengths) / n, sum(per_token) / n
    sxx = sum((x - mx) ** 2 for x in lengths)
    b = sum((x - mx) * (y - my) for x, y in zip(lengths, per_token)) / sxx
    a = my - b * mx
    worst = max(abs(a + b * x - y) / y if y else abs(a + b * x) for x, y in zip(lengths, per_token))
    return a, b, worst


def measure_mixer(mixer, d_model: int, seq_len: int) -> dict:
    """A built mixer's forward FLOPs per token at `seq_len`: the counted a + b L fit plus its declared extra."""
    lengths = measure_lengths(seq_len)
    counted = [count_forward(mixer, d_model, L) for L in lengths]
    a, b, residual = fit_per_token(lengths, counted)
    extra = float(mixer.extra_flops_per_token(seq_len)) if hasattr(mixer, "extra_flops_per_token") else 0.0
    if not (math.isfinite(extra) and extra >= 0):
        raise ValueError(f"extra_flops_per_token({seq_len}) returned {extra!r}: expected a finite count >= 0")
    return {"a": a, "b": b, "counted": a + b * seq_len, "declared": extra, "lengths": lengths,
            "counted_per_length": counted, "max_rel_residual": residual}


def _built(spec, d_model: int):
    """The plugin's mixer at d_model, built on the CPU under a forked, fixed RNG."""
    import torch

    from .models.plugin import build_mixer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_mixer(spec, d_model).float().eval()


def plugin_flops(spec, d_model: int, seq_len: int) -> dict:
    """measure_mixer for a plugin family's mixer at (d_model, seq_len), memoised for the process."""
    key = (spec, d_model, seq_len)
    if key not in _MEASURED:
        import torch
        mixer = _built(spec, d_model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _MEASURED[key] = measure_mixer(mixer, d_model, seq_len)
    return _MEASURED[key]


def plugin_params(spec, d_model: int) -> int:
    """Parameters of a plugin family's mixer at d_model: built on the meta device (no memory, no time), or on
    the CPU where its constructor cannot run there (the count is the same); once per width."""
    key = (spec, d_model)
    if key not in _PARAMS:
        import torch

        from .errors import UserError
        from .models.plugin import build_mixer, load_mixer_class
        load_mixer_class(spec.target)        # imported outside the meta context: its module-level tensors are real
        try:
            with torch.device("meta"):
                mixer = build_mixer(spec, d_model)
        except UserError:
            mixer = _built(spec, d_model)
        _PARAMS[key] = sum(p.numel() for p in mixer.parameters())
    return _PARAMS[key]
