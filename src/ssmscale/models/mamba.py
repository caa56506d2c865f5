"""Mamba block (Gu & Dao 2023): gated, short causal convolution, then the selective state-space scan.

    x, z = in_proj(u)                        d -> 2 E d, no bias
    x = silu(causal depthwise conv1d(x))     kernel d_conv, with bias
    dt, B, C = x_proj(x)                     E d -> dt_rank + 2 N, no bias
    dt = dt_proj.weight @ dt                 dt_rank -> E d; its bias enters the scan as delta_bias
    y = selective_scan(x, dt, A, B, C, D, z, delta_bias, softplus)    with A = -exp(A_log)
    out = out_proj(y)                        E d -> d, no bias
One residual branch per layer (no separate MLP; models/block.py is the block, MambaMixer its mixer).
For generation, `step` advances a conv state
(batch, E d, d_conv) and an SSM state (batch, E d, N): O(1) time and memory per token.
Where the scan runs the fused CPU kernel (fp32 on the CPU), everything between in_proj and out_proj
runs as one op, `ops.mamba_inner_fused` (same numbers within fp32 rounding; it keeps ~3x less for
the backward); elsewhere (GPU, no C compiler, another `scan_impl`) as the composition below.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import decode, selective_scan
from ..ops.mamba_inner import fused_supported, mamba_inner_fused
from ..ops.scan import resolve_impl
from .block import LayerSpec
from .config import ModelConfig


def causal_depthwise_conv(x, weight, bias):
    """y_t = bias + sum_k weight[:, k] * x_{t - K + 1 + k}: a causal depthwise conv1d over (b, C, L).

    The same as conv1d(x, weight, bias, padding=K-1, groups=C)[..., :L], written as K shifted
    multiply-adds because PyTorch's grouped conv1d is ~100x slower than that on CPU."""
    K, L = weight.shape[-1], x.shape[-1]
    xp = F.pad(x, (K - 1, 0))
    w = weight.reshape(weight.shape[0], K, 1)
    y = bias[:, None] + w[:, K - 1] * x
    for k in range(K - 1):
        y = y + w[:, k] * xp[..., k:k + L]
    return y


class MambaCache:
    """Recurrent state of one Mamba layer: the last d_conv inputs of the conv and the SSM state."""

    def __init__(self, batch, d_inner, d_conv, d_state, dtype, device):
        self.conv = torch.zeros(batch, d_inner, d_conv, dtype=dtype, device=device)
        self.ssm = torch.zeros(batch, d_inner, d_state, dtype=torch.float32, device=device)
        self.pos = 0

    def pointers(self) -> tuple:
        """Where the cache's tensors lie (a decoding chain bound to them checks they have not moved)."""
        return self.conv.data_ptr(), self.ssm.data_ptr()


