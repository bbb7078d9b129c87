"""Training text: read a corpus, tokenize it once into an on-disk cache, serve batches.

A corpus is a list of documents (files). Documents are split into train / validation by a
hash of their relative path, so adding files never reshuffles the existing ones; a corpus of
a single document is split by position instead (its tail is the validation text).

Tokens are written once per (corpus content, tokenizer, settings) under the cache directory as
raw ``np.memmap`` files. The cache entry is a directory written under a temporary name and
renamed into place, so members of a population that share one cache never read a partial copy.

Every batch is a pure function of ``(seed, step, batch_size)``: a member resumed from a
checkpoint, or two members with the same seed, see exactly the same text.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import sysconfig
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trainers.config import DataConfig   # the data's config (torch-free), re-exported here

if TYPE_CHECKING:
    import torch

# torch is imported where windows become tensors (batches, the held-out set): reading, tokenizing
# and checking a corpus (the CLI before Ray starts, the driver's one tokenization) imports none.

# Bump when the cache layout or the tokenization changes: old entries are then ignored.
CACHE_VERSION = 1
# Directories never read as corpus text (tests of the standard library, installed packages).
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


class DataError(ValueError):
    """The corpus cannot be used (missing path, no text, too small); one line naming it."""


class _CacheEntry:
    """What every tokenized cache entry holds: its ``meta``, ``vocab_size``, ``tokenizer_path``
    (the BPE tokenizer.json, None for bytes) and ``from_cache`` (False only for the load that
    tokenized); ``_split`` maps one split's tokens and checks that a window fits."""

    def __init__(self, config: DataConfig, entry: Path, from_cache: bool):
        self.meta = json.loads((entry / "meta.json").read_text())
        self._dtype = np.dtype(self.meta["dtype"])
        self.config = config
        self.path = entry
        self.from_cache = from_cache
        self.vocab_size: int = self.meta["vocab_size"]
        self.tokenizer_path: str | None = str(entry / "tokenizer.json") if config.tokenizer == "bpe" else None

    def _split(self, file: str, n_tokens: int, what: str, split: str) -> np.ndarray:
        """The read-only memmap of ``file`` (``n_tokens`` tokens); DataError naming ``what`` when
        its ``split`` split is shorter than a window (seq_len + 1)."""
        tokens = np.memmap(self.path / file, dtype=self._dtype, mode="r", shape=(n_tokens,))
        need = self.config.seq_len + 1
        if len(tokens) < need:
            raise DataError(f"data.seq_len: {what} is too small: its {split} split has "
                            f"{len(tokens)} tokens, a window needs seq_len + 1 = {need}")
        return tokens


