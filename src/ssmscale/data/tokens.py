"""The tokenised corpus: a verified on-disk cache, random training windows, a fixed validation set.

Cache layout, under `data.cache_dir`, else $SSMSCALE_CACHE, else ~/.cache/ssmscale:

    tokens/<fingerprint>/train.bin   tokens of the training documents, raw little-endian uint16
                         val.bin     (uint32 above 65536 tokens); each document followed by the
                         meta.json   separator token; meta.json (written last) has counts, dtype, sha256s

A cache is built in a hidden temporary folder beside it and renamed into place, so a build that
dies leaves nothing that looks finished, and two processes building the same cache at once both
end up reading one complete copy. Every load checks meta.json, the file sizes and the sha256 of each
file; anything wrong means one line on stderr and a rebuild.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fsutil import atomic_write_json
from ..provenance import stable_hash
from .corpus import Corpus

FORMAT_VERSION = 1
_SPLITS = ("train", "val")


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("SSMSCALE_CACHE") or "~/.cache/ssmscale").expanduser()


class TokenData:
    """Tokens of both splits (memory-mapped) with the tokenizer that made them."""

    def __init__(self, corpus: Corpus, tokenizer, cache_root_dir: Path, *, eval_tokens: int, progress: bool = True):
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.corpus_fingerprint = corpus.fingerprint
        self.corpus_bytes = corpus.n_bytes
        self.chunking = corpus.chunking          # documents cut into pieces, in words (None: read whole)
        self.eval_tokens = eval_tokens
        self.fingerprint = stable_hash({"split": corpus.split_key, "tokenizer": tokenizer.name,
                                        "format": FORMAT_VERSION})
        self.cache_dir = cache_root_dir / "tokens" / self.fingerprint
        self.rebuilt = False                      # whether this prepare had to tokenise
        self._dtype = np.dtype(self._load_or_build(progress)["dtype"])
        self._open()

    def _open(self) -> None:
        self.train_tokens = np.memmap(self.cache_dir / "train.bin", dtype=self._dtype, mode="r")
        self.val_tokens = np.memmap(self.cache_dir / "val.bin", dtype=self._dtype, mode="r")
        self.n_train_tokens = len(self.train_tokens)
        self.n_val_tokens = len(self.val_tokens)

    def __getstate__(self):
        # sent to another process (a job executor): reopen the cache there rather than copy the tokens
        return {k: v for k, v in self.__dict__.items() if k not in ("train_tokens", "val_tokens")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    # ------------------------------------------------------------------------------- batches
    def check_seq_len(self, seq_len: int) -> None:
        for split, n in (("training", self.n_train_tokens), ("validation", self.n_val_tokens)):
            if n < seq_len + 1:
                raise UserError(f"{self.corpus.label}: the {split} split has {n} tokens, fewer than "
                                f"seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len")

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int):
        """`batch_size` windows of seq_len + 1 tokens starting uniformly at random in the training
        tokens; a function of (seed, step) alone. Returns int64 tensors x and y = x shifted by one."""
        import torch
        self.check_seq_len(seq_len)
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.n_train_tokens - seq_len, size=batch_size)
        windows = np.asarray(self.train_tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
        return (torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
                torch.from_numpy(np.ascontiguousarray(windows[:, 1:])))

    def val_set(self, seq_len: int):
        """The fixed held-out set: targets are validation tokens 1..n (n = eval_tokens rounded down to
        whole windows of seq_len, at least one), inputs the tokens before them. Returns (x, y, n_bytes)
        with n_bytes the UTF-8 bytes of the targets (bits per byte = nats / (ln 2 * n_bytes))."""
        import torch
        self.check_seq_len(seq_len)
        n_windows = max(1, min(self.eval_tokens, self.n_val_tokens - 1) // seq_len)
        tokens = np.asarray(self.val_tokens[:n_windows * seq_len + 1], dtype=np.int64)
        x = tokens[:-1].reshape(n_windows, seq_len)
        y = tokens[1:].reshape(n_windows, seq_len)
        n_bytes = int(self.tokenizer.token_bytes[y].sum())
        return torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), n_bytes

    def describe(self) -> dict:
        return {**self.corpus.describe(), "tokenizer": self.tokenizer.name, "vocab_size": self.vocab_size,
                "n_train_tokens": self.n_train_tokens, "n_val_tokens": self.n_val_tokens,
                "fingerprint": self.fingerprint, "cache": str(self.cache_dir)}

    # --------------------------------------------------------------------------------- cache
    def _load_or_build(self, progress: bool) -> dict:
        if self.cache_dir.exists():
            meta, problem = self._verify(self.cache_dir)
            if meta is not None:
                return meta
            print(f"rebuilding corrupt token cache at {self.cache_dir} ({problem})", file=sys.stderr)
        return self._build(progress)

    def _verify(self, folder: Path) -> tuple[dict | None, str]:
        """(meta, "") when `folder` holds a complete cache for this corpus and tokenizer, else (None, why)."""
        from ..safeload import FileRefused, read_json
        try:
            meta = read_json(folder / "meta.json")
        except FileNotFoundError:
            return None, "meta.json missing"
        except FileRefused as exc:
            return None, f"meta.json unreadable: {exc.reason}"
        try:
            if (meta["format"], meta["fingerprint"], meta["tokenizer_sha256"]) != \
                    (FORMAT_VERSION, self.fingerprint, self.tokenizer.sha256):
                return None, "built by another version or tokenizer"
            itemsize = np.dtype(meta["dtype"]).itemsize
            for split in _SPLITS:
                path, info = folder / f"{split}.bin", meta["splits"][split]
                if not path.is_file() or path.stat().st_size != info["tokens"] * itemsize:
                    return None, f"{path.name} missing or the wrong size"
                if _sha256_file(path) != info["sha256"]:
                    return None, f"{path.name} checksum mismatch"
        except (KeyError, TypeError, ValueError):
            return None, "meta.json malformed"
        return meta, ""

    def _build(self, progress: bool) -> dict:
        self.rebuilt = True
        parent = self.cache_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{self.fingerprint}.{uuid.uuid4().hex}.tmp"     # mkdir honours the umask; mkdtemp would not
        tmp.mkdir()
        try:
            dtype = np.dtype("<u2" if self.vocab_size <= 65536 else "<u4")
            writers = {split: _TokenWriter(tmp / f"{split}.bin", dtype) for split in _SPLITS}
            sep = np.array([self.tokenizer.separator_id], dtype=dtype)
            batch, chars = [], 0
            for doc in self.corpus.documents(desc="tokenising"):
                batch.append(doc)
                chars += len(doc.text)
                if len(batch) == 256 or chars > 1 << 22:      # encode in batches of bounded size
                    self._write(batch, writers, sep)
                    batch, chars = [], 0
            self._write(batch, writers, sep)
            meta = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint,
                    "corpus_fingerprint": self.corpus_fingerprint, "corpus": self.corpus.label,
                    "tokenizer": self.tokenizer.name, "tokenizer_sha256": self.tokenizer.sha256,
                    "dtype": dtype.str, "splits": {s: w.close() for s, w in writers.items()}}
            atomic_write_json(tmp / "meta.json", meta)
            self._publish(tmp)
            return meta
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write(self, docs, writers, sep) -> None:
        if not docs:
            return
        for doc, ids in zip(docs, self.tokenizer.encode_arrays([d.text for d in docs])):
            writer = writers["val" if self.corpus.is_val(doc.id) else "train"]
            writer.write(ids)
            writer.write(sep)

    def _publish(self, tmp: Path) -> None:
        """Rename the finished build into place; keep a complete copy another process put there first."""
        for _ in range(3):
            try:
                os.rename(tmp, self.cache_dir)
                return
            except OSError:
                if self._verify(self.cache_dir)[0] is not None:
                    return
                trash = self.cache_dir.with_name(f".{self.fingerprint}.{uuid.uuid4().hex}.trash")
                try:
                    os.rename(self.cache_dir, trash)
                except FileNotFoundError:
                    continue
                shutil.rmtree(trash, ignore_errors=True)
        raise OSError(f"{self.cache_dir}: could not publish the token cache")


class _TokenWriter:
    """Appends token arrays to a raw binary file, counting and hashing as it goes."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.file = open(path, "wb")
        self.dtype = dtype
        self.sha = hashlib.sha256()
        self.tokens = 0

    def write(self, ids: np.ndarray) -> None:
        raw = np.asarray(ids).astype(self.dtype, copy=False).tobytes()
        self.file.write(raw)
        self.sha.update(raw)
        self.tokens += len(ids)

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"tokens": self.tokens, "sha256": self.sha.hexdigest()}


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()
