"""The member actors of one driver session: starting them, calling them, waiting for them.

``Members`` owns the Ray actors (population/member.py's ``Member``, one per member, named
``<run>/m<id>`` for the dashboard): it starts them (``launch`` creates them and sends their first
calls, ``wait_started`` waits for them; on resume they continue from their committed checkpoints),
gives a member whose process died a new one (``revive``), starts and joins their checkpoint
writes, and kills them when the session ends. Every wait polls, so a SIGTERM/SIGINT
is noticed within POLL_S (``stop.check()`` raises inside the wait).

A member's process may die under any call (SIGKILL, OOM kill, a lost node): ``call`` and the
checkpoint calls note it in ``dead`` instead of raising, and the loop restores the member
(population/decisions.py). Any other error inside a member is raised. Why it died is one line
(:func:`death_line`): "node lost: node <id> at <ip> ..." when Ray reports the death of the
member's node (or the node its process ran on is no longer alive in ``ray.nodes()``), else
"process died ...".
"""
from __future__ import annotations

import re
import time
from typing import Any, Iterator, Mapping, Protocol

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from population.config import SearchSetup
from population.member import Member
from population.store import RunStore
from trainers.config import TrainConfig
from trainers.data import load_corpus, load_held_out

POLL_S = 0.1             # ray.wait timeout: how quickly a signal is noticed
MAX_STARTS = 3           # a member that dies this often while starting is a SearchError
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
        self.generation: dict[int, int] = {}    # processes started for each member (revive adds one)
        self.dead: dict[int, str] = {}          # members whose current process died -> why
        self.nodes: dict[int, str] = {}         # member -> Ray node id of its current process
        self.died_on: dict[int, str] = {}       # member -> node id of its last process that died
        self.published: dict[int, Any] = {}     # member -> state ref of its train_and_evaluate in flight
        self._starting: dict[int, tuple] = {}   # launched, not yet waited for: (record, node ref, load ref)
        self._starts = 0                        # launches of the members now starting

    def __getitem__(self, m: int) -> Any:
        return self.actors[m]

    # -- lifecycle -------------------------------------------------------------------------------

    def launch(self, records: Mapping[int, Any], train: TrainConfig) -> None:
        """Create one actor per record (its genome and seed) and send its first calls, without
        waiting: where its process runs, and for a member with a committed checkpoint the
        checkpoint's load, queued right behind the actor's creation. ``train`` is the run's base
        TrainConfig (its cosine horizon set). The actors' processes start, import torch and
        build their trainers while the driver goes on (the monitor's sinks are built meanwhile);
        ``wait_started`` waits for them."""
        if self.setup.population.trainer.kind == "internlm2":   # the sleep trainer reads no text
            corpus = load_corpus(self.setup.data)   # tokenize once here, not in every member at once
            for n, form in (self.setup.fitness.held_out_corpora() if self.setup.fitness else {}).items():
                load_held_out(self.setup.data, form, corpus.tokenizer_path, f"fitness.eval.{n}.corpus")
        self.train = train
        self._starts = 0
        self._launch(dict(records))

    def _launch(self, records: Mapping[int, Any]) -> None:
        self._starts += 1
        self._starting = {}
        for m, rec in records.items():
            self.dead.pop(m, None)
            actor = self._new_actor(m, rec.genome, rec.seed)
            self.actors[m] = actor
            load = (actor.load_checkpoint.remote(self.store.storage, self.store.name, rec.checkpoint)
                    if rec.checkpoint else None)
            self._starting[m] = (rec, actor.node_id.remote(), load)

    def wait_started(self) -> None:
        """Wait until every launched member is up (and has loaded its checkpoint). A member
        whose process dies meanwhile is started again (at most MAX_STARTS starts in all)."""
        while True:
            starting = self._starting
            self.nodes.update(self.call({m: node for m, (_, node, _) in starting.items()},
                                        timeout=START_TIMEOUT_S))
            self.call({m: load for m, (_, _, load) in starting.items() if load is not None and m not in self.dead})
            todo = {m: starting[m][0] for m in starting if m in self.dead}
            if not todo:
                self._starting = {}
                return
            if self._starts >= MAX_STARTS:
                raise SearchError(f"members {sorted(todo)} died {MAX_STARTS} times while starting "
                                  f"({next(iter(self.dead.values()))})")
            self._launch(todo)

    def revive(self, m: int, genome: dict, seed: int) -> None:
        """A new process for member m if its process died (a fresh trainer of ``genome`` and
        ``seed``: the caller then gives it its state)."""
        if m not in self.dead:
            return
        try:
            ray.kill(self.actors[m], no_restart=True)
        except Exception:   # already gone
            pass
        del self.dead[m]
        self.published.pop(m, None)
        if m in self.nodes:
            self.died_on[m] = self.nodes.pop(m)
        self.actors[m] = self._new_actor(m, genome, seed)
        self.nodes.update(self.call({m: self.actors[m].node_id.remote()}, timeout=START_TIMEOUT_S))

    def _new_actor(self, m: int, genome: dict, seed: int) -> Any:
        res = self.setup.population.resources
        options = dict(name=f"{self.setup.name}/m{m}", num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                       max_concurrency=2, max_restarts=0)
        args = (m, self.setup.model, self.train, self.setup.data, genome, seed, self.num_threads,
                self.setup.fitness, self.setup.population.trainer)
        deadline = time.monotonic() + 30
        while True:
            try:
                actor = Member.options(**options).remote(*args)
                self.generation[m] = self.generation.get(m, 0) + 1
                return actor
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
        background thread; the snapshot must be at the record's step (else SearchError). A
        member that died is noted in ``dead`` (its checkpoint is not written)."""
        refs = {m: self.actors[m].save_checkpoint.remote(self.store.storage, self.store.name, path)
                for m, (path, _) in checkpoints.items()}
        for m, info in self.call(refs).items():
            if info["step"] != checkpoints[m][1]:
                raise SearchError(f"member {m}: checkpoint at step {info['step']}, "
                                  f"record at step {checkpoints[m][1]}")

    def finish_checkpoints(self, ids: list[int]) -> dict[int, tuple[str, str]]:
        """Wait until the checkpoint writes of ``ids`` are complete (a member that died meanwhile
        is noted in ``dead``: its checkpoint is not written); returns {member: (path, SHA-256)}
        of what each wrote (``Records.saved`` takes it)."""
        done = self.call({m: self.actors[m].wait_saved.remote() for m in ids})
        return {m: (info["path"], info["sha256"]) for m, info in done.items()
                if isinstance(info, dict) and info.get("sha256")}

    # -- calls -----------------------------------------------------------------------------------

    def train_and_evaluate(self, m: int, n_steps: int) -> Any:
        """Start member m's last part of an interval; returns the ref of its figures and keeps
        the ref of its evaluated state for ``take_published``."""
        figures, state = self.actors[m].train_and_evaluate.remote(n_steps)
        self.published[m] = state
        return figures

    def take_published(self, m: int) -> Any:
        """The state ref of member m's last train_and_evaluate (None if already taken)."""
        return self.published.pop(m, None)

    def call(self, refs: Mapping[int, Any], timeout: float | None = None,
             failed_ok: bool = False) -> dict[int, Any]:
        """{member: result} of calls on members, once all are done. A member whose process died
        is noted in ``dead`` and left out; so is one whose call could not read its input (a state
        lost with its node: the member itself is fine). Any other error is raised, or returned
        as the member's result if ``failed_ok``."""
        out = {}
        for m, res in self.gather(refs, timeout=timeout).items():
            if isinstance(res, RayActorError):
                self.note_dead(m, res)
            elif isinstance(res, RayTaskError):
                if not isinstance(res.cause, (RayActorError, ObjectLostError)):
                    if not failed_ok:
                        raise res
                    out[m] = res
            else:
                out[m] = res
        return out

    def note_dead(self, m: int, error: RayActorError) -> None:
        """Member m's process died (if the error is about its current process, not one that a
        revive already replaced)."""
        actor_id = getattr(error, "actor_id", None)
        if m not in self.dead and (actor_id is None or actor_id == self.actors[m]._actor_id.hex()):
            self.dead[m] = self.cause(m, death_line(error), self.nodes.get(m))

    def cause(self, m: int, why: str, node: str | None = None) -> str:
        """``why`` member m's process died, told as a lost node when the node it ran on
        (``node``; by default the node of its last process that died) is not alive in
        ``ray.nodes()`` — Ray may report the process's death before the node's."""
        node = node or self.died_on.get(m)
        if why.startswith("node lost") or node is None:
            return why
        try:
            info = next((n for n in ray.nodes() if n.get("NodeID") == node), None)
        except Exception:   # noqa: BLE001 - the GCS does not answer: the death as Ray told it
            return why
        if info is None or info.get("Alive", True):
            return why
        reason = info.get("DeathReasonMessage") or ""
        return _node_lost(node, info.get("NodeManagerAddress"), reason)

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

    def gather(self, refs: Mapping[int, Any], timeout: float | None = None) -> dict[int, Any]:
        """{member: result} once every ref is done; a member's error is its result. A
        ``timeout`` turns members that never start into a SearchError."""
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
                out[by_ref[ref]] = result(ref, raise_errors=False)
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