class MambaMixer(nn.Module):
    """A mixer (models/block.py): d_inner = expand d_model channels, state N = d_state per channel."""

    chunked_prefill = False      # after the prompt, tokens come one at a time (`step`)

    def __init__(self, d_model: int, expand: int = 2, d_state: int = 16, d_conv: int = 4, dt_rank: int | None = None,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, scan_impl: str = "auto"):
        super().__init__()
        d, e, n = d_model, expand * d_model, d_state
        r = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = e, n, d_conv, r
        self.dt_range, self.dt_init_floor = (dt_min, dt_max), dt_init_floor
        self.scan_impl = scan_impl
        self.in_proj = nn.Linear(d, 2 * e, bias=False)
        self.conv1d = nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n))
        self.D = nn.Parameter(torch.empty(e))
        self.out_proj = nn.Linear(e, d, bias=False)
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for lin in (self.in_proj, self.x_proj, self.out_proj):
            lin.reset_parameters()              # PyTorch default (Kaiming-uniform), as the reference keeps
        self.conv1d.reset_parameters()
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        # dt ~ log-uniform in [dt_min, dt_max], floored; the bias is its inverse softplus
        dt_min, dt_max = self.dt_range
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=self.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A = -(1, 2, ..., N) for every channel
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)

    def residual_out_projections(self):
        return [self.out_proj.weight]

    def forward(self, u, cache: MambaCache | None = None):
        if cache is not None and cache.pos > 0:
            if u.shape[1] != 1:
                raise ValueError("Mamba cache: after the prompt, tokens are fed one at a time")
            return self.step(u, cache)
        xz = self.in_proj(u)                                            # (b, L, 2 E d)
        if self._runs_fused(xz):
            A = -torch.exp(self.A_log)
            out, last = mamba_inner_fused(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                          self.dt_proj.weight, self.out_proj.weight, A, self.D,
                                          self.dt_proj.bias, return_last_state=True)
            if cache is not None:
                self._fill_cache(cache, last, xz[..., :self.d_inner].transpose(1, 2))
            return out
        x, z = xz.transpose(1, 2).chunk(2, dim=1)                       # (b, E d, L) each
        x_pre = x
        x = F.silu(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias))
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)          # (b, E d, L)
        A = -torch.exp(self.A_log.float())
        out = selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z,
                             delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                             return_last_state=cache is not None, impl=self.scan_impl)
        if cache is not None:
            y, last = out
            self._fill_cache(cache, last, x_pre)
        else:
            y = out
        return self.out_proj(y.transpose(1, 2))

    def _runs_fused(self, xz) -> bool:
        """Whether the scan resolves to the fused CPU kernel here and the tensors are fp32 CPU ones."""
        if xz.device.type != "cpu" or resolve_impl(self.scan_impl, "cpu").name != "fused":
            return False
        return fused_supported(xz, self.A_log, self.D, self.conv1d.weight, self.x_proj.weight,
                               self.dt_proj.weight, self.out_proj.weight)

    @staticmethod
    def _fill_cache(cache: MambaCache, last, x_pre):
        """After a prompt: the SSM state and the conv's last d_conv inputs x_pre (b, E d, L)."""
        L, d_conv = x_pre.shape[-1], cache.conv.shape[-1]
        cache.ssm.copy_(last)
        keep = min(L, d_conv)
        cache.conv.zero_()
        cache.conv[..., d_conv - keep:] = x_pre[..., L - keep:]
        cache.pos += L

    def step(self, u, cache: MambaCache):
        """One token: u (b, 1, d) -> (b, 1, d), advancing the cache in place: one fused C call where it
        applies (ops.decode), else `step_reference`."""
        out = decode.step(self, u, cache)
        return self.step_reference(u, cache) if out is None else out

    def step_reference(self, u, cache: MambaCache):
        """One token, module by module (the definition the fused step is tested against)."""
        x, z = self.in_proj(u[:, 0]).chunk(2, dim=-1)                   # (b, E d)
        cache.conv.copy_(torch.roll(cache.conv, shifts=-1, dims=-1))
        cache.conv[..., -1] = x
        x = F.silu((cache.conv * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus((dt @ self.dt_proj.weight.t()).float() + self.dt_proj.bias.float())
        A = -torch.exp(self.A_log.float())
        h = cache.ssm
        h.mul_(torch.exp(delta[..., None] * A)).add_(delta[..., None] * B.float()[:, None, :] * x.float()[..., None])
        y = (h @ C.float()[..., None]).squeeze(-1) + self.D.float() * x.float()
        y = (y * F.silu(z.float())).to(u.dtype)
        cache.pos += 1
        return self.out_proj(y)[:, None]

    block_step = decode.block_step      # a decoded token through the whole block in one call (models/block.py)
    decode_call = decode.block_call     # that call bound to a cache, for a stack decoded without framework ops

    def allocate_cache(self, batch, max_len, dtype, device):
        return MambaCache(batch, self.d_inner, self.d_conv, self.d_state, dtype, device)


def mamba_options(cfg: ModelConfig) -> dict:
    return {"expand": cfg.expand, "d_state": cfg.d_state, "d_conv": cfg.d_conv, "dt_rank": cfg.dt_rank_,
            "dt_min": cfg.dt_min, "dt_max": cfg.dt_max, "dt_init_floor": cfg.dt_init_floor, "scan_impl": cfg.scan_impl}


def mamba_layer(cfg: ModelConfig) -> LayerSpec:
    """x + mixer(norm(x)): one residual branch per layer."""
    return LayerSpec(MambaMixer, mamba_options(cfg))
