"""A named-pipe line from the driver to a member on its node, for the one call whose latency is
the point: an exploit's ``load_state``.

A Ray actor call wakes four threads in turn (the caller's and the actor's io threads, the
actor's executor, the caller again) and, to an actor that has been idle for a while, costs
≈1.7 ms on a 2-core VM against ≈0.7 ms back to back; a pipe round trip between two idle
processes costs ≈0.09 ms there. A member with a shared-memory directory therefore listens on a
FIFO pair in it (``m<id>-<pid>.req`` / ``.rep``): the driver writes one order, the member's
listener thread runs it and writes the reply. Orders are small and written whole (below
PIPE_BUF, so never interleaved); replies are length-prefixed pickles.

The driver only sends an order to a member it would otherwise call with ``load_state`` (an idle
one), so the listener runs exactly what the Ray task would, under the same rules. When the
member's process is gone the reply pipe reports end-of-file (the listener held its only write
end), and the driver makes the same call through Ray, where the failure surfaces as usual.
"""
from __future__ import annotations

import os
import pickle
import select
import struct
import threading
from pathlib import Path
from typing import Any, Callable

_LEN = struct.Struct("<I")


class ChannelClosed(RuntimeError):
    """The member at the other end is gone (end-of-file on its reply pipe)."""


class Listener:
    """Member side: a daemon thread that runs ``handler(*order)`` for each order read from
    ``<stem>.req`` and writes its result (or its exception, as text) to ``<stem>.rep``."""

    def __init__(self, directory: str | os.PathLike, stem: str, handler: Callable[..., Any]) -> None:
        base = Path(directory) / f"{stem}-{os.getpid()}"
        self.paths = (str(base) + ".req", str(base) + ".rep")
        for path in self.paths:
            if os.path.exists(path):
                os.unlink(path)
            os.mkfifo(path, 0o600)
        # O_RDWR: opening never blocks, and the request pipe never reports end-of-file between
        # driver sessions; this process holds the only write end of the reply pipe
        self._req = os.open(self.paths[0], os.O_RDWR)
        self._rep = os.open(self.paths[1], os.O_RDWR)
        self._handler = handler
        self._thread = threading.Thread(target=self._serve, name=f"orders-{stem}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                order = pickle.loads(_read_message(self._req))
            except (OSError, ChannelClosed):   # closed: the member is shutting down
                return
            try:
                reply = {"ok": self._handler(*order)}
            except BaseException as e:  # sent back: the driver raises it
                reply = {"error": f"{type(e).__name__}: {e}"}
            try:
                _write_message(self._rep, pickle.dumps(reply))
            except OSError:
                return

    def close(self) -> None:
        for path in self.paths:
            try:
                os.unlink(path)
            except OSError:
                pass


class Channel:
    """Driver side of one member's pipes."""

    def __init__(self, paths: tuple[str, str]) -> None:
        self.paths = tuple(paths)
        self._req = os.open(self.paths[0], os.O_WRONLY | os.O_NONBLOCK)   # the listener reads it
        self._rep = os.open(self.paths[1], os.O_RDONLY | os.O_NONBLOCK)
        self._buffer = b""

    def send(self, *order: Any) -> None:
        data = pickle.dumps(order)
        if _LEN.size + len(data) > select.PIPE_BUF:
            raise ValueError(f"an order of {len(data)} bytes does not fit one pipe write")
        os.write(self._req, _LEN.pack(len(data)) + data)

    def fileno(self) -> int:
        return self._rep

    def receive(self) -> Any | None:
        """The reply, once it is whole (call when select says the pipe is readable); None while
        part of it is still on its way. Raises ChannelClosed at end-of-file, RuntimeError with the
        member's error when the order failed."""
        try:
            chunk = os.read(self._rep, 1 << 16)
        except BlockingIOError:   # nothing yet
            return None
        if not chunk:
            raise ChannelClosed(f"{self.paths[1]}: the member is gone")
        self._buffer += chunk
        if len(self._buffer) < _LEN.size:
            return None
        (n,) = _LEN.unpack_from(self._buffer)
        if len(self._buffer) < _LEN.size + n:
            return None
        reply = pickle.loads(self._buffer[_LEN.size:_LEN.size + n])
        self._buffer = self._buffer[_LEN.size + n:]
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]

    def close(self) -> None:
        for fd in (self._req, self._rep):
            try:
                os.close(fd)
            except OSError:
                pass


def _read_message(fd: int) -> bytes:
    head = _read_exactly(fd, _LEN.size)
    (n,) = _LEN.unpack(head)
    return _read_exactly(fd, n)


def _read_exactly(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise ChannelClosed("end of file")
        out += chunk
    return out


def _write_message(fd: int, data: bytes) -> None:
    view = memoryview(_LEN.pack(len(data)) + data)
    while view.nbytes:
        view = view[os.write(fd, view):]
