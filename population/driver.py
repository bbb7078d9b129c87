"""The driver: a population of resident trainers on Ray, evolved round by round.

``run_search(setup)`` opens (or resumes) a run in the run store, starts one ``Member`` actor per
member and runs the round loop of the population's mode:

- ``sync`` (:func:`sync_rounds`): every member trains the same interval, then the whole
  population is judged and evolved at once — a barrier per round, bit-for-bit reproducible on CPU.
- ``async`` (:func:`async_events`): a member is judged alone as soon as it finishes its interval,
  against the others as they were last evaluated; nobody waits for a straggler.

Exploits move the donor's trainer state (weights, Adam moments, step, RNG) through the Ray object
store into the receiver's resident process; explore sets hyperparameters in place; architecture
genes change the model with the weights carried over. Every round (sync) or event (async) is
committed to the run store atomically: checkpoints first, then ``state.json`` naming them, so a
driver killed at any point resumes from its last commit. Randomness comes only from numpy
Generators seeded with ``(run seed, round | member, event)`` — never global RNGs.

Lineage (``lineage.jsonl``): one record per event, ``event`` one of born | exploit | explore |
crossover | restart | died, with round, member, parents, genome, changed (the readable diff
against the genome the weights came from), diff, step and fitness.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from evo.genome import Genome, diff, format_diff
from evo.space import SearchSpace
from evo.strategies import StrategyConfig, make_strategy
from evo.strategy import Crossover, Exploit, Keep, MemberView, Restart, Snapshot
from population.config import PopulationConfig, SearchSetup
from population.handoff import Handoff
from population.member import Member, split_genome, threads_for
from population.monitor import Monitor
from population.store import RunStore, StoreError
from trainers.data import DataConfig, load_corpus
from trainers.model import InternLM2Config
from trainers.trainer import TrainConfig

# Config keys a user may change when resuming a run: the budget (extend it), where it runs and
# how it is watched. Everything else must match the stored config.
RESUMABLE_KEYS = (
    "name", "storage", "population.total_steps", "population.resources", "population.max_failures",
    "population.max_concurrent",
    "logging", "data.cache_dir", "train.device", "train.num_threads", "train.compile",
)
POLL_S = 0.1            # ray.wait timeout: how quickly a signal is noticed
START_TIMEOUT_S = 600.0  # members that cannot be placed within this are an error, not a hang
STATE_VERSION = 1


class SearchError(RuntimeError):
    """The search cannot go on (too many member failures, members that never start); one line."""


class ConfigConflictError(ValueError):
    """Resuming with a config that conflicts with the stored run."""


class ResourceFitError(ValueError):
    """The population does not fit the cluster's resources."""


class _Stopped(Exception):
    """Raised inside the loop when SIGTERM/SIGINT arrived: stop without committing."""


# ----------------------------------------------------------------------------------------------
# What the driver knows of each member (committed in state.json)


@dataclass
class MemberRecord:
    """One member as committed: its genome, its evaluations and the schedule that produced it."""

    id: int
    genome: dict[str, Any]
    seed: int                    # the trainer's seed (init + batch order); kept on exploit
    step: int = 0
    history: list[list] = field(default_factory=list)    # [[step, val_bpb], ...] own evaluations
    objectives: dict[str, float] = field(default_factory=dict)   # val_bpb, params, tokens_per_s
    checkpoint: str | None = None                        # committed checkpoint (None: fresh init)
    parent: int | None = None                            # where the weights last came from
    # the hyperparameter schedule in effect: [{"step", "genome", "seed"}], inherited on exploit
    schedule: list[dict] = field(default_factory=list)
    alive: bool = True
    age: int = 0                 # rounds (sync) / intervals (async) since born or restart
    intervals: int = 0           # intervals trained (async: the member's own round counter)

    @property
    def fitness(self) -> float | None:
        return self.history[-1][1] if self.history else None

    def view(self) -> MemberView:
        return MemberView(id=self.id, genome=Genome.from_dict(self.genome),
                          history=tuple((int(s), float(f)) for s, f in self.history),
                          age=self.age, step=self.step, objectives=dict(self.objectives))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MemberRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _plain(x: Any) -> Any:
    """JSON-shaped copy (tuples -> lists), so records compare equal before and after a commit."""
    return json.loads(json.dumps(x))


