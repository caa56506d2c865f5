"""Mamba-2 block (Dao & Gu 2024, arXiv 2405.21060): one input projection, a short causal convolution over
x, B and C, the SSD layer (scalar decay per head), and a gated RMSNorm before the output projection.

    z, xBC, dt = in_proj(u)                      d -> 2 d_inner + 2 G N + H, no bias
    x, B, C = silu(causal depthwise conv1d(xBC))  over d_inner + 2 G N channels, kernel d_conv, with bias
    y = ssd(x, dt, A, B, C, D, dt_bias, softplus) H heads of head_dim, A = -exp(A_log) one scalar per head,
                                                  G groups of B and C shared by H / G heads, D per head
    out = out_proj(rmsnorm(y * silu(z)))         the norm per group of channels; d_inner -> d, no bias
One residual branch per layer (no MLP; models/block.py is the block, Mamba2Mixer its mixer). Initialisation as mamba_ssm's Mamba2: A ~ U[1, 16],
dt bias = inverse softplus of dt log-uniform in [dt_min, dt_max] (floored), D = 1, linears and the conv
at PyTorch's defaults; A_log, D and the dt bias get no weight decay (out_proj is rescaled by the LM).
Generation keeps a conv state (batch, conv channels, d_conv) and an SSM state (batch, H, head_dim, N):
O(1) per token; a piece of several tokens after the prompt continues both (chunked prefill).
Where the SSD runs the fused recurrent CPU kernel (fp32 on the CPU), everything between in_proj and
out_proj runs as one op, `ops.mamba2_inner_fused` (same numbers within fp32 rounding; it keeps less
for the backward); elsewhere (GPU, no C compiler, another `ssd_impl`, a piece continuing a cache) as
the composition below.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import decode, ssd
from ..ops.mamba2_inner import fused_supported, mamba2_inner_fused
from ..ops.ssd import resolve_ssd_impl
from ..ops.ssd_ref import heads_of_groups
from .block import LayerSpec
from .config import ModelConfig
from .mamba import causal_depthwise_conv
from .norm import GatedRMSNorm

A_INIT_RANGE = (1.0, 16.0)


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """Mamba's dt bias: softplus(bias) = dt, dt log-uniform in [dt_min, dt_max], floored at dt_init_floor."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba2Cache:
    """Recurrent state of one Mamba-2 layer: the last d_conv conv inputs and the SSM state (fp32)."""

    def __init__(self, batch, conv_dim, d_conv, heads, head_dim, d_state, dtype, device):
        self.conv = torch.zeros(batch, conv_dim, d_conv, dtype=dtype, device=device)
        self.ssm = torch.zeros(batch, heads, head_dim, d_state, dtype=torch.float32, device=device)
        self.pos = 0

    def pointers(self) -> tuple:
        """Where the cache's tensors lie (a decoding chain bound to them checks they have not moved)."""
        return self.conv.data_ptr(), self.ssm.data_ptr()


