"""The driver: a population of resident trainers on Ray, evolved round by round.

``run_search(setup)`` opens (or resumes) a run in the run store, starts one ``Member`` actor per
member and runs the round loop of the population's mode:

- ``sync`` (:func:`sync_rounds`): every member trains the same interval, then the whole
  population is judged and evolved at once — a barrier per round, bit-for-bit reproducible on CPU.
- ``async`` (:func:`async_events`): a member is judged alone as soon as it finishes its interval,
  against the others as they were last evaluated; nobody waits for a straggler.

The loops are made of a few parts, each in its own file (:class:`Search` holds one of each):

- population/records.py — the members' records, the lineage, the commits of ``state.json``;
- population/members.py — the member actors: starting, replacing, calling and waiting for them;
- population/slots.py — where and when members train (fit on the cluster, slots, intervals);
- population/handoff.py — every member's state in Ray's object store: exploits, restores;
- population/decisions.py — the strategy's decisions applied, dead members restored, failed
  members replaced;
- population/progress.py and population/monitor.py — the progress line and the sinks.

Every round (sync) or event (async) is committed to the run store atomically: checkpoints
first, then ``state.json`` naming them, so a driver killed at any point resumes from its last
commit. Randomness comes only from numpy Generators seeded with ``(run seed, round | member,
event)`` — never global RNGs.
"""
from __future__ import annotations

import json
import signal
import threading
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import ray

from evo.strategies import make_strategy, ready_every
from evo.strategy import Strategy
from population.cluster import Cluster, ClusterError, connect
from population.config import SearchSetup
from population.decisions import apply_decisions, checkpoint_dead, finish_interval, replace_failed, restore_dead
from population.handoff import Handoff
from population.member import threads_for
from population.members import Members, SearchError, failure, failures
from population.monitor import Monitor
from population.progress import Progress
from population.records import Records, plain, settle_heap
from population.slots import ResourceFitError, Slots, check_fit
from population.store import RunStore

__all__ = ["ClusterError", "ConfigConflictError", "ResourceFitError", "SearchError", "Search", "async_events",
           "config_conflict", "resume_setup", "run_search", "sync_rounds"]

# Config keys a user may change when resuming a run: the budget (extend it), where it runs and
# how it is watched. Everything else must match the stored config.
RESUMABLE_KEYS = (
    "name", "storage", "population.total_steps", "population.resources", "population.max_failures",
    "population.max_concurrent",
    "logging", "data.cache_dir", "train.device", "train.num_threads", "train.compile",
)


class ConfigConflictError(ValueError):
    """Resuming with a config that conflicts with the stored run."""


class _Stopped(Exception):
    """Raised inside the loop when SIGTERM/SIGINT arrived: stop without committing."""


@dataclass
class Search:
    """One driver session: the parts the loops are made of."""

    setup: SearchSetup
    strategy: Strategy          # evo/: plans decisions from a snapshot of the population
    records: Records            # the members' records, lineage, commits
    members: Members            # the member actors
    slots: Slots                # who trains when
    handoff: Handoff            # exploits through the object store
    progress: Progress          # the progress line
    monitor: Monitor | None = None   # W&B, Optuna, Ray metrics (made once the members are launched)

    @classmethod
    def build(cls, setup: SearchSetup, store: RunStore, console: Any, stop: _StopFlag) -> Search:
        strategy = make_strategy(dataclasses.replace(setup.strategy, ready_intervals=judged_every(setup)), setup.space)
        num_threads = threads_for(setup.population.resources.num_cpus)
        records = Records(setup, store, strategy, num_threads)
        members = Members(setup, store, num_threads, stop)
        return cls(setup=setup, strategy=strategy, records=records, members=members,
                   slots=Slots(setup.population, members), handoff=Handoff(members),
                   progress=Progress(setup.name, records, console))

    def rng(self, *keys: int) -> np.random.Generator:
        """The driver's only source of randomness: seeded by (run seed, *keys, strategy.seed)."""
        return np.random.default_rng([self.setup.seed, *keys, self.setup.strategy.seed])

    def close(self) -> None:
        self.progress.close()
        self.members.close()


# ----------------------------------------------------------------------------------------------
# Entry points


def resume_setup(storage: str, name: str) -> dict:
    """The stored resolved config of a run (the CLI rebuilds a SearchSetup from it)."""
    return RunStore(storage, name).read_config()