def _member_seed(seed: int, member: int, *more: int) -> int:
    return int(np.random.SeedSequence([seed, member, *more]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Entry points


def resume_setup(storage: str, name: str) -> dict:
    """The stored resolved config of a run (the CLI rebuilds a SearchSetup from it)."""
    return RunStore(storage, name).read_config()


def run_search(setup: SearchSetup, *, console: Any = None) -> dict:
    """Run (or resume) the search described by ``setup``; returns the summary.

    The summary's ``status`` is "finished", or "stopped" when SIGTERM/SIGINT ended it (the last
    committed round stays; ``evo resume`` continues from it). Raises ResourceFitError before
    anything is written when the population cannot fit the cluster, ConfigConflictError when an
    existing run was made with a conflicting config, SearchError when members keep failing.
    """
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    started_ray = _init_ray()
    stop = _StopFlag()
    previous_handlers = stop.install()  # after ray.init, which installs its own SIGTERM handler
    search: _Search | None = None
    try:
        check_fit(setup.population, ray.nodes())
        store = RunStore(setup.storage, setup.name)
        with store.lock():
            search = _Search(setup, store, console, stop)
            done = search.open()
            if done is not None:
                return done
            try:
                search.start_members()
                if setup.population.mode == "sync":
                    sync_rounds(search)
                else:
                    async_events(search)
            except (_Stopped, KeyboardInterrupt):
                search.mark("stopped")
                search.monitor.close("stopped")
                console.print(f"{setup.name}: stopped by a signal; round {search.round} is the last committed")
                _write_report(store, console)
                return search.summary("stopped")
            except BaseException:
                search.flush_lineage()   # what led to the failure, for the post-mortem
                search.mark("failed")
                if search.monitor is not None:
                    search.monitor.close("failed")
                raise
            search.mark("finished")
            search.monitor.close("finished")
            summary = search.summary("finished")
            store.write_text("summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
            _write_report(store, console)
            best = summary["best"] or {}
            console.print(f"finished {setup.name} at round {search.round}: best member "
                          f"{best.get('member')} val_bpb {best.get('val_bpb', float('nan')):.4f}")
            return summary
    finally:
        if search is not None:
            search.close()
        stop.restore(previous_handlers)
        if started_ray:
            ray.shutdown()


def _write_report(store: RunStore, console: Any) -> None:
    """The run's HTML report (population/report.py); a report that fails never fails the search."""
    from population.report import write_report

    try:
        console.print(f"report: {write_report(store.storage, store.name)}")
    except Exception as e:  # noqa: BLE001 - plotting must not turn a finished search into a failure
        console.print(f"{store.name}: the report could not be written ({type(e).__name__}: {e})")


def _init_ray() -> bool:
    """Connect to Ray: RAY_ADDRESS (set under ``ray job submit``) or a fresh local instance.

    Token authentication stays as Ray sets it up. Nothing is uploaded: the package is installed
    in the environment the workers run in (and a job's working_dir reaches its actors anyway).
    Returns True when this call started Ray (the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    return address is None


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
# Resource fit


def check_fit(population: PopulationConfig, nodes: list[dict]) -> None:
    """Refuse (ResourceFitError) a population whose members cannot all be placed at once.

    Members pack per node: a node holds floor(CPU / num_cpus) members (and the same for GPUs).
    The message says what would fit instead: a smaller share per member, or fewer members.
    """
    res, size = population.resources, population.size
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", n.get("alive", False))]
    cpus = [float(r.get("CPU", 0.0)) for r in alive]
    gpus = [float(r.get("GPU", 0.0)) for r in alive]
    fits_cpu = _packs(cpus, res.num_cpus)
    fits_gpu = _packs(gpus, res.num_gpus) if res.num_gpus > 0 else fits_cpu
    fits = sum(min(_packs([c], res.num_cpus), _packs([g], res.num_gpus) if res.num_gpus > 0 else 10**9)
               for c, g in zip(cpus, gpus))
    if fits >= size:
        return
    want = f"{float(res.num_cpus)} CPU" + (f", {float(res.num_gpus)} GPU" if res.num_gpus > 0 else "")
    have = f"{sum(cpus)} CPUs" + (f", {sum(gpus)} GPUs" if res.num_gpus > 0 else "")
    options = []
    if fits_cpu < size:
        share = _largest_share(cpus, size)
        if share > 0:
            options.append(f"population.resources.num_cpus: {share}")
    if res.num_gpus > 0 and fits_gpu < size:
        share = _largest_share(gpus, size)
        options.append(f"population.resources.num_gpus: {share}")
    if fits >= 2:
        options.append(f"population.size: {fits}")
    advice = ": use " + " or ".join(options) if options else ""
    raise ResourceFitError(
        f"population of {size} members × {want} does not fit this cluster ({have}){advice}")


def _packs(capacities: list[float], share: float) -> int:
    """How many members of ``share`` fit on nodes of these capacities (Ray's 1e-4 granularity)."""
    return sum(int(math.floor(c / share + 1e-6)) for c in capacities)


def _largest_share(capacities: list[float], size: int) -> float:
    """The largest per-member share (2 decimals) with which ``size`` members fit; 0 if none."""
    best = 0.0
    for c in capacities:
        for k in range(1, size + 1):
            x = math.floor(c / k * 100) / 100
            if x > best and _packs(capacities, x) >= size:
                best = x
    return best


# ----------------------------------------------------------------------------------------------
# The loops


def sync_rounds(search: _Search) -> None:
    """Sync mode: every member trains the same interval, then the population evolves at once.

        round, steps = the last committed round (0, 0 for a new run)
        every member starts training n = min(interval_steps, total_steps - steps) steps
            (on the driver's slots: with fewer slots than members they take turns, see _Interval)
        while members are training:
            wait until every member has trained and evaluated        (signals handled here)
            round += 1;  steps += n
            a member that failed: "died", then a copy of the best with a resampled genome
            if steps < total_steps:
                decisions = strategy.plan(snapshot, rng([seed, round]))
                apply them: Exploit/Crossover -> receiver.load_state(donor.get_state()) through
                            the object store, then the new genome; Restart -> fresh trainer
            every member starts writing its checkpoint of this round (background thread)
            if steps < total_steps: every member starts training its next interval
            wait for the checkpoints; commit the round to state.json; prune old checkpoints
            tell the monitor (W&B, Optuna, Ray metrics); print the round's progress line

    No plan after the last interval: the final weights are the ones that were evaluated.
    """
    pop = search.pop
    r, steps = search.round, search.steps_done
    n = min(pop.interval_steps, pop.total_steps - steps)
    training = search.start_training(search.ids, n) if n > 0 else None
    while training:
        results = training.wait()
        r += 1
        steps += n
        search.handoff.keep_evaluated(results)
        search.record_results(results, r)
        search.replace_failed(results, r, event=r)
        if steps < pop.total_steps:
            decisions = search.strategy.plan(search.snapshot(r), search.rng(r))
            search.apply(decisions, r, event=r)
        search.start_checkpoints(search.ids, r)
        n = min(pop.interval_steps, pop.total_steps - steps)
        training = search.start_training(search.ids, n) if n > 0 else None
        search.finish_checkpoints(search.ids)
        search.commit(r, steps_done=steps, results=results)
        search.progress(r, steps)


def async_events(search: _Search) -> None:
    """Async mode: each member is judged alone as soon as it finishes its interval.

        every member below the budget starts its next interval (with fewer slots than members:
            a free slot goes to the idle member furthest behind)
        while members are training:
            m = the first member to finish                            (signals handled here)
            event += 1
            if m failed: "died", then a copy of the best with a resampled genome
            elif m is below the budget:
                [decision] = strategy.plan(snapshot, rng([seed, m, event]), ready=[m])
                apply it: a donor hands over its last evaluated snapshot even while it trains
            m starts writing its checkpoint; free slots start the next intervals
            wait for m's checkpoint; commit (round = events // size); prune old checkpoints

    A member is done when its step reaches total_steps. The committed ``round`` is the number of
    events divided by the population size (each member's own count is ``intervals``). A member
    that has already been judged 2x its share of rounds is no longer planned for, so the search
    always ends even if exploits keep taking members back to earlier steps.
    """
    pop = search.pop
    event = search.events
    training: dict[int, Any] = {}

    def fill_slots() -> None:   # free slots go to the idle members furthest behind
        idle = [m for m in search.ids if m not in training and search.next_interval(m) > 0]
        for m in sorted(idle, key=lambda m: (search.records[m].step, m))[:search.slots - len(training)]:
            training[m] = search.actors[m].train_and_evaluate.remote(search.next_interval(m))

    fill_slots()
    while training:
        m, result = search.first_done(training)
        del training[m]
        event += 1
        rec = search.records[m]
        search.handoff.keep_evaluated({m: result})
        search.record_results({m: result}, round=event // pop.size)
        failed = search.replace_failed({m: result}, event // pop.size, event=event)
        if not failed and rec.step < pop.total_steps and rec.intervals < 2 * pop.num_rounds:
            decisions = search.strategy.plan(search.snapshot(event // pop.size),
                                             search.rng(m, event), ready=[m])
            search.apply(decisions, event // pop.size, event=event)
        search.start_checkpoints([m], search.records[m].intervals)
        fill_slots()
        search.finish_checkpoints([m])
        search.commit(event // pop.size, events=event, results={m: result},
                      steps_done=min(r.step for r in search.records.values()))
        if event % pop.size == 0 or not training:
            search.progress(event // pop.size, min(r.step for r in search.records.values()))


def concurrent_slots(pop: PopulationConfig, cluster: Mapping[str, float]) -> int:
    """How many members train at the same moment: population.max_concurrent, else every member
    when they use GPUs (fractions of a GPU are made to be shared), else as many as the cluster's
    CPUs hold at one member's torch thread count (more would only time-slice the same cores)."""
    if pop.max_concurrent is not None:
        return min(pop.max_concurrent, pop.size)
    if pop.resources.num_gpus > 0:
        return pop.size
    per_member = threads_for(pop.resources.num_cpus)
    return max(1, min(pop.size, int(cluster.get("CPU", 0.0) // per_member)))


class _Interval:
    """One sync interval of ``n`` steps for each member, run on the driver's ``slots``.

    With a slot for every member, each trains its whole interval in one call. With fewer slots
    (4 CPU members on 2 cores) members take turns, and an interval is cut into parts
    (``Member.train_part``; ``train_and_evaluate`` trains the last part and evaluates) so that
    the slots finish the round together instead of idling behind the slowest member:

    - a free slot goes to the waiting member with the most work left (longest first); a member
      whose speed is not known yet goes first, with a probe part of n / PROBE_PARTS steps;
    - a part lasts about a quarter of each slot's share of the work left, so parts are long while
      much is left and shrink towards the end of the round (never below MIN_PART_S, never below
      one step).

    Training is a pure function of (seed, step), so how an interval is cut changes only when
    members train, never what they compute.
    """

    PROBE_PARTS = 5
    MIN_PART_S = 0.02

    def __init__(self, search: _Search, ids: list[int], n: int) -> None:
        self.search = search
        self.n = n
        self.left = {m: n for m in ids}          # steps not yet handed out
        self.running: dict[Any, tuple[int, int, float]] = {}   # ref -> (member, steps, started)
        self.results: dict[int, Any] = {}

    def _busy(self) -> set[int]:
        return {m for m, _, _ in self.running.values()}

    def _work(self, m: int) -> float:
        """Estimated seconds member m still needs this round (unknown speed: the mean known one)."""
        est = self.search.step_s
        known = [est[j] for j in self.left if j in est]
        t = est.get(m, statistics.mean(known) if known else 1.0)
        return self.left[m] * t + self.search.eval_s.get(m, 0.0)

    def _part(self, m: int, waiting: list[int], busy: set[int]) -> int:
        left, slots = self.left[m], self.search.slots
        if len(waiting) + len(busy) <= slots:
            return left                          # a slot for everyone: nothing to balance
        t = self.search.step_s.get(m)
        if t is None:
            return min(left, max(1, self.n // self.PROBE_PARTS))
        now = time.perf_counter()
        work = sum(self._work(j) for j in waiting)
        work += sum(max(0.0, started + k * self.search.step_s.get(j, 0.0) - now)
                    for j, k, started in self.running.values())
        target = max(work / (4 * slots), self.MIN_PART_S)
        return max(1, min(left, math.ceil(target / t)))

    def fill(self) -> None:
        """Hand free slots to waiting members."""
        actors, est = self.search.actors, self.search.step_s
        while len(self.running) < self.search.slots:
            busy = self._busy()
            waiting = [m for m, k in self.left.items() if k > 0 and m not in busy]
            if not waiting:
                return
            m = max(waiting, key=lambda j: (j not in est, self._work(j), -j))
            k = self._part(m, waiting, busy)
            self.left[m] -= k
            call = actors[m].train_and_evaluate if self.left[m] == 0 else actors[m].train_part
            self.running[call.remote(k)] = (m, k, time.perf_counter())

    def wait(self) -> dict[int, Any]:
        """{member: train_and_evaluate result (or its error)} once every member is done."""
        search = self.search
        while self.running:
            search.stop.check()
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=POLL_S, fetch_local=False)
            for ref in ready:
                m, k, _ = self.running.pop(ref)
                res = search._get(ref, raise_errors=False)
                if _failure(res) is not None:   # no more parts for it: the round judges the failure
                    self.left[m] = 0
                    self.results[m] = res
                    continue
                search.step_s[m] = res.get("part_seconds", res["seconds"]) / k
                if "eval_seconds" in res:       # its last part: the interval's result
                    search.eval_s[m] = res["eval_seconds"]
                    self.results[m] = res
            self.fill()
        return self.results


# ----------------------------------------------------------------------------------------------
# The search: members, records, store


class _Search:
    """The state of one driver session and the steps the loops are made of."""

    def __init__(self, setup: SearchSetup, store: RunStore, console: Any, stop: _StopFlag) -> None:
        self.setup = setup
        self.store = store
        self.console = console
        self.stop = stop
        self.pop = setup.population
        self.space = setup.space
        self.strategy = make_strategy(setup.strategy, setup.space)
        self.num_threads = threads_for(self.pop.resources.num_cpus)
        self.slots = self.pop.size    # members training at once: set from the cluster by start_members
        self.handoff = Handoff(self)
        self.step_s: dict[int, float] = {}   # member -> seconds per training step (its last part)
        self.eval_s: dict[int, float] = {}   # member -> seconds of its last evaluation + snapshot
        self.train = setup.train
        self.ids = list(range(self.pop.size))
        self.records: dict[int, MemberRecord] = {}
        self.actors: dict[int, Any] = {}
        self.round = 0
        self.steps_done = 0
        self.events = 0
        self.lineage_count = 0
        self.failures = 0
        self.exploit_latencies: list[float] = []
        self.compute_s = 0.0          # seconds members spent inside train_and_evaluate
        self.cpu_s = 0.0              # CPU seconds of the member processes inside train_and_evaluate
        self.wall_s = 0.0             # seconds of the round loop (all sessions)
        self.loop_start: float | None = None
        self.session_rounds = (0, 0.0)  # (round at loop start, time at loop start) for the ETA
        self.committed: dict | None = None
        self.pending_lineage: list[dict] = []
        self.monitor: Monitor | None = None
        self.bar: Any = None

    # -- open / resume -------------------------------------------------------------------------

    def open(self) -> dict | None:
        """Create the run or load its last commit; returns the summary of a finished run."""
        store, setup = self.store, self.setup
        if store.exists():
            conflict = config_conflict(setup.config, store.read_config())
            if conflict:
                raise ConfigConflictError(f"config conflicts with stored run '{setup.name}': {conflict}")
        state = store.read_state() if store.exists() else None
        if state is None:
            if not store.exists():
                store.create(setup.config)
            self._new_population()
            self.monitor = Monitor(setup, store, resumed=False)
            return None
        self._load(state)
        if state.get("status") == "finished" and self._budget_reached():
            self.console.print(f"run {setup.name!r} already finished at round {self.round}")
            return self.summary("finished")
        store.truncate_lineage(self.lineage_count)
        self.console.print(f"resuming from round {self.round} ({setup.name}, {state.get('status')})")
        self.monitor = Monitor(setup, store, resumed=True)
        return None

    def _new_population(self) -> None:
        """Sample the initial genomes (rng([seed, 0])), write "born" records, commit round 0."""
        setup = self.setup
        if self.train.decay_steps is None:   # the cosine horizon is the budget
            self.train = dataclasses.replace(self.train, decay_steps=self.pop.total_steps)
        self.store.truncate_lineage(0)
        rng = np.random.default_rng([setup.seed, 0])
        for m in self.ids:
            genome = _plain(self.space.sample(rng).as_dict())
            seed = _member_seed(setup.seed, m)
            self.records[m] = MemberRecord(id=m, genome=genome, seed=seed,
                                           schedule=[{"step": 0, "genome": genome, "seed": seed}])
            self._lineage("born", 0, m, parents=[], genome=genome, step=0, fitness=None, seed=seed)
        self.commit(0, steps_done=0)

    def _load(self, state: dict) -> None:
        self.round = int(state["round"])
        self.steps_done = int(state.get("steps_done", 0))
        self.events = int(state.get("events", 0))
        self.lineage_count = int(state["lineage_count"])
        self.failures = int(state.get("failures", 0))
        self.exploit_latencies = list(state.get("exploit_latencies", []))
        self.compute_s = float(state.get("timing", {}).get("member_compute_s", 0.0))
        self.cpu_s = float(state.get("timing", {}).get("member_cpu_s", 0.0))
        self.wall_s = float(state.get("timing", {}).get("wall_s", 0.0))
        self.records = {int(d["id"]): MemberRecord.from_dict(d) for d in state["members"]}
        self.ids = sorted(self.records)
        # the cosine horizon stays the one the members were trained with (extending the budget
        # on resume keeps the learning rate at its floor rather than jumping back up)
        self.train = dataclasses.replace(self.train, decay_steps=state.get("decay_steps", self.train.decay_steps))
        self.strategy.load_state_dict(state.get("strategy") or {})
        self.committed = state

    def _budget_reached(self) -> bool:
        if self.pop.mode == "sync":
            return self.steps_done >= self.pop.total_steps
        return all(r.step >= self.pop.total_steps for r in self.records.values())

    # -- members -------------------------------------------------------------------------------

    def start_members(self) -> None:
        """One actor per member; resumed members continue from their committed checkpoint."""
        load_corpus(self.setup.data)   # tokenize once here, not in every member at once
        self.slots = concurrent_slots(self.pop, ray.cluster_resources())
        for m in self.ids:
            self.actors[m] = self._new_actor(m)
        self.gather({m: a.pid.remote() for m, a in self.actors.items()}, timeout=START_TIMEOUT_S,
                    raise_errors=True)
        loads = {m: self.actors[m].load_checkpoint.remote(self.store.storage, self.store.name,
                                                           self.records[m].checkpoint)
                 for m in self.ids if self.records[m].checkpoint}
        self.gather(loads, raise_errors=True)
        self.monitor.start(self._member_dicts(), self.round)
        self.loop_start = time.perf_counter()
        self.session_rounds = (self.round, time.perf_counter())

    def _new_actor(self, m: int) -> Any:
        rec, res = self.records[m], self.pop.resources
        options = dict(name=f"{self.setup.name}/m{m}", num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                       max_concurrency=2, max_restarts=0)
        args = (m, self.setup.model, self.train, self.setup.data, rec.genome, rec.seed, self.num_threads)
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
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
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

    def next_interval(self, m: int) -> int:
        return min(self.pop.interval_steps, max(0, self.pop.total_steps - self.records[m].step))

    def start_training(self, ids: list[int], n: int) -> _Interval:
        """Every member of ``ids`` starts an interval of ``n`` steps on the driver's slots."""
        interval = _Interval(self, ids, n)
        interval.fill()
        return interval

    # -- waiting (signals are noticed within POLL_S) -------------------------------------------

    def done(self, refs: list) -> Iterator[tuple[Any, float]]:
        """Yield each ref as it completes, with the time it was seen complete."""
        pending = list(refs)
        while pending:
            self.stop.check()
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S, fetch_local=False)
            now = time.perf_counter()
            for ref in ready:
                yield ref, now

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
                out[by_ref[ref]] = self._get(ref, raise_errors)
        return out

    def first_done(self, refs: Mapping[int, Any]) -> tuple[int, Any]:
        by_ref = {ref: m for m, ref in refs.items()}
        for ref, _ in self.done(list(by_ref)):
            return by_ref[ref], self._get(ref, raise_errors=False)
        raise SearchError("no member is training")

    @staticmethod
    def _get(ref: Any, raise_errors: bool) -> Any:
        try:
            return ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            if raise_errors:
                raise
            return e

    # -- evaluation results --------------------------------------------------------------------

    def record_results(self, results: Mapping[int, Any], round: int) -> None:
        """History, step and objectives of each member that trained successfully."""
        for m, res in results.items():
            rec = self.records[m]
            rec.intervals += 1
            rec.age += 1
            if not isinstance(res, dict):
                continue
            self.compute_s += float(res.get("seconds", 0.0))
            self.cpu_s += float(res.get("cpu_seconds", 0.0))
            if res.get("failed"):
                continue
            rec.step = int(res["step"])
            rec.history.append([rec.step, res["val_bpb"]])
            rec.objectives = {"val_bpb": res["val_bpb"], "params": res["params"],
                              "tokens_per_s": res["tokens_per_s"]}

    def replace_failed(self, results: Mapping[int, Any], round: int, event: int) -> list[int]:
        """Members that diverged or whose actor died: a "died" record, then a copy of the best
        member's state with a resampled genome (a fresh trainer if no member is healthy).
        More than population.max_failures failures in a run is a SearchError."""
        failed = {m: _failure(res) for m, res in results.items() if _failure(res) is not None}
        if not failed:
            return []
        healthy = [self.records[m] for m in self.ids if m not in failed and self.records[m].history]
        best = min(healthy, key=lambda r: (r.fitness, r.id)) if healthy else None
        for m, (why, actor_died) in sorted(failed.items()):
            rec = self.records[m]
            self.failures += 1
            self._lineage("died", round, m, parents=[], genome=rec.genome, step=rec.step,
                          fitness=rec.fitness, error=why)
            if self.failures > self.pop.max_failures:
                raise SearchError(
                    f"member {m} failed ({why}): {self.failures} failures exceed "
                    f"population.max_failures ({self.pop.max_failures})")
            if actor_died:
                try:
                    ray.kill(self.actors[m], no_restart=True)
                except Exception:
                    pass
                self.actors[m] = self._new_actor(m)
                self.gather({m: self.actors[m].pid.remote()}, timeout=START_TIMEOUT_S, raise_errors=True)
            genome = _plain(self.space.sample(self.rng(round, m, 1 + self.failures)).as_dict())
            if best is not None:
                self._copy_into(m, best.id, genome, round, "restart", parents=[best.id])
                rec.history.append([rec.step, best.fitness])
                rec.objectives = dict(best.objectives)
            else:
                self._fresh(m, genome, _member_seed(self.setup.seed, m, event, 2), round, parents=[])
        return sorted(failed)

    # -- decisions -----------------------------------------------------------------------------

    def snapshot(self, round: int) -> Snapshot:
        return Snapshot(round=round, members=tuple(self.records[m].view() for m in self.ids))

    def rng(self, *keys: int) -> np.random.Generator:
        """The driver's only source of randomness: seeded by (run seed, *keys, strategy.seed)."""
        return np.random.default_rng([self.setup.seed, *keys, self.setup.strategy.seed])

    def apply(self, decisions: list, round: int, event: int) -> None:
        """Apply a plan: receivers load their donors' states (passed as ObjectRefs: the bytes go
        from donor to receiver through the object store, never through the driver), then genomes
        are set and trainers restarted. When a donor is a receiver too, every donor state is
        taken before any member changes."""
        before = {m: dataclasses.replace(r, schedule=list(r.schedule), genome=dict(r.genome))
                  for m, r in self.records.items()}
        sources = {}   # receiver -> member whose weights it takes
        for d in decisions:
            if isinstance(d, Exploit) and d.donor != d.member:
                sources[d.member] = d.donor
            elif isinstance(d, Crossover) and d.weights_from != d.member:
                sources[d.member] = d.weights_from
        loaded, latency = self.handoff.move(sources)
        for d in decisions:
            if not isinstance(d, Keep):
                self.handoff.forget(d.member)
        calls = {}
        for d in decisions:
            if isinstance(d, (Exploit, Crossover)):
                calls[d.member] = self.actors[d.member].apply_genome.remote(_plain(d.genome.as_dict()))
        applied = self.gather(calls, raise_errors=True)

        for d in decisions:
            m = d.member
            if isinstance(d, Keep):
                continue
            if isinstance(d, Restart):
                self._fresh(m, _plain(d.genome.as_dict()), _member_seed(self.setup.seed, m, event, 1),
                            round, parents=[])
                continue
            rec, genome = self.records[m], _plain(d.genome.as_dict())
            source = sources.get(m, m)
            src = before[source]
            step = loaded[m]["step"] if m in loaded else rec.step
            extra: dict[str, Any] = {}
            if isinstance(d, Exploit):
                event_name = "exploit" if source != m else "explore"
                parents = [source]
                extra["how"] = d.how
            else:
                event_name = "crossover"
                parents = list(d.parents)
                extra["weights_from"] = source
                extra["parent_genomes"] = [before[p].genome for p in d.parents]
            if m in latency:
                extra["latency_s"] = latency[m]
                extra["receiver_s"] = {k: loaded[m][k] for k in ("read_s", "load_s") if k in loaded[m]}
                self.exploit_latencies.append(latency[m])
            extra["parent_fitness"] = [before[p].fitness for p in parents]
            self._forget_speed(m, rec.genome, genome)
            rec.genome, rec.step = genome, step
            rec.schedule = _inherit(src.schedule, step, genome, rec.seed)
            if source != m:
                rec.parent = source
            rec.objectives = dict(rec.objectives, params=applied[m]["params"])
            self._lineage(event_name, round, m, parents=parents, genome=genome, step=step,
                          fitness=before[m].fitness, changed_from=src.genome, **extra)

    def _copy_into(self, m: int, donor: int, genome: dict, round: int, event_name: str,
                   parents: list[int]) -> None:
        """m takes donor's evaluated state (as an exploit does), then ``genome``."""
        loaded, latency = self.handoff.move({m: donor})
        loaded, latency = loaded[m], latency[m]
        applied = self.gather({m: self.actors[m].apply_genome.remote(genome)}, raise_errors=True)[m]
        rec, src = self.records[m], self.records[donor]
        self._forget_speed(m, rec.genome, genome)
        rec.genome, rec.step, rec.parent = genome, int(loaded["step"]), donor
        rec.schedule = _inherit(src.schedule, rec.step, genome, rec.seed)
        rec.objectives = dict(rec.objectives, params=applied["params"])
        self._lineage(event_name, round, m, parents=parents, genome=genome, step=rec.step,
                      fitness=src.fitness, changed_from=src.genome, latency_s=latency)

    def _fresh(self, m: int, genome: dict, seed: int, round: int, parents: list[int]) -> None:
        """m throws its weights away: a fresh trainer with ``genome`` and a new seed."""
        old = self.records[m]
        self.handoff.forget(m)
        self.gather({m: self.actors[m].restart.remote(genome, seed)}, raise_errors=True)
        self._forget_speed(m, old.genome, genome)
        self.records[m] = MemberRecord(id=m, genome=genome, seed=seed, checkpoint=old.checkpoint,
                                       intervals=old.intervals,
                                       schedule=[{"step": 0, "genome": genome, "seed": seed}])
        self._lineage("restart", round, m, parents=parents, genome=genome, step=0,
                      fitness=old.fitness, changed_from=old.genome, seed=seed)

    def _forget_speed(self, m: int, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        """A member whose architecture genes changed trains at another speed: _Interval probes it."""
        if split_genome(old)[1] != split_genome(new)[1]:
            self.step_s.pop(m, None)
            self.eval_s.pop(m, None)

    # -- commit ----------------------------------------------------------------------------------

    def start_checkpoints(self, ids: list[int], round: int) -> None:
        """Each member snapshots its state now and writes it in a background thread."""
        refs = {}
        for m in ids:
            path = self.store.checkpoint_path(m, round)
            self.records[m].checkpoint = path
            refs[m] = self.actors[m].save_checkpoint.remote(self.store.storage, self.store.name, path)
        saved = self.gather(refs, raise_errors=True)
        for m, info in saved.items():   # the snapshot saved is the state the record describes
            if info["step"] != self.records[m].step:
                raise SearchError(f"member {m}: checkpoint at step {info['step']}, "
                                  f"record at step {self.records[m].step}")

    def finish_checkpoints(self, ids: list[int]) -> None:
        self.gather({m: self.actors[m].wait_saved.remote() for m in ids}, raise_errors=True)

    def commit(self, round: int, steps_done: int, events: int | None = None,
               results: Mapping[int, Any] | None = None) -> None:
        """Append this round's lineage, commit state.json atomically, prune checkpoints, then
        hand the committed round to the monitor."""
        lineage, self.pending_lineage = self.pending_lineage, []
        if lineage:
            self.lineage_count = self.store.append_lineage(lineage)
        now = time.perf_counter()
        wall = self.wall_s + (now - self.loop_start if self.loop_start is not None else 0.0)
        self.round, self.steps_done = round, steps_done
        if events is not None:
            self.events = events
        state = {
            "version": STATE_VERSION,
            "name": self.setup.name,
            "status": "running",
            "mode": self.pop.mode,
            "round": round,
            "steps_done": steps_done,
            "events": self.events,
            "total_steps": self.pop.total_steps,
            "interval_steps": self.pop.interval_steps,
            "size": self.pop.size,
            "seed": self.setup.seed,
            "decay_steps": self.train.decay_steps,
            "num_threads": self.num_threads,
            "members": self._member_dicts(),
            "strategy": self.strategy.state_dict(),
            "lineage_count": self.lineage_count,
            "failures": self.failures,
            "exploit_latencies": self.exploit_latencies,
            "timing": {"member_compute_s": self.compute_s, "wall_s": wall, "slots": self.slots,
                       "member_cpu_s": self.cpu_s},
            "updated": time.time(),
        }
        self.store.commit_state(state)
        self.committed = state
        self.store.prune_checkpoints({r.checkpoint for r in self.records.values() if r.checkpoint})
        if self.monitor is not None:
            self.monitor.on_round(round, state["members"], lineage, dict(results or {}))

    def _member_dicts(self) -> list[dict]:
        return [_plain(dataclasses.asdict(self.records[m])) for m in self.ids]

    def flush_lineage(self) -> None:
        """Write the records of an uncommitted round (a resume drops them again)."""
        try:
            if self.pending_lineage:
                self.store.append_lineage(self.pending_lineage)
                self.pending_lineage = []
        except (StoreError, OSError):
            pass

    def mark(self, status: str) -> None:
        """Commit the last committed state again with ``status`` (never a half round)."""
        if self.committed is None:
            return
        try:
            self.store.commit_state(dict(self.committed, status=status, updated=time.time()))
            self.committed = dict(self.committed, status=status)
        except (StoreError, OSError):
            if status != "failed":
                raise

    # -- lineage, progress, summary ----------------------------------------------------------

    def _lineage(self, event: str, round: int, member: int, *, parents: list[int], genome: dict,
                 step: int, fitness: float | None, changed_from: dict | None = None, **extra: Any) -> None:
        record = {"event": event, "round": round, "member": member, "parents": parents,
                  "genome": genome, "step": step, "fitness": fitness, "time": time.time()}
        if changed_from is not None:
            a, b = Genome.from_dict(changed_from), Genome.from_dict(genome)
            record["changed"] = format_diff(a, b)
            record["diff"] = {p: list(v) for p, v in diff(a, b).items()}
        record.update(extra)
        self.pending_lineage.append(_plain(record))

    def best(self) -> MemberRecord | None:
        alive = [r for r in self.records.values() if r.alive and r.history]
        return min(alive, key=lambda r: (r.fitness, r.id)) if alive else None

    def progress(self, round: int, steps: int) -> None:
        pop = self.pop
        total_rounds = round + math.ceil(max(0, pop.total_steps - steps) / pop.interval_steps)
        fits = [r.fitness for r in self.records.values() if r.history]
        best = self.best()
        r0, t0 = self.session_rounds
        done = round - r0
        eta = (time.perf_counter() - t0) / done * (total_rounds - round) if done > 0 else None
        info = (f"step {steps}/{pop.total_steps}  best {best.fitness:.4f} (m{best.id})  "
                f"median {statistics.median(fits):.4f}  exploits {len(self.exploit_latencies)}"
                if best else "")
        if self.console.is_terminal:
            if self.bar is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                    console=self.console)
                self.bar.start()
                self._task = self.bar.add_task(f"{self.setup.name} rounds", total=total_rounds,
                                               completed=r0, info="")
            self.bar.update(self._task, completed=round, total=total_rounds, info=info)
        else:
            eta_text = f"  eta {_duration(eta)}" if eta is not None else ""
            self.console.print(f"round {round}/{total_rounds}  {info}{eta_text}", highlight=False, soft_wrap=True)

    def summary(self, status: str) -> dict:
        best = self.best()
        state = self.committed or {}
        timing = dict(state.get("timing", {}))
        if timing.get("wall_s"):
            timing["efficiency"] = timing["member_compute_s"] / (timing["wall_s"] * self.pop.size)
        lat = self.exploit_latencies
        return {
            "name": self.setup.name,
            "status": status,
            "mode": self.pop.mode,
            "round": self.round,
            "steps": self.steps_done,
            "total_steps": self.pop.total_steps,
            "best": None if best is None else {"member": best.id, "val_bpb": best.fitness,
                                               "genome": best.genome, "step": best.step},
            "members": [{"id": r.id, "step": r.step, "val_bpb": r.fitness, "genome": r.genome,
                         "parent": r.parent, "alive": r.alive} for r in self.records.values()],
            "exploits": len(lat),
            "failures": self.failures,
            "exploit_latency_s": {"count": len(lat), "median": statistics.median(lat) if lat else None},
            "timing": timing,
        }


def _failure(result: Any) -> tuple[str, bool] | None:
    """(why, actor died) for a failed train_and_evaluate result, None for a success."""
    if isinstance(result, RayActorError):
        return f"actor died: {str(result).splitlines()[0] if str(result) else type(result).__name__}", True
    if isinstance(result, RayTaskError):
        cause = result.cause if getattr(result, "cause", None) is not None else result
        return f"{type(cause).__name__}: {str(cause).splitlines()[-1] if str(cause) else ''}", False
    if isinstance(result, dict) and result.get("failed"):
        return str(result.get("error", "failed")), False
    return None


def _inherit(schedule: list[dict], step: int, genome: dict, seed: int) -> list[dict]:
    """The donor's schedule up to ``step``, then ``genome`` (with the receiver's seed) from ``step``."""
    out = [dict(e) for e in schedule if e["step"] <= step]
    if out and out[-1]["step"] == step:
        out.pop()
    return out + [{"step": step, "genome": genome, "seed": seed}]


def config_conflict(here: Mapping[str, Any], stored: Mapping[str, Any]) -> str | None:
    """The first difference between two resolved configs that a resume must refuse, or None.

    Keys in RESUMABLE_KEYS (and below them) may differ: e.g. population.total_steps extends
    the budget, logging.* changes how the run is watched.
    """
    a, b = _flatten(_plain(dict(here))), _flatten(_plain(dict(stored)))
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS):
            continue
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
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


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
