"""Transformer++ block: pre-norm causal attention with rotary embeddings, then a pre-norm SwiGLU MLP.

No biases anywhere, RMSNorm, attention through scaled_dot_product_attention. For generation the
attention keeps a preallocated KV cache (batch, heads, max_len, head_dim) filled in place.
The attention width is heads x head_dim (cfg.attn_dim): d_model in the transformer itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .norm import RMSNorm


def rotary_tables(seq_len: int, head_dim: int, base: float, device, offset: int = 0):
    """cos and sin of shape (seq_len, head_dim // 2) for positions offset .. offset + seq_len - 1."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) by the position angle (GPT-NeoX/Llama half layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class KVCache:
    """Preallocated keys and values for one attention layer; `pos` tokens are filled."""

    def __init__(self, batch, n_head, max_len, head_dim, dtype, device):
        self.k = torch.zeros(batch, n_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = 0

    def append(self, k, v):
        n = k.shape[2]
        if self.pos + n > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.pos} + {n} > max_len {self.k.shape[2]}")
        self.k[:, :, self.pos:self.pos + n] = k
        self.v[:, :, self.pos:self.pos + n] = v
        self.pos += n
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim, self.rope_base = cfg.n_head, cfg.head_dim, cfg.rope_base
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.attn_dim, bias=False)
        self.out_proj = nn.Linear(cfg.attn_dim, cfg.d_model, bias=False)

    def forward(self, x, cache: KVCache | None = None):
        b, L, _ = x.shape
        q, k, v = self.qkv(x).view(b, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        offset = cache.pos if cache is not None else 0
        cos, sin = rotary_tables(L, self.head_dim, self.rope_base, x.device, offset)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = cache.append(k, v)
            if L == 1:
                y = F.scaled_dot_product_attention(q, k, v)
            else:  # query i (absolute offset + i) sees keys 0 .. offset + i
                mask = torch.ones(L, k.shape[2], dtype=torch.bool, device=x.device).tril(offset)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(b, L, self.n_head * self.head_dim))

    def allocate_cache(self, batch, max_len, dtype, device):
        return KVCache(batch, self.n_head, max_len, self.head_dim, dtype, device)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)): two residual branches per layer."""

    residual_branches = 2
    chunked_prefill = True       # a piece of several tokens may follow the prompt in the cache

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_attn = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm_mlp = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cache=None):
        x = x + self.attn(self.norm_attn(x), cache)
        return x + self.mlp(self.norm_mlp(x))

    def allocate_cache(self, batch, max_len, dtype, device):
        return self.attn.allocate_cache(batch, max_len, dtype, device)

    def residual_out_projections(self):
        return [self.attn.out_proj.weight, self.mlp.w_down.weight]

    def reset_parameters(self, cfg: ModelConfig):
        for lin in (self.attn.qkv, self.attn.out_proj, self.mlp.w_gate, self.mlp.w_up, self.mlp.w_down):
            nn.init.normal_(lin.weight, std=cfg.init_std)