class Corpus(_CacheEntry):
    """Tokenized train / validation text of one DataConfig, memory-mapped from the cache.

    Attributes: ``vocab_size``; ``bytes_per_token`` (UTF-8 bytes per token of the validation
    split, so bits/byte = nats/token / ln 2 / bytes_per_token); ``train_tokens`` and
    ``val_tokens`` (read-only memmaps); ``from_cache`` (False only for the load that tokenized);
    ``tokenizer_path`` (the BPE tokenizer.json, None for bytes); ``meta`` (sizes, counts).
    """

    def __init__(self, config: DataConfig, entry: Path, from_cache: bool):
        super().__init__(config, entry, from_cache)
        meta = self.meta
        self.bytes_per_token: float = meta["val_bytes"] / meta["val_tokens"]
        what = f"corpus {config.corpus!r}"
        self.train_tokens = self._split("train.bin", meta["train_tokens"], what, "train")
        self.val_tokens = self._split("val.bin", meta["val_tokens"], what, "validation")
        self._eval: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def batch(self, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch for optimizer step ``step``: x, y LongTensor [batch_size, seq_len].

        Window offsets come from ``np.random.default_rng([seed, step])``, so the batch is a pure
        function of (seed, step, batch_size), independent of what was drawn before.
        """
        T = self.config.seq_len
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train_tokens) - T, size=batch_size)   # last start = n - T - 1
        return _windows(self.train_tokens, starts, T)

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out set: eval_batches x eval_batch_size windows evenly spaced over the
        validation tokens; the same for every member and every call."""
        if self._eval is None:
            self._eval = _eval_windows(self.val_tokens, self.config)
        return list(self._eval)

    def eval_sets(self) -> dict[str, tuple[list[tuple[torch.Tensor, torch.Tensor]], float]]:
        """{"": (the held-out batches, bytes per token)}: one unnamed set."""
        return {"": (self.eval_batches(), self.bytes_per_token)}


def _eval_windows(tokens: np.ndarray, c: DataConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """eval_batches x eval_batch_size windows evenly spaced over ``tokens``."""
    T = c.seq_len
    n = c.eval_batches * c.eval_batch_size
    starts = np.linspace(0, len(tokens) - T - 1, n).round().astype(np.int64)
    return [_windows(tokens, starts[i:i + c.eval_batch_size], T) for i in range(0, n, c.eval_batch_size)]


def _windows(tokens: np.ndarray, starts: np.ndarray, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    idx = starts[:, None] + np.arange(T + 1)                 # (B, T+1)
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return w[:, :-1], w[:, 1:]                               # x, y: (B, T), y shifted by one


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the corpus, tokenize it unless an identical cache entry exists, and map it.

    The cache key is a hash of the documents (relative paths and bytes), the tokenizer and the
    split, so any change of the text or the settings makes a new entry.
    """
    if cfg.sources:
        return _load_sources(cfg)
    docs = _read_documents(cfg)
    key = _cache_key(cfg, docs)
    root = _cache_root(cfg)
    entry = root / key
    if (entry / "meta.json").exists():
        return Corpus(cfg, entry, from_cache=True)
    train_docs, val_docs = _split(cfg, docs)
    _write_entry(root, key, lambda tmp: _tokenize_into(cfg, train_docs, val_docs, tmp))
    return Corpus(cfg, entry, from_cache=False)


def _cache_root(cfg: DataConfig) -> Path:
    return Path(os.path.expanduser(cfg.cache_dir or os.environ.get("EVO_CACHE_DIR") or "~/.cache/evo/tokens"))


def _write_entry(root: Path, key: str, write) -> None:
    """Run ``write(tmp)`` into a temporary directory and rename it to ``root / key``."""
    entry = root / key
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        try:
            os.rename(tmp, entry)        # atomic: readers see the whole entry or none
        except OSError:
            if not (entry / "meta.json").exists():
                raise
            # another process wrote the same entry first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_sources(cfg: DataConfig) -> "SourcesCorpus":
    """Several named sources: each read and split on its own, one tokenizer trained on the union
    of their train documents, each source's tokens cached once in one entry."""
    names = cfg.source_names()
    docs = {n: _read_documents(cfg, cfg.sources[n], f"data.sources.{n}") for n in names}
    h = hashlib.sha256()
    for n in names:
        h.update(f"\0source\0{n}\0".encode())
        h.update(_cache_key(cfg, docs[n]).encode())
    key = f"{cfg.tokenizer}-sources-{h.hexdigest()[:32]}"
    root = _cache_root(cfg)
    entry = root / key
    if (entry / "meta.json").exists():
        return SourcesCorpus(cfg, entry, from_cache=True)
    splits = {n: _split(cfg, docs[n], name=f"data.sources.{n}") for n in names}

    def write(out: Path) -> None:
        union = [d for n in names for d in splits[n][0]]
        encode, vocab = _encoder(cfg, union, out)
        dtype = _token_dtype(vocab)
        meta = {"version": CACHE_VERSION, "sources": dict(cfg.sources), "tokenizer": cfg.tokenizer,
                "vocab_size": vocab, "dtype": np.dtype(dtype).name, "per_source": {}}
        for n in names:
            meta["per_source"][n] = _write_splits(encode, dtype, *splits[n], out, prefix=f"{n}.")
        (out / "meta.json").write_text(json.dumps(meta, indent=1))

    _write_entry(root, key, write)
    return SourcesCorpus(cfg, entry, from_cache=False)


class SourcesCorpus(_CacheEntry):
    """Tokenized train / validation text of several named sources (data.sources) sharing one
    tokenizer. The interface of Corpus, plus ``names``, ``train`` / ``val`` (each source's
    memmaps) and ``bytes_per_tokens``; batches draw each sequence's source by the mix weights."""

    def __init__(self, config: DataConfig, entry: Path, from_cache: bool):
        super().__init__(config, entry, from_cache)
        meta = self.meta
        self.names: list[str] = config.source_names()
        self.train: dict[str, np.ndarray] = {}
        self.val: dict[str, np.ndarray] = {}
        self.bytes_per_tokens: dict[str, float] = {}
        for n in self.names:
            m = meta["per_source"][n]
            self.bytes_per_tokens[n] = m["val_bytes"] / m["val_tokens"]
            self.train[n] = self._split(f"{n}.train.bin", m["train_tokens"], f"source {n!r}", "train")
            self.val[n] = self._split(f"{n}.val.bin", m["val_tokens"], f"source {n!r}", "validation")
        # over all validation text (for code that wants one figure)
        self.bytes_per_token: float = (sum(meta["per_source"][n]["val_bytes"] for n in self.names)
                                       / sum(meta["per_source"][n]["val_tokens"] for n in self.names))
        self._eval: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def sources_for(self, seed: int, step: int, batch_size: int, mix: dict | None = None) -> np.ndarray:
        """Index into ``names`` of each sequence's source in the batch of ``step``."""
        return self._draw(seed, step, batch_size, mix)[0]

    def _draw(self, seed: int, step: int, batch_size: int, mix: dict | None) -> tuple[np.ndarray, np.ndarray]:
        weights = self.config.mix_weights(mix)
        p = np.array([weights[n] for n in self.names], dtype=np.float64)
        if not (np.all(np.isfinite(p)) and np.all(p >= 0) and p.sum() > 0):
            raise ValueError(f"data.mix: weights must be finite, >= 0 and not all zero, got {weights}")
        rng = np.random.default_rng([seed, step])
        src = rng.choice(len(self.names), size=batch_size, p=p / p.sum())
        u = rng.random(batch_size)
        return src, u

    def batch(self, seed: int, step: int, batch_size: int, mix: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch for step ``step``: each sequence's source is drawn by the mix weights
        (``mix`` over data.mix over equal), then its window uniformly in that source; a pure
        function of (seed, step, batch_size, weights)."""
        import torch

        T = self.config.seq_len
        src, u = self._draw(seed, step, batch_size, mix)
        w = np.empty((batch_size, T + 1), dtype=np.int64)
        for k in np.unique(src):                    # one gather per source, rows kept in place
            rows = np.flatnonzero(src == k)
            tokens = self.train[self.names[k]]
            starts = (u[rows] * (len(tokens) - T)).astype(np.int64)   # = int(u * (n - T)): u >= 0
            w[rows] = tokens[starts[:, None] + np.arange(T + 1)]
        w = torch.from_numpy(w)
        return w[:, :-1], w[:, 1:]

    def eval_sets(self) -> dict[str, tuple[list[tuple[torch.Tensor, torch.Tensor]], float]]:
        """{source: (its fixed held-out batches, its bytes per token)}."""
        return {n: (self.eval_batches(n), self.bytes_per_tokens[n]) for n in self.names}

    def eval_batches(self, name: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out set of source ``name`` (all sources' sets, in name order, for None)."""
        if name is None:
            return [b for n in self.names for b in self.eval_batches(n)]
        if name not in self._eval:
            self._eval[name] = _eval_windows(self.val[name], self.config)
        return list(self._eval[name])


class HeldOut(_CacheEntry):
    """A text never trained on (a fitness.eval set's corpus), every document of it held out,
    tokenized with the training tokenizer: ``eval_batches()`` and ``bytes_per_token`` as Corpus."""

    def __init__(self, config: DataConfig, entry: Path, from_cache: bool, what: str):
        super().__init__(config, entry, from_cache)
        self.bytes_per_token: float = self.meta["val_bytes"] / self.meta["val_tokens"]
        self.val_tokens = self._split("val.bin", self.meta["val_tokens"], what, "held-out")
        self._eval: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._eval is None:
            self._eval = _eval_windows(self.val_tokens, self.config)
        return list(self._eval)


def load_held_out(cfg: DataConfig, form: str, tokenizer_path: str | None,
                  field: str = "fitness.eval") -> HeldOut:
    """The text ``form`` (any data.corpus form), all of it held out, tokenized with the training
    tokenizer (``tokenizer_path``: the training entry's BPE tokenizer.json; None for bytes) and
    cached once per (text, tokenizer)."""
    docs = _read_documents(cfg, form, field)
    h = hashlib.sha256(b"held-out\0" + _cache_key(cfg, docs).encode())
    if tokenizer_path is not None:
        h.update(Path(tokenizer_path).read_bytes())
    key = f"{cfg.tokenizer}-heldout-{h.hexdigest()[:32]}"
    root = _cache_root(cfg)
    entry = root / key
    what = f"{field} {form!r}"
    if (entry / "meta.json").exists():
        return HeldOut(cfg, entry, True, what)

    def write(out: Path) -> None:
        if tokenizer_path is None:
            encode, vocab = (lambda ds: [np.frombuffer(d, dtype=np.uint8) for d in ds]), 256
        else:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(tokenizer_path)
            shutil.copyfile(tokenizer_path, out / "tokenizer.json")
            encode, vocab = (lambda ds: [np.asarray(e.ids, dtype=np.int64)
                                         for e in tok.encode_batch([d.decode("utf-8") for d in ds])]), \
                tok.get_vocab_size()
        dtype = _token_dtype(vocab)
        counts = _write_splits(encode, dtype, [], [d for _, d in docs], out)
        meta = {"version": CACHE_VERSION, "held_out": form, "tokenizer": cfg.tokenizer,
                "vocab_size": vocab, "dtype": np.dtype(dtype).name, **counts}
        (out / "meta.json").write_text(json.dumps(meta, indent=1))

    _write_entry(root, key, write)
    return HeldOut(cfg, entry, False, what)


# ----------------------------------------------------------------------------- reading

def check_corpus(cfg: DataConfig, extra: dict[str, str] | None = None) -> None:
    """Raise DataError unless the corpus (every source) and the ``extra`` texts ({field: corpus
    form}, e.g. fitness.eval's) name files that can be read. Cheap (no file is read): the CLI
    calls it before a run writes anything or starts Ray."""
    named = {f"data.sources.{n}": cfg.sources[n] for n in cfg.source_names()} or {"data.corpus": cfg.corpus}
    named.update(extra or {})
    for field, source in named.items():
        if source == STDLIB_DOCS:
            continue
        _, files = _corpus_files(source, field)
        for p in files:
            if not os.access(p, os.R_OK):
                raise DataError(f"{field}: cannot read {p}: permission denied")


STDLIB_DOCS = "stdlib-docs"


def _stdlib_docs() -> list[tuple[str, bytes]]:
    """The English prose of the Python documentation shipped with every Python (pydoc_data's
    topics), one document per topic, sorted by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:      # a Python built without its documentation data
        raise DataError("data.corpus: 'stdlib-docs' needs pydoc_data, which this Python lacks") from None
    return [(f"{name}.txt", text.encode("utf-8")) for name, text in sorted(topics.items()) if text]


def _corpus_files(source: str, field: str = "data.corpus") -> tuple[Path, list[Path]]:
    """The corpus root and its files, sorted; DataError (naming ``field``) when the source names none."""
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return root, [p for p in _walk(root) if p.suffix == ".py"]
    path = Path(os.path.expanduser(source))
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise DataError(f"{field}: no text in {source!r} (an empty directory)")
        return path, files
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"{field}: glob {source!r} matches no files")
        return Path(os.path.commonpath([str(p.parent) for p in files])), files
    if path.exists():
        raise DataError(f"{field}: {source!r} is neither a file nor a directory")
    raise DataError(f"{field}: path does not exist: {source}")


def _read_documents(cfg: DataConfig, source: str | None = None,
                    field: str = "data.corpus") -> list[tuple[str, bytes]]:
    """The corpus (or one source) as sorted (relative path, UTF-8 bytes) documents, capped at max_bytes."""
    source = cfg.corpus if source is None else source
    if source == STDLIB_DOCS:
        root, files = Path("/"), _stdlib_docs()
    else:
        root, files = _corpus_files(source, field)
    docs: list[tuple[str, bytes]] = []
    budget = cfg.max_bytes if cfg.max_bytes is not None else math.inf
    for p in files:
        if isinstance(p, tuple):     # an embedded document (name, bytes)
            p, data = root / p[0], p[1]
        else:
            data = p.read_bytes()
        if not data or not _is_text(data):
            continue
        if len(data) > budget:
            data = _truncate(data, int(budget))
        if data:
            docs.append((p.relative_to(root).as_posix(), data))
            budget -= len(data)
        if budget <= 0:
            break
    if not docs:
        what = "the file is empty or not UTF-8 text" if len(files) == 1 else f"{len(files)} files, none non-empty UTF-8 text"
        raise DataError(f"{field}: no text in {source!r} ({what})")
    return docs


def _walk(root: Path) -> list[Path]:
    """All files under root, sorted, skipping hidden entries and SKIP_DIRS."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS]
        out.extend(Path(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(out)


def _is_text(data: bytes) -> bool:
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _truncate(data: bytes, n: int) -> bytes:
    """At most n bytes of data, cut after a newline when there is one (else at a character)."""
    cut = data[:n]
    nl = cut.rfind(b"\n")
    if nl >= 0:
        return cut[:nl + 1]
    return cut.decode("utf-8", errors="ignore").encode("utf-8")


def _cache_key(cfg: DataConfig, docs: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    settings = {"version": CACHE_VERSION, "tokenizer": cfg.tokenizer, "val_fraction": cfg.val_fraction,
                "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else 256}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for rel, data in docs:
        h.update(f"\0{rel}\0{len(data)}\0".encode())
        h.update(data)
    return f"{cfg.tokenizer}-{h.hexdigest()[:32]}"


def _split(cfg: DataConfig, docs: list[tuple[str, bytes]], name: str | None = None) -> tuple[list[bytes], list[bytes]]:
    """Train / validation documents. A document goes to validation when the hash of its relative
    path falls below val_fraction; a single document is split by position (tail = validation)."""
    if len(docs) == 1:
        data = docs[0][1]
        at = int(len(data) * (1.0 - cfg.val_fraction))
        nl = data.find(b"\n", at)
        at = nl + 1 if 0 <= nl < len(data) - 1 else at
        while at < len(data) and (data[at] & 0xC0) == 0x80:    # do not cut inside a UTF-8 character
            at += 1
        train, val = [data[:at]], [data[at:]]
    else:
        train, val = [], []
        for rel, data in docs:
            u = int.from_bytes(hashlib.sha256(b"evo-split\0" + rel.encode()).digest()[:8], "big") / 2.0**64
            (val if u < cfg.val_fraction else train).append(data)
    for split, part in (("validation", val), ("train", train)):
        if not any(part):
            raise DataError(f"data.val_fraction: the {split} split of corpus {name or cfg.corpus!r} is empty "
                            f"({len(docs)} documents, val_fraction={cfg.val_fraction}); add documents "
                            f"or change data.val_fraction")
    return train, val


# ----------------------------------------------------------------------------- tokenizing

def _tokenize_into(cfg: DataConfig, train: list[bytes], val: list[bytes], out: Path) -> None:
    """Write train.bin, val.bin, meta.json (and tokenizer.json for bpe) into out."""
    encode, vocab = _encoder(cfg, train, out)
    dtype = _token_dtype(vocab)
    counts = _write_splits(encode, dtype, train, val, out)
    meta = {"version": CACHE_VERSION, "corpus": cfg.corpus, "tokenizer": cfg.tokenizer,
            "vocab_size": vocab, "dtype": np.dtype(dtype).name, **counts}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _encoder(cfg: DataConfig, train: list[bytes], out: Path):
    """(encode: list of documents -> list of token arrays, vocabulary size); a BPE tokenizer is
    trained on ``train`` and saved as out/tokenizer.json."""
    if cfg.tokenizer == "bytes":
        return (lambda docs: [np.frombuffer(d, dtype=np.uint8) for d in docs]), 256
    tok = _train_bpe([d.decode("utf-8") for d in train], cfg.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    return (lambda docs: [np.asarray(e.ids, dtype=np.int64)
                          for e in tok.encode_batch([d.decode("utf-8") for d in docs])]), tok.get_vocab_size()


def _token_dtype(vocab: int):
    return np.uint8 if vocab <= 2**8 else np.uint16 if vocab <= 2**16 else np.uint32


def _write_splits(encode, dtype, train: list[bytes], val: list[bytes], out: Path, prefix: str = "") -> dict:
    """Write <prefix>train.bin and <prefix>val.bin; their token, byte and document counts."""
    counts = {}
    for split, docs in (("train", train), ("val", val)):
        tokens = np.concatenate(encode(docs)).astype(dtype) if docs else np.zeros(0, dtype)
        tokens.tofile(out / f"{prefix}{split}.bin")
        counts[f"{split}_tokens"] = int(len(tokens))
        counts[f"{split}_bytes"] = sum(len(d) for d in docs)
        counts[f"{split}_documents"] = len(docs)
    return counts


def _train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) trained locally on the train documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


