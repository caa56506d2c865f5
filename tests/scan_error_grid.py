"""Print the worst normwise relative error against `ref` of every fast CPU scan, per output and gradient,
over the grid of tests/test_scan.py.  Run: python tests/scan_error_grid.py"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_scan import FAST_IMPLS, SHAPES, OPTIONS, _run
from scan_inputs import make_inputs, rel_err
worst = {}
for impl in FAST_IMPLS:
    for shape in SHAPES:
        for with_D, with_z, with_bias, sp in OPTIONS:
            inp = make_inputs(*shape, with_D=with_D, with_z=with_z, with_bias=with_bias, softplus=sp)
            ls = shape[3] % 2 == 1
            yr, hr, gr = _run("ref", inp, sp, ls); y, h, g = _run(impl, inp, sp, ls)
            errs = {"y": rel_err(y, yr), **({"last_state": rel_err(h, hr)} if ls else {}),
                    **{"d" + k: rel_err(g[k], gr[k]) for k in gr}}
            for k, e in errs.items():
                worst[(impl, k)] = max(worst.get((impl, k), 0), e)
for impl in FAST_IMPLS:
    print(impl, "  ".join(f"{k[1]} {v:.1e}" for k, v in worst.items() if k[0] == impl))
