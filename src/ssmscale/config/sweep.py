"""Extra grid axes of a ladder over config keys: `sweep:` in a ladder config.

    sweep: {data.synthetic.num_kv_pairs: [4, 16], train.seq_len: [64, 256]}      # 2 x 2 points
    sweep:                                                                          # a union of grids
      - {train.seq_len: [64], data.synthetic.num_kv_pairs: [4, 8, 16]}
      - {train.seq_len: [256], data.synthetic.num_kv_pairs: [16, 64]}

Each key is a dotted path into the per-run part of the config (data, tokenizer, model, train) and
each value the list of values it takes; a grid is the product of its lists, in the order written.
A point is one {key: value} assignment: every run of the ladder is planned once per point, with
the point's values written into its config. A point's label (`num_kv_pairs4_seq_len64`) goes into
the run ids. Pure functions, no heavy imports: the config schema validates sweeps with them.
"""

from __future__ import annotations

import itertools
import json
import re

SWEEPABLE = ("data", "tokenizer", "model", "train")
# set by other ladder keys: train.tokens by budgets/steps/tokens, train.lr by lrs
NOT_SWEEPABLE = {"train.tokens": "set by the ladder from budgets, steps or tokens",
                 "train.lr": "use lrs for a learning-rate grid",
                 "train.progress": "not a property of a run"}


def check_key(key: str) -> None:
    """ValueError naming `sweep.<key>` when the key cannot be swept (unknown keys are found later,
    when each point's config is validated)."""
    if key in NOT_SWEEPABLE:
        raise ValueError(f"sweep.{key}: cannot be swept ({NOT_SWEEPABLE[key]})")
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in SWEEPABLE or not all(parts):
        raise ValueError(f"sweep.{key}: keys are dotted paths under {', '.join(SWEEPABLE)} "
                         "(e.g. train.seq_len)")


def grids(sweep) -> list[dict]:
    """The sweep as a list of grids ({key: [values]}); None is one empty grid (a single point)."""
    if sweep is None:
        return [{}]
    return [sweep] if isinstance(sweep, dict) else list(sweep)


def points(sweep) -> list[dict]:
    """Every point of the sweep in order: [{key: value}, ...]; [{}] without a sweep."""
    out = []
    for grid in grids(sweep):
        keys = list(grid)
        out += [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    return out


def apply_point(raw: dict, point: dict) -> dict:
    """A copy of the config dict `raw` with the point's values written in (missing sections created)."""
    out = json.loads(json.dumps(raw))
    for dotted, value in point.items():
        node = out
        *parents, leaf = dotted.split(".")
        for i, key in enumerate(parents):
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise ValueError(f"sweep.{dotted}: {'.'.join(parents[:i + 1])} is not a section")
        node[leaf] = value
    return out


def encode(point: dict) -> str:
    """A point as a canonical JSON string ('' for no sweep): the form stored in plan.csv and results.csv."""
    return json.dumps(point, sort_keys=True) if point else ""


def decode(text) -> dict:
    return json.loads(text) if isinstance(text, str) and text else {}


def label(point: dict) -> str:
    """`num_kv_pairs4_seq_len64`: the last part of each key and its value, in the point's order;
    only letters, digits, '.', '-' and '_' (a run id is a plain file name)."""
    parts = [f"{key.rsplit('.', 1)[-1]}{_value_text(value)}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9.\-_]", "", "_".join(parts))


def _value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}".replace("+", "")
    if isinstance(value, (list, tuple)):
        return "-".join(_value_text(v) for v in value)
    return str(value)
