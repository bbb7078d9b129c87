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
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, StrictFloat, StrictInt
from pydantic.dataclasses import dataclass

from trainers.architecture import MAX_POSITIONS

# Bump when the cache layout or the tokenization changes: old entries are then ignored.
CACHE_VERSION = 1
# Directories never read as corpus text (tests of the standard library, installed packages).
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


class DataError(ValueError):
    """The corpus cannot be used (missing path, no text, too small); one line naming it."""


@dataclass(config=ConfigDict(extra="forbid"))
class DataConfig:
    """Where the text comes from, how it is tokenized and how it is split.

    A pydantic dataclass: a bad value raises pydantic's ValidationError (a ValueError) that
    locates the field; it stays a plain dataclass to `dataclasses.replace` / `asdict` / pickle."""

    corpus: Annotated[str, Field(min_length=1, description=(
        "'stdlib' (the Python standard library's source), a text file, a directory or a glob"))] = "stdlib"
    tokenizer: Annotated[Literal["bytes", "bpe"], Field(description=(
        "'bytes' (256 symbols) or 'bpe' (trained on the corpus, vocab_size symbols)"))] = "bytes"
    vocab_size: Annotated[StrictInt, Field(gt=0, description="bpe vocabulary size (bytes is always 256)")] = 1024
    seq_len: Annotated[StrictInt, Field(gt=0, le=MAX_POSITIONS, description=(
        f"tokens per training window (at most model.max_position_embeddings, and {MAX_POSITIONS})"))] = 128
    val_fraction: Annotated[StrictFloat, Field(gt=0, lt=1, description=(
        "share of the documents held out for validation (split by a hash of the path)"))] = 0.05
    eval_batches: Annotated[StrictInt, Field(gt=0, le=100_000, description=(
        "batches in the fixed held-out set that fitness is measured on (at most 100000)"))] = 8
    eval_batch_size: Annotated[StrictInt, Field(gt=0, le=65_536, description=(
        "windows per held-out batch (at most 65536)"))] = 16
    max_bytes: Annotated[StrictInt | None, Field(gt=0, description=(
        "cap on the corpus bytes read (keeps the default fast); null reads everything"))] = 8_000_000
    cache_dir: Annotated[str | None, Field(description=(
        "token cache directory; null: $EVO_CACHE_DIR, else ~/.cache/evo/tokens"))] = None

    def __post_init__(self) -> None:
        if self.tokenizer == "bpe" and not 256 < self.vocab_size <= 2**32:
            raise ValueError(f"data.vocab_size: bpe needs 256 < vocab_size <= 2**32 (256 byte symbols + merges), "
                             f"got {self.vocab_size}")


