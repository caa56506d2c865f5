"""Behaviour specific to the fast scan kernels: the fused CPU kernel's chunking, threads, fallback
and build cache, and the Triton kernels run through Triton's CPU interpreter."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ssmscale.ops import scan_cpu, selective_scan
from scan_inputs import make_inputs, rel_err

TESTS = Path(__file__).parent
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
needs_fused = pytest.mark.skipif(not scan_cpu.available(),
                                 reason=f"fused CPU kernel unavailable: {scan_cpu.unavailable_reason()}")


def _run(impl, inputs, softplus=True):
    """Output, last state and every input gradient of a loss that weights each entry differently."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y, h = selective_scan(**{k: leaves.get(k) for k in NAMES}, delta_softplus=softplus,
                          return_last_state=True, impl=impl)
    g = torch.Generator().manual_seed(1)
    loss = (y.float() * torch.randn(y.shape, generator=g)).sum() + (h * torch.randn(h.shape, generator=g)).sum()
    loss.backward()
    return y.detach(), h.detach(), {k: t.grad for k, t in leaves.items()}


def _worst_error(impl, inputs, softplus=True):
    y, h, g = _run(impl, inputs, softplus)
    y0, h0, g0 = _run("ref", inputs, softplus)
    return max([rel_err(y, y0), rel_err(h, h0)] + [rel_err(g[k], g0[k]) for k in g0])


