"""Print the worst normwise relative error of every fast SSD against `ref`, per output and gradient, over the
grid of tests/test_ssd.py, then of the fused Mamba-2 block (conv + recurrent SSD + gated norm + projections)
over the cases of tests/test_mamba2_inner.py and the 10M profile model's layer.
Run: python tests/ssd_error_grid.py"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_ssd import FAST_IMPLS, OPTIONS, SHAPES, errors
import test_mamba2_inner as T
from scan_inputs import rel_err
from ssmscale.ops.mamba2_inner import mamba2_inner_fused, mamba2_inner_ref

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

# (batch, L, d_model, heads, head_dim, groups, d_state); the last: the 10M profile model's layer (Mamba-2 376 x 12)
block_cases = [(1, 1, 8, 2, 4, 1, 4), (2, 70, 12, 4, 8, 1, 16), (2, 37, 10, 6, 3, 3, 5), (1, 130, 16, 2, 20, 2, 16),
               (1, 300, 376, 94, 8, 1, 16)]
worst = {}
for case in block_cases:
    b, L, d, heads, p, groups, n = case
    kw = dict(heads=heads, groups=groups, d_state=n, eps=1e-5, return_final_state=True)
    inputs = T._block_inputs(*case)
    got, want = T._grads(mamba2_inner_fused, inputs, **kw), T._grads(mamba2_inner_ref, inputs, **kw)
    errs = {k: rel_err(a, c) for k, a, c in zip(T.BLOCK_NAMES, got, want)}
    print(f"mamba2_inner b{b} L{L} d{d} h{heads} p{p} g{groups} N{n}: " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    for k, e in errs.items():
        worst[k] = max(worst.get(k, 0.0), e)
print("mamba2_inner (fused), worst: " + "  ".join(f"{k} {v:.1e}" for k, v in worst.items()))
