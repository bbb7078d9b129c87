"""trainers/data.py: corpus reading, split, token cache, batches, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import pickle
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from trainers.data import DataConfig, DataError, load_corpus


def _write_docs(root: Path, names, lines: int = 40) -> None:
    """One text file per name; every line says which document it belongs to."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / f"{name}.txt").write_text("".join(f"<{name}> line {i} of some text\n" for i in range(lines)))


def _doc_names(tokens: np.ndarray) -> set[str]:
    text = bytes(np.asarray(tokens, dtype=np.uint8)).decode()
    return {line.split(">")[0][1:] for line in text.splitlines() if line.startswith("<")}


# ----------------------------------------------------------------------------- config and errors

@pytest.mark.parametrize("kwargs, field, error", [
    ({"seq_len": 0}, "seq_len", "greater_than"),
    ({"tokenizer": "words"}, "tokenizer", "literal_error"),
    ({"val_fraction": 1.0}, "val_fraction", "less_than"),
    ({"val_fraction": True}, "val_fraction", "float_type"),        # YAML's `yes` is no number
    ({"eval_batches": 2.5}, "eval_batches", "int_type"),
    ({"max_bytes": -1}, "max_bytes", "greater_than"),
    ({"corpus": ""}, "corpus", "string_too_short"),
    ({"corpsu": "x"}, "corpsu", "unexpected_keyword_argument"),
])
def test_config_errors_name_the_field(kwargs, field, error):
    # pydantic's error (a ValueError) locates the field; experiments/config.py makes it one line
    with pytest.raises(ValidationError) as e:
        DataConfig(**kwargs)
    assert isinstance(e.value, ValueError)
    first = e.value.errors()[0]
    assert (first["loc"], first["type"]) == ((field,), error)


def test_bpe_vocabulary_is_checked_against_the_tokenizer():
    with pytest.raises(ValidationError, match=r"data\.vocab_size: bpe needs 256 < vocab_size"):
        DataConfig(tokenizer="bpe", vocab_size=100)
    assert DataConfig(tokenizer="bpe", vocab_size=512).vocab_size == 512


def test_config_is_a_dataclass_that_validates_and_pickles():
    cfg = DataConfig(seq_len=64)
    assert replace(cfg, seq_len=32).seq_len == 32 and asdict(cfg)["seq_len"] == 64
    assert pickle.loads(pickle.dumps(cfg)) == cfg                  # members get it through Ray
    with pytest.raises(ValidationError):
        replace(cfg, seq_len=0)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=f"data.corpus: path does not exist: {missing}$"):
        load_corpus(DataConfig(corpus=str(missing)))


def test_glob_without_matches(tmp_path):
    with pytest.raises(DataError, match="data.corpus: glob .* matches no files"):
        load_corpus(DataConfig(corpus=str(tmp_path / "*.md")))


def test_empty_corpus(tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (tmp_path / "empty.txt").write_text("")
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "blob.dat").write_bytes(bytes(range(256)) * 4)
    for corpus in (empty_dir, tmp_path / "empty.txt", binary):
        with pytest.raises(DataError) as e:
            load_corpus(DataConfig(corpus=str(corpus)))
        assert str(e.value).startswith(f"data.corpus: no text in '{corpus}'")
        assert "\n" not in str(e.value)


