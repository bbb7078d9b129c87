"""A member's evaluated state in one shared-memory file, for exploits between members on one node.

Through the Ray object store a hand-off costs a pack (one memcpy), a put (another), an owner
lookup and a plasma read by the receiver (≈1.4 ms for a 2 MB state on a 2-core machine, more
with the borrowed-reference bookkeeping), then a copy out of the store. Here the donor writes its
snapshot once into a file under ``/dev/shm`` (tmpfs: memory, never a disk), and the receiver
reads the tensors with preadv(2) straight into its own parameters and Adam moments when it has
the same layout (Trainer.load_state_dict's in-place path), else the whole file into memory of its
own: nothing but a path crosses Ray.

A file holds a header (magic, header length, the state pickled with each tensor as a persistent
id, and each tensor's dtype/shape/offset/bytes), then every tensor's bytes at an aligned offset.
It is written under a temporary name and renamed, so a reader sees a whole file or none. A
publisher keeps its last ``keep`` files: a receiver told to load generation g can still open it
after the donor has published g + 1 (async mode); a file already open survives the unlink.

Members on different nodes cannot see each other's files: the driver hands those exploits to the
object store (population/driver.py). A node whose ``/dev/shm`` is missing, read-only or too full
for the state publishes through the object store as well.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"EVOSTATE"
ALIGN = 64                       # bytes; every tensor starts cache-line aligned
_PREFIX = struct.Struct("<8sQ")  # magic, header length
SHM = Path("/dev/shm")
HEADROOM = 64 * 2**20            # publish only while this much of the tmpfs stays free


class SharedStateError(RuntimeError):
    """A shared state file is missing or unreadable; the message names the file."""


def shared_root() -> Path | None:
    """Where this node's members publish: ``/dev/shm/evo-<uid>``, or None when /dev/shm is no
    writable directory (then everything goes through the object store)."""
    if not SHM.is_dir() or not os.access(SHM, os.W_OK | os.X_OK):
        return None
    return SHM / f"evo-{os.getuid()}"


def new_session_dir(root: Path) -> Path:
    """A directory for one driver's members: ``<root>/<driver pid>-<random>``; stale ones of
    drivers that died without cleaning up (SIGKILL, a crash) are removed first."""
    root.mkdir(mode=0o700, exist_ok=True)
    for old in root.iterdir():
        pid = old.name.partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o700)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _TensorPickler(pickle.Pickler):
    """Pickles a state with each tensor as a persistent id (its number in ``tensors``)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []

    def persistent_id(self, obj: Any) -> int | None:
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, tensors: list) -> None:
        super().__init__(io.BytesIO(data))
        self.tensors = tensors

    def persistent_load(self, pid: Any) -> Any:
        return self.tensors[pid]


def _unpickle(tree: bytes, tensors: list) -> dict:
    """The state pickled by _TensorPickler, with ``tensors[i]`` in place of tensor number i."""
    return _TensorUnpickler(tree, tensors).load()