def death_line(error: RayActorError) -> str:
    """One line saying why a member's process is gone (Ray's message runs over many lines: a
    header, the actor's fields, then why and how the worker exited): "node lost: node <id> at
    <ip> (<why the node died>)" when the actor died with its node, else "process died: ..."."""
    text = " ".join(str(error).split())
    node = re.search(r"its node has died\. Node Id: ([0-9a-f]+)", text)
    if node:
        ip = re.search(r"\bip: (\S+)", text)
        reason = re.search(r"node was terminated unexpectedly: (.*?)(?:\.(?: |$)|$)", text)
        return _node_lost(node.group(1), ip.group(1) if ip else None, reason.group(1) if reason else "")
    why = [m.group(1) for pattern in (r"The actor is dead because (.*?)\.", r"Worker exit detail: (.*?)\.")
           if (m := re.search(pattern, text))]
    return ("process died: " + "; ".join(why))[:240] if why else "process died"


def _node_lost(node: str, ip: str | None, reason: str) -> str:
    line = f"node lost: node {node[:12]}" + (f" at {ip}" if ip else "")
    reason = " ".join(reason.split()).rstrip(".")
    return (line + (f" ({reason})" if reason else ""))[:240]


def failure(res: Any) -> tuple[str, bool] | None:
    """(why, its process died) for a failed train_and_evaluate result, None for a success."""
    if isinstance(res, RayActorError):
        return death_line(res), True
    if isinstance(res, RayTaskError):
        cause = res.cause if getattr(res, "cause", None) is not None else res
        return f"{type(cause).__name__}: {str(cause).splitlines()[-1] if str(cause) else ''}", False
    if isinstance(res, dict) and res.get("failed"):
        return str(res.get("error", "failed")), False
    return None


def failures(results: Mapping[int, Any]) -> dict[int, tuple[str, bool]]:
    """{member: (why, its process died)} of the members whose interval failed."""
    return {m: f for m, res in results.items() if (f := failure(res)) is not None}
