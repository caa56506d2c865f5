"""Random selective-scan inputs shared by the kernel tests (realistic ranges: delta ~ softplus scale)."""

import torch


def make_inputs(batch, d_inner, d_state, length, *, with_D=True, with_z=True, with_bias=True,
                softplus=True, dtype=torch.float32, seed=0):
    """Without softplus, delta is made positive beforehand (a negative step makes the state blow up)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    inputs = dict(
        u=r(batch, d_inner, length),
        delta=0.5 * r(batch, d_inner, length) - 1.0 if softplus
        else torch.nn.functional.softplus(0.5 * r(batch, d_inner, length) - 1.0) + 0.2,
        A=-torch.exp(0.5 * r(d_inner, d_state)),
        B=r(batch, d_state, length),
        C=r(batch, d_state, length),
        D=r(d_inner) if with_D else None,
        z=r(batch, d_inner, length) if with_z else None,
        delta_bias=0.1 * r(d_inner) if with_bias else None,
    )
    return {k: (v.to(dtype) if (v is not None and k != "A") else v) for k, v in inputs.items()}


def rel_err(a, b):
    """Normwise relative error max|a - b| / max|b| (elementwise ratios blow up near zero)."""
    scale = b.abs().max().item()
    diff = (a.double() - b.double()).abs().max().item()
    return diff / scale if scale > 0 else diff
