"""The member actors of one driver session: starting them, calling them, waiting for them.

``Members`` owns the Ray actors (population/member.py's ``Member``, one per member, named
``<run>/m<id>`` for the dashboard): it starts them (continuing from their committed checkpoints
on resume), replaces an actor whose process died, starts and joins their checkpoint writes, and
kills them when the session ends. Every wait polls, so a SIGTERM/SIGINT is noticed within
POLL_S (``stop.check()`` raises inside the wait).
"""
from __future__ import annotations

import time
from typing import Any, Iterator, Mapping, Protocol

import ray
from ray.exceptions import RayActorError, RayTaskError

from population.config import SearchSetup
from population.member import Member
from population.store import RunStore
from trainers.data import load_corpus
from trainers.trainer import TrainConfig

POLL_S = 0.1             # ray.wait timeout: how quickly a signal is noticed
START_TIMEOUT_S = 600.0  # members that cannot be placed within this are an error, not a hang


class SearchError(RuntimeError):
    """The search cannot go on (too many member failures, members that never start); one line."""


class StopCheck(Protocol):
    def check(self) -> None:
        """Raise if the search was asked to stop."""


class Members:
    """The actors, by member id; ``members[m]`` is member m's actor handle."""

    def __init__(self, setup: SearchSetup, store: RunStore, num_threads: int, stop: StopCheck) -> None:
        self.setup = setup
        self.store = store
        self.num_threads = num_threads
        self.stop = stop
        self.train: TrainConfig = setup.train   # the run's base hyperparameters (set by start)
        self.actors: dict[int, Any] = {}

    def __getitem__(self, m: int) -> Any:
        return self.actors[m]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, records: Mapping[int, Any], train: TrainConfig) -> None:
        """One actor per record (its genome and seed); members with a committed checkpoint
        continue from it. ``train`` is the run's base TrainConfig (its cosine horizon set)."""
        load_corpus(self.setup.data)   # tokenize once here, not in every member at once
        self.train = train
        for m, rec in records.items():
            self.actors[m] = self._new_actor(m, rec.genome, rec.seed)
        self.gather({m: a.pid.remote() for m, a in self.actors.items()}, timeout=START_TIMEOUT_S,
                    raise_errors=True)
        loads = {m: self.actors[m].load_checkpoint.remote(self.store.storage, self.store.name, rec.checkpoint)
                 for m, rec in records.items() if rec.checkpoint}
        self.gather(loads, raise_errors=True)

    def restart_dead(self, failed: Mapping[int, tuple[str, bool]], records: Mapping[int, Any]) -> None:
        """A new actor (a new process) for each failed member whose process died; the caller then
        gives it a state. ``failed`` is :func:`failures`' {member: (why, process died)}."""
        for m, (_, died) in sorted(failed.items()):
            if not died:
                continue
            try:
                ray.kill(self.actors[m], no_restart=True)
            except Exception:   # already gone
                pass
            self.actors[m] = self._new_actor(m, records[m].genome, records[m].seed)
            self.gather({m: self.actors[m].pid.remote()}, timeout=START_TIMEOUT_S, raise_errors=True)

    def _new_actor(self, m: int, genome: dict, seed: int) -> Any:
        res = self.setup.population.resources
        options = dict(name=f"{self.setup.name}/m{m}", num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                       max_concurrency=2, max_restarts=0)
        args = (m, self.setup.model, self.train, self.setup.data, genome, seed, self.num_threads)
        deadline = time.monotonic() + 30
        while True:
            try:
                return Member.options(**options).remote(*args)
            except ValueError as e:   # the name of a member just killed is not released yet
                if "already" not in str(e) or time.monotonic() > deadline:
                    raise
                self.stop.check()
                time.sleep(POLL_S)

    def close(self) -> None:
        """Kill the actors and wait until their names are free (a later run may reuse them)."""
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead, or Ray itself is gone
                pass
        deadline = time.monotonic() + 10
        for m in list(self.actors):
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(f"{self.setup.name}/m{m}")
                except Exception:
                    break
                time.sleep(0.05)
        self.actors.clear()

    # -- checkpoints -----------------------------------------------------------------------------

    def start_checkpoints(self, checkpoints: Mapping[int, tuple[str, int]]) -> None:
        """Each member snapshots its state now and writes it to ``checkpoints[m]``'s path in a
        background thread; the snapshot must be at the record's step (else SearchError)."""
        refs = {m: self.actors[m].save_checkpoint.remote(self.store.storage, self.store.name, path)
                for m, (path, _) in checkpoints.items()}
        for m, info in self.gather(refs, raise_errors=True).items():
            if info["step"] != checkpoints[m][1]:
                raise SearchError(f"member {m}: checkpoint at step {info['step']}, "
                                  f"record at step {checkpoints[m][1]}")

    def finish_checkpoints(self, ids: list[int]) -> None:
        """Wait until the checkpoint writes of ``ids`` are complete."""
        self.gather({m: self.actors[m].wait_saved.remote() for m in ids}, raise_errors=True)

    # -- waiting ---------------------------------------------------------------------------------

    def next_done(self, refs: list) -> tuple[Any, float]:
        """The first of ``refs`` to complete, and when it was seen complete."""
        while True:
            self.stop.check()
            ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_S, fetch_local=False)
            if ready:
                return ready[0], time.perf_counter()

    def done(self, refs: list) -> Iterator[tuple[Any, float]]:
        """Each of ``refs`` as it completes, with the time it was seen complete."""
        pending = list(refs)
        while pending:
            ref, seen = self.next_done(pending)
            pending.remove(ref)
            yield ref, seen

    def gather(self, refs: Mapping[int, Any], timeout: float | None = None,
               raise_errors: bool = False) -> dict[int, Any]:
        """{member: result} once every ref is done; a member's error is its result unless
        ``raise_errors``. A ``timeout`` turns members that never start into a SearchError."""
        by_ref = {ref: m for m, ref in refs.items()}
        out: dict[int, Any] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(by_ref)
        while pending:
            self.stop.check()
            if deadline is not None and time.monotonic() > deadline:
                missing = sorted(by_ref[r] for r in pending)
                raise SearchError(
                    f"members {missing} did not start within {timeout:.0f} s: the cluster's "
                    f"resources are taken by something else (see `ray status`)")
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S, fetch_local=False)
            for ref in ready:
                out[by_ref[ref]] = result(ref, raise_errors)
        return out

    def first_done(self, refs: Mapping[int, Any]) -> tuple[int, Any]:
        """(member, result or error) of the first of ``refs`` to complete."""
        by_ref = {ref: m for m, ref in refs.items()}
        ref, _ = self.next_done(list(by_ref))
        return by_ref[ref], result(ref, raise_errors=False)


def result(ref: Any, raise_errors: bool) -> Any:
    """ray.get(ref); an actor's or task's error is returned instead of raised unless ``raise_errors``."""
    try:
        return ray.get(ref)
    except (RayActorError, RayTaskError) as e:
        if raise_errors:
            raise
        return e


def failure(res: Any) -> tuple[str, bool] | None:
    """(why, its process died) for a failed train_and_evaluate result, None for a success."""
    if isinstance(res, RayActorError):
        return f"actor died: {str(res).splitlines()[0] if str(res) else type(res).__name__}", True
    if isinstance(res, RayTaskError):
        cause = res.cause if getattr(res, "cause", None) is not None else res
        return f"{type(cause).__name__}: {str(cause).splitlines()[-1] if str(cause) else ''}", False
    if isinstance(res, dict) and res.get("failed"):
        return str(res.get("error", "failed")), False
    return None


def failures(results: Mapping[int, Any]) -> dict[int, tuple[str, bool]]:
    """{member: (why, its process died)} of the members whose interval failed."""
    return {m: f for m, res in results.items() if (f := failure(res)) is not None}
