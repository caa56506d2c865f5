"""Transformer++ layer: pre-norm causal attention with rotary embeddings, then a pre-norm SwiGLU MLP
(models/block.py is the block; here are its mixer, its MLP and the layer kind that joins them).

No biases anywhere, RMSNorm, attention through scaled_dot_product_attention. For generation the
attention keeps a preallocated KV cache (batch, heads, max_len, head_dim) filled in place.
The attention width is heads x head_dim (cfg.attn_dim): d_model in the transformer itself.
Linears are initialised N(0, init_std) (GPT-2; the LM rescales the residual outputs by depth).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import decode
from .block import LayerSpec
from .config import ModelConfig


def rotary_tables(seq_len: int, head_dim: int, base: float, device, offset: int = 0):
    """cos and sin of shape (seq_len, head_dim // 2) for positions offset .. offset + seq_len - 1."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) by the position angle (GPT-NeoX/Llama half layout).
    The definition; the model runs `rotate_qk`, which tests/test_models.py compares with it."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


_ROTARY_CACHE: dict = {}     # (head_dim, base, device) -> (cos, signed sin), (n, head_dim), positions 0 .. n-1


def _full_tables(n: int, head_dim: int, base: float, device):
    """cos and sin over the whole head for positions 0 .. >= n - 1, computed once and grown by doubling:
    cos = [cos, cos], sin = [-sin, sin], so that rotating x is x * cos + swap_halves(x) * sin."""
    key = (head_dim, float(base), str(device))
    have = _ROTARY_CACHE.get(key)
    if have is None or have[0].shape[0] < n:
        size = max(n, 2 * have[0].shape[0]) if have is not None else n
        with torch.inference_mode(False), torch.no_grad():   # usable by autograd whatever the caller's mode
            cos, sin = rotary_tables(size, head_dim, base, device)
            have = (torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1))
        _ROTARY_CACHE[key] = have
    return have


def rotate_qk(qk, offset: int, base: float):
    """apply_rotary on q and k at once (qk: (2, batch, heads, L, head_dim)) at positions offset ..
    offset + L - 1, with cached tables and two fused passes instead of six (~2x faster fwd+bwd)."""
    length, head_dim = qk.shape[-2], qk.shape[-1]
    cos, sin = (t[offset:offset + length] for t in _full_tables(offset + length, head_dim, base, qk.device))
    x = qk.float()
    half = head_dim // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos, swapped, sin).to(qk.dtype)


class KVCache:
    """Preallocated keys and values for one attention layer; `pos` tokens are filled."""

    def __init__(self, batch, n_head, max_len, head_dim, dtype, device):
        self.k = torch.zeros(batch, n_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = 0

    def pointers(self) -> tuple:
        """Where the cache's tensors lie (a decoding chain bound to them checks they have not moved)."""
        return self.k.data_ptr(), self.v.data_ptr()

    def append(self, k, v):
        n = k.shape[2]
        if self.pos + n > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.pos} + {n} > max_len {self.k.shape[2]}")
        self.k[:, :, self.pos:self.pos + n] = k
        self.v[:, :, self.pos:self.pos + n] = v
        self.pos += n
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]


class CausalSelfAttention(nn.Module):
    """A mixer (models/block.py): n_head heads of head_dim, RoPE, SDPA; a KV cache for generation."""

    def __init__(self, d_model: int, n_head: int, head_dim: int, rope_base: float = 10000.0,
                 init_std: float = 0.02):
        super().__init__()
        self.n_head, self.head_dim, self.rope_base, self.init_std = n_head, head_dim, rope_base, init_std
        self.qkv = nn.Linear(d_model, 3 * n_head * head_dim, bias=False)
        self.out_proj = nn.Linear(n_head * head_dim, d_model, bias=False)

    def forward(self, x, cache: KVCache | None = None):
        b, L, _ = x.shape
        qkv = self.qkv(x).view(b, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        offset = cache.pos if cache is not None else 0
        qk, v = qkv.split([2, 1])       # (split's backward is one cat; slicing would zero-fill twice)
        q, k = rotate_qk(qk, offset, self.rope_base)
        v = v[0]
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

    def decode_call(self, cache, norm, norm_mlp=None, mlp=None, weights="fp32"):
        """A decoded token through this attention's block (x + attn(norm(x)), then + mlp(norm_mlp(.)) where the
        layer has the SwiGLU branch) as one C call bound to `cache` (ops/decode.py; models/lm.py chains them), or
        None. RoPE reads the model's own tables; weights="bf16" reads bf16 copies of the projections."""
        if not isinstance(cache, KVCache) or (mlp is not None and not isinstance(mlp, SwiGLU)):
            return None
        cos, sin = _full_tables(cache.k.shape[2], self.head_dim, self.rope_base, cache.k.device)
        return decode.attention_call(self, cache, norm, cos, sin, norm_mlp, mlp, weights)

    def residual_out_projections(self):
        return [self.out_proj.weight]

    @torch.no_grad()
    def reset_parameters(self):
        for lin in (self.qkv, self.out_proj):
            nn.init.normal_(lin.weight, std=self.init_std)


class SwiGLU(nn.Module):
    """Transformer++'s MLP branch: w_down(silu(w_gate x) * w_up x), d_ff hidden units, no biases."""

    def __init__(self, d_model: int, d_ff: int, init_std: float = 0.02):
        super().__init__()
        self.init_std = init_std
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))

    def residual_out_projections(self):
        return [self.w_down.weight]

    @torch.no_grad()
    def reset_parameters(self):
        for lin in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(lin.weight, std=self.init_std)


def attention_options(cfg: ModelConfig) -> dict:
    """The attention mixer's options for a model (the transformer's layers and the hybrid's attention)."""
    return {"n_head": cfg.n_head, "head_dim": cfg.head_dim, "rope_base": cfg.rope_base, "init_std": cfg.init_std}


def transformer_layer(cfg: ModelConfig) -> LayerSpec:
    """x + attn(norm_attn(x)), then + mlp(norm_mlp(x)): two residual branches per layer."""
    return LayerSpec(CausalSelfAttention, attention_options(cfg), mlp=True, names=("norm_attn", "attn"))