def test_corpus_too_small_for_seq_len(tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("tiny corpus\n" * 20)                     # 240 bytes; validation tail ~12 bytes
    with pytest.raises(DataError, match=r"data.seq_len: corpus .* too small: its validation split has \d+ tokens"):
        load_corpus(DataConfig(corpus=str(f), seq_len=128))


def test_validation_split_empty(tmp_path):
    _write_docs(tmp_path / "two", ["a", "b"])               # neither path hashes below 0.001
    with pytest.raises(DataError, match=r"data.val_fraction: the validation split .* is empty \(2 documents"):
        load_corpus(DataConfig(corpus=str(tmp_path / "two"), val_fraction=0.001, seq_len=8))


# ----------------------------------------------------------------------------- corpus kinds and split

def test_stdlib_default_is_capped_and_python_source():
    cfg = DataConfig(max_bytes=300_000, val_fraction=0.2)
    c = load_corpus(cfg)
    m = c.meta
    assert m["train_bytes"] + m["val_bytes"] <= 300_000
    assert m["train_bytes"] + m["val_bytes"] > 250_000       # documents fill the cap
    assert c.vocab_size == 256 and c.bytes_per_token == 1.0
    assert c.train_tokens.dtype == np.uint8
    text = bytes(c.train_tokens[:100_000]).decode("utf-8")
    assert "def " in text and "import " in text


def test_single_file_tail_is_validation(tmp_path):
    f = tmp_path / "book.txt"
    data = "".join(f"line {i}: all work and no play\n" for i in range(400)).encode()
    f.write_bytes(data)
    c = load_corpus(DataConfig(corpus=str(f), seq_len=16, val_fraction=0.1))
    train, val = bytes(c.train_tokens), bytes(c.val_tokens)
    assert train + val == data
    assert val.startswith(b"line ") and 0.08 < len(val) / len(data) < 0.12


def test_split_by_document_is_deterministic_and_stable(tmp_path):
    root = tmp_path / "docs"
    _write_docs(root, [f"d{i:02d}" for i in range(40)])
    cfg = DataConfig(corpus=str(root), seq_len=16, val_fraction=0.25, eval_batches=1, eval_batch_size=2)
    c1 = load_corpus(cfg)
    val1, train1 = _doc_names(c1.val_tokens), _doc_names(c1.train_tokens)
    assert val1 and train1 and not val1 & train1 and len(val1 | train1) == 40
    assert c1.meta["val_documents"] == len(val1)
    # adding documents leaves every existing document on its side of the split
    _write_docs(root, [f"new{i:02d}" for i in range(20)])
    c2 = load_corpus(cfg)
    assert not c2.from_cache                                  # new content -> new cache entry
    val2, train2 = _doc_names(c2.val_tokens), _doc_names(c2.train_tokens)
    old = {f"d{i:02d}" for i in range(40)}
    assert val2 & old == val1 and train2 & old == train1
    # the same files in a glob give the same split
    c3 = load_corpus(DataConfig(corpus=str(root / "d*.txt"), seq_len=16, val_fraction=0.25,
                                eval_batches=1, eval_batch_size=2))
    assert _doc_names(c3.val_tokens) == val1


# ----------------------------------------------------------------------------- cache and batches

def test_cache_is_reused_and_batches_are_pure(small_data):
    c1 = load_corpus(small_data)
    meta = c1.path / "meta.json"
    mtimes = {p.name: p.stat().st_mtime_ns for p in c1.path.iterdir()}
    c2 = load_corpus(small_data)
    assert c2.from_cache and c2.path == c1.path
    assert {p.name: p.stat().st_mtime_ns for p in c2.path.iterdir()} == mtimes   # not rewritten
    assert json.loads(meta.read_text())["train_tokens"] == len(c2.train_tokens)
    leftovers = [p for p in c1.path.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []

    x, y = c1.batch(seed=3, step=7, batch_size=5)
    assert x.shape == y.shape == (5, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])                  # y is x shifted by one
    c1.batch(seed=3, step=8, batch_size=5)                    # draws in between change nothing
    for c in (c1, c2):
        x2, y2 = c.batch(seed=3, step=7, batch_size=5)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, c1.batch(seed=3, step=8, batch_size=5)[0])
    assert not torch.equal(x, c1.batch(seed=4, step=7, batch_size=5)[0])
    assert c1.batch(seed=3, step=7, batch_size=9)[0].shape == (9, 32)


def test_eval_batches_fixed(small_data):
    c1, c2 = load_corpus(small_data), load_corpus(small_data)
    e1, e2 = c1.eval_batches(), c2.eval_batches()
    assert len(e1) == small_data.eval_batches
    for (x1, y1), (x2, y2) in zip(e1, e2):
        assert x1.shape == (small_data.eval_batch_size, small_data.seq_len)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    starts = e1[0][0][:, 0]
    assert len(set(starts.tolist())) > 1                      # spread out, not one window repeated
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e1, c1.eval_batches()))


