"""RMSNorm (Zhang & Sennrich 2019): scale by the root mean square, learned gain, no bias, computed in fp32;
and Mamba-2's gated variant, which normalises y * silu(z) within each group of channels."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight._no_weight_decay = True

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """weight * rmsnorm(y * silu(z)), the RMS taken over each of `groups` equal slices of the channels
    (Mamba-2 normalises per group of heads, so a model split over groups normalises the same way)."""

    def __init__(self, dim: int, groups: int = 1, eps: float = 1e-5):
        super().__init__(dim, eps)
        self.groups = groups

    def forward(self, y, z):
        g = (y.float() * F.silu(z.float())).unflatten(-1, (self.groups, -1))
        g = F.rms_norm(g, (g.shape[-1],), None, self.eps).flatten(-2)
        return (g * self.weight.float()).to(y.dtype)
