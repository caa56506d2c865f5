"""Language models: one LM shell, the block of every family, and the sizing rule that matches them.

`FAMILIES` and `ModelConfig` import without torch (the config schema and the CLI check family names
against FAMILIES, so config errors answer in about a second); `LM` is imported on first use."""

from .config import FAMILIES, ModelConfig

__all__ = ["FAMILIES", "ModelConfig", "LM"]


def __getattr__(name):
    if name == "LM":
        from .lm import LM
        return LM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
