"""Admission checks for a mixer: what must hold before a family's scaling study means anything.

The commonest false "win" of a new architecture at small scale is a mixer that sees later tokens. Before a
plugin trains (train, ladder) and on their own (`ssmscale check-family`), its mixer is built at a small width
and checked, in this order (the first failure stops it, naming the check and the first offending position):

1. contract     Mixer(d_model, **options) is a torch.nn.Module; forward(x) maps (batch, L, d_model) fp32 to
                a tensor of the same shape and dtype, at several L (1 included).
2. finite       outputs, and gradients of a random projection of them (input and every parameter), finite.
3. determinism  two builds under one seed have bitwise-equal weights, and give bitwise-equal outputs
                (the seed set again before each forward, so dropout-like randomness is seeded too).
4. batch        each sequence of a batch gives what it gives alone: nothing passes between sequences.
5. causality    exact, in float64 where the mixer runs in it (else fp32, and the line says so):
                - the Jacobian: d<r_t, out_t>/dx_s must be 0 for every s > t, at every t (one backward per
                  length: copy t of the batch carries output t's projection). Causal code gives exact
                  zeros here whatever the rounding, so the tolerance (1e-9 relative in float64, 1e-6 in
                  fp32) only spares algorithms that cancel future terms by subtraction;
                - perturbation: replacing input s by another vector must leave outputs 0..s-1 unchanged
                  (1e-6 / 1e-4 relative), which also catches leaks with no gradient (signs, argmax);
                at lengths 2, 5, 16, 33 and 70 (chunk boundaries of 8, 16, 32 and 64 inside them), so a
                leak of one token, of a 1e-3-sized term, or a normalisation over the sequence is caught.
6. cache        where allocate_cache exists: the sequence fed in pieces (one token at a time, and pieces of
                several sizes unless the mixer says chunked_prefill = False) equals the full forward (1e-5
                relative in float64: a cache may hold fp32 state; a wrong continuation is off by far more).
Without allocate_cache the family trains but cannot generate (the pass line says so).
"""

from __future__ import annotations

from dataclasses import dataclass

CAUSAL_LENGTHS = (2, 5, 16, 33, 70)
SHAPE_LENGTHS = (1, 7, 20)
CACHE_LENGTH = 37
CACHE_PIECES = ([37], [1] * 37, [3, 1, 1, 16, 16], [16, 21], [5, 1, 7, 24])
# relative to the largest output (or past Jacobian entry); the cache's is loose because a mixer may keep its
# recurrent state in fp32 whatever the input's precision (the built-in SSMs do): a wrong continuation is off
# by O(1), not by rounding
TOL = {"float64": {"jacobian": 1e-9, "perturb": 1e-6, "cache": 1e-5},
       "float32": {"jacobian": 1e-6, "perturb": 1e-4, "cache": 1e-4}}


class AdmissionError(Exception):
    """A check failed: `check`, the first offending position (or None), and what was seen."""

    def __init__(self, check: str, detail: str, position: int | None = None):
        self.check, self.detail, self.position = check, detail, position
        where = f" at position {position}" if position is not None else ""
        super().__init__(f"{check} check failed{where}: {detail}")


@dataclass
class Report:
    lines: list            # one per check passed
    dtype: str             # the precision causality and the cache were checked in
    can_generate: bool


def admit(factory, d_model: int, seed: int = 0, say=None) -> Report:
    """Run every check on the mixers `factory()` builds (at width d_model); AdmissionError on the first failure.
    `say(line)` is called as each check passes."""
    import torch
    lines = []

    def passed(line):
        lines.append(line)
        if say:
            say(line)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mixer = _contract(factory, d_model, passed)
        _finite(mixer, d_model, passed)
        _determinism(factory, d_model, seed, passed)
        _batch(mixer, d_model, passed)
        work, why = _precision(mixer, d_model)
        _causality(work, d_model, passed, why)
        can_generate = hasattr(mixer, "allocate_cache")
        if can_generate:
            _cache(work, d_model, passed, why)
        else:
            passed("cache: no allocate_cache, so this family trains but cannot generate (profile --modes generate "
                   "says so)")
    return Report(lines, why[0], can_generate)


