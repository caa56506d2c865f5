"""Print the worst normwise relative error of every fast SSD against `ref`, per output and gradient, over the
grid of tests/test_ssd.py.  Run: python tests/ssd_error_grid.py"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_ssd import FAST_IMPLS, OPTIONS, SHAPES, errors

for impl in FAST_IMPLS:
    worst: dict[str, float] = {}
    for shape in SHAPES:
        errs_shape: dict[str, float] = {}
        for opt in OPTIONS:
            for k, e in errors(shape, opt, impl).items():
                errs_shape[k] = max(errs_shape.get(k, 0.0), e)
                worst[k] = max(worst.get(k, 0.0), e)
        print(f"{impl} b{shape[0]} L{shape[1]} h{shape[2]} p{shape[3]} g{shape[4]} N{shape[5]} chunk{shape[6]}: "
              + "  ".join(f"{k} {v:.1e}" for k, v in errs_shape.items()))
    print(f"{impl}, worst over the grid: " + "  ".join(f"{k} {v:.1e}" for k, v in worst.items()))
