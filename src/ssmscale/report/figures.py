"""What every figure of a report shares: a constrained-layout canvas (matplotlib's object API on the Agg
canvas, so no global backend is touched), PNG bytes without a version stamp (same study, same bytes),
and the tick labels of log axes.
"""

from __future__ import annotations

import io
import math


def _figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.6, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})   # no version stamp: same bytes
    return buf.getvalue()


def _sci(x: float) -> str:
    """1.2e+15 -> '1.2e15' for labels."""
    mant, _, exp = f"{x:.2g}".partition("e")
    return f"{mant}e{int(exp)}" if exp else mant


def _minor_2_5(label):
    """A minor log-axis tick formatter labelling only 2x and 5x a power of ten, with label(v)."""
    def fmt(v: float, _pos=None) -> str:
        return label(v) if round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""
    return _mpl_ticker().FuncFormatter(fmt)


def _mathtext_sci(v: float) -> str:
    """20000 -> '$2\\times10^{4}$'."""
    exp = math.floor(math.log10(v))
    return rf"${round(v / 10 ** exp)}\times10^{{{exp}}}$"


def _mpl_ticker():
    import matplotlib.ticker
    return matplotlib.ticker


def _human(v: float) -> str:
    """Tick labels without exponents: 0.3, 20, 200k, 1.5M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"
