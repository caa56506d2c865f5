"""Data pipeline: corpus sources and split, token cache (reuse, rebuild), batches, validation set, MQAR."""

import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # before `datasets` is imported anywhere: no network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import subprocess
import sys

import numpy as np
import pytest
import torch

from ssmscale.config import DataConfig, MQARConfig, TokenizerConfig
from ssmscale.data import prepare_data
from ssmscale.data.corpus import load_corpus, split_hash, stdlib_files
from ssmscale.data.mqar import IGNORE
from ssmscale.errors import UserError

STDLIB_SMALL = 200_000
BYTE = TokenizerConfig()


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """Keep `datasets` offline and its caches inside the test's folder."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def stdlib_cfg(tmp_path, **kw):
    kw.setdefault("max_bytes", STDLIB_SMALL)
    kw.setdefault("val_fraction", 0.2)
    return DataConfig(source="stdlib", cache_dir=str(tmp_path / "cache"), **kw)


def prepare(cfg, tok=BYTE, seq_len=64, eval_tokens=1024):
    return prepare_data(cfg, tok, seq_len=seq_len, eval_tokens=eval_tokens, progress=False)


def write_docs(folder, n, prefix="doc"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i:03d}.txt"
        p.write_text(f"# {prefix} number {i}\n" + "".join(f"line {j} of {i}: caf\u00e9 \u2211\n" for j in range(20)))
        paths.append(p)
    return paths


def files_cfg(tmp_path, paths, **kw):
    kw.setdefault("val_fraction", 0.2)
    return DataConfig(source="files", paths=[str(p) for p in paths], cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture(scope="module")
def stdlib_data(tmp_path_factory):
    return prepare(stdlib_cfg(tmp_path_factory.mktemp("stdlib")))


def as_bytes(tokens) -> bytes:
    return np.asarray(tokens, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------------------------- corpus
def test_importing_the_package_loads_no_heavy_library():
    code = "import sys, ssmscale.data; print(sorted({'datasets', 'tokenizers', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stdlib_rule_skips_tests_site_packages_and_build_files():
    import sysconfig
    from pathlib import Path
    files = stdlib_files(Path(sysconfig.get_paths()["stdlib"]))
    assert files == sorted(files) and len(files) > 100
    assert "os.py" in files and "json/decoder.py" in files
    for rel in files:
        parts = rel.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), rel
        assert not parts[-1].startswith(("test_", "_sysconfigdata")), rel


def test_max_bytes_caps_the_corpus_and_changes_the_fingerprint(tmp_path):
    small = load_corpus(stdlib_cfg(tmp_path, max_bytes=50_000), progress=False)
    big = load_corpus(stdlib_cfg(tmp_path, max_bytes=80_000), progress=False)
    assert 50_000 - 4 < small.n_bytes <= 50_000 and 80_000 - 4 < big.n_bytes <= 80_000
    assert sum(len(d.text.encode()) for d in small.documents()) == small.n_bytes
    assert small.fingerprint != big.fingerprint
    # a document's side of the split does not depend on the cap
    for doc in small.documents():
        assert small.is_val(doc.id) == big.is_val(doc.id)


def test_fingerprint_is_sha256_of_length_prefixed_documents(tmp_path):
    paths = write_docs(tmp_path / "a", 3)
    corpus = load_corpus(files_cfg(tmp_path, paths), progress=False)
    sha = hashlib.sha256()
    for p in paths:
        raw = p.read_bytes()
        sha.update(len(raw).to_bytes(8, "little") + raw)
    assert corpus.fingerprint == sha.hexdigest()


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    paths = write_docs(tmp_path / "docs", 40)
    cfg = files_cfg(tmp_path, paths, val_fraction=0.25)
    one, two = load_corpus(cfg, progress=False), load_corpus(cfg, progress=False)
    val = [d.id for d in one.documents("val")]
    train = [d.id for d in one.documents("train")]
    assert val == [d.id for d in two.documents("val")]
    assert not set(val) & set(train) and sorted(val + train, key=int) == [str(i) for i in range(40)]
    assert val == [str(i) for i in range(40) if split_hash(str(i)) < 0.25]
    assert 3 <= len(val) <= 20 and one.n_val_docs == len(val)


def test_both_splits_non_empty_with_few_documents(tmp_path):
    paths = write_docs(tmp_path / "docs", 2)
    corpus = load_corpus(files_cfg(tmp_path, paths, val_fraction=0.01), progress=False)
    assert corpus.n_val_docs == 1 and len(list(corpus.documents("train"))) == 1
    with pytest.raises(UserError, match="at least 2"):
        load_corpus(files_cfg(tmp_path, paths[:1]), progress=False)


def test_token_streams_are_the_split_documents_with_separators(stdlib_data):
    corpus = stdlib_data.corpus
    for split, tokens in (("train", stdlib_data.train_tokens), ("val", stdlib_data.val_tokens)):
        expected = "".join(d.text + "\x00" for d in corpus.documents(split)).encode()
        assert as_bytes(tokens) == expected


# ---------------------------------------------------------------------------------- batches
def test_batches_depend_on_seed_and_step_only(tmp_path, stdlib_data):
    again = prepare(stdlib_cfg(tmp_path))          # e.g. the other model family: its own prepare
    x1, y1 = stdlib_data.train_batch(seed=3, step=7, batch_size=4, seq_len=32)
    x2, y2 = again.train_batch(seed=3, step=7, batch_size=4, seq_len=32)
    assert x1.dtype == y1.dtype == torch.int64
    assert x1.shape == y1.shape == (4, 32)
    assert (x1 == x2).all() and (y1 == y2).all()
    x3, _ = stdlib_data.train_batch(seed=4, step=7, batch_size=4, seq_len=32)
    x4, _ = stdlib_data.train_batch(seed=3, step=8, batch_size=4, seq_len=32)
    assert not (x1 == x3).all() and not (x1 == x4).all()


def test_batch_windows_are_slices_of_train_tokens(stdlib_data):
    train = as_bytes(stdlib_data.train_tokens)
    x, y = stdlib_data.train_batch(seed=0, step=0, batch_size=16, seq_len=48)
    assert (x[:, 1:] == y[:, :-1]).all()
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        window = as_bytes(np.concatenate([row_x, row_y[-1:]]))
        assert window in train


def test_pickled_data_reopens_the_cache_instead_of_copying_tokens(stdlib_data):
    import pickle
    blob = pickle.dumps(stdlib_data)
    assert len(blob) < stdlib_data.n_train_tokens
    copy = pickle.loads(blob)
    assert isinstance(copy.train_tokens, np.memmap)
    assert (copy.train_batch(1, 2, 4, 32)[0] == stdlib_data.train_batch(1, 2, 4, 32)[0]).all()


def test_val_set_is_fixed_contiguous_and_counts_bytes(stdlib_data):
    x, y, n_bytes = stdlib_data.val_set(seq_len=64)
    assert x.shape == y.shape == (1024 // 64, 64)
    val = np.asarray(stdlib_data.val_tokens, dtype=np.int64)
    assert (x.flatten().numpy() == val[:1024]).all() and (y.flatten().numpy() == val[1:1025]).all()
    assert n_bytes == y.numel()                     # byte tokenizer: one byte per target
    x2, y2, _ = stdlib_data.val_set(seq_len=64)
    assert (x == x2).all() and (y == y2).all()
    assert stdlib_data.val_set(seq_len=100)[0].shape == (10, 100)      # rounded down to whole windows


def test_val_set_has_at_least_one_window_and_seq_len_must_fit(tmp_path, stdlib_data):
    data = prepare(stdlib_cfg(tmp_path), eval_tokens=10)
    assert data.val_set(seq_len=64)[0].shape == (1, 64)
    with pytest.raises(UserError, match="validation split has .* tokens"):
        stdlib_data.val_set(seq_len=stdlib_data.n_val_tokens)
    with pytest.raises(UserError, match="seq_len"):
        prepare(stdlib_cfg(tmp_path), seq_len=10**6)


# ---------------------------------------------------------------------------------- cache
def test_second_prepare_reuses_the_cache(tmp_path):
    cfg = stdlib_cfg(tmp_path)
    first = prepare(cfg)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.cache_dir.iterdir()}
    second = prepare(cfg)
    assert first.rebuilt and not second.rebuilt
    assert second.cache_dir == first.cache_dir
    assert {p.name: p.stat().st_mtime_ns for p in second.cache_dir.iterdir()} == mtimes
    assert sorted(p.name for p in first.cache_dir.parent.iterdir()) == [first.fingerprint]   # no temp left


def test_cache_location_defaults_to_ssmscale_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMSCALE_CACHE", str(tmp_path / "env-cache"))
    data = prepare(DataConfig(source="stdlib", max_bytes=STDLIB_SMALL, val_fraction=0.2))
    assert data.cache_dir == tmp_path / "env-cache" / "tokens" / data.fingerprint
    assert data.describe()["cache"] == str(data.cache_dir)


def _truncate_train(folder):
    raw = (folder / "train.bin").read_bytes()
    (folder / "train.bin").write_bytes(raw[: len(raw) // 2])


def _flip_val_byte(folder):
    raw = bytearray((folder / "val.bin").read_bytes())
    raw[10] ^= 0x01
    (folder / "val.bin").write_bytes(bytes(raw))


def _garble_meta(folder):
    (folder / "meta.json").write_text('{"format": 1, "splits": ')


def _meta_wrong_count(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["splits"]["train"]["tokens"] += 1
    (folder / "meta.json").write_text(json.dumps(meta))


def _delete_meta(folder):
    (folder / "meta.json").unlink()


@pytest.mark.parametrize("damage", [_truncate_train, _flip_val_byte, _garble_meta, _meta_wrong_count, _delete_meta])
def test_corrupt_or_partial_cache_is_rebuilt(tmp_path, capsys, damage):
    cfg = stdlib_cfg(tmp_path)
    good = prepare(cfg)
    train, val = as_bytes(good.train_tokens), as_bytes(good.val_tokens)
    damage(good.cache_dir)
    capsys.readouterr()
    again = prepare(cfg)
    err = capsys.readouterr().err
    assert again.rebuilt and f"rebuilding corrupt token cache at {again.cache_dir}" in err
    assert as_bytes(again.train_tokens) == train and as_bytes(again.val_tokens) == val
    assert not prepare(cfg).rebuilt


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    from ssmscale.data.tokenizer import ByteTokenizer

    def boom(self, texts):
        raise RuntimeError("killed mid-build")
    monkeypatch.setattr(ByteTokenizer, "encode_arrays", boom)
    with pytest.raises(RuntimeError):
        prepare(stdlib_cfg(tmp_path))
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []


def test_build_racing_a_finished_copy_keeps_a_valid_cache(tmp_path):
    cfg = stdlib_cfg(tmp_path)
    data = prepare(cfg)
    data._build(progress=False)                      # a second builder finishing after the first
    assert not prepare(cfg).rebuilt
    _delete_meta(data.cache_dir)                     # a broken copy in the way is replaced
    data._build(progress=False)
    assert not prepare(cfg).rebuilt
    assert sorted(p.name for p in data.cache_dir.parent.iterdir()) == [data.fingerprint]


def test_fingerprint_follows_corpus_and_tokenizer_not_location(tmp_path):
    a = write_docs(tmp_path / "a", 6)
    b = write_docs(tmp_path / "b", 6)
    data_a = prepare(files_cfg(tmp_path, a), seq_len=16)
    data_b = prepare(files_cfg(tmp_path, b), seq_len=16)
    assert data_a.fingerprint == data_b.fingerprint and not data_b.rebuilt   # same text elsewhere
    b[2].write_text(b[2].read_text() + "one more line\n")
    changed = prepare(files_cfg(tmp_path, b), seq_len=16)
    assert changed.corpus_fingerprint != data_a.corpus_fingerprint
    assert changed.fingerprint != data_a.fingerprint and changed.rebuilt
    bpe = prepare(files_cfg(tmp_path, a), TokenizerConfig(kind="bpe", vocab_size=300), seq_len=16)
    assert bpe.corpus_fingerprint == data_a.corpus_fingerprint and bpe.fingerprint != data_a.fingerprint


# ---------------------------------------------------------------------------------- BPE
def test_bpe_is_trained_once_reused_and_counts_bytes_exactly(tmp_path, monkeypatch):
    from ssmscale.data import tokenizer as tokenizer_module
    cfg = stdlib_cfg(tmp_path)
    tok_cfg = TokenizerConfig(kind="bpe", vocab_size=400)
    data = prepare(cfg, tok_cfg)
    tok = data.tokenizer
    assert tok.name == "bpe-400" and data.vocab_size == 400
    assert int(np.max(data.train_tokens)) < 400
    assert data.n_train_tokens < 0.8 * data.corpus.n_bytes          # merges shorten the text
    text = "def f(x):\n    return x * 2  # caf\u00e9 \u2211 \U0001F600\n"
    assert tok.decode(tok.encode(text)) == text
    # the token streams decode to exactly the documents of each split
    expected = "".join(d.text + "\x00" for d in data.corpus.documents("val"))
    assert tok.decode_bytes(data.val_tokens) == expected.encode()
    assert tok.decode(data.val_tokens) == expected
    # the targets are the validation text after the first token; n_bytes counts exactly that span
    x, y, n_bytes = data.val_set(seq_len=64)
    start = len(tok.decode_bytes(x[0, :1]))
    assert tok.decode_bytes(y.flatten()) == expected.encode()[start:start + n_bytes]
    assert y.numel() < n_bytes == int(tok.token_bytes[y].sum())

    def no_training(*args, **kwargs):
        raise AssertionError("BPE retrained")
    monkeypatch.setattr(tokenizer_module, "_train_bpe", no_training)
    mtime = tok.path.stat().st_mtime_ns
    again = prepare(cfg, tok_cfg)
    assert not again.rebuilt and again.tokenizer.path == tok.path and tok.path.stat().st_mtime_ns == mtime
    assert again.tokenizer.encode(text) == tok.encode(text)


def test_unreadable_bpe_file_is_retrained(tmp_path, capsys):
    cfg, tok_cfg = stdlib_cfg(tmp_path), TokenizerConfig(kind="bpe", vocab_size=300)
    data = prepare(cfg, tok_cfg)
    data.tokenizer.path.write_text("{not json")
    again = prepare(cfg, tok_cfg)
    assert "retraining unreadable BPE tokenizer" in capsys.readouterr().err
    assert as_bytes(again.train_tokens) == as_bytes(data.train_tokens) and not again.rebuilt


# ---------------------------------------------------------------------------------- sources
def test_files_source_reads_txt_jsonl_parquet_in_order(tmp_path):
    import pandas as pd
    txt = write_docs(tmp_path / "t", 2)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"body": f"json row {i}", "n": i}) + "\n" for i in range(3)))
    parquet = tmp_path / "rows.parquet"
    pd.DataFrame({"body": ["parquet row 0", "parquet row 1"], "n": [0, 1]}).to_parquet(parquet)
    cfg = files_cfg(tmp_path, [tmp_path / "t" / "*.txt", jsonl, parquet], text_field="body")
    corpus = load_corpus(cfg, progress=False)
    texts = [d.text for d in corpus.documents()]
    assert texts == [p.read_text() for p in txt] + [f"json row {i}" for i in range(3)] + \
        ["parquet row 0", "parquet row 1"]
    assert [d.id for d in corpus.documents()] == [str(i) for i in range(7)]


def test_hf_source_loads_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 20}) + "\n" for i in range(12)))
    cfg = DataConfig(source="hf", hf_name=str(folder), hf_split="train", cache_dir=str(tmp_path / "cache"))
    data = prepare(cfg, seq_len=16)
    assert data.corpus.n_docs == 12 and data.describe()["source"] == "hf"
    assert as_bytes(data.train_tokens).count(b"\x00") == 12 - data.corpus.n_val_docs
    with pytest.raises(UserError, match="no field 'content'"):
        load_corpus(DataConfig(source="hf", hf_name=str(folder), text_field="content"), progress=False)
    with pytest.raises(UserError, match="validation"):
        load_corpus(DataConfig(source="hf", hf_name=str(folder), hf_split="validation"), progress=False)


def test_unreachable_hub_dataset_is_a_user_error(tmp_path):
    cfg = DataConfig(source="hf", hf_name="someone/not-cached-anywhere", cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match="someone/not-cached-anywhere"):
        load_corpus(cfg, progress=False)


@pytest.mark.parametrize("make, match", [
    (lambda d: [d / "missing.txt"], r"missing\.txt: data file not found"),
    (lambda d: [d / "nothing-*.jsonl"], r"nothing-\*\.jsonl: no file matches"),
    (lambda d: [d / "notes.docx"], r"notes\.docx: unsupported data file type"),
    (lambda d: [d / "rows.jsonl"], r"rows\.jsonl: no field 'text' \(columns: body\)"),
    (lambda d: [d / "numbers.jsonl"], r"numbers\.jsonl: field 'text' holds int values, not text"),
])
def test_bad_files_are_user_errors_naming_the_path(tmp_path, make, match):
    (tmp_path / "notes.docx").write_text("x")
    (tmp_path / "rows.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n')
    (tmp_path / "numbers.jsonl").write_text('{"text": 1}\n{"text": 2}\n')
    with pytest.raises(UserError, match=match):
        load_corpus(files_cfg(tmp_path, make(tmp_path)), progress=False)
    assert not (tmp_path / "cache").exists()


def _one_text_file(folder, n_paragraphs=60):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "input.txt"
    path.write_text("\n\n".join(f"PARAGRAPH {i}: " + " ".join(f"caf\u00e9 word{j}" for j in range(8 + i % 13)) + "\nline two"
                                 for i in range(n_paragraphs)) + "\n")
    return path


def test_one_text_file_is_cut_into_pieces_at_paragraph_ends_and_trains(tmp_path):
    # nanoGPT's Shakespeare is one input.txt: one document, which a split by document cannot divide
    path = _one_text_file(tmp_path)
    text = path.read_text()
    corpus = load_corpus(files_cfg(tmp_path, [path], val_fraction=0.05), progress=False)
    pieces = list(corpus.documents())
    assert corpus.chunk_bytes == 4096 and len(pieces) == corpus.n_docs >= 2
    assert "".join(d.text for d in pieces) == text                          # nothing lost, nothing repeated
    assert [d.id for d in pieces] == [f"0#{k}" for k in range(len(pieces))]
    assert all(len(d.text.encode()) <= 4096 for d in pieces)
    assert all(d.text.endswith("\n\n") for d in pieces[:-1])                # cut at paragraph ends
    assert 1 <= corpus.n_val_docs < corpus.n_docs
    assert corpus.describe()["chunking"].startswith(f"1 document cut into {corpus.n_docs} pieces of at most 4096")
    again = load_corpus(files_cfg(tmp_path, [path], val_fraction=0.05), progress=False)
    assert (again.fingerprint, [d.id for d in again.documents("val")]) == \
        (corpus.fingerprint, [d.id for d in corpus.documents("val")])
    data = prepare(files_cfg(tmp_path, [path], val_fraction=0.05), seq_len=16, eval_tokens=64)
    assert data.n_train_tokens > 0 and data.chunking == corpus.chunking


def test_chunk_bytes_cuts_every_document_and_changes_the_fingerprint(tmp_path):
    paths = write_docs(tmp_path / "docs", 3)
    whole = load_corpus(files_cfg(tmp_path, paths), progress=False)
    cut = load_corpus(files_cfg(tmp_path, paths, chunk_bytes=128), progress=False)
    assert whole.n_docs == 3 and "chunking" not in whole.describe()
    assert cut.n_docs > 3 and cut.fingerprint != whole.fingerprint and cut.split_key != whole.split_key
    assert "".join(d.text for d in cut.documents()) == "".join(d.text for d in whole.documents())
    assert all(d.text.endswith("\n") for d in cut.documents())              # no blank lines: at line ends


def test_a_piece_without_line_ends_is_cut_on_a_character_boundary():
    from ssmscale.data.corpus import Document, chunk_document
    text = "\u2211" * 100                                                     # 3 UTF-8 bytes each, no line end
    pieces = list(chunk_document(Document("d", text), 64))
    assert "".join(p.text for p in pieces) == text and all(len(p.text.encode()) <= 64 for p in pieces)


def test_a_text_file_too_small_for_two_pieces_says_how_to_cut_it_finer(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("just one short paragraph\n")
    with pytest.raises(UserError, match=r"input\.txt\): makes 1 piece of at most 4096 bytes; a train/validation "
                                        r"split by document needs at least 2 \(a smaller data.chunk_bytes cuts it finer\)"):
        load_corpus(files_cfg(tmp_path, [path]), progress=False)


# ---------------------------------------------------------------------------------- MQAR
def mqar_cfg(**kw):
    return DataConfig(source="synthetic", synthetic=MQARConfig(vocab_size=64, num_kv_pairs=4, num_examples=100, **kw))


def test_mqar_examples_recall_values_of_earlier_keys():
    data = prepare(mqar_cfg(), seq_len=24, eval_tokens=24 * 5)
    x, y = data.train_batch(seed=0, step=0, batch_size=8, seq_len=24)
    assert x.shape == y.shape == (8, 24) and data.vocab_size == 64
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0:8:2], row_x[1:8:2]
        assert len(set(keys)) == 4 and all(1 <= k < 32 for k in keys) and all(32 <= v < 64 for v in values)
        scored = [i for i, t in enumerate(row_y) if t != IGNORE]
        assert len(scored) == 4 and min(scored) >= 8
        assert sorted(row_x[i] for i in scored) == sorted(keys)
        for i in scored:
            assert row_y[i] == values[keys.index(row_x[i])]
        assert all(row_x[i] == 0 for i in range(8, 24) if i not in scored)
    vx, vy, n_bytes = data.val_set(seq_len=24)
    assert vx.shape == (5, 24) and n_bytes is None and (data.val_set(seq_len=24)[1] == vy).all()


def test_mqar_is_deterministic_and_checks_sizes():
    data = prepare(mqar_cfg(), seq_len=24)
    a, b = data.train_batch(1, 5, 4, 24), data.train_batch(1, 5, 4, 24)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert not (a[0] == data.train_batch(2, 5, 4, 24)[0]).all()
    with pytest.raises(UserError, match="seq_len"):
        prepare(mqar_cfg(), seq_len=11)
    with pytest.raises(UserError, match="num_kv_pairs"):
        prepare(DataConfig(source="synthetic", synthetic=MQARConfig(vocab_size=8, num_kv_pairs=4)), seq_len=64)