class Corpus:
    """Tokenized train / validation text of one DataConfig, memory-mapped from the cache.

    Attributes: ``vocab_size``; ``bytes_per_token`` (UTF-8 bytes per token of the validation
    split, so bits/byte = nats/token / ln 2 / bytes_per_token); ``train_tokens`` and
    ``val_tokens`` (read-only memmaps); ``from_cache`` (False only for the load that tokenized);
    ``tokenizer_path`` (the BPE tokenizer.json, None for bytes); ``meta`` (sizes, counts).
    """

    def __init__(self, config: DataConfig, entry: Path, from_cache: bool):
        meta = json.loads((entry / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        self.config = config
        self.meta = meta
        self.path = entry
        self.from_cache = from_cache
        self.vocab_size: int = meta["vocab_size"]
        self.bytes_per_token: float = meta["val_bytes"] / meta["val_tokens"]
        self.train_tokens = np.memmap(entry / "train.bin", dtype=dtype, mode="r", shape=(meta["train_tokens"],))
        self.val_tokens = np.memmap(entry / "val.bin", dtype=dtype, mode="r", shape=(meta["val_tokens"],))
        self.tokenizer_path: str | None = str(entry / "tokenizer.json") if config.tokenizer == "bpe" else None
        self._eval: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        need = config.seq_len + 1
        for split, tokens in (("train", self.train_tokens), ("validation", self.val_tokens)):
            if len(tokens) < need:
                raise DataError(f"data.seq_len: corpus {config.corpus!r} is too small: its {split} split has "
                                f"{len(tokens)} tokens, a window needs seq_len + 1 = {need}")

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
            c = self.config
            T = c.seq_len
            n = c.eval_batches * c.eval_batch_size
            starts = np.linspace(0, len(self.val_tokens) - T - 1, n).round().astype(np.int64)
            self._eval = [_windows(self.val_tokens, starts[i:i + c.eval_batch_size], T)
                          for i in range(0, n, c.eval_batch_size)]
        return list(self._eval)


def _windows(tokens: np.ndarray, starts: np.ndarray, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(T + 1)                 # (B, T+1)
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return w[:, :-1], w[:, 1:]                               # x, y: (B, T), y shifted by one


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the corpus, tokenize it unless an identical cache entry exists, and map it.

    The cache key is a hash of the documents (relative paths and bytes), the tokenizer and the
    split, so any change of the text or the settings makes a new entry.
    """
    docs = _read_documents(cfg)
    key = _cache_key(cfg, docs)
    root = Path(os.path.expanduser(cfg.cache_dir or os.environ.get("EVO_CACHE_DIR") or "~/.cache/evo/tokens"))
    entry = root / key
    if (entry / "meta.json").exists():
        return Corpus(cfg, entry, from_cache=True)
    train_docs, val_docs = _split(cfg, docs)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _tokenize_into(cfg, train_docs, val_docs, tmp)
        try:
            os.rename(tmp, entry)        # atomic: readers see the whole entry or none
        except OSError:
            if not (entry / "meta.json").exists():
                raise
            # another process wrote the same entry first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Corpus(cfg, entry, from_cache=False)


# ----------------------------------------------------------------------------- reading

def check_corpus(cfg: DataConfig) -> None:
    """Raise DataError unless the corpus names files that can be read. Cheap (no file is read):
    the CLI calls it before a run writes anything or starts Ray."""
    _, files = _corpus_files(cfg.corpus)
    for p in files:
        if not os.access(p, os.R_OK):
            raise DataError(f"data.corpus: cannot read {p}: permission denied")


def _corpus_files(source: str) -> tuple[Path, list[Path]]:
    """The corpus root and its files, sorted; DataError when the source names none."""
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return root, [p for p in _walk(root) if p.suffix == ".py"]
    path = Path(os.path.expanduser(source))
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise DataError(f"data.corpus: no text in {source!r} (an empty directory)")
        return path, files
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"data.corpus: glob {source!r} matches no files")
        return Path(os.path.commonpath([str(p.parent) for p in files])), files
    if path.exists():
        raise DataError(f"data.corpus: {source!r} is neither a file nor a directory")
    raise DataError(f"data.corpus: path does not exist: {source}")


def _read_documents(cfg: DataConfig) -> list[tuple[str, bytes]]:
    """The corpus as sorted (relative path, UTF-8 bytes) documents, capped at max_bytes."""
    source = cfg.corpus
    root, files = _corpus_files(source)
    docs: list[tuple[str, bytes]] = []
    budget = cfg.max_bytes if cfg.max_bytes is not None else math.inf
    for p in files:
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
        raise DataError(f"data.corpus: no text in {source!r} ({what})")
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


def _split(cfg: DataConfig, docs: list[tuple[str, bytes]]) -> tuple[list[bytes], list[bytes]]:
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
            raise DataError(f"data.val_fraction: the {split} split of corpus {cfg.corpus!r} is empty "
                            f"({len(docs)} documents, val_fraction={cfg.val_fraction}); add documents "
                            f"or change data.val_fraction")
    return train, val


# ----------------------------------------------------------------------------- tokenizing

def _tokenize_into(cfg: DataConfig, train: list[bytes], val: list[bytes], out: Path) -> None:
    """Write train.bin, val.bin, meta.json (and tokenizer.json for bpe) into out."""
    if cfg.tokenizer == "bytes":
        vocab = 256
        encode = lambda docs: [np.frombuffer(d, dtype=np.uint8) for d in docs]  # noqa: E731
    else:
        tok = _train_bpe([d.decode("utf-8") for d in train], cfg.vocab_size)
        tok.save(str(out / "tokenizer.json"))
        vocab = tok.get_vocab_size()
        encode = lambda docs: [np.asarray(e.ids, dtype=np.int64)  # noqa: E731
                               for e in tok.encode_batch([d.decode("utf-8") for d in docs])]
    dtype = np.uint8 if vocab <= 2**8 else np.uint16 if vocab <= 2**16 else np.uint32
    counts = {}
    for split, docs in (("train", train), ("val", val)):
        tokens = np.concatenate(encode(docs)).astype(dtype)
        tokens.tofile(out / f"{split}.bin")
        counts[f"{split}_tokens"] = int(len(tokens))
        counts[f"{split}_bytes"] = sum(len(d) for d in docs)
        counts[f"{split}_documents"] = len(docs)
    meta = {"version": CACHE_VERSION, "corpus": cfg.corpus, "tokenizer": cfg.tokenizer,
            "vocab_size": vocab, "dtype": np.dtype(dtype).name, **counts}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


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