class Mamba2Mixer(nn.Module):
    """A mixer (models/block.py): `heads` heads of head_dim (d_inner = heads x head_dim), `ngroups` groups of
    B and C of d_state, the SSD in chunks of chunk_size."""

    def __init__(self, d_model: int, heads: int, head_dim: int = 8, d_state: int = 16, ngroups: int = 1,
                 d_conv: int = 4, chunk_size: int = 8, ssd_impl: str = "auto", dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, norm_eps: float = 1e-5):
        super().__init__()
        d = d_model
        self.heads, self.head_dim, self.d_inner = heads, head_dim, heads * head_dim
        self.groups, self.d_state, self.d_conv = ngroups, d_state, d_conv
        self.chunk_size, self.ssd_impl = chunk_size, ssd_impl
        self.dt_range, self.dt_init_floor = (dt_min, dt_max), dt_init_floor
        self.conv_dim = self.d_inner + 2 * self.groups * self.d_state
        self.in_proj = nn.Linear(d, self.d_inner + self.conv_dim + self.heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        self.norm = GatedRMSNorm(self.d_inner, self.groups, norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)
        for p in (self.A_log, self.D, self.dt_bias):
            p._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for module in (self.in_proj, self.out_proj, self.conv1d):
            module.reset_parameters()
        self.dt_bias.copy_(inverse_softplus_dt(self.heads, *self.dt_range, self.dt_init_floor))
        self.A_log.copy_(torch.log(torch.empty(self.heads).uniform_(*A_INIT_RANGE)))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def residual_out_projections(self):
        return [self.out_proj.weight]

    def _split(self, zxbcdt):
        return zxbcdt.split([self.d_inner, self.conv_dim, self.heads], dim=-1)

    def forward(self, u, cache: Mamba2Cache | None = None):
        if cache is not None and cache.pos > 0 and u.shape[1] == 1:
            return self.step(u, cache)
        b, L, _ = u.shape
        if (cache is None or cache.pos == 0) and self._runs_fused(u):
            out, last = mamba2_inner_fused(u, self.in_proj.weight, self.conv1d.weight, self.conv1d.bias, self.dt_bias,
                                           -torch.exp(self.A_log), self.D, self.norm.weight, self.out_proj.weight,
                                           heads=self.heads, groups=self.groups, d_state=self.d_state,
                                           eps=self.norm.eps, return_final_state=True)
            if cache is not None:      # the conv's last d_conv inputs (xBC of the last tokens) and the SSM state
                keep = min(L, self.d_conv)
                xBC = F.linear(u[:, L - keep:], self.in_proj.weight[self.d_inner:self.d_inner + self.conv_dim])
                cache.conv.zero_()
                cache.conv[..., self.d_conv - keep:] = xBC.transpose(1, 2)
                cache.ssm.copy_(last)
                cache.pos += L
            return out
        z, xBC, dt = self._split(self.in_proj(u))
        xBC = xBC.transpose(1, 2)                                          # (b, conv channels, L)
        w, bias = self.conv1d.weight, self.conv1d.bias
        if cache is None:
            xBC = causal_depthwise_conv(xBC, w, bias)
        else:   # continue from the cached inputs: the first d_conv - 1 outputs of the joined input are dropped
            joined = torch.cat([cache.conv[..., 1:], xBC], dim=-1)
            cache.conv.copy_(torch.cat([cache.conv, xBC], dim=-1)[..., -self.d_conv:])
            xBC = causal_depthwise_conv(joined, w, bias)[..., self.d_conv - 1:]
        x, B, C = F.silu(xBC).transpose(1, 2).split(
            [self.d_inner, self.groups * self.d_state, self.groups * self.d_state], dim=-1)
        out = ssd(x.unflatten(-1, (self.heads, self.head_dim)), dt, -torch.exp(self.A_log.float()),
                  B.unflatten(-1, (self.groups, self.d_state)), C.unflatten(-1, (self.groups, self.d_state)),
                  D=self.D.float(), dt_bias=self.dt_bias.float(), dt_softplus=True,
                  initial_state=None if cache is None else cache.ssm, return_final_state=cache is not None,
                  chunk_size=self.chunk_size, impl=self.ssd_impl)
        if cache is not None:
            y, last = out
            cache.ssm.copy_(last)
            cache.pos += L
        else:
            y = out
        return self.out_proj(self.norm(y.flatten(-2), z))

    def _runs_fused(self, u) -> bool:
        """Whether the SSD resolves to the fused recurrent CPU kernel here, on fp32 CPU tensors (not under CPU
        autocast, which runs in_proj in bf16: the composition below does that, as for Mamba)."""
        if u.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return False
        if resolve_ssd_impl(self.ssd_impl, "cpu", (self.head_dim, self.d_state)) != "fused-recurrent":
            return False
        return fused_supported(u, self.in_proj.weight, self.A_log, self.D, self.dt_bias, self.conv1d.weight, self.norm.weight,
                               self.out_proj.weight)

    def step(self, u, cache: Mamba2Cache):
        """One token: u (b, 1, d) -> (b, 1, d), advancing the cache in place: one fused C call where it
        applies (ops.decode), else `step_reference`."""
        out = decode.step(self, u, cache)
        return self.step_reference(u, cache) if out is None else out

    def step_reference(self, u, cache: Mamba2Cache):
        """One token, module by module (the definition the fused step is tested against)."""
        b = u.shape[0]
        z, xBC, dt = self._split(self.in_proj(u[:, 0]))
        cache.conv.copy_(torch.roll(cache.conv, shifts=-1, dims=-1))
        cache.conv[..., -1] = xBC
        xBC = F.silu((cache.conv * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)
        x, B, C = xBC.split([self.d_inner, self.groups * self.d_state, self.groups * self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())                                # (b, H)
        x = x.float().view(b, self.heads, self.head_dim)
        B = heads_of_groups(B.float().view(b, 1, self.groups, self.d_state), self.heads)[:, 0]   # (b, H, N)
        C = heads_of_groups(C.float().view(b, 1, self.groups, self.d_state), self.heads)[:, 0]
        h = cache.ssm
        h.mul_(torch.exp(dt * -torch.exp(self.A_log.float()))[..., None, None])
        h.add_((dt[..., None] * x)[..., None] * B[:, :, None, :])
        y = (h @ C[..., None]).squeeze(-1) + self.D.float()[:, None] * x                 # (b, H, p)
        cache.pos += 1
        return self.out_proj(self.norm(y.flatten(1).to(u.dtype), z))[:, None]

    block_step = decode.block_step      # a decoded token through the whole block in one call (models/block.py)
    decode_call = decode.block_call     # that call bound to a cache, for a stack decoded without framework ops

    def allocate_cache(self, batch, max_len, dtype, device):
        return Mamba2Cache(batch, self.conv_dim, self.d_conv, self.heads, self.head_dim, self.d_state,
                           dtype, device)


def mamba2_layer(cfg: ModelConfig) -> LayerSpec:
    """x + mixer(norm(x)) with the Mamba-2 mixer: one residual branch per layer."""
    return LayerSpec(Mamba2Mixer, {
        "heads": cfg.mamba2_nheads, "head_dim": cfg.mamba2_head_dim, "d_state": cfg.mamba2_d_state,
        "ngroups": cfg.mamba2_ngroups, "d_conv": cfg.d_conv, "chunk_size": cfg.mamba2_chunk_size,
        "ssd_impl": cfg.ssd_impl, "dt_min": cfg.dt_min, "dt_max": cfg.dt_max, "dt_init_floor": cfg.dt_init_floor,
        "norm_eps": cfg.norm_eps})
