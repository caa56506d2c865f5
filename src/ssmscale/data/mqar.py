"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023), a synthetic test of recall.

An example of seq_len tokens starts with k key-value pairs `k1 v1 k2 v2 ...`: distinct keys from
[1, V/2), values from [V/2, V). Each key is then asked again once, in random order, at random
distinct later positions; every other position holds the filler token 0. The target at a query is
the value that followed that key; all other targets are -100 (not scored). Attention recalls
this with little width; a fixed-size recurrent state has to grow with k.

Training examples come from a fixed pool of `num_examples` (example i is generated from its own
seeded stream), drawn at random per (seed, step); the validation set is a separate fixed pool.
"""

from __future__ import annotations

import numpy as np

from .. import limits
from ..config import MQARConfig
from ..errors import UserError
from ..provenance import stable_hash
from .tokenizer import IdentityTokenizer

GENERATOR_VERSION = 1
IGNORE = -100
_TRAIN, _VAL = 0, 1


def check_fits(cfg: MQARConfig, seq_len: int) -> None:
    k = cfg.num_kv_pairs
    if cfg.vocab_size // 2 - 1 < k:
        raise UserError(f"data.synthetic.num_kv_pairs: {k} distinct keys need vocab_size >= {2 * k + 2} "
                        f"(keys come from [1, vocab_size/2); got vocab_size {cfg.vocab_size})")
    if seq_len < 3 * k:
        raise UserError(f"train.seq_len: {seq_len} cannot hold {k} key-value pairs and {k} queries "
                        f"(needs at least 3 * num_kv_pairs = {3 * k})")


def mqar_example(cfg: MQARConfig, seq_len: int, stream: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Example `index` of a stream (0: training pool, 1: validation pool) as (x, y) int64 arrays."""
    rng = np.random.default_rng([GENERATOR_VERSION, stream, index])
    k, half = cfg.num_kv_pairs, cfg.vocab_size // 2
    keys = rng.choice(np.arange(1, half), size=k, replace=False)
    values = rng.integers(half, cfg.vocab_size, size=k)
    x = np.zeros(seq_len, dtype=np.int64)
    y = np.full(seq_len, IGNORE, dtype=np.int64)
    x[0:2 * k:2], x[1:2 * k:2] = keys, values
    slots = np.sort(rng.choice(np.arange(2 * k, seq_len), size=k, replace=False))
    order = rng.permutation(k)
    x[slots], y[slots] = keys[order], values[order]
    return x, y


class MQARData:
    """Same interface as TokenData; there is no text, so there are no bytes to score per."""

    def __init__(self, cfg: MQARConfig, *, seq_len: int, eval_tokens: int):
        check_fits(cfg, seq_len)
        self.cfg = cfg
        self.seq_len = seq_len
        self.eval_tokens = eval_tokens
        self.tokenizer = IdentityTokenizer(cfg.vocab_size)
        self.vocab_size = cfg.vocab_size
        self.fingerprint = stable_hash({"mqar": cfg.model_dump(), "seq_len": seq_len,
                                        "generator": GENERATOR_VERSION})
        self.corpus_fingerprint = self.fingerprint
        self.corpus_bytes = 0
        self.n_val_examples = max(1, eval_tokens // seq_len)
        if self.n_val_examples > limits.MAX_EVAL_EXAMPLES:     # each is generated in Python: bounded
            raise UserError(f"train.eval_tokens: {eval_tokens:,} tokens are {self.n_val_examples:,} validation "
                            f"examples of {seq_len} tokens; at most {limits.MAX_EVAL_EXAMPLES:,} are generated "
                            f"(limits.py): lower it to {limits.MAX_EVAL_EXAMPLES * seq_len:,} or less")
        self.n_train_tokens = cfg.num_examples * seq_len
        self.n_val_tokens = self.n_val_examples * seq_len

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int):
        rng = np.random.default_rng([seed, step])
        return self._batch(_TRAIN, rng.integers(0, self.cfg.num_examples, size=batch_size), seq_len)

    def val_set(self, seq_len: int):
        x, y = self._batch(_VAL, range(self.n_val_examples), seq_len)
        return x, y, None

    def describe(self) -> dict:
        return {"source": "synthetic", "task": "mqar", "mqar": self.cfg.model_dump(), "seq_len": self.seq_len,
                "tokenizer": self.tokenizer.name, "vocab_size": self.vocab_size,
                "n_train_tokens": self.n_train_tokens, "n_val_tokens": self.n_val_tokens,
                "corpus_bytes": 0, "fingerprint": self.fingerprint, "cache": None}

    def _batch(self, stream: int, indices, seq_len: int):
        import torch
        check_fits(self.cfg, seq_len)
        pairs = [mqar_example(self.cfg, seq_len, stream, int(i)) for i in indices]
        return (torch.from_numpy(np.stack([x for x, _ in pairs])),
                torch.from_numpy(np.stack([y for _, y in pairs])))
