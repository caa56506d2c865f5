"""The shape of one language model: a frozen dataclass shared by every family, the FLOP counter and sizing.

FAMILIES is the one list of built-in model families; everything else (config schema, CLI checks, sizing,
profile, report colours) derives from it. A model is a stack of layers, each of one kind
(`layer_kinds`): "transformer" (attention + MLP), "mamba", "mamba2", "attention" (an attention-only
residual branch, the hybrid's attention layers), or "plugin": a plugin family's mixer (`mixer`, a
models.plugin.MixerSpec), with Transformer++'s MLP after it when the spec says so.

Mamba-2 knobs (Dao & Gu 2024 use head_dim 64, d_state 128 (64 in ablations), chunk 256 at 125M-1.3B
parameters on GPUs). The defaults here are for the 2.5e4-4e5-parameter CPU models of this project:
- mamba2_head_dim 8: a 25K-parameter model is about 30 wide (60 SSM channels), so 64 would leave it one
  head. A head is also the step in which the block's width moves (d_inner = heads x head_dim), and
  the count jumps by ~3 head_dim d_model per layer at each step: with 8 the sizing rule matches the
  transformer within 5.2% from 2.5e4 to 1e7 parameters (head_dim 16: up to 9%);
- mamba2_d_state 16: the per-layer state is d_inner x d_state, the same as Mamba-1 with its N = 16, so
  the two SSMs compare at equal state size; B and C cost 2 d_state d_model parameters per layer, which
  at N = 128 would be a third of a 25K model's layer;
- mamba2_chunk_size 8: the SSD's result does not depend on it (up to rounding); short chunks are
  faster on a CPU, in the chunked form (memory traffic over heads x T x T per chunk) and in the
  fused kernel alike (measured: 8 a little faster than 16, 32 and 64 much slower at head_dim 8). The
  FLOP count follows it (flops.py counts the SSD as the chunked form computes it).
Mamba-2's d_inner is head_dim x heads with heads = expand d_model / head_dim rounded to a multiple of
ngroups (the reference requires expand d_model to be such a multiple; rounding lets the sizing rule
use any even width, so that families match within a few percent even at toy sizes). Likewise the
hybrid's attention has round(d_model / head_dim) heads of head_dim (the transformer's d_model is a
multiple of head_dim, so there the attention width is d_model exactly).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .plugin import FAMILY_NAME, MixerSpec

FAMILIES = ("transformer", "mamba", "mamba2", "hybrid")
HYBRID_SSMS = ("mamba2", "mamba")
SSD_IMPLS = ("auto", "fused", "fused-recurrent", "fused-chunk", "chunked", "ref")
LAYER_KINDS = ("transformer", "attention", "mamba", "mamba2", "plugin")
RESERVED_NAMES = FAMILIES + LAYER_KINDS + ("all",)     # not a plugin family's name ("all": a fit without families)


def plugin_name_ok(name: str) -> bool:
    return bool(FAMILY_NAME.fullmatch(name)) and name not in RESERVED_NAMES


def pad_vocab(vocab_size: int, multiple: int = 8) -> int:
    return multiple * math.ceil(vocab_size / multiple)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def default_attn_layers(n_layer: int, every: int) -> tuple[int, ...]:
    """About one attention layer in `every` (at least one, never the first layer), spread evenly:
    the middle of each of k equal spans of layers 1 .. n_layer - 1."""
    k = min(n_layer - 1, max(1, _round_half_up(n_layer / every)))
    return tuple(1 + math.floor((j + 0.5) * (n_layer - 1) / k) for j in range(k))


@dataclass(frozen=True)
class ModelConfig:
    family: str                    # one of FAMILIES
    d_model: int
    n_layer: int
    vocab_size: int = 256          # the tokenizer's vocabulary; the embedding is padded to a multiple of 8
    norm_eps: float = 1e-5
    init_std: float = 0.02         # embedding (and attention / MLP linears): GPT-2 style
    # Transformer++ (and the hybrid's attention layers)
    head_dim: int = 32
    d_ff: int | None = None        # SwiGLU hidden width; None: 8/3 d_model rounded up to a multiple of 16
    rope_base: float = 10000.0
    # Mamba (defaults of Gu & Dao 2023); d_conv, expand and dt_* are Mamba-2's too (same defaults)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None     # None: ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    scan_impl: str = "auto"
    # Mamba-2 (Dao & Gu 2024); tiny-model defaults, see the module docstring
    mamba2_head_dim: int = 8
    mamba2_d_state: int = 16
    mamba2_ngroups: int = 1
    mamba2_chunk_size: int = 8
    ssd_impl: str = "auto"
    # hybrid: SSM layers with attention-only layers at hybrid_attn_layers (default: one in hybrid_attn_every)
    hybrid_ssm: str = "mamba2"
    hybrid_attn_every: int = 8
    hybrid_attn_layers: tuple[int, ...] | None = None
    # a plugin family (any name that is not a built-in family): its mixer
    mixer: MixerSpec | None = None

    def __post_init__(self):
        if self.mixer is None and self.family not in FAMILIES:
            raise ValueError(f"family: unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.mixer is not None and not plugin_name_ok(self.family):
            raise ValueError(f"family: a plugin family needs a name of its own (letters, digits, '_'; not one of "
                             f"{', '.join(dict.fromkeys(RESERVED_NAMES))}), got {self.family!r}")
        for name in ("d_model", "n_layer", "vocab_size", "head_dim", "d_state", "d_conv", "expand",
                     "mamba2_head_dim", "mamba2_d_state", "mamba2_ngroups", "mamba2_chunk_size",
                     "hybrid_attn_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.family == "transformer" and self.d_model % self.head_dim:
            raise ValueError(f"d_model: {self.d_model} is not a multiple of head_dim {self.head_dim}")
        if self.hybrid_ssm not in HYBRID_SSMS:
            raise ValueError(f"hybrid_ssm: expected one of {', '.join(HYBRID_SSMS)}, got {self.hybrid_ssm!r}")
        if self.ssd_impl not in SSD_IMPLS:
            raise ValueError(f"ssd_impl: expected one of {', '.join(SSD_IMPLS)}, got {self.ssd_impl!r}")
        if self.hybrid_attn_layers is not None:
            layers = tuple(sorted(set(int(i) for i in self.hybrid_attn_layers)))
            object.__setattr__(self, "hybrid_attn_layers", layers)
        if self.family == "hybrid":
            if self.n_layer < 2:
                raise ValueError(f"n_layer: a hybrid needs at least 2 layers (SSM and attention), got {self.n_layer}")
            bad = [i for i in self.hybrid_attn_layers or () if not 0 <= i < self.n_layer]
            if bad:
                raise ValueError(f"hybrid_attn_layers: layer {bad[0]} is outside 0..{self.n_layer - 1}")
            if self.hybrid_attn_layers is not None and len(self.hybrid_attn_layers) in (0, self.n_layer):
                raise ValueError("hybrid_attn_layers: a hybrid needs both attention and SSM layers")

    @property
    def padded_vocab(self) -> int:
        return pad_vocab(self.vocab_size)

    @property
    def n_head(self) -> int:
        """Attention heads: d_model / head_dim for the transformer, round(d_model / head_dim) in the hybrid."""
        return max(1, _round_half_up(self.d_model / self.head_dim))

    @property
    def attn_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return 16 * math.ceil(8 * self.d_model / 3 / 16)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def mamba2_nheads(self) -> int:
        g = self.mamba2_ngroups
        return g * max(1, _round_half_up(self.expand * self.d_model / (self.mamba2_head_dim * g)))

    @property
    def mamba2_d_inner(self) -> int:
        return self.mamba2_nheads * self.mamba2_head_dim

    @property
    def attn_layers(self) -> tuple[int, ...]:
        """Indices of the hybrid's attention layers (empty for the other families)."""
        if self.family != "hybrid":
            return ()
        if self.hybrid_attn_layers is not None:
            return self.hybrid_attn_layers
        return default_attn_layers(self.n_layer, self.hybrid_attn_every)

    @property
    def is_plugin(self) -> bool:
        return self.mixer is not None

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """The kind of every layer: the family's block, or for the hybrid its SSM and "attention"."""
        if self.is_plugin:
            return ("plugin",) * self.n_layer
        if self.family != "hybrid":
            return (self.family,) * self.n_layer
        attn = set(self.attn_layers)
        return tuple("attention" if i in attn else self.hybrid_ssm for i in range(self.n_layer))

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