def judged_every(setup: SearchSetup) -> int:
    """Intervals between two judgements of a member (`strategy.ready_intervals`, 'auto' resolved
    from the run's intervals per member)."""
    return ready_every(setup.strategy, setup.population.total_steps // setup.population.interval_steps)


def run_search(setup: SearchSetup, *, console: Any = None) -> dict:
    """Run (or resume) the search described by ``setup``; returns the summary.

    The summary's ``status`` is "finished", or "stopped" when SIGTERM/SIGINT ended it (the last
    committed round stays; ``evo resume`` continues from it). Before Ray starts it takes the
    run's lock: RunLockedError when another live driver holds it, StorageUnusableError when the
    storage cannot be written. Raises ClusterError when Ray cannot be reached
    (population/cluster.py), ResourceFitError before anything is written when the population
    cannot fit the cluster, ConfigConflictError when an existing run was made with a conflicting
    config, SearchError when members keep failing.
    """
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    stop = _StopFlag()
    previous_handlers = stop.install()   # a signal while connecting to Ray stops the run too
    store = RunStore(setup.storage, setup.name)
    cluster: Cluster | None = None
    search: Search | None = None
    closing: _Closing | None = None   # the members and Ray shut down while the report is written
    try:
        # The lock (and with it the storage) before Ray: a second driver on a live run, or a
        # storage that cannot be written, is refused before any Ray process starts.
        with store.lock():
            cluster = connect(console, stopping=lambda: stop.signum is not None,
                              dashboard=setup.logging.ray_dashboard)
            stop.install()   # again: ray.init replaced the SIGTERM handler with its own
            check_fit(setup.population, ray.nodes())
            if store.exists():
                conflict = config_conflict(setup.config, store.read_config())
                if conflict:
                    raise ConfigConflictError(f"config conflicts with stored run '{setup.name}': {conflict}")
            search = Search.build(setup, store, console, stop)
            records = search.records
            opened = records.open()
            for note in records.notes:   # a damaged commit skipped for an older one
                console.print(f"warning: {note}", markup=False, highlight=False, soft_wrap=True)
            if opened == "finished":
                console.print(f"run {setup.name!r} already finished at round {records.round}")
                return records.summary("finished")
            if opened == "resumed":
                console.print(f"resuming from round {records.round} ({setup.name}, "
                              f"{records.committed.get('status')})")
            every = search.strategy.config.ready_intervals
            if every > 1 and setup.strategy.ready_intervals == "auto":
                console.print(f"{setup.name}: each member is judged every {every} intervals "
                              f"({every * setup.population.interval_steps} steps; strategy.ready_intervals: auto)")
            try:
                slots = search.slots.start(ray.cluster_resources())
                # the members' processes start (worker, torch, trainer) while the sinks are built
                # and opened (W&B's runs, the Optuna study): about 2 s of the driver's own work
                search.members.launch(records.members, records.train)
                search.monitor = Monitor(setup, store, resumed=opened == "resumed")
                search.monitor.start(records.member_dicts(), records.round)
                search.members.wait_started()
                records.start_clock(slots)   # the loop's wall time starts once members are up
                search.progress.start()
                if setup.population.mode == "sync":
                    sync_rounds(search)
                else:
                    async_events(search)
            except (_Stopped, KeyboardInterrupt):
                records.mark("stopped")
                if search.monitor is not None:   # None: stopped while the members were being created
                    search.monitor.close("stopped")
                console.print(f"{setup.name}: stopped by a signal; round {records.round} is the last committed")
                closing = _close_while(search, cluster)
                _write_report(store, console)
                return records.summary("stopped")
            except BaseException:
                records.flush_lineage()   # what led to the failure, for the post-mortem
                records.mark("failed")
                if search.monitor is not None:
                    search.monitor.close("failed")
                raise
            records.mark("finished")
            search.monitor.close("finished")
            summary = records.summary("finished")
            store.write_text("summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
            closing = _close_while(search, cluster)
            _write_report(store, console)
            best = summary["best"] or {}
            console.print(f"finished {setup.name} at round {records.round}: best member "
                          f"{best.get('member')} val_bpb {best.get('val_bpb', float('nan')):.4f}")
            return summary
    finally:
        if closing is not None:
            closing.join()
        else:
            _close(search, cluster)
        stop.restore(previous_handlers)


# ----------------------------------------------------------------------------------------------
# The loops


def sync_rounds(s: Search) -> None:
    """Sync mode: every member trains the same interval, then the population evolves at once.

        round, steps = the last committed round (0, 0 for a new run)
        every member publishes its state (the object store keeps it: exploits, restores)
        every member starts training n = min(interval_steps, total_steps - steps) steps
            (on the driver's slots: with fewer slots than members they take turns)
        while members are training:
            wait until every member has trained and evaluated        (signals handled here)
                a member whose process died is restored from its own state (a new process)
                and trains the interval again; the round waits for it
            round += 1;  steps += n
            keep each evaluated member's state reference (in the object store)
            record the results: history, step, objectives
            a member that diverged: "died", then a copy of the best member with a resampled
                genome
            if steps < total_steps:
                decisions = strategy.plan(snapshot, rng([seed, round]))
                apply them: Exploit/Crossover -> the receiver loads the donor's state from the
                            object store, then takes its new genome; Restart -> fresh trainer
            members that died meanwhile: restored from their own state
            every member starts writing its checkpoint of this round (background thread)
            if steps < total_steps: every member starts training its next interval
            wait for the checkpoints (a member that died: restored, its checkpoint written
                again); commit the round to state.json; prune old checkpoints
            tell the monitor (W&B, Optuna, Ray metrics); print the round's progress line
            settle the heap: the round's young garbage collected, the survivors frozen

    No plan after the last interval: the final weights are the ones that were evaluated.
    """
    pop, ids = s.setup.population, s.records.ids
    r, steps = s.records.round, s.records.steps_done
    s.handoff.refresh(ids)
    restore_dead(s, r)
    n = min(pop.interval_steps, pop.total_steps - steps)
    started = dict(s.members.generation)
    training = s.slots.start_interval(ids, n) if n > 0 else None
    while training:
        results = finish_interval(s, training, r, steps + n, started)
        r += 1
        steps += n
        s.handoff.keep_evaluated(results)
        s.records.record_results(results)
        print_eval_failures(s, results)
        replace_failed(s, failures(results), r, event=r)
        if steps < pop.total_steps:
            decisions = s.strategy.plan(s.records.snapshot(r), s.rng(r))
            apply_decisions(s, decisions, r, event=r)
        restore_dead(s, r)
        s.members.start_checkpoints(s.records.set_checkpoints(ids, r))
        n = min(pop.interval_steps, pop.total_steps - steps)
        started = dict(s.members.generation)
        training = s.slots.start_interval(ids, n) if n > 0 else None
        s.records.saved(s.members.finish_checkpoints(ids))
        checkpoint_dead(s, r, lambda m: r)
        members, lineage = s.records.commit(r, steps_done=steps)
        s.monitor.on_round(r, members, lineage, results)
        s.progress.update(r, steps)
        settle_heap()


def print_eval_failures(s: Search, results: Mapping[int, Any]) -> None:
    """One line per member whose fitness.function failed in this evaluation (it goes on; the
    line is also kept in the state's eval_failures)."""
    for m, res in sorted(results.items()):
        if isinstance(res, dict) and res.get("score_error"):
            s.progress.console.print(f"{s.setup.name}: member {m} at step {res.get('step')}: {res['score_error']}",
                                     markup=False, highlight=False, soft_wrap=True)


def async_events(s: Search) -> None:
    """Async mode: each member is judged alone as soon as it finishes its interval.

        every member below the budget starts its next interval (with fewer slots than members:
            a free slot goes to the idle member furthest behind)
        while members are training:
            m = the first member to finish                            (signals handled here)
            if m's process died: m is restored from its own state (a new process) and
                starts the interval again; no event
            event += 1;  round = event // size
            keep m's evaluated state reference; record its result
            if m diverged: "died", then a copy of the best member with a resampled genome
            elif m is below the budget:
                [decision] = strategy.plan(snapshot, rng([seed, m, event]), ready=[m])
                apply it: a donor's current state is read from the object store (the donor
                is not called: it may be training)
            m starts writing its checkpoint; free slots start the next intervals
            wait for m's checkpoint (if m died: restored, written again); commit; prune old
            checkpoints; tell the monitor

    A member is done when its step reaches total_steps. The committed ``round`` is the number of
    events divided by the population size (each member's own count is ``intervals``). A member
    that has already been judged 2x its share of rounds is no longer planned for, so the search
    always ends even if exploits keep taking members back to earlier steps.
    """
    pop, ids = s.setup.population, s.records.ids
    event = s.records.events
    training: dict[int, Any] = {}

    def next_interval(m: int) -> int:
        return min(pop.interval_steps, max(0, pop.total_steps - s.records[m].step))

    def fill_slots() -> None:   # free slots go to the idle members furthest behind
        idle = [m for m in ids if m not in training and next_interval(m) > 0]
        for m in sorted(idle, key=lambda m: (s.records[m].step, m))[:s.slots.count - len(training)]:
            training[m] = s.members.train_and_evaluate(m, next_interval(m))

    s.handoff.refresh(ids)
    restore_dead(s, event // pop.size)
    fill_slots()
    while training:
        m, result = s.members.first_done(training)
        del training[m]
        if (f := failure(result)) is not None and f[1]:   # its process died
            s.members.note_dead(m, result)
            restore_dead(s, event // pop.size)
            fill_slots()
            continue
        event += 1
        r = event // pop.size
        s.handoff.keep_evaluated({m: result})
        s.records.record_results({m: result})
        print_eval_failures(s, {m: result})
        failed = failures({m: result})
        replace_failed(s, failed, r, event=event)
        rec = s.records[m]
        if not failed and rec.step < pop.total_steps and rec.intervals < 2 * pop.num_rounds:
            decisions = s.strategy.plan(s.records.snapshot(r), s.rng(m, event), ready=[m])
            apply_decisions(s, decisions, r, event=event)
        restore_dead(s, r)
        s.members.start_checkpoints(s.records.set_checkpoints([m], s.records[m].intervals))
        fill_slots()
        s.records.saved(s.members.finish_checkpoints([m]))
        checkpoint_dead(s, r, lambda j: s.records[j].intervals)
        steps = min(x.step for x in s.records.members.values())
        members, lineage = s.records.commit(r, steps_done=steps, events=event)
        s.monitor.on_round(r, members, lineage, {m: result})
        settle_heap()
        if event % pop.size == 0 or not training:
            s.progress.update(r, steps)


# ----------------------------------------------------------------------------------------------
# Signals, the report


def _close(search: Search | None, cluster: Cluster | None) -> None:
    """Kill the members, then shut down the Ray this driver started (if it did)."""
    try:
        if search is not None:
            search.close()
    finally:
        if cluster is not None:
            cluster.close()


class _Closing(threading.Thread):
    """``_close`` in a thread: Ray's shutdown (about a second of waiting for its processes to
    exit, one after another) runs while the report is drawn, which needs no Ray. ``join`` waits
    for it and raises what it raised."""

    def __init__(self, search: Search | None, cluster: Cluster | None) -> None:
        super().__init__(name="evo-close", daemon=True)
        self._args = (search, cluster)
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            _close(*self._args)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by join
            self._error = e

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _close_while(search: Search, cluster: Cluster | None) -> _Closing:
    """Start closing the session in the background (the run is committed: nothing left needs Ray)."""
    search.progress.close()   # the progress line is the console's: closed here, before the report prints
    closing = _Closing(search, cluster)
    closing.start()
    return closing


def _write_report(store: RunStore, console: Any) -> None:
    """The run's HTML report (population/report.py); a report that fails never fails the search."""
    from population.report import write_report

    try:
        console.print(f"report: {write_report(store.storage, store.name)}")
    except Exception as e:  # noqa: BLE001 - plotting must not turn a finished search into a failure
        console.print(f"{store.name}: the report could not be written ({type(e).__name__}: {e})")


class _StopFlag:
    """SIGTERM / SIGINT handler: note the signal; the loop stops at its next wait.

    ``ray job stop`` sends SIGTERM, then SIGKILL 3 s later, so the loop polls every POLL_S. A
    second signal while stopping raises KeyboardInterrupt at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return previous

    def restore(self, previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def check(self) -> None:
        if self.signum is not None:
            raise _Stopped(signal.Signals(self.signum).name)


# ----------------------------------------------------------------------------------------------
# Resume


def config_conflict(here: Mapping[str, Any], stored: Mapping[str, Any]) -> str | None:
    """The first difference between two resolved configs that a resume must refuse, or None.

    Keys in RESUMABLE_KEYS (and below them) may differ: e.g. population.total_steps extends
    the budget, logging.* changes how the run is watched.
    """
    a, b = _flatten(plain(dict(here))), _flatten(plain(dict(stored)))
    if a.get("population.trainer.kind") == "internlm2" and not any(k.startswith("population.trainer.") for k in b):
        # a run made before population.trainer existed trained the InternLM2 model
        b.update({k: v for k, v in a.items() if k.startswith("population.trainer.")})
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS):
            continue
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va is None and vb is _ABSENT:
            continue   # a key the schema gained after the run was made, at its null default (fitness.eval)
        if va != vb:   # 1 == 1.0: YAML may write a float field as an int
            here_text = "absent here" if va is _ABSENT else f"{va!r} here"
            run_text = "absent in the run" if vb is _ABSENT else f"{vb!r} in the run"
            return f"{key} is {here_text} but {run_text}"
    return None


_ABSENT = object()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}