class Publisher:
    """Writes one member's snapshots as numbered files in ``directory``; keeps the last ``keep``."""

    def __init__(self, directory: str | os.PathLike, stem: str, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.stem = stem
        self.keep = keep
        self.generation = 0
        self.files: list[Path] = []

    def publish(self, state: dict) -> str | None:
        """Write ``state`` (CPU tensors and plain Python) to a new file; returns its path, or
        None when the file system lacks room (the caller then uses the object store)."""
        out = io.BytesIO()
        pickler = _TensorPickler(out)   # the tree, each tensor replaced by its number
        pickler.dump(state)
        tensors = pickler.tensors
        flat = [_bytes_of(t.detach().contiguous()) for t in tensors]
        meta, offset = [], 0
        for t, f in zip(tensors, flat):
            meta.append((str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, f.nbytes))
            offset = _align(offset + f.nbytes)
        header = pickle.dumps((out.getvalue(), meta), protocol=pickle.HIGHEST_PROTOCOL)
        start = _align(_PREFIX.size + len(header))
        total = start + offset
        try:
            free = os.statvfs(self.directory)
        except OSError:
            return None
        if free.f_bavail * free.f_frsize < total + HEADROOM:
            return None
        self.generation += 1
        path = self.directory / f"{self.stem}-{self.generation}.state"
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb", buffering=0) as f:
                pad = start - _PREFIX.size - len(header)
                _write(f, _PREFIX.pack(MAGIC, len(header)) + header + bytes(pad))
                at = 0
                for (_, _, off, n), chunk in zip(meta, flat):
                    if off > at:
                        _write(f, bytes(off - at))
                    _write(f, chunk)
                    at = off + n
            os.rename(tmp, path)
        except OSError:   # ENOSPC between the check and the write, the directory removed, ...
            tmp.unlink(missing_ok=True)
            return None
        self.files.append(path)
        while len(self.files) > self.keep:
            self.files.pop(0).unlink(missing_ok=True)
        return str(path)

    def close(self) -> None:
        """Remove every file this publisher still keeps."""
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files = []


def _write(f, data) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = f.write(view)
        view = view[n:]


class Placeholder:
    """A tensor of a state file not read yet: its dtype and shape (what Trainer.load_state_dict
    compares) and where its bytes are."""

    __slots__ = ("index", "dtype", "shape", "offset", "nbytes")

    def __init__(self, index: int, dtype: torch.dtype, shape: tuple, offset: int, nbytes: int) -> None:
        self.index, self.dtype, self.shape, self.offset, self.nbytes = index, dtype, torch.Size(shape), offset, nbytes


class SharedFile:
    """An open state file: ``state`` is its state with a Placeholder for each tensor.
    ``read_into(pairs)`` reads the tensors straight into given destinations (preadv(2): one copy,
    no buffer in between); ``read()`` reads the whole state. Use as a context manager."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise SharedStateError(f"shared state {path} is gone (its member published two newer ones, "
                                   "or the run ended)") from e
        try:
            self.size = os.fstat(self.fd).st_size
            prefix = os.pread(self.fd, _PREFIX.size, 0)
            if len(prefix) < _PREFIX.size:
                raise SharedStateError(f"shared state {path}: truncated ({self.size} bytes)")
            magic, length = _PREFIX.unpack(prefix)
            if magic != MAGIC or _PREFIX.size + length > self.size:
                raise SharedStateError(f"shared state {path}: not an evo state file")
            self.tree, meta = pickle.loads(os.pread(self.fd, length, _PREFIX.size))   # tree: pickled bytes
            start = _align(_PREFIX.size + length)
            if meta and start + meta[-1][2] + meta[-1][3] > self.size:
                raise SharedStateError(f"shared state {path}: truncated ({self.size} bytes)")
            self.placeholders = [Placeholder(i, getattr(torch, dtype), shape, start + off, n)
                                 for i, (dtype, shape, off, n) in enumerate(meta)]
            self.state = _unpickle(self.tree, self.placeholders)
        except BaseException:
            os.close(self.fd)
            raise

    def read_into(self, pairs: list[tuple[torch.Tensor, Placeholder]] | None) -> dict | None:
        """Fill each destination of ``pairs`` with its placeholder's bytes; ``None``: return the
        whole state, read into memory of the caller's own."""
        if pairs is None:
            return self.read()
        if not all(dst.device.type == "cpu" and dst.is_contiguous() for dst, _ in pairs):
            tensors = self._read_tensors()   # e.g. a GPU trainer: read, then copy to the device
            for dst, src in pairs:
                dst.copy_(tensors[src.index])
            return None
        runs: list[tuple[int, list]] = []   # (file offset, buffers) of each stretch read at once
        end = -1
        for dst, src in sorted(pairs, key=lambda p: p[1].offset):
            if dst.numel() * dst.element_size() != src.nbytes:
                raise SharedStateError(f"shared state {self.path}: tensor {src.index} has "
                                       f"{src.nbytes} bytes, its destination {dst.numel() * dst.element_size()}")
            view = _bytes_of(dst) if src.nbytes else None
            if runs and 0 <= src.offset - end < ALIGN and len(runs[-1][1]) < _IOV_MAX - 2:
                if src.offset > end:
                    runs[-1][1].append(_PAD[:src.offset - end])
            else:
                runs.append((src.offset, []))
            if view is not None:
                runs[-1][1].append(view)
            end = src.offset + src.nbytes
        for offset, buffers in runs:
            want = sum(b.nbytes for b in buffers)
            if buffers and os.preadv(self.fd, buffers, offset) != want:
                raise SharedStateError(f"shared state {self.path}: short read")
        return None

    def read(self) -> dict:
        """The state, read with one read(2) of the whole file into memory of the caller's own;
        its tensors are views of that memory."""
        return _unpickle(self.tree, self._read_tensors())

    def _read_tensors(self) -> list[torch.Tensor]:
        buf = np.empty(self.size, dtype=np.uint8)
        if os.preadv(self.fd, [buf], 0) != self.size:
            raise SharedStateError(f"shared state {self.path}: short read")
        own = torch.from_numpy(buf)
        return [own[p.offset:p.offset + p.nbytes].view(p.dtype).view(p.shape) if p.nbytes
                else torch.empty(p.shape, dtype=p.dtype) for p in self.placeholders]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SharedFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor as bytes, writable (numpy's view; bfloat16 and empty
    tensors through uint8)."""
    try:
        return memoryview(t.detach().numpy()).cast("B")
    except TypeError:   # a dtype numpy lacks
        return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_PAD = memoryview(bytearray(ALIGN))   # read(2)s the padding between two tensors into nowhere


def read_shared(path: str | os.PathLike) -> dict:
    """The state in ``path``, in memory of the caller's own."""
    with SharedFile(path) as f:
        return f.read()
