"""Triton kernels of the selective scan (imported only when the "triton" implementation runs).

One program owns one batch element and a block of BLOCK_D channels; its (BLOCK_D, N) state stays
in registers while it walks the sequence. Layouts are mamba_ssm's, contiguous:
u, delta, z, out (batch, d_inner, L); B, C (batch, N, L); A (d_inner, N).
Forward: saves the state before every CHUNK-th step when gradients are needed.
Backward: chunks in reverse; a chunk's states are recomputed from its saved start state into a
per-program scratch slab (CHUNK + 1 slots, stays in L2), then the adjoint recurrence runs back
through them. dB and dC sum over channels: each program writes its block's partial sums
(batch, n_dblocks, L, N), added up afterwards, so results do not depend on scheduling.
"""

import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _step_size(delta_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw, dt): delta (+ bias) before and after the optional softplus."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return raw, dt


@triton.jit
def scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                    out_ptr, ypre_ptr, states_ptr, last_ptr,
                    d_inner, length, n_state, n_chunks,
                    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, SAVE: tl.constexpr):
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md = offs_d < d_inner
    mn = offs_n < n_state
    mdn = md[:, None] & mn[None, :]
    rows = (b * d_inner + offs_d).to(tl.int64)
    seq = rows * length
    bc = b.to(tl.int64) * n_state * length + offs_n * length
    A = tl.load(A_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mdn, other=0.0)
    bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    Dv = tl.load(D_ptr + offs_d, mask=md, other=0.0).to(tl.float32) if HAS_D else 0.0
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for t in range(0, length):
        if SAVE:
            if t % CHUNK == 0:
                tl.store(states_ptr + (rows[:, None] * n_chunks + t // CHUNK) * n_state
                         + offs_n[None, :], h, mask=mdn)
        raw, dt = _step_size(delta_ptr, seq + t, md, bias, HAS_BIAS, SOFTPLUS)
        uu = tl.load(u_ptr + seq + t, mask=md, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + bc + t, mask=mn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc + t, mask=mn, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * A) * h + (dt * uu)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        if HAS_D:
            y = y + Dv * uu
        if HAS_Z:
            if SAVE:
                tl.store(ypre_ptr + seq + t, y, mask=md)
            zz = tl.load(z_ptr + seq + t, mask=md, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(out_ptr + seq + t, y.to(out_ptr.dtype.element_ty), mask=md)
    tl.store(last_ptr + rows[:, None] * n_state + offs_n[None, :], h, mask=mdn)


@triton.jit
def scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                    ypre_ptr, states_ptr, gout_ptr, glast_ptr, scratch_ptr,
                    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
                    d_inner, length, n_state, n_chunks,
                    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, HAS_GLAST: tl.constexpr):
    b = tl.program_id(0)
    pd = tl.program_id(1)
    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md = offs_d < d_inner
    mn = offs_n < n_state
    mdn = md[:, None] & mn[None, :]
    rows = (b * d_inner + offs_d).to(tl.int64)
    seq = rows * length
    bc = b.to(tl.int64) * n_state * length + offs_n * length
    prog = b.to(tl.int64) * tl.num_programs(1) + pd
    slot = BLOCK_D * BLOCK_N
    scratch = (scratch_ptr + prog * (CHUNK + 1) * slot
               + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :])
    part = prog * length * n_state + offs_n             # (batch, n_dblocks, L, N) partial sums
    A = tl.load(A_ptr + offs_d[:, None] * n_state + offs_n[None, :], mask=mdn, other=0.0)
    bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    Dv = tl.load(D_ptr + offs_d, mask=md, other=0.0).to(tl.float32) if HAS_D else 0.0
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)   # dLoss/dh_t from step t+1
    if HAS_GLAST:
        carry = tl.load(glast_ptr + rows[:, None] * n_state + offs_n[None, :], mask=mdn, other=0.0)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for ci in range(0, n_chunks):
        t0 = (n_chunks - 1 - ci) * CHUNK
        t_end = tl.minimum(t0 + CHUNK, length)
        h = tl.load(states_ptr + (rows[:, None] * n_chunks + t0 // CHUNK) * n_state + offs_n[None, :],
                    mask=mdn, other=0.0)
        tl.store(scratch, h)
        for t in range(t0, t_end):
            raw, dt = _step_size(delta_ptr, seq + t, md, bias, HAS_BIAS, SOFTPLUS)
            uu = tl.load(u_ptr + seq + t, mask=md, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + bc + t, mask=mn, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * uu)[:, None] * Bt[None, :]
            tl.store(scratch + (t - t0 + 1) * slot, h)
        tl.debug_barrier()
        for i in range(0, t_end - t0):
            t = t_end - 1 - i
            raw, dt = _step_size(delta_ptr, seq + t, md, bias, HAS_BIAS, SOFTPLUS)
            uu = tl.load(u_ptr + seq + t, mask=md, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + bc + t, mask=mn, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc + t, mask=mn, other=0.0).to(tl.float32)
            g = tl.load(gout_ptr + seq + t, mask=md, other=0.0).to(tl.float32)
            gy = g
            if HAS_Z:
                zz = tl.load(z_ptr + seq + t, mask=md, other=0.0).to(tl.float32)
                y = tl.load(ypre_ptr + seq + t, mask=md, other=0.0)
                sg = tl.sigmoid(zz)
                gy = g * zz * sg
                tl.store(dz_ptr + seq + t, g * y * sg * (1.0 + zz * (1.0 - sg)), mask=md)
            h_prev = tl.load(scratch + (t - t0) * slot)
            h_cur = tl.load(scratch + (t - t0 + 1) * slot)
            decay = tl.exp(dt[:, None] * A)
            G = carry + gy[:, None] * Ct[None, :]          # dLoss/dh_t
            q = G * decay * h_prev                          # dLoss/d(dt_t A)
            tl.store(dB_ptr + part + t * n_state, tl.sum(G * (dt * uu)[:, None], axis=0), mask=mn)
            tl.store(dC_ptr + part + t * n_state, tl.sum(gy[:, None] * h_cur, axis=0), mask=mn)
            gB = tl.sum(G * Bt[None, :], axis=1)
            ddt = gB * uu + tl.sum(q * A, axis=1)
            dA_acc += q * dt[:, None]
            du = gB * dt
            if HAS_D:
                du = du + Dv * gy
            tl.store(du_ptr + seq + t, du, mask=md)
            dD_acc += gy * uu
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            tl.store(ddelta_ptr + seq + t, ddt, mask=md)
            dbias_acc += ddt
            carry = decay * G
        tl.debug_barrier()
    tl.store(dA_ptr + rows[:, None] * n_state + offs_n[None, :], dA_acc, mask=mdn)
    tl.store(dD_ptr + rows, dD_acc, mask=md)
    tl.store(dbias_ptr + rows, dbias_acc, mask=md)
