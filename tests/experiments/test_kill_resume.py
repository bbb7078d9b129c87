"""A driver killed with SIGKILL mid-run, then the same command again: the run finishes with every
round, and in sync mode on CPU its fitness table and lineage equal an uninterrupted run's.

The driver is killed at three points of a round, each found by watching the real run from
outside — the process titles Ray gives a member while it runs a task (``ray::Member.<method>``)
and the files of the run store — with no hook in evo:

- ``training``: a member runs ``train_and_evaluate`` / ``train_part``;
- ``exploit``: a member runs ``load_state``, ``apply_genome`` or ``publish`` after the first
  commit (a receiver loading its donor's state, taking its new genome, publishing it: in a run
  without member faults only an exploit calls them);
- ``commit``: the checkpoints of the next round are on disk (or being written) while
  ``state.json`` still holds the round before.

At the moment of observation the driver is stopped (SIGSTOP), the point checked again (the round
not committed meanwhile), and only then SIGKILLed; a missed point lets it go on (SIGCONT) to the
next round. The uninterrupted reference run is made once for the module. One run is killed at all
three points in turn, each kill in the run the same command resumed after the one before (an
exploit first, in the fresh run: a resumed run's members load their checkpoints with the methods
an exploit calls), and must still end equal to the reference.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from population.store import CHECKPOINT_SLOTS, RunStore
from tests.helpers import (EVO, QUICKSTART, TINY, comparable_lineage, evo_env, evo_status, member_processes,
                           proc_title, read_lineage, set_args)

pytestmark = pytest.mark.slow

OVERRIDES = TINY + ["population.size=3", "population.total_steps=120", "population.interval_steps=10"]
ROUNDS = 12
# the member tasks of each point: an exploit is a receiver loading its donor's state, taking its
# new genome, then publishing its new state
POINTS = {"training": ("train_and_evaluate", "train_part"), "exploit": ("load_state", "apply_genome", "publish")}


def _run(storage, name):
    return [EVO, "run", QUICKSTART, "--storage", str(storage), "--name", name, *set_args(OVERRIDES)]


def _fitness_table(status: dict) -> list[tuple]:
    return sorted((m["id"], m["step"], m["val_bpb"], str(m["genome"]), m["parent"]) for m in status["members"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (storage, env, its status, its lineage)."""
    root = tmp_path_factory.mktemp("kill_resume")
    env = evo_env(root / "cache")
    storage = root / "runs"
    ref = subprocess.run(_run(storage, "ref"), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    return storage, env, evo_status(storage, "ref", env), read_lineage(storage / "ref")


def _committed_round(store: RunStore) -> int:
    """The committed round; -1 before the first commit or while one is being read beside a write."""
    try:
        state = store.read_state() if store.exists() else None
    except Exception:   # noqa: BLE001 - read beside the driver's commit: ask again
        return -1
    return -1 if state is None else int(state["round"])


def _at(point: str, titles: list[str]) -> bool:
    return any(t.split(".", 1)[-1].startswith(POINTS[point]) for t in titles)


def _next_checkpoints(run_dir: Path, r: int, since: float) -> list[str]:
    """Round ``r + 1``'s checkpoint files (its slot) written since ``since`` (this driver's: not
    ones an earlier killed driver or an earlier round left behind)."""
    names = []
    for p in run_dir.glob(f"checkpoints/m*/s{(r + 1) % CHECKPOINT_SLOTS}.pt*"):
        try:
            if p.stat().st_mtime >= since:
                names.append(p.name)
        except FileNotFoundError:   # a temporary file renamed meanwhile
            pass
    return sorted(names)


def _observe(point: str, store: RunStore, run_dir: Path, pids: list[int],
             since: float) -> tuple[int, list[str]] | None:
    """(the committed round, the members' titles) if the run is at ``point`` now, else None."""
    titles = [proc_title(p) for p in pids]
    if point != "commit" and not _at(point, titles):
        return None   # the titles first: they are cheap to read
    r = _committed_round(store)
    if r < 1 or r >= ROUNDS - 1:
        return None
    if point == "commit" and not _next_checkpoints(run_dir, r, since):
        return None
    return r, titles


def _kill_at(point: str, proc: subprocess.Popen, storage: Path, name: str, mark: str, since: float) -> dict:
    """SIGKILL the driver at ``point``; returns what was seen at the kill."""
    store, run_dir = RunStore(storage, name), storage / name
    deadline = time.time() + 300
    pids: list[int] = []
    while time.time() < deadline and proc.poll() is None:
        if len(pids) < 3:
            pids = sorted(member_processes(mark))
            time.sleep(0.01)
            continue
        seen = _observe(point, store, run_dir, pids, since)
        if seen is None:
            time.sleep(0.001)
            continue
        os.kill(proc.pid, signal.SIGSTOP)   # frozen where it is: is it still there?
        r, titles = seen
        if _committed_round(store) == r:
            os.kill(proc.pid, signal.SIGKILL)
            return {"round": r, "titles": titles, "checkpoints": _next_checkpoints(run_dir, r, since)}
        os.kill(proc.pid, signal.SIGCONT)
    return {}


# the order one run meets the points in: an exploit in the fresh run, then a commit and training,
# each in the run the same command resumed after the kill before
POINT_ORDER = ("exploit", "commit", "training")


def test_sigkill_at_each_point_then_same_command_equals_uninterrupted(reference):
    storage, env, ref_status, ref_lineage = reference
    name = "killed"
    kills = []
    for point in POINT_ORDER:
        # this driver's members are told from the killed drivers' by a mark of their own
        mark = f"EVO_TEST_KILL_RESUME={name}-{point}-{os.getpid()}"
        point_env = dict(env, EVO_TEST_KILL_RESUME=mark.split("=", 1)[1])
        log_path = storage.parent / f"{name}-{point}.log"
        with open(log_path, "w") as log:
            since = time.time() - 1.0   # file times may be coarser than the clock
            proc = subprocess.Popen(_run(storage, name), env=point_env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            seen = _kill_at(point, proc, storage, name, mark, since)
            if not seen and proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            # Whatever the driver had started (its local Ray) goes with it; clean up stragglers in its session.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert seen, f"never observed the run at {point}:\n" + log_path.read_text()[-3000:]
        assert proc.returncode == -signal.SIGKILL, point
        if point == "commit":
            assert seen["checkpoints"], seen
        else:
            assert _at(point, seen["titles"]), seen
        mid = evo_status(storage, name, env)
        assert mid["round"] == seen["round"] < ROUNDS and mid["status"] in ("running", "interrupted"), (point, mid)
        kills.append((point, seen))

    again = subprocess.run(_run(storage, name), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    resumed = evo_status(storage, name, env)
    assert resumed["status"] == ref_status["status"] == "finished"
    assert resumed["round"] == ref_status["round"] == ROUNDS
    assert _fitness_table(resumed) == _fitness_table(ref_status)
    assert comparable_lineage(read_lineage(storage / name)) == comparable_lineage(ref_lineage)
    for point, seen in kills:
        print(f"{point}: killed at committed round {seen['round']}, titles {seen['titles']}, "
              f"next round's checkpoints on disk {seen['checkpoints']}")
