"""One colour per model family, the same in every figure (study report, profile plot)."""

from __future__ import annotations

from ..models.config import FAMILIES

# matplotlib's tab10 order: the families of FAMILIES take the first colours (transformer blue, mamba red,
# mamba2 green, hybrid purple); any other name (an unknown family in a CSV) the next ones
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22")
FIXED = {**dict(zip(FAMILIES, PALETTE)), "all": "#333333"}   # "all": a fit without a family column


def check_family_count(names, source) -> None:
    """A report draws each family in a colour of its own (and a panel of its own): at most len(PALETTE)."""
    from ..errors import UserError
    names = set(names)
    if len(names) > len(PALETTE):
        raise UserError(f"{source}: {len(names)} families; a report draws at most {len(PALETTE)} (one colour "
                        "each): `ssmscale fit` fits any number")


def family_colors(names) -> dict[str, str]:
    """{name: colour}: fixed for the known families, the spare palette in sorted order for the others."""
    spare = iter(c for c in PALETTE if c not in FIXED.values())
    return {name: FIXED.get(name) or next(spare, "#000000") for name in sorted(names)}
