"""Mixers for the plugin tests (tests/test_byo.py), loaded by file path as a user's would be: one causal mixer
without a cache (it trains, it cannot generate), and mixers that break the contract, each in one way check-family
must catch: leaks of a later token, of a 1e-3-sized term, through a normalisation over the sequence, at chunk
boundaries only, through a sign (no gradient); a wrong cache; a wrong shape; randomness no seed controls."""

import random

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalConv(nn.Module):
    """A causal depthwise convolution over 4 tokens between two linears: causal, no allocate_cache."""

    def __init__(self, d_model, kernel=4):
        super().__init__()
        self.kernel = kernel
        self.proj = nn.Linear(d_model, d_model)
        self.weight = nn.Parameter(torch.randn(d_model, kernel) / kernel)
        self.out_proj = nn.Linear(d_model, d_model)

    def causal(self, x):
        h = F.pad(self.proj(x).transpose(1, 2), (self.kernel - 1, 0))
        return F.conv1d(h, self.weight[:, None], groups=h.shape[1]).transpose(1, 2)

    def forward(self, x, cache=None):
        return self.out_proj(torch.tanh(self.causal(x)))


class FutureToken(CausalConv):
    """Adds the next token: the leak of one position."""

    def forward(self, x, cache=None):
        nxt = F.pad(x[:, 1:], (0, 0, 0, 1))
        return super().forward(x) + self.out_proj(nxt)


class SmallLeak(CausalConv):
    """Adds a 1e-3-sized term from the mean over the whole sequence."""

    def forward(self, x, cache=None):
        return super().forward(x) + 1e-3 * x.mean(dim=1, keepdim=True)


class SequenceNorm(CausalConv):
    """Normalises over the sequence (a 'layer norm' over the wrong axis)."""

    def forward(self, x, cache=None):
        h = self.causal(x)
        return self.out_proj((h - h.mean(dim=1, keepdim=True)) / (h.std(dim=1, keepdim=True, correction=0) + 1e-5))


class ChunkBoundaryLeak(CausalConv):
    """A chunked kernel's boundary bug: the last position of each chunk of 16 also sees the next chunk's first."""

    def forward(self, x, cache=None):
        out = super().forward(x)
        L = x.shape[1]
        ends = torch.arange(15, max(L - 1, 15), 16)
        leak = torch.zeros_like(out)
        leak[:, ends] = self.out_proj(x[:, ends + 1])
        return out + leak


class SignLeak(CausalConv):
    """Adds 1e-3 times the sign of the next token: a leak with no gradient."""

    def forward(self, x, cache=None):
        return super().forward(x) + 1e-3 * torch.sign(F.pad(x[:, 1:], (0, 0, 0, 1)))


class StatelessCache:
    def __init__(self):
        self.pos = 0


class ForgetfulCache(CausalConv):
    """Has a cache that keeps nothing: a piece after the first does not see what came before it."""

    def allocate_cache(self, batch, max_len, dtype, device):
        return StatelessCache()

    def forward(self, x, cache=None):
        return super().forward(x)


class WrongShape(CausalConv):
    def forward(self, x, cache=None):
        return torch.cat([super().forward(x)] * 2, dim=-1)


class Unseeded(CausalConv):
    """Initialised from Python's own random generator, which torch.manual_seed does not control."""

    def __init__(self, d_model):
        super().__init__(d_model)
        with torch.no_grad():
            self.weight.fill_(random.random())


LEAKS = {"FutureToken": "causality", "SmallLeak": "causality", "SequenceNorm": "causality",
         "ChunkBoundaryLeak": "causality", "SignLeak": "causality", "ForgetfulCache": "cache",
         "WrongShape": "contract", "Unseeded": "determinism"}