def _x(batch, length, d_model, dtype=None):
    import torch
    return torch.randn(batch, length, d_model, dtype=dtype or torch.float32)


def _contract(factory, d_model, passed):
    import torch
    try:
        mixer = factory()
    except Exception as exc:
        raise AdmissionError("contract", f"building the mixer at d_model {d_model} raised {_short(exc)}") from None
    if not isinstance(mixer, torch.nn.Module):
        raise AdmissionError("contract", f"the class built a {type(mixer).__name__}, not a torch.nn.Module")
    mixer.float()
    for L in SHAPE_LENGTHS:
        x = _x(2, L, d_model)
        out = _forward(mixer, x, "contract")
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise AdmissionError("contract", f"forward maps (2, {L}, {d_model}) float32 to {got}; it must return "
                                             "the input's shape and dtype")
    passed(f"contract: forward maps (batch, L, {d_model}) fp32 to the same shape and dtype "
           f"(L = {', '.join(map(str, SHAPE_LENGTHS))})")
    return mixer


def _forward(mixer, x, check, cache=None):
    try:
        return mixer(x) if cache is None else mixer(x, cache)
    except Exception as exc:
        raise AdmissionError(check, f"forward on {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} raised "
                                    f"{_short(exc)}") from None


def _first_bad_position(t) -> int:
    """The first sequence position (dim 1) where a (batch, L, ...) tensor is not finite."""
    import torch
    bad = ~torch.isfinite(t)
    return int(bad.reshape(t.shape[0], t.shape[1], -1).any(-1).any(0).nonzero()[0, 0])


def _finite(mixer, d_model, passed):
    import torch
    x = _x(2, 33, d_model).requires_grad_(True)
    out = _forward(mixer, x, "finite")
    if not torch.isfinite(out).all():
        raise AdmissionError("finite", "the output is not finite", _first_bad_position(out))
    mixer.zero_grad(set_to_none=True)
    (out * torch.randn_like(out)).sum().backward()
    if not torch.isfinite(x.grad).all():
        raise AdmissionError("finite", "the gradient with respect to the input is not finite",
                             _first_bad_position(x.grad))
    for name, p in mixer.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise AdmissionError("finite", f"the gradient of parameter {name} is not finite")
    mixer.zero_grad(set_to_none=True)
    passed("finite: outputs and gradients (input and parameters) are finite")


def _determinism(factory, d_model, seed, passed):
    import torch
    built = []
    for _ in range(2):
        torch.manual_seed(seed)
        built.append(factory().float())
    a, b = (m.state_dict() for m in built)
    for name in a:
        if not torch.equal(a[name], b[name]):
            raise AdmissionError("determinism", f"two builds under seed {seed} differ in {name}")
    x = _x(2, 33, d_model)
    outs = []
    for m in (built[0], built[0], built[1]):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(_forward(m, x, "determinism"))
    for other in outs[1:]:
        if not torch.equal(outs[0], other):
            differ = (outs[0] != other).reshape(2, 33, -1).any(-1).any(0).nonzero()[0, 0]
            raise AdmissionError("determinism", f"the same input under seed {seed} gave different outputs",
                                 int(differ))
    passed(f"determinism: two builds under seed {seed} have equal weights and give equal outputs")


def _batch(mixer, d_model, passed):
    import torch
    x = _x(3, 16, d_model)
    with torch.no_grad():
        together = _forward(mixer, x, "batch")
        for i in range(3):
            alone = _forward(mixer, x[i:i + 1], "batch")[0]
            diff = (together[i] - alone).abs().amax(-1)
            bad = (diff > 1e-4 * max(alone.abs().max().item(), 1e-30)).nonzero()
            if len(bad):
                raise AdmissionError("batch", f"sequence {i} of a batch of 3 differs from it alone (by "
                                              f"{diff.max().item():.2g}): sequences must not mix", int(bad[0, 0]))
    passed("batch: each sequence of a batch gives what it gives alone")


