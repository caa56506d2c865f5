"""The hybrid family's attention layer kind, and how the hybrid stacks its layers.

A hybrid is one stack of SSM layers (Mamba-2 by default, `hybrid_ssm: mamba` for Mamba) with a few
Transformer++ attention layers among them: Dao & Gu 2024 (Sec. 9.2.3) find about 10% attention
layers best in a 48-layer Mamba-2, Waleffe et al. 2024 use 4 of 56 layers (~7%) at 8B.
ModelConfig.layer_kinds says which layer is which: by default about one in `hybrid_attn_every` = 8
(at least one, never the first layer, spread evenly), or the indices in `hybrid_attn_layers`.

An attention layer here is attention only, x + attn(norm(x)), with no MLP: the Mamba-2 paper's hybrids
replace SSM layers by attention layers, and neither SSM family has an MLP, so every layer of the stack
is one residual branch (out projections rescaled by 1/sqrt(n_layer), as in the SSM families). The
attention is the Transformer++ one (RoPE, SDPA, no biases, std-0.02 init) with round(d_model / head_dim)
heads. The generation cache is per layer: a KV cache for attention, conv + SSM state for the SSM layers.
Sizing treats the hybrid like the SSM families (twice the transformer's layers, the width that
matches its parameter count; models/sizing.py).
"""

from __future__ import annotations

from .block import LayerSpec
from .config import ModelConfig
from .transformer import CausalSelfAttention, attention_options


def attention_layer(cfg: ModelConfig) -> LayerSpec:
    """x + attn(norm(x)): the hybrid's attention layer, one residual branch."""
    return LayerSpec(CausalSelfAttention, attention_options(cfg), mlp=False, names=("norm", "attn"))
