"""Gated linear attention (GLA; Yang, Wang, Shen, Panda & Kim 2023, arXiv 2312.06635) as an ssmscale plugin mixer.

Per head, a matrix state S (d_k x d_v) decays by a data-dependent gate and takes in one outer product per token:
    S_t = diag(a_t) S_{t-1} + k_t^T v_t,      o_t = q_t S_t,      log a_t = logsigmoid(x_t W1 W2 + b) / 16
(a low-rank gate with temperature 16, as the paper), then a per-head RMSNorm, an output gate silu(x W_r) and
W_o. Training runs the chunked form (chunks of `chunk_size`: attention-like products inside a chunk, the
recurrence between chunks, decays taken relative to the chunk start so every exp stays in range); generation
runs the same code on any piece with the state carried in the cache: O(1) memory per token.
Heads: d_k = expand_k d_model and d_v = expand_v d_model rounded to multiples of `heads`, so any width works.
Use it with `mlp: true` (the paper's GLA Transformer puts a SwiGLU after each GLA layer).

    custom_families:
      gla: {mixer: "../examples/gla.py:GatedLinearAttention", mlp: true, options: {heads: 4}}
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_DECAY_FLOOR = -2.5     # per token: chunk_size steps of it stay far inside fp32's exp range


class GLACache:
    """The recurrent state of one GLA layer: S per head, and how many tokens it has seen."""

    def __init__(self, batch, heads, dk, dv, dtype, device):
        self.state = torch.zeros(batch, heads, dk, dv, dtype=torch.promote_types(dtype, torch.float32), device=device)
        self.pos = 0


class GatedLinearAttention(nn.Module):
    def __init__(self, d_model, heads=4, expand_k=0.5, expand_v=1.0, gate_rank=16, gate_temp=16.0, chunk_size=16,
                 init_std=0.02):
        super().__init__()
        self.heads, self.chunk, self.temp, self.init_std = heads, chunk_size, gate_temp, init_std
        dk = heads * max(1, round(expand_k * d_model / heads))
        dv = heads * max(1, round(expand_v * d_model / heads))
        self.dk, self.dv = dk, dv
        self.q_proj = nn.Linear(d_model, dk, bias=False)
        self.k_proj = nn.Linear(d_model, dk, bias=False)
        self.v_proj = nn.Linear(d_model, dv, bias=False)
        self.r_proj = nn.Linear(d_model, dv, bias=False)          # output gate
        self.gate_down = nn.Linear(d_model, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, dk, bias=True)
        self.norm_weight = nn.Parameter(torch.ones(dv // heads))
        self.out_proj = nn.Linear(dv, d_model, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.r_proj, self.gate_down, self.gate_up, self.out_proj):
            nn.init.normal_(lin.weight, std=self.init_std)
        nn.init.zeros_(self.gate_up.bias)
        self.norm_weight.fill_(1.0)

    def residual_out_projections(self):
        return [self.out_proj.weight]

    def allocate_cache(self, batch, max_len, dtype, device):
        return GLACache(batch, self.heads, self.dk // self.heads, self.dv // self.heads, dtype, device)

    def extra_flops_per_token(self, seq_len):
        """Elementwise work the FLOP counter does not see: the gate's logsigmoid, cumulative sum and three exps
        (~8 per key channel), the state's decay once per chunk, the norm and output gate (~5 per value)."""
        h = self.heads
        return 8 * self.dk + 5 * self.dv + (self.dk // h) * (self.dv // h) * h / min(self.chunk, seq_len)

    def forward(self, x, cache=None):
        b, L, _ = x.shape
        h, c = self.heads, self.chunk
        work = torch.promote_types(x.dtype, torch.float32)      # the state and decays: fp32 at least

        def heads(t):              # (b, L, h * e) -> (b, h, L, e)
            return t.view(b, L, h, -1).transpose(1, 2).to(work)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        log_a = heads((F.logsigmoid(self.gate_up(self.gate_down(x))) / self.temp).clamp(min=LOG_DECAY_FLOOR))
        state = cache.state if cache is not None else q.new_zeros(b, h, q.shape[-1], v.shape[-1])
        pad = (-L) % c             # the last chunk padded with zero inputs and no decay: outputs there are dropped
        q, k, v, log_a = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, log_a))
        n = (L + pad) // c
        q, k, v, log_a = (t.view(b, h, n, c, -1) for t in (q, k, v, log_a))
        cum = log_a.cumsum(-2)                           # decay from the chunk start, <= 0
        last = cum[..., -1:, :]
        q_in = q * cum.exp()                             # query against the chunk-start state
        k_in = k * (-cum).exp()                          # key, undone to the chunk start (<= e^(2.5 c))
        k_out = k * (last - cum).exp()                   # key, decayed to the chunk end
        mask = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
        scores = (q_in @ k_in.transpose(-1, -2)).masked_fill(~mask, 0.0)
        out = scores @ v                                 # within each chunk
        inter = []
        for i in range(n):                               # between chunks: the recurrence on S
            inter.append(q_in[:, :, i] @ state)
            state = last[:, :, i].transpose(-1, -2).exp() * state + k_out[:, :, i].transpose(-1, -2) @ v[:, :, i]
        out = (out + torch.stack(inter, dim=2)).view(b, h, n * c, -1)[:, :, :L]
        if cache is not None:
            cache.state.copy_(state)
            cache.pos += L
        out = F.rms_norm(out, (out.shape[-1],), self.norm_weight.to(work), 1e-5)
        out = out.transpose(1, 2).reshape(b, L, -1).to(x.dtype)
        return self.out_proj(out * F.silu(self.r_proj(x)))
