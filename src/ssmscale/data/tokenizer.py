"""Tokenizers shared by every model family: byte-level (the default) and byte-level BPE.

Both map text to bytes first, so every token stands for a whole number of bytes: `token_bytes[id]`
is that number, which makes bits per byte exact for any set of target tokens. Documents are
separated by the token for the byte 0 (NUL), one byte long in every tokenizer.

BPE uses HF `tokenizers` with the byte-level pre-tokenizer, is trained on the training split only,
and is saved as JSON in the cache, keyed by the corpus split and the vocabulary size, so later runs
(and the other model family) reuse the very same merges.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from ..config import TokenizerConfig
from ..errors import UserError
from ..fsutil import atomic_write_text
from .corpus import Corpus


def _byte_chars() -> list[str]:
    """The printable character byte-level BPE uses for each byte value (the GPT-2 convention):
    printable Latin-1 bytes stand for themselves, the other 68 take code points 256, 257, ... in order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = [], 256
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(shifted))
            shifted += 1
    return chars


BYTE_CHARS = _byte_chars()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_CHARS)}


class ByteTokenizer:
    """UTF-8 bytes are the tokens; vocab 256; decoding replaces invalid UTF-8."""
    name = "byte"
    vocab_size = 256
    separator_id = 0
    sha256 = "byte"

    def __init__(self):
        self.token_bytes = np.ones(256, dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode_bytes(self, ids) -> bytes:
        return bytes(int(i) for i in ids)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A trained byte-level BPE (HF tokenizers); `vocab_size` is the size asked for, which a small
    corpus may not fill (ids stay below it either way)."""

    def __init__(self, tok, vocab_size: int, path: Path, raw: bytes):
        self._tok = tok
        self.path = path
        self.text = raw.decode("utf-8")     # the JSON it was loaded from (export writes these very merges)
        self.name = f"bpe-{vocab_size}"
        self.vocab_size = vocab_size
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self._pieces = [""] * vocab_size
        for piece, i in tok.get_vocab().items():
            self._pieces[i] = piece
        self.token_bytes = np.array([len(p) for p in self._pieces], dtype=np.int64)  # one char per byte
        self.separator_id = tok.token_to_id(BYTE_CHARS[0])

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self._tok.encode_batch(texts)]

    def decode_bytes(self, ids) -> bytes:
        return bytes(CHAR_TO_BYTE[c] for i in ids for c in self._pieces[int(i)])

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class IdentityTokenizer:
    """For synthetic token tasks (MQAR): the tokens are the data; text does not come into it."""

    def __init__(self, vocab_size: int):
        self.name = f"identity-{vocab_size}"
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def load_tokenizer(cfg: TokenizerConfig, corpus: Corpus, cache_root: Path, progress: bool = True):
    """The byte tokenizer, or the BPE for this corpus split and size: loaded if cached, else trained."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    path = bpe_path(cache_root, cfg.vocab_size, corpus.split_key)
    if path.exists():
        try:
            return load_bpe(path, cfg.vocab_size)
        except Exception as exc:  # noqa: BLE001 - tokenizers reports a bad file as a plain Exception
            print(f"retraining unreadable BPE tokenizer at {path} ({type(exc).__name__})", file=sys.stderr)
    _train_bpe(corpus, cfg.vocab_size, path, progress)
    return load_bpe(path, cfg.vocab_size)


def bpe_path(cache_root: Path, vocab_size: int, split_key: str) -> Path:
    """Where the BPE of this size trained on this corpus split is cached."""
    return cache_root / "tokenizers" / f"bpe-{vocab_size}-{split_key}.json"


def load_bpe(path: Path, vocab_size: int) -> BPETokenizer:
    """The BPE cached at `path`, read once through safeload (a regular file of at most CAPS["json"] bytes:
    a FIFO or a huge file there is refused, FileRefused, not waited on) and hashed from those same bytes."""
    from tokenizers import Tokenizer

    from ..safeload import CAPS, read_bytes
    raw = read_bytes(path, CAPS["json"])
    tok = Tokenizer.from_str(raw.decode("utf-8"))
    if tok.get_vocab_size() > vocab_size or any(tok.token_to_id(c) is None for c in BYTE_CHARS):
        raise ValueError("not a byte-level BPE of this size")
    return BPETokenizer(tok, vocab_size, path, raw)


def _train_bpe(corpus: Corpus, vocab_size: int, path: Path, progress: bool) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=progress, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = (doc.text for doc in corpus.documents("train"))
    tok.train_from_iterator(texts, trainer, length=corpus.n_docs - corpus.n_val_docs)
    if tok.get_vocab_size() <= 256:
        raise UserError(f"{corpus.label}: too little training text to learn any BPE merge")
    atomic_write_text(path, tok.to_str())
