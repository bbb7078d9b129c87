"""The run store: everything a search run keeps, under ``<storage>/<name>/``.

``storage`` is a local directory or any filesystem URI fsspec resolves (``file://``, ``s3://``,
``gs://``, ``memory://`` in tests), so the driver and the member actors of a multi-node cluster
can share one store. They pass plain strings around (``store.storage``, ``store.name``) and each
opens its own ``RunStore``; a ``RunStore`` also pickles as those two strings. This module imports
no ray, and torch only inside the two checkpoint methods (``evo status`` need not pay for it).

Layout::

    <storage>/<name>/              RunStore.uri
    ├── config.yaml                the resolved experiment config; written once, by create()
    ├── state.json                 the commit pointer, the only file a commit replaces:
    │                              {"commit": 42, "round": 12, "file": "states/000042.json",
    │                               "sha256": "…", "bytes": 5120, "time": "2026-…Z",
    │                               "needs": ["states/000040.json", "states/000041.json"],
    │                               "previous": [{"commit": 41, "file", "sha256", "round", "needs"}, …]}
    ├── states/
    │   ├── 000040.json            the driver's whole state at commit 40 (JSON, sorted keys, one
    │   │                          top-level key per line, each member's record on a line of its own)
    │   ├── 000041.json            …commit 41 as a delta of commit 40: the top-level keys, and in
    │   │                          "delta" the member fields that changed, the evaluations
    │   │                          appended, and "of": {"file", "sha256", "round", "commit"} of the
    │   │                          state it applies to (apply_delta)
    │   └── 000042.json            …commit 42 (whole or a delta): each written under a fresh name,
    │                              never rewritten; the newest KEEP_STATES commits are kept, with
    │                              their checksums in the pointer's "previous", and every body
    │                              their deltas need ("needs": the chain back to a whole body), so
    │                              a resume can fall back to an older one
    ├── lineage.jsonl              one JSON object per line, one per event, append-only; on resume
    │                              the lines written after the last commit are dropped
    ├── checkpoints/
    │   └── m3/
    │       ├── s0.pt … s3.pt      torch.save of member 3's trainer state: CHECKPOINT_SLOTS slots
    │       │                      per member, overwritten in turn (slot = round % SLOTS, async:
    │       │                      the member's intervals; the next free one when a kept commit
    │       │                      names that one), never deleted (checkpoint_slots)
    │       └── s0.pt.sha256 …     its SHA-256, written by the member after the file; the member
    │                              also reports it (wait_saved), the driver commits it in the
    │                              member's record (checkpoint_sha256; read from this file only
    │                              when not reported), and a resume checks the file against it
    │                              (a run of an older evo names r<round>.pt files instead: they
    │                              are read as they are and deleted once no kept commit names them)
    ├── lock.json                  while a driver holds the run: {"pid", "host", "pid_start",
    │                              "started", "heartbeat" (unix s), "token"}
    └── …                          whatever else is written with write_text (reports, optuna.db …)

Commit protocol. ``commit_state`` writes the state to ``states/<commit>.json``, then replaces
``state.json`` with a small pointer holding that file's SHA-256. The commit happens when the
pointer is replaced: a crash before that leaves the previous pointer, which names a body that is
complete and never touched again. ``read_state`` checks the checksum, so a torn body is reported
(``CorruptRunError``), never returned. A delta names the body it applies to with that body's
checksum, so the whole chain back to a whole body is checked the same way (a chain of checksums);
a run written before deltas (every body whole, no "needs") reads as before. ``committed_states`` also yields the older bodies still
kept, each checked against its checksum, and ``prune_checkpoints`` keeps every checkpoint one of
them names: a run whose last commit lost a file resumes from the commit before it. The driver
prunes in the background (``prune_checkpoints(background=True)``): the files to delete are chosen
from the kept commits before the thread starts, so a crash meanwhile only leaves files behind.

Checkpoint slots. A member writes each checkpoint into one of its CHECKPOINT_SLOTS (= KEEP_STATES
+ 1) slots, replacing what was there (a temporary renamed into place), so a round creates and
deletes no file. ``checkpoint_slots`` never hands out a slot that a kept commit (the last one
or an older one a resume can fall back to) names: the KEEP_STATES kept commits name at most
KEEP_STATES checkpoints of a member, so one slot is always free, and a crash while a slot is
written leaves every checkpoint a kept commit names as it was committed.

Writes. On a local disk every file is written under a temporary name beside it
(``<name>.tmp-<hex>``), fsynced and renamed into place with ``os.replace``: a reader sees the old
file or the new one, never part of one. On other filesystems a file is written in one piece with
``fs.open(path, "wb")``; an object store (S3, GCS, Azure) creates or replaces an object atomically
when that upload completes, so there too a reader sees the old object or the new one.

One writer. The driver holds ``lock()`` while it writes a run (config, state, lineage, pruning);
member actors only write their own checkpoints, and ``evo status`` / ``evo export`` only read.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import functools
import hashlib
import io
import json
import math
import os
import posixpath
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import IO, Any

import fsspec
import yaml
from fsspec.implementations.local import LocalFileSystem

try:   # a JSON encoder in compiled code, ≈10× json's on a round's delta (BENCHMARKS.md, driver scale)
    import orjson
except ImportError:   # pragma: no cover - an install without it writes through json alone
    orjson = None

CONFIG = "config.yaml"
STATE = "state.json"
STATES_DIR = "states"
CHECKSUM_SUFFIX = ".sha256"    # beside each checkpoint: "<name>.pt.sha256"
LINEAGE = "lineage.jsonl"
CHECKPOINTS_DIR = "checkpoints"
LOCK = "lock.json"

MAX_CHAIN_READ = 1000          # deltas a reader follows back before it calls the chain broken
KEEP_STATES = 3                # state bodies kept (and the checkpoints they name), so a reader that
                               # read state.json just before a commit still finds the body it names,
                               # and a resume can fall back to an older commit
CHECKPOINT_SLOTS = KEEP_STATES + 1   # checkpoint files per member, overwritten in turn: one more
                               # than the kept commits can name
DEFAULT_STALE_AFTER = 300.0    # seconds without a heartbeat after which a lock is abandoned
_TMP_MARK = ".tmp-"            # temporary files are "<final name>.tmp-<hex>"
LIST_EVERY_S = 600.0           # prune_checkpoints(new=...) lists the checkpoints folder whole this often
_TMP_MAX_AGE = 3600.0          # prune_checkpoints deletes temporaries older than this (a crash's)
_REMOTE_SETTLE = 0.2           # seconds between writing a lock on fsspec and reading it back

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_CLEAN_SLOT_RE = re.compile(r"checkpoints/m\d+/s\d+\.pt")
_SLOT_RE = re.compile(r"m\d+/s(\d+)\.pt(?:\.sha256)?")   # a slot file, under checkpoints/
_STATE_BODY_RE = re.compile(r"(\d+)\.json")


# Config keys an older evo wrote into config.yaml that the schema no longer has: a stored run
# that carries them still resumes (read_config drops them). population.transfer chose between
# shared-memory files and the object store; exploits now always go through the object store.
RETIRED_KEYS = (("population", "transfer"),)


class RawJSON(str):
    """A list item already encoded as JSON (a member's record, encoded once by the driver):
    ``commit_state`` writes it as it is."""


class StoreError(RuntimeError):
    """A run-store operation that cannot be done; the message is one line."""


class RunLockedError(StoreError):
    """Another live driver holds the run's lock (or took it over from this one)."""


class CorruptRunError(StoreError):
    """A file of the run cannot be read back (truncated, garbled, missing); the message names it."""


class StorageUnusableError(StoreError):
    """The storage cannot hold the run at all (a file in the way, read-only, no permission)."""


class RunStore:
    """One run's directory: config, committed state, lineage, checkpoints and the driver lock.

    Constructing a ``RunStore`` touches nothing; ``create`` makes the run, ``lock`` makes the
    run's directory if needed (so a driver can lock, then create).
    """

    def __init__(self, storage: str | os.PathLike[str], name: str) -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or set(name) == {"."}:
            raise StoreError(
                f"run name {name!r} is invalid: use letters, digits, '.', '_' and '-' "
                "(and not '.' or '..')"
            )
        storage = os.fspath(storage)
        if not storage:
            raise StoreError("storage is empty: give a directory or a filesystem URI")
        try:
            self.fs, root = fsspec.core.url_to_fs(storage)
        except (ValueError, ImportError) as e:
            raise StoreError(f"storage {storage!r} cannot be opened: {_first_line(e)}") from e
        self.name = name
        self._local = isinstance(self.fs, LocalFileSystem)
        root = root.rstrip("/") or "/"
        self._root = posixpath.join(root, name)   # a path for self.fs (no protocol)
        # storage and uri as strings that reopen the same place from any process
        self.storage: str = root if self._local else self.fs.unstrip_protocol(root)
        self.uri: str = self._root if self._local else self.fs.unstrip_protocol(self._root)
        self._held: dict[str, Any] | None = None   # the lock record this object wrote, while held
        self._lost: str | None = None               # why the lock was lost while held
        self._beat_mutex = threading.Lock()
        self._lineage_size_lines: tuple[int, int] | None = None   # local: (bytes, lines) last seen
        # the checkpoints each state body names, by (file, sha256): a body never changes, so its
        # references are read once (prune_checkpoints runs every round)
        self._body_refs: dict[tuple[str, str], frozenset[str]] = {}
        # prune_checkpoints(new=...): the checkpoint files that may exist, and when the
        # checkpoints folder was last listed whole (monotonic seconds)
        self._present: set[str] | None = None
        self._listed_at = -math.inf
        # prune_checkpoints(background=True): the thread deleting the last round's unnamed
        # checkpoints, and the first error it met (raised by the next wait_pruned)
        self._deleter: threading.Thread | None = None
        self._deleting: frozenset[str] = frozenset()   # the .pt paths it was handed
        self._delete_error: BaseException | None = None
        self.delete_cpu_s = 0.0   # CPU seconds the background deletions took (their thread's)
        # checkpoint_slots: the pointer last read and the checkpoints its kept commits name
        self._kept_refs: tuple[bytes | None, tuple[frozenset[str], ...]] = (None, ())
        self._kept_union: frozenset[str] = frozenset()   # the union of _kept_refs' sets
        self._slot_names: dict[int, tuple[str, ...]] = {}   # member -> its slots' paths

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r})"

    def __reduce__(self) -> tuple:
        # a store travels to Ray actors as its two strings; the lock stays with its holder
        return (RunStore, (self.storage, self.name))

    # ------------------------------------------------------------------ config
    def exists(self) -> bool:
        """A run exists once its config.yaml is there."""
        return self._fresh().isfile(self._path(CONFIG))

    def create(self, config: dict) -> None:
        """Make the run: write ``config`` (the resolved config) as config.yaml.

        Refuses a run that already exists. Call it while holding ``lock()``, which keeps a
        second driver from creating the same run at the same moment.
        """
        if not isinstance(config, dict):
            raise StoreError(f"config must be a dict, got {type(config).__name__}")
        if self.exists():
            raise StoreError(
                f"run {self.name!r} already exists at {self.uri}; resume it or choose another name"
            )
        try:
            text = yaml.safe_dump(config, sort_keys=False)
        except yaml.YAMLError as e:
            raise StoreError(f"config cannot be written as YAML: {_first_line(e)}") from e
        self._write_bytes(CONFIG, text.encode())

    def read_config(self) -> dict:
        data = self._read_bytes(CONFIG)
        if data is None:
            raise StoreError(f"run {self.name!r} does not exist at {self.uri} (no {CONFIG})")
        try:
            config = yaml.safe_load(data)
        except yaml.YAMLError as e:
            raise CorruptRunError(f"{self._uri(CONFIG)} is not valid YAML: {_first_line(e)}") from e
        if not isinstance(config, dict):
            raise CorruptRunError(f"{self._uri(CONFIG)} does not hold a mapping")
        for section, key in RETIRED_KEYS:   # written by an older evo; nothing reads them now
            if isinstance(config.get(section), dict):
                config[section].pop(key, None)
        return config

    # ------------------------------------------------------------------ state
    def commit_state(self, state: dict, refs: Iterable[str] | None = None,
                     delta_of: dict | None = None) -> dict:
        """Commit ``state`` (JSON: dict keys become strings) as the run's current state; returns
        the pointer's entry for it ({"commit", "round", "file", "sha256", "needs"}).

        ``state["round"]`` must be a non-negative int. Atomic: a crash at any point leaves
        either the previous commit or this one (see the module docstring). ``refs``: every
        checkpoint path the state names, when the caller knows them (the driver: its members'
        checkpoints); else the body is searched for them.

        ``delta_of``: the entry (as returned here) of the commit ``state`` is a delta of: the
        body is then written as that delta (``state["delta"]``: what changed, see
        ``apply_delta``), naming the body it applies to and its checksum; a reader rebuilds the
        whole state from the last whole body and the deltas after it.
        """
        self._check_not_lost()
        rnd = state.get("round") if isinstance(state, dict) else None
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise StoreError(f"state.round must be a non-negative int, got {rnd!r}")
        needs: list[str] = []
        if delta_of is not None:
            needs = [*delta_of.get("needs", []), delta_of["file"]]
            state = dict(state)
            state["delta"] = dict(state.get("delta") or {}, of={k: delta_of[k] for k in ("commit", "file", "round", "sha256")})
        try:
            body = _encode_state(state)
        except (TypeError, ValueError) as e:
            raise StoreError(f"state is not JSON-serialisable: {_first_line(e)}") from e

        seqs = self._state_seqs()
        seq = (seqs[-1] if seqs else 0) + 1   # above any body a crashed commit left behind
        rel = f"{STATES_DIR}/{seq:06d}.json"
        self._write_bytes(rel, body)
        sha = hashlib.sha256(body).hexdigest()
        if refs is not None:
            self._body_refs[(rel, sha)] = frozenset(map(_clean_rel, refs))
        elif delta_of is None:
            self._body_refs[(rel, sha)] = _refs_in(body)
        pointer = {
            "commit": seq, "round": rnd, "file": rel, "bytes": len(body),
            "sha256": sha, "time": _iso(time.time()),
            "previous": [p for p in self._pointer_chain() if p["commit"] > seq - KEEP_STATES],
        }
        if needs:
            pointer["needs"] = needs
        self._write_bytes(STATE, json.dumps(pointer, sort_keys=True, indent=1).encode() + b"\n")

        # housekeeping, safe because one driver writes: old bodies no kept commit needs, and
        # temporaries of commits that died (only commit_state writes these names)
        needed = {rel, *needs}
        for p in pointer["previous"]:
            needed.add(p["file"])
            needed.update(p.get("needs", []))
        for old in seqs:
            name = f"{STATES_DIR}/{old:06d}.json"
            if old <= seq - KEEP_STATES and name not in needed:
                self._remove(name)
        if self._local:
            for directory, prefix in ((STATES_DIR, ""), ("", STATE + _TMP_MARK)):
                folder = os.path.join(self._root, directory)
                for entry in os.listdir(folder):
                    if _TMP_MARK in entry and entry.startswith(prefix):
                        self._remove(posixpath.join(directory, entry) if directory else entry)
        return {"commit": seq, "round": rnd, "file": rel, "sha256": sha, "needs": needs, "bytes": len(body)}

    def read_state(self) -> dict | None:
        """The last committed state, or None when no round has been committed yet."""
        for _ in range(3):
            raw = self._read_bytes(STATE)
            if raw is None:
                return None
            pointer = self._parse_pointer(raw)
            try:
                return self._read_body(pointer)
            except CorruptRunError:
                if self._read_bytes(STATE) != raw:
                    continue   # a commit in between pruned a body it names: follow the new pointer
                raise
        raise CorruptRunError(f"{self._uri(STATE)} kept changing while being read")

    def committed_states(self) -> Iterator[tuple[str, dict | CorruptRunError]]:
        """(body file, state) of the last commit, then of each older body still kept, newest
        first; a body that is missing or does not match its checksum comes as (file, the error).
        Nothing when no round has been committed; CorruptRunError when state.json is unreadable."""
        raw = self._read_bytes(STATE)
        if raw is None:
            return
        pointer = self._parse_pointer(raw)
        for entry in [pointer, *pointer.get("previous", [])]:
            try:
                yield entry["file"], self._read_body(entry)
            except CorruptRunError as e:
                yield entry["file"], e

    def _pointer_chain(self) -> list[dict]:
        """{"commit", "file", "sha256", "round"} of the current body and the older ones the
        pointer names, newest first; [] when there is no readable pointer."""
        raw = self._read_bytes(STATE)
        try:
            pointer = self._parse_pointer(raw) if raw is not None else None
        except CorruptRunError:
            return []
        if pointer is None or not isinstance(pointer.get("commit"), int):
            return []
        keys = ("commit", "file", "sha256", "round", "needs")
        return [{k: pointer[k] for k in keys if k in pointer}, *pointer.get("previous", [])]

    def _read_body(self, entry: dict, named_by: str = STATE) -> dict:
        """The state an entry of the pointer names, checked against its checksum; a delta is
        applied to the state it names (read and checked the same way), back to a whole body."""
        chain: list[dict] = []
        while True:
            state = self._read_one(entry, named_by)
            if not isinstance(state.get("delta"), dict):
                break
            chain.append(state)
            of = state["delta"].get("of")
            if not (isinstance(of, dict) and isinstance(of.get("file"), str) and isinstance(of.get("sha256"), str)
                    and isinstance(of.get("round"), int)) or len(chain) > MAX_CHAIN_READ:
                raise CorruptRunError(f"{self._uri(entry['file'])} is a delta that names no valid earlier state")
            try:
                of = dict(of, file=_clean_rel(of["file"]))
            except StoreError:
                raise CorruptRunError(f"{self._uri(entry['file'])} names {of['file']!r}, outside the run") from None
            named_by, entry = entry["file"], of
        for delta in reversed(chain):
            state = apply_delta(state, delta)
        return state

    def _read_one(self, entry: dict, named_by: str) -> dict:
        """One body file of the pointer (or of a delta), checked against its checksum."""
        where = self._uri(entry["file"])
        body = self._read_bytes(entry["file"])
        if body is None:
            raise CorruptRunError(f"{self._uri(named_by)} names {entry['file']}, which is missing")
        if hashlib.sha256(body).hexdigest() != entry["sha256"]:
            raise CorruptRunError(f"{where} does not match the checksum in {named_by} (truncated or edited)")
        try:
            state = json.loads(body)
        except ValueError as e:
            raise CorruptRunError(f"{where} is not valid JSON: {e}") from e
        if not isinstance(state, dict) or state.get("round") != entry["round"]:
            raise CorruptRunError(f"{where} does not hold round {entry['round']} named by {named_by}")
        return state

    def _parse_pointer(self, raw: bytes) -> dict:
        where = self._uri(STATE)
        try:
            pointer = json.loads(raw)
        except ValueError as e:
            raise CorruptRunError(f"{where} is not valid JSON: {e}") from e
        if not (
            isinstance(pointer, dict) and isinstance(pointer.get("file"), str)
            and isinstance(pointer.get("sha256"), str) and isinstance(pointer.get("round"), int)
        ):
            raise CorruptRunError(f"{where} lacks 'file', 'sha256' or 'round'")
        try:
            pointer["file"] = _clean_rel(pointer["file"])
        except StoreError:
            raise CorruptRunError(f"{where} names {pointer['file']!r}, outside the run") from None
        previous = pointer.get("previous", [])
        if not isinstance(previous, list):
            previous = []
        pointer["previous"] = []
        for p in previous:   # older bodies: a malformed entry only loses that fallback
            if (isinstance(p, dict) and isinstance(p.get("commit"), int) and isinstance(p.get("file"), str)
                    and isinstance(p.get("sha256"), str) and isinstance(p.get("round"), int)):
                with contextlib.suppress(StoreError):
                    pointer["previous"].append(dict(p, file=_clean_rel(p["file"])))
        return pointer

    def _state_seqs(self) -> list[int]:
        """Commit numbers of the state bodies present, ascending."""
        try:
            paths = self._fresh().ls(self._path(STATES_DIR), detail=False)
        except FileNotFoundError:
            return []
        found = (_STATE_BODY_RE.fullmatch(posixpath.basename(p)) for p in paths)
        return sorted(int(m.group(1)) for m in found if m)

    # ------------------------------------------------------------------ lineage
    def append_lineage(self, records: list[dict]) -> int:
        """Append one JSON line per record; returns the number of lines now in the file.

        A line torn by a crash (no final newline) is dropped first.
        """
        self._check_not_lost()
        payload = b"".join(self._lineage_line(i, r) for i, r in enumerate(records))
        if not self._local:
            data = self._read_bytes(LINEAGE) or b""
            data = data[: data.rfind(b"\n") + 1] + payload   # no append on object stores
            self._write_bytes(LINEAGE, data)
            return data.count(b"\n")
        path = self._path(LINEAGE)
        os.makedirs(self._root, exist_ok=True)
        with open(path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            known = self._lineage_size_lines
            if known is None or known[0] != size:   # count once, then trust the file size
                f.seek(0)
                data = f.read()
                complete = data.rfind(b"\n") + 1
                if complete != size:
                    f.truncate(complete)
                known = (complete, data.count(b"\n"))
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
            lines = known[1] + len(records)
            self._lineage_size_lines = (f.tell(), lines)
        return lines

    def read_lineage(self) -> list[dict]:
        """All complete records, in order (a torn last line is ignored)."""
        data = self._read_bytes(LINEAGE) or b""
        records = []
        for i, line in enumerate(data.split(b"\n")[:-1], start=1):
            try:
                record = json.loads(line)
            except ValueError as e:
                raise CorruptRunError(f"{self._uri(LINEAGE)}: line {i} is not valid JSON ({e})") from e
            if not isinstance(record, dict):
                raise CorruptRunError(f"{self._uri(LINEAGE)}: line {i} is not a JSON object")
            records.append(record)
        return records

    def truncate_lineage(self, n_lines: int) -> None:
        """Keep the first ``n_lines`` records (resume: drop what came after the last commit)."""
        self._check_not_lost()
        if isinstance(n_lines, bool) or not isinstance(n_lines, int) or n_lines < 0:
            raise StoreError(f"n_lines must be a non-negative int, got {n_lines!r}")
        data = self._read_bytes(LINEAGE) or b""
        lines = data.split(b"\n")[:-1]
        if n_lines > len(lines):
            raise CorruptRunError(
                f"cannot truncate {self._uri(LINEAGE)} to {n_lines} records: it has {len(lines)}"
            )
        kept = b"".join(line + b"\n" for line in lines[:n_lines])
        if kept != data:
            self._write_bytes(LINEAGE, kept)
        self._lineage_size_lines = None

    def _lineage_line(self, i: int, record: dict) -> bytes:
        if not isinstance(record, dict):
            raise StoreError(f"lineage record {i} must be a dict, got {type(record).__name__}")
        try:
            return dumps(record) + b"\n"   # json.dumps(record, sort_keys=True), as json.loads reads it
        except (TypeError, ValueError) as e:
            raise StoreError(f"lineage record {i} is not JSON-serialisable: {_first_line(e)}") from e

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, member: int, round: int) -> str:
        """The relative path of member ``member``'s checkpoint at ``round``."""
        for field, value in (("member", member), ("round", round)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise StoreError(f"checkpoint {field} must be a non-negative int, got {value!r}")
        return f"{CHECKPOINTS_DIR}/m{member}/r{round}.pt"

    def checkpoint_slots(self, keys: dict[int, int]) -> dict[int, str]:
        """The relative path each member of ``keys`` ({member: n}, n the round, or in async
        mode the member's intervals) writes its next checkpoint to: its slot
        ``n % CHECKPOINT_SLOTS`` (``checkpoints/m<member>/s<slot>.pt``), or, when a kept commit
        names that one (a member set back to an older commit, a resume that fell back), the
        next slot none names. The slot is overwritten in place: nothing to delete afterwards."""
        kept = self._kept_union if self._kept_checkpoints() else frozenset()   # what any kept commit names
        slots, names = CHECKPOINT_SLOTS, self._slot_names
        out = {}
        for m, n in keys.items():
            if type(m) is not int or type(n) is not int or m < 0 or n < 0:   # (exact ints: the usual case)
                if isinstance(m, bool) or not isinstance(m, int) or m < 0 or isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise StoreError(f"checkpoint member and round must be non-negative ints, got {m!r}, {n!r}")
            paths = names.get(m)
            if paths is None:   # the member's slot paths, made once (thousands of members a round)
                paths = names[m] = tuple(f"{CHECKPOINTS_DIR}/m{m}/s{i}.pt" for i in range(slots))
            for i in range(slots):
                path = paths[(n + i) % slots]
                if path not in kept:
                    break
            else:   # cannot happen: the kept commits name at most KEEP_STATES of a member's slots
                raise StoreError(f"every checkpoint slot of member {m} is named by a kept commit")
            out[m] = path
        return out

    def _kept_checkpoints(self) -> tuple[frozenset[str], ...]:
        """The checkpoints each kept commit names (read again only when the pointer changed)."""
        raw = self._read_bytes(STATE)
        if raw is None:
            return ()
        if raw != self._kept_refs[0]:
            pointer = self._parse_pointer(raw)   # CorruptRunError for an unreadable pointer
            self._kept_refs = (raw, tuple(self._refs_of(e) for e in [pointer, *pointer["previous"]]))
            self._kept_union = frozenset().union(*self._kept_refs[1])
        return self._kept_refs[1]

    def save_checkpoint(self, rel_path: str, state: dict) -> int:
        """torch.save ``state`` to ``rel_path`` atomically, then its SHA-256 beside it
        (``<rel_path>.sha256``); returns the bytes written. A write that fails (disk full,
        read-only) is a StoreError naming the file and the reason.

        Safe from a background thread (each call writes its own temporary file). Store tensors
        and plain Python only: ``load_checkpoint`` uses ``torch.load(weights_only=True)``.
        """
        return self.write_checkpoint(rel_path, state)[0]

    def write_checkpoint(self, rel_path: str, state: dict) -> tuple[int, str]:
        """``save_checkpoint``, returning (bytes written, the SHA-256 written beside it): a
        member hands the checksum to the driver, which need not read the ``.sha256`` back."""
        import torch

        rel = _clean_rel(rel_path)
        digest = hashlib.sha256()

        def save(f: IO[bytes]) -> None:
            torch.save(state, _Hashing(f, digest))

        try:
            size = self._write(rel, save)
            self._write_bytes(rel + CHECKSUM_SUFFIX, digest.hexdigest().encode() + b"\n")
        except Exception as e:
            # torch reports a failed write (ENOSPC) as a RuntimeError raised while handling it
            cause = next((c for c in _chain(e) if isinstance(c, OSError)), None)
            if cause is None:
                raise
            raise StoreError(f"cannot write checkpoint {self._uri(rel)}: {_os_error(cause)}") from e
        return size, digest.hexdigest()

    def checkpoint_sha256(self, rel_path: str) -> str | None:
        """The SHA-256 written beside a checkpoint by ``save_checkpoint``; None without one."""
        data = self._read_bytes(_clean_rel(rel_path) + CHECKSUM_SUFFIX)
        text = data.decode(errors="replace").strip() if data is not None else ""
        return text if re.fullmatch(r"[0-9a-f]{64}", text) else None

    def check_checkpoint(self, rel_path: str, sha256: str | None) -> str | None:
        """Why the checkpoint at ``rel_path`` cannot be the one committed with ``sha256`` (a
        line naming it), or None when it is intact. Without a checksum (a run of an older evo)
        only its presence is checked."""
        rel = _clean_rel(rel_path)
        where = self._uri(rel)
        if sha256 is None:
            return None if self._fresh().isfile(self._path(rel)) else f"checkpoint {where} is missing"
        digest = hashlib.sha256()
        try:
            with self.fs.open(self._path(rel), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError:
            return f"checkpoint {where} is missing"
        except OSError as e:
            return f"checkpoint {where} cannot be read: {_os_error(e)}"
        if digest.hexdigest() != sha256:
            return (f"checkpoint {where} does not match its checksum in the committed state "
                    "(truncated, corrupt, or another checkpoint copied over it)")
        return None

    def check_against_record(self, rel_path: str, member: dict) -> str | None:
        """Why the (intact) checkpoint at ``rel_path`` cannot be the state of ``member`` (a
        committed member dict: its step and genome, whose model.* genes fix the shapes), a line
        naming it; None when it matches. Catches a valid checkpoint of another member or
        architecture copied over it with its checksum updated."""
        where = self._uri(_clean_rel(rel_path))
        try:
            state = self.load_checkpoint(rel_path)
        except CorruptRunError as e:
            return str(e)
        configs = {"train": state.get("train_config") or {}, "model": state.get("model_config") or {}}
        found = [("step", state.get("step"), member.get("step"))]
        for gene, value in sorted((member.get("genome") or {}).items()):
            section, _, field = gene.partition(".")
            if field in configs.get(section, {}):
                found.append((gene, configs[section][field], value))
        for what, theirs, ours in found:
            if theirs != ours:
                return (f"checkpoint {where} does not match member {member.get('id')}'s record "
                        f"({what}: {theirs!r} in the checkpoint, {ours!r} in the record)")
        return None

    def load_checkpoint(self, rel_path: str) -> dict:
        """The state saved at ``rel_path``, tensors on CPU."""
        import torch

        rel = _clean_rel(rel_path)
        where = self._uri(rel)
        try:
            source = self._path(rel) if self._local else io.BytesIO(self.fs.cat_file(self._path(rel)))
            state = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise CorruptRunError(f"checkpoint {where} is missing") from e
        except Exception as e:   # torch reports a bad file with many exception types
            # torch names a refused global two ways: "Unsupported global: GLOBAL x.Y" (a class
            # not allowed) and "unsupported GLOBAL posix.system whose module posix is blocked"
            refused = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(e))
            if refused:
                raise StoreError(
                    f"checkpoint {where} holds {refused.group(1)}, which torch.load(weights_only=True) "
                    "refuses: save tensors and plain Python only"
                ) from e
            raise CorruptRunError(
                f"checkpoint {where} cannot be read: truncated or corrupt ({_describe(e)})"
            ) from e
        if not isinstance(state, dict):
            raise CorruptRunError(f"checkpoint {where} holds a {type(state).__name__}, not a dict")
        return state

    def prune_checkpoints(self, keep: set[str], new: set[str] | None = None,
                          background: bool = False) -> list[str]:
        """Delete checkpoint files (``*.pt`` under checkpoints/) not in ``keep``; returns them.

        A checkpoint named anywhere in a committed state still kept (the last commit and the
        older bodies ``committed_states`` yields) is kept too, whatever ``keep`` says: a resume
        can fall back to the commit before a lost checkpoint. A checkpoint's ``.sha256`` goes
        with it. Temporaries of saves that died more than an hour ago are deleted as well; those
        of saves in progress are left alone.

        ``new``: the checkpoint paths named since the last call (the driver, the only one that
        names checkpoints, passes them every round). Then the files this store knows of are
        the candidates, and the folder is listed whole only on the first call and every
        LIST_EVERY_S seconds (temporaries, files of a crashed session): a round costs what it
        deletes, not the size of the store. Without ``new``, the folder is listed every time.

        Slot files (``checkpoints/m<id>/s<k>.pt`` with k < CHECKPOINT_SLOTS, and their
        checksums) are never deleted: ``checkpoint_slots`` overwrites them in turn. What goes is
        the rest: an older evo's ``r<round>.pt`` files once no kept commit names them, files a
        caller wrote under other names, temporaries of crashed saves.

        ``background`` (with ``new``, between listings): which files go is decided here, from
        the committed states, and a thread deletes them (their ``.pt`` paths are returned); the
        round goes on meanwhile. Only files no kept commit names are handed to it, so a crash
        while it deletes loses nothing a resume needs (a file it left is deleted by the next
        listing). ``wait_pruned`` joins it: call it before a path it deletes may be named again
        (the driver does before naming checkpoints), and ``lock()`` does before it releases the run;
        the next prune joins it first.
        """
        self._check_not_lost()
        self.wait_pruned()
        listing = new is None or self._present is None or time.monotonic() - self._listed_at >= LIST_EVERY_S
        if not listing:
            new = {k for k in map(_clean_rel, new) if not _is_slot(k)}
            if not new and not self._present:
                return []   # nothing but slots named since the last listing: nothing to delete
        kept = {_clean_rel(k) for k in keep}.union(*self._kept_checkpoints())
        if not listing:
            self._present |= new
            gone = sorted(self._present - kept)
            self._present -= set(gone)
            if background and gone:
                self._deleting = frozenset(gone)
                self._deleter = threading.Thread(target=self._delete_quietly, args=(gone,),
                                                 name=f"evo-store-prune-{self.name}", daemon=True)
                self._deleter.start()
                return gone
            return self._delete(gone)
        try:
            paths = self._fresh().find(self._path(CHECKPOINTS_DIR))
        except FileNotFoundError:
            paths = []
        deleted = []
        present = set()
        for path in sorted(paths):
            rel = posixpath.relpath(path, self._root)
            name = posixpath.basename(rel)
            if _TMP_MARK in name:
                if not (self._local and _older_than(path, _TMP_MAX_AGE)):
                    continue
            elif _is_slot(rel):
                continue   # overwritten in turn, never deleted
            elif name.endswith(".pt" + CHECKSUM_SUFFIX):
                if rel[: -len(CHECKSUM_SUFFIX)] in kept:
                    continue
            elif not name.endswith(".pt") or rel in kept:
                if name.endswith(".pt"):
                    present.add(rel)
                continue
            self._remove(rel)
            deleted.append(rel)
        self._present, self._listed_at = present, time.monotonic()
        return deleted

    def wait_pruned(self, paths: Iterable[str] | None = None) -> None:
        """Wait until the deletions ``prune_checkpoints(background=True)`` started are done --
        with ``paths``, only if one of them is being deleted; a deletion that failed is a
        StoreError here (one line)."""
        if paths is not None and self._deleter is not None and self._deleting.isdisjoint(paths):
            return
        deleter, self._deleter, self._deleting = self._deleter, None, frozenset()
        if deleter is not None:
            deleter.join()
        error, self._delete_error = self._delete_error, None
        if error is not None:
            why = _os_error(error) if isinstance(error, OSError) else _describe(error)
            raise StoreError(f"cannot delete an old checkpoint of run {self.name!r}: {why}")

    def _delete(self, gone: list[str]) -> list[str]:
        """Delete each checkpoint of ``gone`` and its checksum; returns the files that were there."""
        deleted = []
        for rel in gone:
            for path in (rel, rel + CHECKSUM_SUFFIX):
                if self._remove_existing(path):
                    deleted.append(path)
        return deleted

    def _delete_quietly(self, gone: list[str]) -> None:
        start = time.thread_time()
        try:
            self._delete(gone)
        except BaseException as e:   # handed to the driver by wait_pruned
            self._delete_error = e
        finally:
            self.delete_cpu_s += time.thread_time() - start

    def _refs_of(self, entry: dict) -> frozenset[str]:
        """The checkpoints the state of a pointer entry names (read once per body; a body that
        cannot be read names none; a delta's, from the whole state it stands for)."""
        key = (entry["file"], entry["sha256"])
        if key not in self._body_refs:
            try:
                body = self._read_bytes(entry["file"])
            except OSError:
                body = None
            if body is None or hashlib.sha256(body).hexdigest() != entry["sha256"]:
                return frozenset()   # not cached: it may still appear
            if _DELTA_MARK in body:
                try:
                    whole = self._read_body(entry)
                except (CorruptRunError, OSError):
                    return frozenset()
                self._body_refs[key] = _refs_in(_ENCODE(whole).encode())
            else:
                self._body_refs[key] = _refs_in(body)
        return self._body_refs[key]

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self, stale_after: float = DEFAULT_STALE_AFTER) -> Iterator[RunStore]:
        """Hold the run's lock for the ``with`` block: two drivers never write one run.

        Raises RunLockedError while another live driver holds it. A stale lock (its process on
        this host is gone, or its heartbeat is older than ``stale_after`` seconds) is taken over
        with a RuntimeWarning. While held, a background thread refreshes the heartbeat every
        ``stale_after / 5`` s, so a long round does not make the lock look abandoned.
        """
        if not stale_after > 0:
            raise StoreError(f"stale_after must be positive, got {stale_after!r}")
        if self._held is not None:
            raise StoreError(f"run {self.name!r}: this RunStore already holds the lock")
        made = _missing_dirs(self._root) if self._local else []   # the lock makes them
        try:
            self._acquire(stale_after)
        except OSError as e:
            # the lock is the first thing a driver writes: a storage that cannot be written
            # is named here, in one line, before anything else starts
            raise StorageUnusableError(
                f"storage {self.storage!r} cannot hold run {self.name!r}: "
                f"{_os_reason(e)}"
            ) from e
        stop = threading.Event()
        beat = threading.Thread(
            target=self._beat_until, args=(stop, stale_after / 5),
            name=f"evo-store-heartbeat-{self.name}", daemon=True,
        )
        beat.start()
        try:
            yield self
        finally:
            stop.set()
            beat.join()
            with contextlib.suppress(StoreError):   # no deletion of this driver's outlives its lock
                self.wait_pruned()
            self._release()
            # a driver refused after locking (the population does not fit) leaves no trace
            for path in made:
                try:
                    os.rmdir(path)
                except OSError:
                    break   # not empty: the run was written

    def driver_alive(self, stale_after: float = DEFAULT_STALE_AFTER) -> bool:
        """Whether a live driver holds the run: a lock that ``lock()`` would refuse to take over."""
        holder = self._read_lock()
        return holder is not None and _stale_reason(holder, stale_after) is None

    def heartbeat(self) -> None:
        """Refresh the held lock's heartbeat; RunLockedError if another driver took it over."""
        with self._beat_mutex:
            if self._held is None:
                raise StoreError(f"run {self.name!r}: heartbeat() needs lock() to be held")
            self._check_not_lost()
            holder = self._read_lock()
            if not holder or holder.get("token") != self._held["token"]:
                by = f" by pid {holder.get('pid')} on host {holder.get('host')}" if holder else ""
                self._lost = f"run {self.name!r}: this driver's lock was taken over{by}"
                raise RunLockedError(self._lost)
            self._held["heartbeat"] = time.time()
            self._write_bytes(LOCK, _dump(self._held))

    def _acquire(self, stale_after: float) -> None:
        now = time.time()
        record = {
            "pid": os.getpid(), "host": socket.gethostname(), "pid_start": _pid_start(os.getpid()),
            "started": _iso(now), "heartbeat": now, "token": uuid.uuid4().hex,
        }
        for _ in range(10):
            if self._create_lock(record):
                self._held, self._lost = record, None
                return
            holder = self._read_lock()
            if holder is None:
                continue   # released between our attempt and the read: try again
            reason = _stale_reason(holder, stale_after)
            if reason is None:
                raise RunLockedError(self._locked_message(holder, stale_after))
            if self._remove_stale_lock(holder):
                warnings.warn(
                    f"run {self.name!r}: taking over the stale lock of pid {holder.get('pid')} "
                    f"on host {holder.get('host')} ({reason})",
                    RuntimeWarning, stacklevel=4,
                )
        raise RunLockedError(
            f"run {self.name!r}: could not take {self._uri(LOCK)}, other drivers keep taking it"
        )

    def _create_lock(self, record: dict) -> bool:
        """Create the lock file holding ``record`` unless one exists; True when it is ours."""
        path = self._path(LOCK)
        if self._local:
            os.makedirs(self._root, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(_dump(record))
                f.flush()
                os.fsync(f.fileno())
            return True
        # fsspec has no exclusive create: write, let a concurrent writer land, read back
        if self._fresh().exists(path):
            return False
        self._write_bytes(LOCK, _dump(record))
        time.sleep(_REMOTE_SETTLE)
        return (self._read_lock() or {}).get("token") == record["token"]

    def _remove_stale_lock(self, holder: dict) -> bool:
        """Remove the lock file judged stale, unless it changed since; True when removed."""
        if not self._local:
            self._remove(LOCK)
            return True
        path = self._path(LOCK)
        aside = f"{path}.stale-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, aside)   # of several contenders, one moves a given file
        except FileNotFoundError:
            return False
        try:
            moved = _parse_lock(_read_local(aside))
            if moved.get("token") != holder.get("token"):
                # a live driver locked in between our read and the rename: put its lock back
                with contextlib.suppress(OSError):
                    os.link(aside, path)
                return False
            return True
        finally:
            os.unlink(aside)

    def _release(self) -> None:
        with self._beat_mutex:
            held, self._held = self._held, None
            holder = self._read_lock()
            if holder and held and holder.get("token") == held["token"]:
                self._remove(LOCK)
            else:
                what = "was taken over by another driver; leaving it" if holder else "file disappeared"
                warnings.warn(f"run {self.name!r}: the lock {what}", RuntimeWarning, stacklevel=3)

    def _beat_until(self, stop: threading.Event, every: float) -> None:
        while not stop.wait(every):
            try:
                self.heartbeat()
            except RunLockedError:
                return   # recorded in self._lost: the driver's next write raises
            except OSError:
                continue   # storage hiccup: try again next period

    def _read_lock(self) -> dict | None:
        """The lock record; None when there is no lock file, {} when it cannot be parsed."""
        for attempt in range(2):
            data = self._read_bytes(LOCK)
            if data is None:
                return None
            record = _parse_lock(data)
            if record or attempt:
                return record
            time.sleep(0.05)   # a lock being created is empty for an instant
        return {}

    def _locked_message(self, holder: dict, stale_after: float) -> str:
        beat = holder.get("heartbeat")
        age = f"{time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else "unknown"
        return (
            f"run {self.name!r} is locked by pid {holder.get('pid')} on host {holder.get('host')} "
            f"since {holder.get('started')} (last heartbeat {age}); stop that driver, or wait "
            f"until its heartbeat is {stale_after:.0f} s old"
        )

    def _check_not_lost(self) -> None:
        if self._lost is not None:
            raise RunLockedError(self._lost)

    # ------------------------------------------------------------------ other files
    def write_text(self, rel_path: str, text: str) -> None:
        """Write a text file in the run, atomically (reports, notes …)."""
        self._check_not_lost()
        self._write_bytes(_clean_rel(rel_path), text.encode())

    def read_text(self, rel_path: str) -> str:
        rel = _clean_rel(rel_path)
        data = self._read_bytes(rel)
        if data is None:
            raise StoreError(f"no file {self._uri(rel)}")
        return data.decode()

    def exists_path(self, rel_path: str) -> bool:
        return self._fresh().exists(self._path(_clean_rel(rel_path)))

    def local_path(self, rel_path: str) -> str | None:
        """A local filesystem path for ``rel_path`` when the storage is local, else None.

        For tools that need a real file (an optuna sqlite database, a report); creates nothing.
        """
        return self._path(_clean_rel(rel_path)) if self._local else None

    # ------------------------------------------------------------------ I/O primitives
    def _path(self, rel: str) -> str:
        return posixpath.join(self._root, _clean_rel(rel))

    def _uri(self, rel: str) -> str:
        """Where a file is, for messages."""
        return posixpath.join(self.uri, rel)

    def _fresh(self) -> fsspec.AbstractFileSystem:
        """The filesystem with its cached listings dropped: other processes write here too."""
        self.fs.invalidate_cache()
        return self.fs

    def _write(self, rel: str, write: Callable[[IO[bytes]], object]) -> int:
        """Write a file so that readers see the old or the new one whole; returns its size."""
        path = self._path(rel)
        if not self._local:
            with self.fs.open(path, "wb") as f:   # one upload: an object appears whole
                write(f)
                return f.tell()
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}{_TMP_MARK}{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)
        return size

    def _write_bytes(self, rel: str, data: bytes) -> int:
        return self._write(rel, lambda f: f.write(data))

    def _read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            if self._local:   # without fsspec's layers: the driver reads a checksum per member per round
                with open(self._path(rel), "rb") as f:
                    return f.read()
            return self.fs.cat_file(self._path(rel))
        except FileNotFoundError:
            return None

    def _remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(rel))

    def _remove_existing(self, rel: str) -> bool:
        """Remove the file if it is there; whether it was."""
        try:
            if self._local:
                os.unlink(self._path(rel))
            else:
                self.fs.rm_file(self._path(rel))
        except FileNotFoundError:
            return False
        return True


