"""Language models: one LM shell, Transformer++ and Mamba blocks, and the sizing rule that matches them."""

from .config import FAMILIES, ModelConfig
from .lm import LM

__all__ = ["FAMILIES", "ModelConfig", "LM"]
