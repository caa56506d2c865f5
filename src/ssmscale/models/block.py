"""The one residual block every layer of every family is: x + mixer(norm(x)) [, then x + mlp(norm_mlp(x))].

The mixer contract (docs/byo.md), which the built-in mixers satisfy as any plugin does:
- a torch.nn.Module class constructed as `Mixer(d_model, **options)`;
- `forward(x, cache=None)` maps (batch, L, d_model) to (batch, L, d_model), causally: output t depends on
  inputs 0..t only;
- optional `allocate_cache(batch, max_len, dtype, device)`: any object such that `forward(piece, cache)`
  continues the cached sequence (generation); without it the family trains but cannot generate;
- optional `extra_flops_per_token(seq_len)`: FLOPs per token the FLOP counter cannot see (elementwise work:
  scans, gates, decays), added to the matmul FLOPs it measures (flops_measure.py);
- optional `reset_parameters()`, called when the LM (re)initialises, and `residual_out_projections()`:
  the weights the LM rescales by 1/sqrt(branches x n_layer) (GPT-2; Mamba rescales its out_proj likewise);
- optional class attribute `chunked_prefill = False` when, after the prompt, pieces must be one token long;
- optional `block_step(x, cache, norm)`: one decoded token (x: (batch, 1, d_model), the block's input) through
  the whole block, x + mixer(norm(x)), advancing the cache, or None where it does not apply (then the block
  runs as usual); the built-in SSMs fuse norm and mixer into one C call there (ops/decode.py);
- optional `decode_call(cache, norm, norm_mlp, mlp, weights="fp32")`: the block's decoding step (with the SwiGLU
  branch where the layer has one) bound to a cache as an ops.decode.LayerCall (weights="bf16": reading bf16
  copies of the projections), or None; when every layer of a model gives one, a decoded token runs the whole
  stack as one C call (models/lm.py). The built-in mixers have one.

A layer kind (LayerSpec) says which mixer with which options, whether the Transformer++ SwiGLU branch
follows it, and the names its modules are registered under: those names are the state_dict keys, kept as
they were before the families shared this block (`attn` / `norm_attn` for the transformer, `attn` / `norm`
for the hybrid's attention, `mixer` / `norm` for the SSMs and plugins), so saved weights still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .norm import RMSNorm


@dataclass(frozen=True)
class LayerSpec:
    mixer: type                          # the mixer class, constructed as mixer(d_model, **options)
    options: dict = field(default_factory=dict)
    mlp: bool = False                    # a SwiGLU branch after the mixer (Transformer++'s layer)
    names: tuple[str, str] = ("norm", "mixer")     # (pre-norm, mixer) module names: the state_dict keys


class Block(nn.Module):
    """x + mixer(norm(x)), then + mlp(norm_mlp(x)) when the layer has an MLP: one or two residual branches."""

    def __init__(self, kind: str, mixer: nn.Module, d_model: int, norm_eps: float, mlp: nn.Module | None = None,
                 names: tuple[str, str] = ("norm", "mixer")):
        super().__init__()
        self.kind = kind
        self._names = names
        self.add_module(names[0], RMSNorm(d_model, norm_eps))
        self.add_module(names[1], mixer)
        if mlp is not None:
            self.norm_mlp = RMSNorm(d_model, norm_eps)
            self.mlp = mlp
        else:
            self.mlp = None
        self.residual_branches = 1 + (mlp is not None)
        # a piece of several tokens may follow the prompt in the cache (Mamba-1 takes one at a time)
        self.chunked_prefill = getattr(mixer, "chunked_prefill", True)

    @property
    def mixer_module(self) -> nn.Module:
        return getattr(self, self._names[1])

    def forward(self, x, cache=None):
        norm, mixer = getattr(self, self._names[0]), getattr(self, self._names[1])
        if cache is not None and x.shape[1] == 1 and self.mlp is None and hasattr(mixer, "block_step"):
            out = mixer.block_step(x, cache, norm)
            if out is not None:
                return out
        h = norm(x)
        x = x + (mixer(h) if cache is None else mixer(h, cache))
        if self.mlp is not None:
            x = x + self.mlp(self.norm_mlp(x))
        return x

    def decode_call(self, cache, weights: str = "fp32"):
        """This block's decoding step bound to `cache` (ops.decode.LayerCall), or None where the mixer has none;
        weights: "fp32", or "bf16" for bf16 copies of the projection weights."""
        hook = getattr(self.mixer_module, "decode_call", None)
        if hook is None:
            return None
        return hook(cache, getattr(self, self._names[0]), self.norm_mlp if self.mlp is not None else None, self.mlp,
                    weights=weights)

    @property
    def can_generate(self) -> bool:
        return hasattr(self.mixer_module, "allocate_cache")

    def allocate_cache(self, batch, max_len, dtype, device):
        if not self.can_generate:
            raise ValueError(f"{self.kind} layers: the mixer {type(self.mixer_module).__name__} has no allocate_cache, "
                             "so this model cannot generate")
        return self.mixer_module.allocate_cache(batch, max_len, dtype, device)

    def residual_out_projections(self) -> list:
        mixer = self.mixer_module
        out = list(mixer.residual_out_projections()) if hasattr(mixer, "residual_out_projections") else []
        return out + (self.mlp.residual_out_projections() if self.mlp is not None else [])

    def reset_parameters(self):
        for module in (self.mixer_module, self.mlp):
            if module is not None and hasattr(module, "reset_parameters"):
                module.reset_parameters()