def list_runs(storage: str | os.PathLike[str]) -> list[str]:
    """Names of the runs under ``storage`` (directories holding a config.yaml), sorted."""
    try:
        fs, root = fsspec.core.url_to_fs(os.fspath(storage))
    except (ValueError, ImportError) as e:
        raise StoreError(f"storage {os.fspath(storage)!r} cannot be opened: {_first_line(e)}") from e
    fs.invalidate_cache()   # listings cached by s3fs & co. miss other processes' runs
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    names = (posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")
    return sorted(
        n for n in names
        if _NAME_RE.fullmatch(n) and set(n) != {"."} and fs.isfile(posixpath.join(root, n, CONFIG))
    )


# ---------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=1 << 16)   # the driver cleans every member's checkpoint path per commit
def _clean_rel(rel: str) -> str:
    """``rel`` normalised; StoreError unless it is a relative path inside the run."""
    if type(rel) is str and _CLEAN_SLOT_RE.fullmatch(rel):   # a slot's path, normalised already
        return rel   # (a commit names 4,096 of them: normpath's cost is most of the check)
    norm = posixpath.normpath(rel) if isinstance(rel, str) and rel else ""
    if not norm or norm in (".", "..") or norm.startswith(("/", "../")) or "\\" in norm:
        raise StoreError(f"path {rel!r} must be a relative path inside the run directory")
    return norm


def _is_slot(rel: str) -> bool:
    """Whether ``rel`` (clean) is a checkpoint slot or its checksum (``checkpoint_slots``)."""
    if not rel.startswith(CHECKPOINTS_DIR + "/"):
        return False
    m = _SLOT_RE.fullmatch(rel, len(CHECKPOINTS_DIR) + 1)
    return m is not None and int(m.group(1)) < CHECKPOINT_SLOTS


_REF_RE = re.compile(rb'"(' + re.escape(CHECKPOINTS_DIR.encode()) + rb'/[^"\\]*)"')


def _refs_in(body: bytes) -> frozenset[str]:
    """Every JSON string in a state body that names a file under checkpoints/ (found in the
    text by a regular expression: no parse, no walk over thousands of members)."""
    out = set()
    for m in _REF_RE.finditer(body):
        with contextlib.suppress(StoreError, UnicodeDecodeError):
            out.add(_clean_rel(m.group(1).decode()))
    return frozenset(out)


_ENCODE = json.JSONEncoder(sort_keys=True).encode
_DELTA_MARK = b'"delta"'   # in every delta body (and, by chance, in few others: those are read whole)


def apply_delta(state: dict, delta: dict) -> dict:
    """The whole state a delta body stands for, given the whole ``state`` it names (its members
    changed in place). A delta holds every top-level key but ``members`` (and
    ``exploit_latencies``, given as what was appended: ``delta.exploit_latencies_add``), and in
    ``delta``: ``members`` — {field: [ids, values]} of the member fields that changed (ids null:
    every member, in order) —, ``history_add`` — [ids, lists of evaluations appended] — and
    ``history`` — [ids, whole histories] of the members whose history was replaced, and
    ``objectives_cols`` — [ids, keys, a column of values per key] of the members whose
    objectives (dicts of those keys) changed. A delta
    without a top-level ``strategy`` gives it in ``delta.strategy``: ``whole`` (its keys but
    the ones below, as they are) and ``items`` ({key: {"set": entries, "del": keys}}: dicts of
    the state before, entries set or deleted)."""
    d = delta["delta"]
    members = state.get("members") or []
    latencies = state.get("exploit_latencies", [])
    strategy = state.get("strategy")
    state = {k: v for k, v in delta.items() if k != "delta"}
    if "exploit_latencies_add" in d:
        state["exploit_latencies"] = [*latencies, *d["exploit_latencies_add"]]
    if "strategy" in d and "strategy" not in state:
        try:
            new = dict(d["strategy"].get("whole") or {})
            for key, change in (d["strategy"].get("items") or {}).items():
                entries = dict((strategy or {}).get(key) or {})
                for k in change.get("del") or []:
                    entries.pop(k, None)
                entries.update(change.get("set") or {})
                new[key] = entries
        except (TypeError, ValueError, AttributeError) as e:
            raise CorruptRunError(f"a delta cannot be applied: {e}") from None
        state["strategy"] = new
    state["members"] = members
    pos = {m.get("id"): i for i, m in enumerate(members)}

    def rows(spec: list) -> Iterator[tuple[dict, Any]]:
        ids, values = spec
        if ids is None:
            if len(values) != len(members):
                raise CorruptRunError(f"a delta gives {len(values)} values for {len(members)} members")
            return zip(members, values)
        try:
            return zip([members[pos[i]] for i in ids], values)
        except KeyError as e:
            raise CorruptRunError(f"a delta names member {e.args[0]!r}, which the state does not have") from None

    try:
        for field_, spec in (d.get("members") or {}).items():
            for m, v in rows(spec):
                m[field_] = v
        if "objectives_cols" in d:   # [ids, keys, one column of values per key]
            ids, keys, columns = d["objectives_cols"]
            for m, v in rows([ids, [dict(zip(keys, row)) for row in zip(*columns)]]):
                m["objectives"] = v
        if "history" in d:
            for m, v in rows(d["history"]):
                m["history"] = v
        if "history_add" in d:
            for m, v in rows(d["history_add"]):
                m["history"] = [*m.get("history", []), *v]
    except (TypeError, ValueError, AttributeError) as e:
        raise CorruptRunError(f"a delta cannot be applied: {e}") from None
    return state


def dumps(value: Any) -> bytes:
    """``json.dumps(value, sort_keys=True).encode()`` as a reader sees it (``json.loads`` of
    either gives the same value), written by orjson where it can (≈10× faster on a round's
    delta): compact (no space after ``,`` and ``:``), floats in orjson's shortest form
    (``1e-05`` as ``0.00001``), which parse back to the same numbers, and a non-ASCII
    character as UTF-8 rather than a ``\\u`` escape (every reader parses the bytes with
    ``json.loads``, which takes both). orjson writes NaN and ±Infinity as ``null`` where json
    writes ``NaN`` / ``Infinity``: a text of orjson's that holds ``null`` is made again part by
    part (``_with_nulls``), so that only a None is ever written as null. Through json alone
    when orjson refuses the value (non-str dict keys, an int beyond 64 bits, a numpy scalar)
    or is not installed."""
    if orjson is not None:
        try:
            out = orjson.dumps(value, option=_ORJSON_OPTIONS)
        except TypeError:   # orjson.JSONEncodeError is one
            return _ENCODE(value).encode()
        # a null of orjson's is a None, unless the value holds a NaN or ±Infinity somewhere
        return out if b"null" not in out or _finite_free(value) else _with_nulls(value)
    return _ENCODE(value).encode()


def _finite_free(value: Any) -> bool:
    """True when ``value`` holds no NaN and no ±Infinity anywhere (so orjson's text of it is
    json's, compacted); False when it may. One walk, columns summed in C: a round's delta
    (columns of 4,096 values) costs a few sums, not its encoding again at every level of
    ``_with_nulls``."""
    t = type(value)
    if t is float:
        return _FINITE_MIN <= value <= _FINITE_MAX
    if value is None or t is int or t is str or t is bool:
        return True
    if t is dict or t is list or t is tuple:
        flat = [value]
        for _ in range(8):   # lists of lists (histories: [[step, bpb], ...]) and of dicts flattened in C
            if not flat:
                return True
            kinds = set(map(type, flat))
            if kinds <= _SEQUENCES:
                flat = list(chain.from_iterable(flat))
            elif kinds == _DICT:
                flat = list(chain.from_iterable(map(dict.values, flat)))
            elif kinds <= _NUMBERS:   # their sum is NaN or infinite if one of them is (or it overflowed: "may")
                return math.isfinite(sum(flat))
            elif kinds <= _SCALARS:
                return float not in kinds or all(map(_finite_or_none, flat))
            elif kinds <= _KNOWN and len(flat) > 64:   # many: scalars checked here, the containers' items next
                if float in kinds and not math.isfinite(sum([x for x in flat if type(x) is float])):
                    return False
                seqs = [x for x in flat if type(x) is list or type(x) is tuple]
                dicts = [x for x in flat if type(x) is dict]
                flat = [*chain.from_iterable(seqs), *chain.from_iterable(map(dict.values, dicts))]
            else:   # a few of different kinds (a delta's parts), or a type of another kind: one by one
                break
        return all(map(_finite_free, flat))
    return False   # anything else: the part-by-part path decides


_SEQUENCES = frozenset({list, tuple})
_DICT = {dict}
_NUMBERS = frozenset({int, float, bool})
_SCALARS = frozenset({int, float, bool, str, type(None)})
_KNOWN = _SCALARS | _SEQUENCES | _DICT


def _with_nulls(value: Any) -> bytes:
    """``dumps(value)`` of a value whose orjson text holds ``null``: a None is ``null``, a
    float (NaN, ±Infinity) json's text, a dict or list each item through ``dumps`` (so only
    the parts that hold a null are split further: a delta's ``[None, [4,096 values]]`` costs
    two calls), anything else json's text."""
    t = type(value)
    if value is None:
        return b"null"
    if t is dict and all(type(k) is str for k in value):
        return b"{" + b",".join(orjson.dumps(k) + b":" + dumps(value[k]) for k in sorted(value)) + b"}"
    if t is list or t is tuple:
        if all(map(_finite_or_none, value)):   # a column of scalars (a delta's since_change, parent)
            return orjson.dumps(value)
        return b"[" + b",".join(map(dumps, value)) + b"]"
    return _ENCODE(value).encode()


def _finite_or_none(v: Any) -> bool:
    """v is None, or an int / str / bool, or a finite float: written alike by orjson and json."""
    t = type(v)
    return v is None or t is int or t is str or t is bool or (t is float and _FINITE_MIN <= v <= _FINITE_MAX)


_FINITE_MIN, _FINITE_MAX = -1.7976931348623157e308, 1.7976931348623157e308


_ORJSON_OPTIONS = orjson.OPT_SORT_KEYS if orjson is not None else 0


def _encode_state(state: dict) -> bytes:
    """A state body: JSON with sorted keys, one top-level key per line and each item of a list
    of objects (the members) on a line of its own -- readable and greppable, and written by
    compiled encoders (``dumps``; an indented dump goes through the pure-Python one: seconds for
    thousands of members)."""
    lines = []
    for key in sorted(state, key=str):
        value = state[key]
        if isinstance(value, list) and value and (all(type(v) is RawJSON for v in value)
                                                  or all(isinstance(v, (dict, RawJSON)) for v in value)):
            inner = b",\n".join(v.encode() if isinstance(v, RawJSON) else dumps(v) for v in value)
            text = b"[\n" + inner + b"\n]"
        else:
            text = _dumps_parts(value, 2)
        lines.append(json.dumps(str(key)).encode() + b": " + text)
    return b"{\n" + b",\n".join(lines) + b"\n}\n"


def _dumps_parts(value: Any, depth: int) -> bytes:
    """``dumps(value)``; a dict of str keys (a delta, its members' changes) item by item down
    to ``depth`` levels, so that only the items whose text holds a null (a None, or a NaN
    orjson wrote as one) are searched for a NaN, not the whole value (a round's delta holds a
    None in most of its parts, but not in its largest: the strategy's state, the schedules)."""
    if depth and orjson is not None and type(value) is dict and all(type(k) is str for k in value):
        return b"{" + b",".join(orjson.dumps(k) + b":" + _dumps_parts(value[k], depth - 1)
                                for k in sorted(value)) + b"}"
    return dumps(value)


class _Hashing:
    """A writable file that also feeds what is written to a hash (torch.save needs only write)."""

    def __init__(self, f: IO[bytes], digest: Any) -> None:
        self.f, self.digest = f, digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from or while handling, innermost last."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _os_error(e: OSError) -> str:
    """An OSError in a few words: its reason, without the errno and path Python adds."""
    return e.strerror or _first_line(e)


def _stale_reason(holder: dict, stale_after: float) -> str | None:
    """Why a lock record is abandoned, or None when its driver may be alive."""
    if not holder:
        return "the lock file is unreadable"
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        if not _pid_alive(pid):
            return f"pid {pid} is not running"
        start = _pid_start(pid)
        if holder.get("pid_start") is not None and start is not None and start != holder["pid_start"]:
            return f"pid {pid} now belongs to another process"
    beat = holder.get("heartbeat")
    if isinstance(beat, bool) or not isinstance(beat, (int, float)):
        return "the lock file has no heartbeat"
    age = time.time() - beat
    if age > stale_after:
        return f"last heartbeat {age:.0f} s ago"
    return None


def _missing_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while path and not os.path.lexists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _os_reason(e: OSError) -> str:
    """An OSError as a short clause: what failed, on which path."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and e.filename:
        path = os.fspath(e.filename)
        while path and not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        return f"{path} is a file, not a directory"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"not writable{where}: {e.strerror}"
    return f"{e.strerror or e}{where}"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a Linux process; None elsewhere or if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()   # the command name may hold spaces
        return fields[0].decode(), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_start(pid: int) -> int | None:
    """When the process started (distinguishes a reused pid); None where /proc is missing."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[0] != "Z"   # a zombie has exited; only its parent has not reaped it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # alive, owned by someone else
    return True


def _parse_lock(data: bytes) -> dict:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _dump(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, indent=1).encode() + b"\n"


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.path.getmtime(path) > seconds
    except FileNotFoundError:
        return False


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort: not every OS allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _describe(e: BaseException) -> str:
    """``Type: first sentence`` of an exception, short enough for a one-line message."""
    text = _first_line(e).split(". ")[0]
    text = text if text != type(e).__name__ else ""
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__