def _precision(mixer, d_model):
    """The mixer in float64 if it runs there, else fp32: (mixer, (dtype name, why))."""
    import copy

    import torch
    m64 = copy.deepcopy(mixer).double()
    try:
        with torch.no_grad():
            out = m64(_x(1, 5, d_model, torch.float64))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
            return m64, ("float64", "")
        why = f"its forward returns {out.dtype} for float64 input"
    except Exception as exc:
        why = f"its forward does not run in float64 ({_short(exc)})"
    return mixer, ("float32", why)


def _causality(mixer, d_model, passed, precision):
    import torch
    name, why = precision
    dtype = torch.float64 if name == "float64" else torch.float32
    tol = TOL[name]
    for L in CAUSAL_LENGTHS:
        x = _x(1, L, d_model, dtype)
        # the Jacobian: copy t of the batch back-propagates <r_t, out_t> only
        xs = x.expand(L, L, d_model).clone().requires_grad_(True)
        out = _forward(mixer, xs, "causality")
        r = torch.randn(L, d_model, dtype=dtype)
        picked = out[torch.arange(L), torch.arange(L)]                     # (L, d): output t of copy t
        (grad,) = torch.autograd.grad((picked * r).sum(), xs)
        size = grad.abs().amax(-1)                                         # (t, s): |d<r_t, out_t>/dx_s|
        future = torch.ones(L, L, dtype=torch.bool).triu(1)
        scale = max(size[~future].max().item(), 1e-300)
        leak = future & (size > tol["jacobian"] * scale)
        if leak.any():
            t, s = (int(v) for v in leak.nonzero()[0])
            raise AdmissionError("causality", f"the output there depends on the input at position {s} (length {L}, "
                                              f"d out/d x there {size[t, s].item() / scale:.2g} x the largest over "
                                              f"inputs up to the output's position, {name}): the mixer sees later "
                                              f"tokens", t)
        # perturbation: copy s has input s replaced; copy 0 of the batch is the unperturbed sequence
        with torch.no_grad():
            xp = x.expand(L + 1, L, d_model).clone()
            xp[torch.arange(1, L + 1), torch.arange(L)] = torch.randn(L, d_model, dtype=dtype)
            outp = _forward(mixer, xp, "causality")
        base = outp[0]
        diff = (outp[1:] - base).abs().amax(-1)                            # (s, t)
        scale = max(base.abs().max().item(), 1e-300)
        past = torch.ones(L, L, dtype=torch.bool).tril(-1)                 # t < s
        moved = past & (diff > tol["perturb"] * scale)
        if moved.any():
            pairs = moved.nonzero()
            s, t = (int(v) for v in pairs[pairs[:, 1].argmin()])
            raise AdmissionError("causality", f"the output there changes when the input at position {s} changes "
                                              f"(length {L}, by {diff[s, t].item() / scale:.2g} of the output's "
                                              f"size, {name}): the mixer sees later tokens", t)
    note = f" ({why}; fp32 tolerances)" if why else ""
    passed(f"causality: no output depends on a later input, by the Jacobian and by perturbation, in {name}{note} "
           f"(L = {', '.join(map(str, CAUSAL_LENGTHS))})")


def _cache(mixer, d_model, passed, precision):
    import torch
    name, _ = precision
    dtype = torch.float64 if name == "float64" else torch.float32
    L = CACHE_LENGTH
    x = _x(2, L, d_model, dtype)
    with torch.no_grad():
        full = _forward(mixer, x, "cache")
    scale = max(full.abs().max().item(), 1e-300)
    chunked = getattr(mixer, "chunked_prefill", True)
    patterns = [p for p in CACHE_PIECES if chunked or all(n == 1 for n in p[1:])]
    if not chunked:
        patterns.append([5] + [1] * (L - 5))
    for pieces in patterns:
        try:
            cache = mixer.allocate_cache(2, L, dtype, x.device)
        except Exception as exc:
            raise AdmissionError("cache", f"allocate_cache(2, {L}, {dtype}, cpu) raised {_short(exc)}") from None
        outs, start = [], 0
        with torch.no_grad():
            for n in pieces:
                outs.append(_forward(mixer, x[:, start:start + n], "cache", cache))
                start += n
        got = torch.cat(outs, dim=1)
        diff = (got - full).abs().amax(-1).amax(0)
        bad = (diff > TOL[name]["cache"] * scale).nonzero()
        if len(bad):
            t = int(bad[0, 0])
            raise AdmissionError("cache", f"fed in pieces {_pieces(pieces)} the output differs from the full forward "
                                          f"(by {diff[t].item() / scale:.2g} of its size, {name})", t)
    what = "one token at a time and in pieces of several sizes" if chunked else "after a prompt, one token at a time"
    passed(f"cache: the sequence fed {what} equals the full forward ({name})")


