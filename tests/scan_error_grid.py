"""Print the worst normwise relative error against the reference of every fast CPU kernel, per output
and gradient: the scans over the grid of tests/test_scan.py, the fused conv and the fused Mamba inner
op over the cases of tests/test_mamba_inner.py.  Run: python tests/scan_error_grid.py"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
from test_scan import FAST_IMPLS, SHAPES, OPTIONS, _run
from scan_inputs import make_inputs, rel_err
import test_mamba_inner as T
from ssmscale.ops.conv import causal_conv1d_fused, causal_conv1d_ref
from ssmscale.ops.mamba_inner import mamba_inner_fused, mamba_inner_ref

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

conv_cases = [(1, 3, 1, 4, True, 2), (2, 20, 70, 4, True, 1), (3, 40, 130, 3, False, 2), (2, 33, 65, 4, True, 1),
              (1, 736, 1024, 4, True, 1)]
worst = {}
for batch, channels, length, width, silu, time_dim in conv_cases:
    g = torch.Generator().manual_seed(0)
    shape = (batch, length, channels) if time_dim == 1 else (batch, channels, length)
    inputs = [torch.randn(shape, generator=g), torch.randn(channels, 1, width, generator=g),
              torch.randn(channels, generator=g)]
    got = T._grads(causal_conv1d_fused, inputs, silu=silu, time_dim=time_dim)
    want = T._grads(causal_conv1d_ref, inputs, silu=silu, time_dim=time_dim)
    for k, a, b in zip(["y", "dx", "dweight", "dbias"], got, want):
        worst[k] = max(worst.get(k, 0), rel_err(a, b))
print("conv (fused)", "  ".join(f"{k} {v:.1e}" for k, v in worst.items()))

block_cases = [(1, 8, 16, 4, 2, 1), (2, 12, 40, 16, 3, 70), (3, 10, 20, 5, 2, 130), (2, 24, 48, 16, 2, 64),
               (1, 368, 736, 16, 23, 300)]   # the last: the 10M profile model's layer
worst = {}
for case in block_cases:
    inputs = T._block_inputs(*case)
    got = T._grads(mamba_inner_fused, inputs, return_last_state=True)
    want = T._grads(mamba_inner_ref, inputs, return_last_state=True)
    for k, a, b in zip(T.BLOCK_NAMES, got, want):
        worst[k] = max(worst.get(k, 0), rel_err(a, b))
print("mamba_inner (fused)", "  ".join(f"{k} {v:.1e}" for k, v in worst.items()))