def test_concurrent_loads_share_one_entry(tmp_path):
    """Processes tokenizing the same corpus at once all succeed and leave one complete entry."""
    corpus = tmp_path / "docs"
    _write_docs(corpus, [f"d{i:02d}" for i in range(30)], lines=400)
    cache = tmp_path / "cache"
    code = ("import sys; from trainers.data import DataConfig, load_corpus; "
            f"c = load_corpus(DataConfig(corpus={str(corpus)!r}, val_fraction=0.3, cache_dir={str(cache)!r})); "
            "print(len(c.train_tokens), len(c.val_tokens))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    assert len({out for out, _ in outs}) == 1
    entries = list(cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").exists()


# ----------------------------------------------------------------------------- bpe

def test_bpe_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    cfg = DataConfig(tokenizer="bpe", vocab_size=320, max_bytes=150_000, val_fraction=0.2, seq_len=32)
    c = load_corpus(cfg)
    assert 256 < c.vocab_size <= 320
    assert c.train_tokens.dtype == np.uint16
    assert int(c.train_tokens.max()) < c.vocab_size
    assert c.bytes_per_token > 1.2                            # merges make tokens longer than a byte
    tok = Tokenizer.from_file(c.tokenizer_path)
    val_text = tok.decode(np.asarray(c.val_tokens).tolist())
    assert len(val_text.encode("utf-8")) == c.meta["val_bytes"]   # byte-level BPE round-trips exactly
    again = load_corpus(cfg)
    assert again.from_cache and np.array_equal(again.train_tokens, c.train_tokens)
    # training is deterministic: a member with its own cache (another node) gets the same tokens
    elsewhere = load_corpus(replace(cfg, cache_dir=str(tmp_path / "other-node")))
    assert not elsewhere.from_cache and elsewhere.path.name == c.path.name
    assert np.array_equal(elsewhere.train_tokens, c.train_tokens)
    assert Path(elsewhere.tokenizer_path).read_bytes() == Path(c.tokenizer_path).read_bytes()
    # a different vocabulary size is a different cache entry
    other = load_corpus(DataConfig(tokenizer="bpe", vocab_size=300, max_bytes=150_000, val_fraction=0.2))
    assert other.path != c.path and other.vocab_size <= 300


# ----------------------------------------------------------------------------- several sources

def _golden_docs(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for k in range(12):
        (root / f"d{k:02d}.txt").write_text("".join(f"<d{k:02d}> line {i} of some text {i * k % 7}\n" for i in range(60)))


def _digest(c) -> str:
    import hashlib
    h = hashlib.sha256()
    h.update(np.asarray(c.train_tokens).tobytes())
    h.update(np.asarray(c.val_tokens).tobytes())
    for step in range(3):
        x, y = c.batch(7, step, 4)
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    for x, y in c.eval_batches():
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    h.update(repr(c.bytes_per_token).encode())
    return h.hexdigest()


@pytest.mark.parametrize("tokenizer, digest", [
    # computed with main's trainers/data.py (before data.sources existed) on the same corpus
    ("bytes", "68ca41490cda6d6049d3825f6c90dbd4e15fcd62251398b096c18b756170998f"),
    ("bpe", "af22a8750e31345841e9157f9e7bb0fd58fdaf3d7e0d4d16afd1394d4c9b4684"),
])
def test_single_corpus_is_byte_identical_to_before_sources(tmp_path, tokenizer, digest):
    _golden_docs(tmp_path / "docs")
    cfg = DataConfig(corpus=str(tmp_path / "docs"), tokenizer=tokenizer, vocab_size=300, seq_len=16,
                     val_fraction=0.25, eval_batches=2, eval_batch_size=3, cache_dir=str(tmp_path / "cache"))
    assert _digest(load_corpus(cfg)) == digest


def test_stdlib_docs_is_english_prose(tmp_path):
    c = load_corpus(DataConfig(corpus="stdlib-docs", max_bytes=None, seq_len=32, cache_dir=str(tmp_path)))
    total = c.meta["train_bytes"] + c.meta["val_bytes"]
    assert 200_000 < total < 2_000_000 and c.meta["val_documents"] > 0
    text = bytes(np.asarray(c.train_tokens[:200_000], dtype=np.uint8)).decode("utf-8", errors="ignore")
    assert " the " in text and "statement" in text


def _two_sources(tmp_path, **kw) -> DataConfig:
    _write_docs(tmp_path / "a", [f"a{i:02d}" for i in range(20)], lines=60)
    _write_docs(tmp_path / "b", [f"b{i:02d}" for i in range(20)], lines=60)
    return DataConfig(sources={"aa": str(tmp_path / "a"), "bb": str(tmp_path / "b")}, seq_len=16,
                      val_fraction=0.25, eval_batches=2, eval_batch_size=3, cache_dir=str(tmp_path / "cache"), **kw)


def test_sources_share_one_tokenizer_and_one_cache_entry(tmp_path):
    cfg = _two_sources(tmp_path, tokenizer="bpe", vocab_size=300)
    c = load_corpus(cfg)
    assert not c.from_cache and c.names == ["aa", "bb"] and c.vocab_size == 300
    tok_files = list((tmp_path / "cache").glob("*/tokenizer.json"))
    assert len(tok_files) == 1
    again = load_corpus(cfg)
    assert again.from_cache and again.path == c.path
    # each source's own text, each held-out set from its own validation documents
    for n, letter in (("aa", "a"), ("bb", "b")):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(c.tokenizer_path)
        text = tok.decode(np.asarray(c.train[n][:400]).tolist())
        assert f"<{letter}" in text and f"<{'b' if letter == 'a' else 'a'}" not in text
        assert len(c.eval_batches(n)) == 2 and c.eval_batches(n)[0][0].shape == (3, 16)


def test_batch_sources_follow_the_weights_and_are_pure(tmp_path):
    c = load_corpus(_two_sources(tmp_path))
    only_b = c.sources_for(3, 5, 64, {"aa": 0.0})
    assert set(only_b.tolist()) == {1}
    x, _ = c.batch(3, 5, 64, {"aa": 0.0})
    text = bytes(x.flatten().numpy().astype(np.uint8)).decode("utf-8", errors="ignore")
    assert "<b" in text and "<a" not in text
    even = c.sources_for(3, 5, 4000)
    assert 1800 < int(even.sum()) < 2200                       # equal weights by default
    skewed = c.sources_for(3, 5, 4000, {"aa": 3.0, "bb": 1.0})
    assert 800 < int(skewed.sum()) < 1200
    for mix in (None, {"bb": 0.25}):
        a1, b1 = c.batch(3, 7, 8, mix)
        a2, b2 = c.batch(3, 7, 8, mix)
        assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_mixed_batches_are_byte_identical_to_the_per_sequence_loop(tmp_path):
    """SourcesCorpus.batch gathers each source's windows at once; the digest was computed with
    the loop it replaced (one window per sequence), over several seeds, steps, sizes and mixes."""
    import hashlib
    c = load_corpus(_two_sources(tmp_path))
    h = hashlib.sha256()
    for seed, step, size, mix in ((3, 0, 1, None), (3, 7, 8, None), (5, 2, 64, {"bb": 0.25}),
                                  (5, 3, 17, {"aa": 0.0}), (9, 11, 33, {"aa": 4.0, "bb": 1.0})):
        x, y = c.batch(seed, step, size, mix)
        assert x.shape == y.shape == (size, 16) and x.dtype == y.dtype == torch.long
        h.update(x.contiguous().numpy().tobytes())
        h.update(y.contiguous().numpy().tobytes())
    assert h.hexdigest() == "4134b992830e6d3d9ff0ac855205dd59668faba7a97f40365d3abec4eb0e3598"


@pytest.mark.parametrize("kwargs, message", [
    ({"mix": {"cc": 1.0}}, "data.mix.cc: no such source"),
    ({"mix": {"aa": 0.0, "bb": 0}}, "data.mix: all weights are zero"),
])
def test_bad_mix(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _two_sources(tmp_path, **kwargs)
