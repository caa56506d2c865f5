"""Data: corpus -> shared tokenizer -> cached token arrays -> training windows and a fixed validation set.

`prepare_data` is the one entry point; both model families call it with the same config and seed
and so see identical batches. Heavy libraries (datasets, tokenizers, torch) load only when used.
"""

from __future__ import annotations

from ..config import DataConfig, TokenizerConfig
from ..errors import UserError
from .corpus import Corpus, load_corpus
from .mqar import MQARData
from .tokenizer import ByteTokenizer, BPETokenizer, load_tokenizer
from .tokens import TokenData, cache_root

__all__ = ["prepare_data", "TokenData", "MQARData", "Corpus", "load_corpus", "ByteTokenizer",
           "BPETokenizer", "load_tokenizer", "cache_root"]


def prepare_data(data_cfg: DataConfig, tok_cfg: TokenizerConfig, *, seq_len: int, eval_tokens: int,
                 progress: bool = True) -> TokenData | MQARData:
    """Read the corpus, get its tokenizer and token cache (built on first use), check seq_len fits."""
    if data_cfg.source == "synthetic":
        if data_cfg.synthetic is None:
            raise UserError("data.synthetic: source 'synthetic' needs an MQAR section")
        return MQARData(data_cfg.synthetic, seq_len=seq_len, eval_tokens=eval_tokens)
    root = cache_root(data_cfg.cache_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"data.cache_dir: {root} is a file, not a folder")
    try:
        corpus = load_corpus(data_cfg, progress=progress)
        tokenizer = load_tokenizer(tok_cfg, corpus, root, progress=progress)
        data = TokenData(corpus, tokenizer, root, eval_tokens=eval_tokens, progress=progress)
    except OSError as exc:         # e.g. a cache folder that cannot be written, a part of its path that is a file
        where = exc.filename or root
        raise UserError(f"data: {where}: {exc.strerror or exc} (the token cache is under data.cache_dir, "
                        f"$SSMSCALE_CACHE or ~/.cache/ssmscale)") from None
    data.check_seq_len(seq_len)
    return data
