"""Sizing: one documented rule turns a target non-embedding parameter count into (d_model, n_layer).

Transformer++ (the anchor family):
  n_layer = max(2, round((N / (12 * r^2))^(1/3)))  with aspect ratio r = d_model / n_layer = 64
  (GPT-3 125M is 12 x 768: r = 64), then d_model = the multiple of head_dim whose exact
  non-embedding count is closest to N (in log space). Shapes keep r within ASPECT_BAND;
  a 2-layer floor keeps the smallest models from being single-layer (r drops below 64 there).
Every other family (Mamba, Mamba-2, the hybrid) is a stack of single-branch layers with no MLP, so
  it takes twice the transformer's layers (Gu & Dao 2023: two Mamba blocks ~ one attention + MLP
  layer, both ~12 d^2; Mamba-2 likewise, ~6 d^2 per block at expand 2; the hybrid's attention-only
  layers ~4 d^2 each; LAYERS_PER_TRANSFORMER_LAYER holds this depth rule per family) and the width =
  the multiple of 8 closest in non-embedding parameters to the transformer's exact count, or the even
  width closest below width 256 (64 for Mamba, the rule its committed study was planned with), so that
  small models match within a few percent: a step of 8 in width moves the count by 16/d, 25% at width
  64. At large width Mamba's is the transformer's width; at small width it is a little narrower,
  because x_proj, dt_proj, A_log and D cost relatively more there (Mamba-2: B and C, whose size does
  not scale with width). Mamba-2 and the hybrid's attention round their head counts
  (models/config.py), so any even width is a valid model.
A plugin family (models/plugin.py) is sized by the same search: its depth is the transformer's layers when
  its layer has the MLP branch (mixer + MLP ~ one transformer layer), twice them without (like the SSMs),
  or the spec's n_layer; its width the multiple of the spec's width_multiple (searched in steps of 8 first,
  then in its own steps around that, at every width)
  whose non-embedding count is closest to the transformer's, which it must match within PLUGIN_MATCH
  With its MLP branch the MLP's hidden width (8/3 d_model rounded up to 16 by default) is then set to the
  integer that lands closest: the fine step that width alone lacks at small sizes (a step of 2 in width moves
  a 2.5e4-parameter model's count by ~13%). A plugin that misses PLUGIN_MATCH (no MLP branch, a coarse
  width_multiple or a fixed n_layer) is an error that says by how much.
All counts come from flops.param_counts, which a test checks against the built models.
Targets are bounded by limits.MAX_PARAMS and widths by limits.MAX_WIDTH, so no request can hang the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import limits
from .config import FAMILIES, ModelConfig

ASPECT = 64
ASPECT_BAND = (16, 128)
MIN_LAYERS = 2
WIDTH_MULTIPLE = 8      # of the families matched to the transformer, from width FINE_BELOW on
FINE_BELOW = {"mamba": 64}     # other families: FINE_BELOW_DEFAULT
FINE_BELOW_DEFAULT = 256
# Blocks that stand for one transformer layer at the same width: a Transformer++ layer is attention +
# MLP (~12 d^2); the other families' blocks have no MLP (Mamba ~6 d^2 at expand 2), so they stack two
# (Gu & Dao 2023). Every family in models.config.FAMILIES needs an entry (a test checks).
LAYERS_PER_TRANSFORMER_LAYER = {"transformer": 1, "mamba": 2, "mamba2": 2, "hybrid": 2}
PLUGIN_MATCH = 0.02     # a plugin's count must lie within 2% of the transformer's


@dataclass(frozen=True)
class Shape:
    family: str
    d_model: int
    n_layer: int
    params: int          # non-embedding
    params_total: int
    d_ff: int | None = None    # a plugin's MLP hidden width, where sizing set it

    @property
    def aspect(self) -> float:
        return self.d_model / self.n_layer


def _count(base: ModelConfig, family: str, d_model: int, n_layer: int, mixer=None, d_ff=None) -> tuple[int, int]:
    from ..flops import param_counts
    p = param_counts(base.replace(family=family, d_model=d_model, n_layer=n_layer, mixer=mixer,
                                  d_ff=d_ff if d_ff is not None else base.d_ff))
    return p["non_embedding"], p["total"]


def _closest_width(base: ModelConfig, family: str, n_layer: int, target: float, multiple: int, mixer=None) -> int:
    """Multiple of `multiple` whose non-embedding count with `n_layer` layers is closest to target."""
    def err(d):
        return abs(math.log(_count(base, family, d, n_layer, mixer)[0] / target))
    # counts grow ~ d^2, so start from 12 n d^2 = target and search the neighbourhood
    guess = max(multiple, multiple * round(math.sqrt(target / (12 * n_layer)) / multiple))
    lo = guess
    while lo > multiple and err(lo - multiple) <= err(lo):
        lo -= multiple
    hi = guess
    while err(hi + multiple) < err(hi):
        hi += multiple
        if hi > limits.MAX_WIDTH:    # cannot happen for targets within MAX_PARAMS; a backstop, not a result
            raise ValueError(f"d_model: no width up to {limits.MAX_WIDTH} (limits.MAX_WIDTH) reaches {target:g} "
                             f"parameters with {n_layer} layers")
    return min((lo, hi), key=err)


def transformer_layers(target: float) -> int:
    return max(MIN_LAYERS, round((target / (12 * ASPECT ** 2)) ** (1 / 3)))


def layer_multiple(family: str, mixer=None) -> int:
    """Blocks of `family` that match one transformer layer in depth (see LAYERS_PER_TRANSFORMER_LAYER; a plugin:
    1 with its MLP branch, 2 without)."""
    if mixer is not None:
        return 1 if mixer.mlp else 2
    try:
        return LAYERS_PER_TRANSFORMER_LAYER[family]
    except KeyError:
        raise ValueError(f"family: no depth rule for model family {family!r} in sizing.py") from None


def layers_at_width(family: str, transformer_layers: int, mixer=None) -> int:
    """Depth of `family` beside a transformer of `transformer_layers` layers at the same width (a
    width sweep such as the recall study's: width varies, depth follows the family's rule)."""
    if mixer is not None and mixer.n_layer is not None:
        return mixer.n_layer
    return layer_multiple(family, mixer) * transformer_layers


def shape_for(family: str, target_params: float, base: ModelConfig | None = None,
              match: int | None = None, mixer=None) -> Shape:
    """(d_model, n_layer) of `family` for a target non-embedding count (see module docstring).

    `match`: for the other families, the exact count to match (default: the transformer's at this target).
    `mixer`: a plugin family's models.plugin.MixerSpec."""
    if not 0 < target_params <= limits.MAX_PARAMS:
        raise ValueError(f"target_params: must be positive and at most {limits.MAX_PARAMS:g} "
                         f"(limits.MAX_PARAMS: beyond any model that can exist), got {target_params:g}")
    if family not in FAMILIES and mixer is None:
        raise ValueError(f"family: unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    base = base or ModelConfig(family="transformer", d_model=64, n_layer=1)
    n_tf = transformer_layers(target_params)
    if family == "transformer":
        d = _closest_width(base, "transformer", n_tf, target_params, base.head_dim)
        n = n_tf
    elif mixer is not None:
        return _plugin_shape(family, target_params, base, match, mixer, n_tf)
    else:
        if match is None:
            match = shape_for("transformer", target_params, base).params
        n = layers_at_width(family, n_tf)
        d = _closest_width(base, family, n, match, WIDTH_MULTIPLE)
        if d < FINE_BELOW.get(family, FINE_BELOW_DEFAULT):
            d = _closest_width(base, family, n, match, 2)
    params, total = _count(base, family, d, n)
    return Shape(family, d, n, params, total)


def _plugin_shape(family, target_params, base, match, mixer, n_tf) -> Shape:
    if match is None:
        match = shape_for("transformer", target_params, base).params
    n = layers_at_width(family, n_tf, mixer)
    step = mixer.width_multiple
    coarse = step * math.ceil(WIDTH_MULTIPLE / step)
    d = _closest_width(base, family, n, match, coarse, mixer)
    if coarse != step:           # then the fine steps around it, at every width: the match must be within 2%
        d = _closest_width(base, family, n, match, step, mixer)
    d_ff = None
    if mixer.mlp and base.d_ff is None:   # each unit of the MLP's hidden width adds 3 d parameters per layer
        default = base.replace(family=family, d_model=d, mixer=mixer).ffn_dim
        rest = _count(base, family, d, n, mixer, d_ff=default)[0] - 3 * d * default * n
        d_ff = min(max(round((match - rest) / (3 * d * n)), math.ceil(default / 1.5)), math.floor(default * 1.5))
    params, total = _count(base, family, d, n, mixer, d_ff)
    if abs(params / match - 1) > PLUGIN_MATCH:
        raise ValueError(f"d_model: plugin family {family}: the closest width, {d} with {n} layers, has {params:,} "
                         f"non-embedding parameters, {params / match - 1:+.1%} from the transformer's {match:,} "
                         f"(more than {PLUGIN_MATCH:.0%}); lower its width_multiple ({step}) or change n_layer")
    return Shape(family, d, n, params, total, d_ff)


def ladder_shapes(targets, families=FAMILIES, base: ModelConfig | None = None, mixers: dict | None = None):
    """Shapes for every (target, family), each family matched to the transformer at the same target
    (`mixers`: {plugin family: MixerSpec})."""
    mixers = mixers or {}
    out = []
    for target in targets:
        tf = shape_for("transformer", target, base)
        for fam in families:
            out.append(tf if fam == "transformer" else shape_for(fam, target, base, match=tf.params,
                                                                 mixer=mixers.get(fam)))
    return out


def check_within_bounds(cfg: ModelConfig) -> None:
    """ValueError for an explicit shape with more non-embedding parameters than limits.MAX_PARAMS: a model
    that cannot exist is refused before anything is allocated for it (targets are bounded in shape_for)."""
    n = _count(cfg, cfg.family, cfg.d_model, cfg.n_layer, cfg.mixer)[0]
    if n > limits.MAX_PARAMS:
        raise ValueError(f"d_model: {cfg.d_model} x {cfg.n_layer} layers is {n:.3g} non-embedding parameters, more "
                         f"than {limits.MAX_PARAMS:g}, ssmscale's bound on what can exist (limits.py)")