def _pieces(pieces) -> str:
    return "1 x 37" if pieces == [1] * 37 else "+".join(map(str, pieces))


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}".rstrip(": ")


# ------------------------------------------------------------------------------ entry points
_ADMITTED: dict = {}       # (spec, sha256) -> Report: a plugin is checked once per process and code version


def check_width(spec, d_model: int) -> int:
    """The width a plugin is checked at before training: the run's, at most 128 (the checks are about the
    code's structure, not its size), a multiple of the spec's width_multiple."""
    step = spec.width_multiple
    return d_model if d_model <= 128 else max(step, 128 // step * step)


def admit_plugin(spec, d_model: int, family: str, say=None) -> Report:
    """The checks for a plugin family before it trains; a UserError of one line when one fails."""
    from ..errors import UserError
    from .plugin import build_mixer
    key = (spec, spec.sha256())
    if key not in _ADMITTED:
        width = check_width(spec, d_model)
        try:
            _ADMITTED[key] = admit(lambda: build_mixer(spec, width), width, say=say)
        except AdmissionError as exc:
            raise UserError(f"plugin family {family} ({spec.target}) refused: {exc} "
                            f"(ssmscale check-family shows every check)") from None
    return _ADMITTED[key]


def builtin_factories(family: str, d_model: int, options: dict) -> list:
    """[(label, factory)] for a built-in family's mixers at d_model (a hybrid has two kinds of layer)."""
    from .config import ModelConfig
    from .lm import LAYERS
    cfg = ModelConfig(family=family, d_model=d_model, n_layer=3 if family == "hybrid" else 2, **options)
    out = []
    for kind in dict.fromkeys(cfg.layer_kinds):
        layer = LAYERS[kind](cfg)
        out.append((f"{family} ({kind} layer, {layer.mixer.__name__})",
                    lambda layer=layer: layer.mixer(d_model, **layer.options)))
    return out


def check_family(target: str, options: dict, d_model: int, say=print) -> list:
    """`ssmscale check-family`: every check on a plugin mixer (file or module path) or a built-in family's
    mixers; prints each passed check; a UserError of one line naming the first failure."""
    from ..errors import UserError
    from .config import FAMILIES
    from .plugin import MixerSpec, build_mixer, resolve_target, split_target
    if target in FAMILIES:
        try:
            factories = builtin_factories(target, d_model, options)
        except (TypeError, ValueError) as exc:
            raise UserError(f"--options: {exc}") from None
    else:
        try:
            split_target(target)
        except ValueError as exc:
            raise UserError(f"SPEC: {exc} (or a built-in family: {', '.join(FAMILIES)})") from None
        spec = MixerSpec(resolve_target(target, "."), dict(options))
        label = f"{spec.class_name} from {spec.source_path()} (sha256 {spec.sha256()[:12]})"
        factories = [(label, lambda: build_mixer(spec, d_model))]
    reports = []
    for label, factory in factories:
        say(f"{label}, d_model {d_model}, options {json_text(options)}:")
        try:
            reports.append(admit(factory, d_model, say=lambda line: say(f"  ok  {line}")))
        except AdmissionError as exc:
            raise UserError(f"{label}: {exc}") from None
        say(f"  admitted: {len(reports[-1].lines)} checks passed")
    return reports


def json_text(options: dict) -> str:
    import json
    return json.dumps(options, sort_keys=True)
