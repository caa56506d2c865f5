"""The shape of one language model: a frozen dataclass shared by both families, the FLOP counter and sizing."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

FAMILIES = ("transformer", "mamba")


def pad_vocab(vocab_size: int, multiple: int = 8) -> int:
    return multiple * math.ceil(vocab_size / multiple)


@dataclass(frozen=True)
class ModelConfig:
    family: str                    # "transformer" (Transformer++) or "mamba"
    d_model: int
    n_layer: int
    vocab_size: int = 256          # the tokenizer's vocabulary; the embedding is padded to a multiple of 8
    norm_eps: float = 1e-5
    init_std: float = 0.02         # embedding (and transformer linears): GPT-2 style
    # Transformer++
    head_dim: int = 32
    d_ff: int | None = None        # SwiGLU hidden width; None: 8/3 d_model rounded up to a multiple of 16
    rope_base: float = 10000.0
    # Mamba (defaults of Gu & Dao 2023)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None     # None: ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    scan_impl: str = "auto"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family: unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        for name in ("d_model", "n_layer", "vocab_size", "head_dim", "d_state", "d_conv", "expand"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.family == "transformer" and self.d_model % self.head_dim:
            raise ValueError(f"d_model: {self.d_model} is not a multiple of head_dim {self.head_dim}")

    @property
    def padded_vocab(self) -> int:
        return pad_vocab(self.vocab_size)

    @property
    def n_head(self) -> int:
        return self.d_model // self.head_dim

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

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
