"""Text corpora: where documents come from, how big the corpus is, what it hashes to, how it splits.

A corpus is an ordered, re-iterable sequence of documents, each with a stable id:
- `stdlib`: the running Python's standard-library `.py` files (built in, works offline).
  Rule: every `*.py` under `sysconfig.get_paths()["stdlib"]`, in sorted relative-path order, except
  anything inside a folder named `test`, `tests`, `idle_test`, `site-packages`, `__pycache__` or
  `config-*` (build-specific), files named `test_*.py`, and `_sysconfigdata*.py` (it records the
  machine's build paths). Decoded as UTF-8 with errors="replace". Id: the relative path.
- `files`: local .txt/.md (one document per file), .jsonl/.json and .parquet (one document per
  row, column `text_field`), read through `datasets.load_dataset`. Globs allowed. Id: the row index.
- `hf`: `datasets.load_dataset(hf_name, hf_config, split=hf_split)`, column `text_field`. Id: row index.

`max_bytes` keeps the documents in order until the cap; the document that crosses it is cut at a
character boundary. Empty documents are skipped. The fingerprint is the sha256 of every kept
document in order, each as an 8-byte little-endian length followed by its UTF-8 bytes.

The split is by document: a document is held out for validation when the first 8 bytes of
sha256(id), read as a fraction of 2**64, fall below `val_fraction`. It depends on the id alone, so
it does not move when `max_bytes` changes. When that leaves a split empty, the document with the
lowest (for validation) or highest (for training) hash is moved across; a corpus needs at least two
documents.

Chunks: one text file is the commonest corpus there is (nanoGPT's Shakespeare is one input.txt), and it
is one document. `chunk_bytes: N` cuts every kept document into pieces of at most N UTF-8 bytes, each
ending at its last blank line (a paragraph end) when that lies in the piece's second half, else at its
last line end, else at a character boundary; piece k of document `id` has the id `id#k`, so the split stays a function of ids.
Left unset, a corpus of fewer than two documents is cut into pieces of AUTO_CHUNK_BYTES and one of two
or more is left whole. The fingerprint hashes the pieces (their lengths change with N) and `describe()`
and the run header state the rule.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..config import DataConfig
from ..errors import UserError
from ..provenance import stable_hash

SPLIT_RULE = "sha256(id)[:8] < val_fraction, v1"
CHUNK_RULE = "pieces of at most {n} bytes ending at a paragraph end, else a line end; id '<doc>#<k>'"
AUTO_CHUNK_BYTES = 4096


def split_key(corpus_fingerprint: str, val_fraction: float, chunk_bytes: int | None = None) -> str:
    """The key of a corpus split under SPLIT_RULE (a run's result records every input, so export finds its BPE)."""
    key = {"corpus": corpus_fingerprint, "val_fraction": val_fraction, "rule": SPLIT_RULE}
    if chunk_bytes is not None:          # (keys of corpora read whole are unchanged)
        key["chunks"] = CHUNK_RULE.format(n=chunk_bytes)
    return stable_hash(key)


_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_FILE_KINDS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def split_hash(doc_id: str) -> float:
    """Where a document falls in [0, 1): below val_fraction means validation."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2.0 ** 64


class Corpus:
    """Documents of one source after the byte cap, with fingerprint, sizes and the split.

    `read()` yields (id, text) in corpus order, freshly each call: the corpus is scanned once here
    (fingerprint, sizes, split) and read again for BPE training and tokenising, never held in memory.
    """

    def __init__(self, source: str, label: str, read: Callable[[], Iterator[tuple[str, str]]], *,
                 max_bytes: int | None, val_fraction: float, chunk_bytes: int | None = None,
                 progress: bool = False):
        self.source = source                  # "stdlib", "files", "hf"
        self.label = label                    # names the corpus in messages: "stdlib (/usr/lib/python3.11)"
        self._read = read
        self.max_bytes = max_bytes
        self.val_fraction = val_fraction
        self.chunk_bytes = chunk_bytes        # None: documents as read (until _scan finds fewer than 2)
        self.chunking: str | None = None      # the chunk rule in words, when documents are cut
        self.progress = progress
        self._moved: dict[str, bool] = {}     # id -> is_val, for documents moved to keep both splits non-empty
        self._scan()

    def documents(self, split: str | None = None, desc: str | None = None) -> Iterator[Document]:
        """The kept documents in order; `split` ("train" / "val") keeps only that side."""
        docs = self._kept()
        if desc:
            docs = _bar(docs, desc, self.n_docs, self.progress)
        for doc in docs:
            if split is None or self.is_val(doc.id) == (split == "val"):
                yield doc

    def is_val(self, doc_id: str) -> bool:
        moved = self._moved.get(doc_id)
        return moved if moved is not None else split_hash(doc_id) < self.val_fraction

    @property
    def split_key(self) -> str:
        """Names this corpus with this split: what a tokenizer trained on the training side depends on."""
        return split_key(self.fingerprint, self.val_fraction, self.chunk_bytes)

    def describe(self) -> dict:
        out = {"source": self.source, "corpus": self.label, "corpus_bytes": self.n_bytes,
               "n_docs": self.n_docs, "n_val_docs": self.n_val_docs, "val_fraction": self.val_fraction,
               "max_bytes": self.max_bytes, "split_rule": SPLIT_RULE,
               "corpus_fingerprint": self.fingerprint}
        if self.chunking:
            out["chunking"], out["chunk_bytes"] = self.chunking, self.chunk_bytes
        return out

    # ----------------------------------------------------------------------------------------
    def _capped(self) -> Iterator[Document]:
        left = self.max_bytes
        for doc_id, text in self._read():
            if left is not None:
                raw = text.encode("utf-8")
                if len(raw) >= left:
                    text = raw[:left].decode("utf-8", errors="ignore")   # cut on a character boundary
                    if text:
                        yield Document(doc_id, text)
                    return
                left -= len(raw)
            if text:
                yield Document(doc_id, text)

    def _kept(self) -> Iterator[Document]:
        docs = self._capped()
        if self.chunk_bytes is None:
            return docs
        return (piece for doc in docs for piece in chunk_document(doc, self.chunk_bytes))

    def _scan(self) -> None:
        n_read = self._scan_once()
        if self.n_docs < 2 and self.chunk_bytes is None and self.n_bytes > 0:
            self.chunk_bytes = AUTO_CHUNK_BYTES
            self._scan_once()
            self.chunking = (f"{n_read} document cut into {self.n_docs} pieces of at most {self.chunk_bytes} bytes "
                             "at paragraph ends (set data.chunk_bytes to choose)")
        elif self.chunk_bytes is not None:
            self.chunking = (f"{n_read} documents cut into {self.n_docs} pieces of at most {self.chunk_bytes} bytes "
                             "at paragraph ends (data.chunk_bytes)")
        if self.n_docs < 2:
            what = (f"has {self.n_docs} non-empty document{'s' * (self.n_docs != 1)}" if self.chunk_bytes is None
                    else f"makes {self.n_docs} piece{'s' * (self.n_docs != 1)} of at most {self.chunk_bytes} bytes")
            hint = " (a smaller data.chunk_bytes cuts it finer)" if self.n_docs == 1 and self.chunk_bytes else ""
            raise UserError(f"{self.label}: {what}; a train/validation split by document needs at least 2{hint}")

    def _scan_once(self) -> int:
        """Fingerprint, sizes and split of the kept documents (pieces); returns the documents read whole."""
        sha = hashlib.sha256()
        n_val = n_docs = n_bytes = 0
        whole = set()
        lowest = highest = None                                       # (hash, id)
        self._moved = {}
        for doc in _bar(self._kept(), f"reading {self.source} corpus", None, self.progress):
            raw = doc.text.encode("utf-8")
            sha.update(len(raw).to_bytes(8, "little"))
            sha.update(raw)
            n_docs += 1
            n_bytes += len(raw)
            h = split_hash(doc.id)
            n_val += h < self.val_fraction
            lowest = min(lowest, (h, doc.id)) if lowest else (h, doc.id)
            highest = max(highest, (h, doc.id)) if highest else (h, doc.id)
            whole.add(doc.id.rpartition("#")[0] if self.chunk_bytes is not None else doc.id)
        if n_docs >= 2 and n_val == 0:
            self._moved[lowest[1]] = True
            n_val = 1
        elif n_docs >= 2 and n_val == n_docs:
            self._moved[highest[1]] = False
            n_val -= 1
        self.fingerprint = sha.hexdigest()           # sha256 hex of the kept documents
        self.n_docs, self.n_val_docs = n_docs, n_val
        self.n_bytes = n_bytes                       # UTF-8 bytes of the kept documents
        return len(whole)


def chunk_document(doc: Document, max_bytes: int) -> Iterator[Document]:
    """`doc` in pieces of at most `max_bytes` UTF-8 bytes, each ending at its last paragraph end (a blank
    line) if that is in the piece's second half, else its last line end, else a character boundary; ids
    `<id>#0`, `<id>#1`, ..."""
    raw = doc.text.encode("utf-8")
    start = k = 0
    while start < len(raw):
        end = min(start + max_bytes, len(raw))
        if end < len(raw):
            window = raw[start:end]
            cut = window.rfind(b"\n\n") + 2
            if cut < len(window) // 2:               # no paragraph end in the piece's second half
                cut = window.rfind(b"\n") + 1
            if cut > 0:
                end = start + cut
            else:                                    # no line end: back off to a character boundary
                while end > start + 1 and (raw[end] & 0xC0) == 0x80:
                    end -= 1
        yield Document(f"{doc.id}#{k}", raw[start:end].decode("utf-8"))
        start, k = end, k + 1

def _bar(it, desc, total, progress):
    if not progress:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, total=total, unit="doc", delay=1.0, leave=False)


# ------------------------------------------------------------------------------------ sources
def load_corpus(cfg: DataConfig, progress: bool = True) -> Corpus:
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        source = ("stdlib", f"stdlib ({root})", partial(_read_stdlib, root))
    elif cfg.source == "files":
        source = _files_source(cfg, progress)
    elif cfg.source == "hf":
        source = _hf_source(cfg, progress)
    else:
        raise ValueError(f"not a text source: {cfg.source}")
    name, label, read = source
    return Corpus(name, label, read, max_bytes=cfg.max_bytes, val_fraction=cfg.val_fraction,
                  chunk_bytes=cfg.chunk_bytes, progress=progress)


def stdlib_files(root: Path) -> list[str]:
    """Relative paths (posix, sorted) of the standard-library sources that make the corpus."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith(("test_", "_sysconfigdata")):
                out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def _read_stdlib(root: Path) -> Iterator[tuple[str, str]]:
    for rel in stdlib_files(root):
        yield rel, (root / rel).read_bytes().decode("utf-8", errors="replace")


def _files_source(cfg: DataConfig, progress: bool):
    files = []
    for pattern in cfg.paths:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) if glob.has_magic(pattern) \
            else [os.path.expanduser(pattern)]
        if not matches:
            raise UserError(f"{pattern}: no file matches this pattern")
        for path in matches:
            if not os.path.isfile(path):
                raise UserError(f"{path}: data file not found")
            kind = _FILE_KINDS.get(Path(path).suffix.lower())
            if kind is None:
                raise UserError(f"{path}: unsupported data file type (use {', '.join(_FILE_KINDS)})")
            files.append((kind, path))
    # consecutive files of one kind are read by one load_dataset call
    groups: list[tuple[str, list[str]]] = []
    for kind, path in files:
        if groups and groups[-1][0] == kind:
            groups[-1][1].append(path)
        else:
            groups.append((kind, [path]))
    tables = [_load_files(kind, paths, cfg.text_field, progress) for kind, paths in groups]
    shown = ", ".join(p for _, p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return "files", f"files ({shown})", partial(_read_tables, tables)


def _load_files(kind: str, paths: list[str], text_field: str, progress: bool):
    where = paths[0] + (f" (and {len(paths) - 1} more {kind} files)" if len(paths) > 1 else "")
    kwargs = {"sample_by": "document"} if kind == "text" else {}
    ds = _load_dataset(where, progress, kind, data_files=paths, split="train", **kwargs)
    return where, _column(ds, "text" if kind == "text" else text_field, where)


def _hf_source(cfg: DataConfig, progress: bool):
    where = cfg.hf_name
    ds = _load_dataset(where, progress, cfg.hf_name, cfg.hf_config, split=cfg.hf_split)
    ds = _column(ds, cfg.text_field, where)
    config = f", config {cfg.hf_config}" if cfg.hf_config else ""
    return "hf", f"hf ({cfg.hf_name}{config}, split {cfg.hf_split})", partial(_read_tables, [(where, ds)])


def _load_dataset(where: str, progress: bool, *args, **kwargs):
    import datasets
    was_enabled = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(*args, **kwargs)
    except ConnectionError as exc:
        raise UserError(f"{where}: could not reach the dataset hub ({_first_line(exc)}); "
                        "check the name and the network, or use a local copy") from None
    except Exception as exc:  # noqa: BLE001 - any failure to read user data is the user's to fix
        raise UserError(f"{where}: could not load the dataset ({type(exc).__name__}: {_first_line(exc)})") from None
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _column(ds, name: str, where: str):
    if name not in ds.column_names:
        raise UserError(f"{where}: no field '{name}' (columns: {', '.join(ds.column_names)}); "
                        "set data.text_field")
    return ds.select_columns([name])


def _read_tables(tables) -> Iterator[tuple[str, str]]:
    """Rows of one-column datasets in order; a row's id is its index over all of them."""
    index = 0
    for where, ds in tables:
        name = ds.column_names[0]
        for batch in ds.iter(batch_size=1024):
            for text in batch[name]:
                if text is None:
                    text = ""
                elif not isinstance(text, str):
                    raise UserError(f"{where}: field '{name}' holds {type(text).__name__} values, not text")
                yield str(index), text
                index += 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
