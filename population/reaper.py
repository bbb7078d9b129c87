"""The watchdog of evo's local Ray: when the driver dies, its Ray goes with it.

Started by population/cluster.py as ``python reaper.py DRIVER_PID TEMP_ROOT`` with its stdin a
pipe whose only writer is the driver; it imports nothing of evo or Ray, so it starts at once.
While the driver lives it keeps a list of the processes of the driver's Ray: the driver's
children whose command line names TEMP_ROOT (GCS, raylet, dashboard, monitors) and all their
descendants (agents, workers), each with its start time so a reused pid is never touched. When
the pipe closes (the driver exited, or was killed), it SIGKILLs every one still alive and
deletes TEMP_ROOT (Ray's session and every temporary file its processes made).

Why: a raylet that dies without SIGTERM leaves its agents alive for a minute (they try to report
the death to a GCS that is gone), holding Ray's fixed ports; a killed driver cannot clean up.
Linux only (/proc); elsewhere it just deletes TEMP_ROOT.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time

SCAN_S = 1.0        # how often the list of processes is refreshed while Ray starts ...
SETTLED_SCAN_S = 10.0   # ... and once no new process was found for SETTLE_S (each scan reads
SETTLE_S = 30.0         # every process's /proc stat: ≈ 0.25 CPU s a minute at 1 s on a busy host)


def _procs() -> dict[int, tuple[int, int, str]]:
    """pid → (ppid, start time in clock ticks, state) of every process."""
    out = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()   # the command name may hold spaces
        try:
            out[int(name)] = (int(rest[1]), int(rest[19]), rest[0])
        except (IndexError, ValueError):
            continue
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _scan(driver: int, root: str, known: dict[int, int]) -> None:
    """Add to ``known`` (pid → start time) the driver's Ray processes and their descendants."""
    procs = _procs()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    for pid in children.get(driver, []):
        if pid not in known and pid != os.getpid() and root in _cmdline(pid):
            known[pid] = procs[pid][1]
    todo = [pid for pid, start in known.items() if pid in procs and procs[pid][1] == start]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in known:
                known[child] = procs[child][1]
                todo.append(child)


def _kill(known: dict[int, int]) -> int:
    """SIGKILL every known process still alive (same pid, same start time); how many."""
    procs = _procs()
    killed = 0
    for pid, start in known.items():
        p = procs.get(pid)
        if p is not None and p[1] == start and p[2] != "Z":
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def main(argv: list[str]) -> int:
    driver, root = int(argv[0]), argv[1]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)   # a Ctrl-C meant for the driver must not stop the cleanup
    known: dict[int, int] = {}
    linux = os.path.isdir("/proc/self")
    last_new = time.monotonic()
    while True:
        if linux:
            before = len(known)
            _scan(driver, root, known)
            if len(known) > before:
                last_new = time.monotonic()
        # Ray's own processes (the driver's children) start with ray.init, so the scans can slow
        # down once none has appeared for a while; workers started later descend from the
        # raylet, and the last scan below (the raylet still alive) finds them.
        settled = time.monotonic() - last_new > SETTLE_S
        ready, _, _ = select.select([sys.stdin], [], [], SETTLED_SCAN_S if settled else SCAN_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break   # EOF: the driver is gone (or closed the pipe after ray.shutdown)
    if linux:
        for _ in range(5):   # a process may still be spawning a child as its parent is killed
            _scan(driver, root, known)
            if not _kill(known):
                break
            time.sleep(0.1)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
