"""Language models: one LM shell, Transformer++ and Mamba blocks, and the sizing rule that matches them.

`LM` (and with it torch) loads on first use, so the config schema can check family names against
FAMILIES without importing torch (config errors answer in about a second)."""

from .config import FAMILIES, ModelConfig

__all__ = ["FAMILIES", "ModelConfig", "LM"]


def __getattr__(name):
    if name == "LM":
        from .lm import LM
        return LM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
