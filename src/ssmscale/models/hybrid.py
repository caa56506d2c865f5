"""The hybrid family's attention layer, and how the hybrid stacks its layers.

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

import torch.nn as nn

from .config import ModelConfig
from .norm import RMSNorm
from .transformer import CausalSelfAttention


class AttentionBlock(nn.Module):
    """x + attn(norm(x)): the hybrid's attention layer, one residual branch."""

    residual_branches = 1
    chunked_prefill = True       # a piece of several tokens may follow the prompt in the cache

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)

    def forward(self, x, cache=None):
        return x + self.attn(self.norm(x), cache)

    def allocate_cache(self, batch, max_len, dtype, device):
        return self.attn.allocate_cache(batch, max_len, dtype, device)

    def residual_out_projections(self):
        return [self.attn.out_proj.weight]

    def reset_parameters(self, cfg: ModelConfig):
        for lin in (self.attn.qkv, self.attn.out_proj):
            nn.init.normal_(lin.weight, std=cfg.init_std)