def _python(code, env=None, timeout=600):
    """Run `code` in a fresh interpreter (so module-level state starts clean)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=timeout)


# ------------------------------------------------------------------------------ fused CPU kernel

@needs_fused
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 129])
def test_fused_is_exact_across_chunk_boundaries(monkeypatch, chunk, length):
    monkeypatch.setattr(scan_cpu, "CHUNK", chunk)
    assert _worst_error("fused", make_inputs(2, 3, 4, length)) < 1e-4


@needs_fused
@pytest.mark.parametrize("threads", [1, 2, 4, 5, 9])
def test_fused_gives_the_same_answer_for_any_split_of_tiles_over_threads(monkeypatch, threads):
    # 3 batches x 3 tiles of 16 channels (the last one 8 wide): with 2, 4 or 5 threads some batches
    # are split between threads, whose dB/dC partial sums must be added exactly once; with 9 every
    # thread has one tile
    monkeypatch.setattr(scan_cpu, "_MIN_WORK_PER_THREAD", 1)
    torch.set_num_threads(threads)
    try:
        assert scan_cpu.threads_for(3, 40, 70, 4) == threads
        assert _worst_error("fused", make_inputs(3, 40, 4, 70)) < 1e-4
    finally:
        torch.set_num_threads(min(2, os.cpu_count() or 1))


@needs_fused
@pytest.mark.parametrize("softplus", [True, False])
def test_fused_takes_the_model_layouts(softplus):
    # the Mamba block passes transposes of time-major (batch, L, channels) activations, z as the
    # second half of in_proj's output and B, C as slices of x_proj's output; delta here even has a
    # time stride of 2. Every gradient must reach the right elements of the underlying tensors.
    b, d, n, L = 2, 20, 4, 70
    g = torch.Generator().manual_seed(0)
    bases = dict(xz=torch.randn(b, L, 2 * d, generator=g), dbc=torch.randn(b, L, 3 + 2 * n, generator=g),
                 delta=0.5 * torch.randn(b, d, 2 * L, generator=g) + (-1.0 if softplus else 1.0),
                 A=-torch.rand(d, n, generator=g) - 0.5, D=torch.randn(d, generator=g),
                 bias=0.1 * torch.randn(d, generator=g))

    def run(impl):
        leaves = {k: v.clone().requires_grad_() for k, v in bases.items()}
        xz, dbc = leaves["xz"].transpose(1, 2), leaves["dbc"].transpose(1, 2)
        y = selective_scan(xz[:, :d], leaves["delta"][..., ::2], leaves["A"], dbc[:, 3:3 + n],
                           dbc[:, 3 + n:], leaves["D"], xz[:, d:], leaves["bias"],
                           delta_softplus=softplus, impl=impl)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        return y.detach(), {k: v.grad for k, v in leaves.items()}

    y, grads = run("fused")
    y0, grads0 = run("ref")
    assert max([rel_err(y, y0)] + [rel_err(grads[k], grads0[k]) for k in grads0]) < 1e-4


@needs_fused
@pytest.mark.parametrize("d_inner, length", [(32, 16), (40, 37), (16, 64 + 21), (48, 130)])
def test_fused_gives_the_same_bits_in_mamba_ssms_layout_as_channels_last(d_inner, length):
    # (batch, channels, L) contiguous, as the benchmark and mamba_ssm's API pass it, is read and written through
    # 16 x 16 register transposes (whole tiles of 16 channels, 16 steps at a time, N = 16 for B, C, dB, dC) and
    # scalar loops for the rest; channels-last through row copies. Copies either way: the same bits come out.
    inputs = make_inputs(2, d_inner, 16, length)
    last = {k: v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z", "B", "C") else v
            for k, v in inputs.items()}
    assert last["u"].stride(1) == 1 and inputs["u"].stride(2) == 1
    y, h, g = _run("fused", inputs)
    y_last, h_last, g_last = _run("fused", last)
    assert torch.equal(y, y_last) and torch.equal(h, h_last)
    assert all(torch.equal(g[k], g_last[k]) for k in g)
    y0, h0, g0 = _run("ref", inputs)
    assert max([rel_err(y, y0), rel_err(h, h0)] + [rel_err(g[k], g0[k]) for k in g0]) < 1e-4


@needs_fused
def test_fused_runs_on_torchs_openmp_threads_where_it_can_and_on_its_own_otherwise(tmp_path):
    # on torch's libgomp, the kernel shares torch's worker threads; elsewhere it is built without
    # OpenMP and starts POSIX threads. Both split the rows the same way and agree with the reference.
    if scan_cpu.torch_uses_libgomp():
        assert b"GOMP_parallel" in Path(scan_cpu.load()._name).read_bytes()
    done = _python("""
        from pathlib import Path
        import torch
        from ssmscale.ops import scan_cpu
        scan_cpu.torch_uses_libgomp = lambda: False       # before anything loads the kernel
        scan_cpu._MIN_WORK_PER_THREAD = 1
        from scan_inputs import make_inputs
        from test_scan_kernels import _worst_error
        assert b"GOMP_parallel" not in Path(scan_cpu.load()._name).read_bytes()
        for threads in (1, 2, 7):
            torch.set_num_threads(threads)
            assert _worst_error("fused", make_inputs(3, 40, 4, 70)) < 1e-4, threads
    """, env={"SSMSCALE_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr


def test_fused_uses_torchs_thread_count_and_one_thread_for_small_work():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert scan_cpu.threads_for(8, 256, 1024, 16) == 1
        torch.set_num_threads(3)
        assert scan_cpu.threads_for(8, 256, 1024, 16) == 3
        assert scan_cpu.threads_for(1, 32, 8192, 16) == 2      # never more threads than 16-channel tiles
        assert scan_cpu.threads_for(1, 4, 8, 16) == 1          # 512 updates: not worth a thread
    finally:
        torch.set_num_threads(before)


@needs_fused
def test_fused_without_grad_matches_with_grad():
    inputs = make_inputs(2, 8, 16, 100)
    with torch.no_grad():
        y_nograd, h_nograd = selective_scan(**inputs, delta_softplus=True, return_last_state=True, impl="fused")
    y, h, _ = _run("fused", inputs)
    assert torch.equal(y_nograd, y) and torch.equal(h_nograd, h)


@needs_fused
def test_fused_gradient_through_last_state_only():
    inputs = make_inputs(2, 4, 3, 20)
    grads = {}
    for impl in ("fused", "ref"):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        _, h = selective_scan(**leaves, delta_softplus=True, return_last_state=True, impl=impl)
        h.pow(2).sum().backward()
        grads[impl] = {k: t.grad for k, t in leaves.items()}
    for k, g in grads["ref"].items():
        if g is None:   # C, D and z do not reach the last state: ref has no gradient, fused zeros
            assert not grads["fused"][k].any(), k
        else:
            assert rel_err(grads["fused"][k], g) < 1e-4, k


@needs_fused
def test_fused_returns_gradients_in_each_inputs_dtype():
    inputs = make_inputs(2, 4, 3, 9, dtype=torch.bfloat16)
    y, h, g = _run("fused", inputs)
    y0, h0, g0 = _run("ref", inputs)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    for k, v in inputs.items():
        assert g[k].dtype == v.dtype, k
        assert rel_err(g[k].float(), g0[k].float()) < 2e-2, k   # both rounded to bf16 at the end


@needs_fused
def test_fused_handles_empty_sequences():
    y, h = selective_scan(**make_inputs(2, 3, 4, 0), return_last_state=True, impl="fused")
    assert y.shape == (2, 3, 0) and torch.equal(h, torch.zeros(2, 3, 4))


@needs_fused
def test_loading_the_kernel_does_not_flush_denormals_process_wide():
    # linking a shared library with -ffast-math would set flush-to-zero at load time
    assert scan_cpu.load() is not None
    assert (torch.tensor([1e-38]) / 100).item() > 0


@needs_fused
def test_kernel_is_built_into_the_cache_and_auto_announces_fused(tmp_path):
    done = _python("""
        import torch
        from scan_inputs import make_inputs
        from ssmscale.ops import selective_scan
        selective_scan(**make_inputs(1, 2, 2, 3))
        selective_scan(**make_inputs(1, 2, 2, 3))
    """, env={"SSMSCALE_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["ssmscale: selective_scan on cpu runs 'fused'"]
    assert len(list((tmp_path / "kernels").glob("scan_cpu-*.so"))) == 1


@pytest.mark.parametrize("env, reason", [
    ({"SSMSCALE_NO_FUSED_SCAN": "1"}, "'fused' unavailable: disabled by SSMSCALE_NO_FUSED_SCAN=1"),
    ({"CC": "/nonexistent/cc"}, "'fused' unavailable: no C compiler ('/nonexistent/cc' not found; set CC)"),
])
def test_without_the_kernel_auto_falls_back_to_chunked_and_says_so_once(tmp_path, env, reason):
    done = _python("""
        from scan_inputs import make_inputs, rel_err
        from ssmscale.ops import available_impls, selective_scan
        assert "fused" not in available_impls("cpu"), available_impls("cpu")
        inputs = make_inputs(2, 3, 4, 10)
        for _ in range(2):
            y = selective_scan(**inputs, delta_softplus=True)
        assert rel_err(y, selective_scan(**inputs, delta_softplus=True, impl="ref")) < 1e-4
    """, env={"SSMSCALE_CACHE": str(tmp_path), **env})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"ssmscale: selective_scan on cpu runs 'chunked' ({reason})"]


def test_asking_for_fused_when_it_is_unavailable_names_the_available_ones(tmp_path):
    done = _python("""
        from scan_inputs import make_inputs
        from ssmscale.ops import selective_scan
        try:
            selective_scan(**make_inputs(1, 2, 2, 3), impl="fused")
        except ValueError as exc:
            print(exc)
    """, env={"SSMSCALE_NO_FUSED_SCAN": "1"})
    assert done.stdout.strip() == ("impl: 'fused' is not available on cpu in this process; "
                                   "available: ['chunked', 'ref']")


# ---------------------------------------------------------------------- Triton, interpreted on CPU

_TRITON_GRID = """
    import json, torch
    from scan_inputs import make_inputs, rel_err
    from ssmscale.ops import scan_triton, selective_scan_ref
    scan_triton.CHUNK, scan_triton.BLOCK_D = 8, 4      # many chunks and channel blocks at tiny sizes
    NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]

    def run(fn, inputs, softplus):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
        y, h = fn(**{k: leaves.get(k) for k in NAMES}, delta_softplus=softplus, return_last_state=True)
        g = torch.Generator().manual_seed(1)
        loss = (y.float() * torch.randn(y.shape, generator=g)).sum() + (h * torch.randn(h.shape, generator=g)).sum()
        loss.backward()
        return dict(y=y.detach().float(), last_state=h.detach(),
                    **{"d" + k: t.grad.float() for k, t in leaves.items()})

    cases = [  # (batch, d_inner, N, L), (with_D, with_z, with_bias, softplus), dtype
        ((1, 3, 1, 1), (True, True, True, True), "float32"),
        ((2, 5, 4, 7), (False, False, False, False), "float32"),
        ((2, 9, 3, 17), (True, True, True, True), "float32"),
        ((1, 4, 16, 24), (True, False, True, False), "float32"),
        ((2, 6, 5, 19), (False, True, False, True), "float32"),
        ((2, 5, 4, 11), (True, True, True, True), "bfloat16"),
    ]
    out = []
    for shape, (D, z, bias, sp), dtype in cases:
        inputs = make_inputs(*shape, with_D=D, with_z=z, with_bias=bias, softplus=sp,
                             dtype=getattr(torch, dtype))
        got = run(scan_triton.selective_scan_triton, inputs, sp)
        want = run(selective_scan_ref, inputs, sp)
        out.append(dict(case=f"{shape} {dtype} D{int(D)}z{int(z)}bias{int(bias)}sp{int(sp)}", dtype=dtype,
                        errors={k: rel_err(got[k], want[k]) for k in want}))
    print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (pip install triton) so its kernels cannot be interpreted")
def test_triton_kernels_match_reference_outputs_and_gradients_under_the_interpreter():
    done = _python(_TRITON_GRID, env={"TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    cases = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(cases) == 6
    for case in cases:
        tol = 1e-4 if case["dtype"] == "float32" else 2e-2   # bf16: both sides rounded at the end
        bad = {k: e for k, e in case["errors"].items() if not e < tol}
        assert not bad, f"{case['case']}: {bad}"


def test_triton_is_registered_for_cuda_only_and_not_imported_until_used():
    done = _python("""
        import sys
        from ssmscale.ops import available_impls
        from ssmscale.ops.scan import _REGISTRY
        available_impls()
        print(_REGISTRY["triton"].devices, "triton" in sys.modules)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["('cuda',)", "False"]
