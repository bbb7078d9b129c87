"""Where and when members train: the population's fit on the cluster, and the driver's slots.

``check_fit`` refuses, before anything is written, a population whose members cannot all be
placed at once. ``concurrent_slots`` says how many members train at the same moment, and
``Slots`` hands those slots out: with fewer slots than members (4 CPU members on 2 cores) the
members take turns, and a sync interval is cut into parts (:class:`Interval`) so that the slots
finish the round together. Training is a pure function of (seed, step), so the slots change
when members train, never what they compute.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Mapping

from population.config import PopulationConfig
from population.member import split_genome, threads_for
from population.members import Members, failure, result


class ResourceFitError(ValueError):
    """The population does not fit the cluster's resources."""


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
    """The largest per-member share (2 decimals) with which ``size`` members fit; 0 if none.

    Fewer members fit as the share grows, so a bisection over the hundredths finds it in
    O(nodes · log(capacity)) whatever the size."""
    lo, hi = 0, int(math.floor(max(capacities, default=0.0) * 100))   # in hundredths
    while lo < hi:   # invariant: lo == 0 or lo/100 fits
        mid = (lo + hi + 1) // 2
        if _packs(capacities, mid / 100) >= size:
            lo = mid
        else:
            hi = mid - 1
    return lo / 100


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


class Slots:
    """The driver's slots and each member's measured speed (what Interval plans parts with)."""

    def __init__(self, pop: PopulationConfig, members: Members) -> None:
        self.pop = pop
        self.members = members
        self.count = pop.size                  # set from the cluster by start
        self.step_s: dict[int, float] = {}     # member -> seconds per training step (its last part)
        self.eval_s: dict[int, float] = {}     # member -> seconds of its last evaluation + snapshot

    def start(self, cluster: Mapping[str, float]) -> int:
        """Size the slots for ``cluster`` (ray.cluster_resources()); returns their number."""
        self.count = concurrent_slots(self.pop, cluster)
        return self.count

    def start_interval(self, ids: list[int], n: int) -> Interval:
        """Every member of ``ids`` starts an interval of ``n`` steps on the slots."""
        interval = Interval(self, ids, n)
        interval.fill()
        return interval

    def forget_speed(self, m: int, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        """A member whose architecture genes changed trains at another speed: probe it again."""
        if split_genome(old)[1] != split_genome(new)[1]:
            self.step_s.pop(m, None)
            self.eval_s.pop(m, None)


class Interval:
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

    def __init__(self, slots: Slots, ids: list[int], n: int) -> None:
        self.slots = slots
        self.n = n
        self.left = {m: n for m in ids}          # steps not yet handed out
        self.running: dict[Any, tuple[int, int, float]] = {}   # ref -> (member, steps, started)
        self.results: dict[int, Any] = {}

    def _busy(self) -> set[int]:
        return {m for m, _, _ in self.running.values()}

    def _work(self, m: int) -> float:
        """Estimated seconds member m still needs this round (unknown speed: the mean known one)."""
        est = self.slots.step_s
        known = [est[j] for j in self.left if j in est]
        t = est.get(m, statistics.mean(known) if known else 1.0)
        return self.left[m] * t + self.slots.eval_s.get(m, 0.0)

    def _part(self, m: int, waiting: list[int], busy: set[int]) -> int:
        left, slots = self.left[m], self.slots.count
        if len(waiting) + len(busy) <= slots:
            return left                          # a slot for everyone: nothing to balance
        t = self.slots.step_s.get(m)
        if t is None:
            return min(left, max(1, self.n // self.PROBE_PARTS))
        now = time.perf_counter()
        work = sum(self._work(j) for j in waiting)
        work += sum(max(0.0, started + k * self.slots.step_s.get(j, 0.0) - now)
                    for j, k, started in self.running.values())
        target = max(work / (4 * slots), self.MIN_PART_S)
        return max(1, min(left, math.ceil(target / t)))

    def fill(self) -> None:
        """Hand free slots to waiting members."""
        actors, est = self.slots.members.actors, self.slots.step_s
        while len(self.running) < self.slots.count:
            busy = self._busy()
            waiting = [m for m, k in self.left.items() if k > 0 and m not in busy]
            if not waiting:
                return
            m = max(waiting, key=lambda j: (j not in est, self._work(j), -j))
            k = self._part(m, waiting, busy)
            self.left[m] -= k
            ref = (self.slots.members.train_and_evaluate(m, k) if self.left[m] == 0
                   else actors[m].train_part.remote(k))
            self.running[ref] = (m, k, time.perf_counter())

    def wait(self) -> dict[int, Any]:
        """{member: train_and_evaluate result (or its error)} once every member is done."""
        slots = self.slots
        while self.running:
            ref, _ = slots.members.next_done(list(self.running))
            m, k, _ = self.running.pop(ref)
            res = result(ref, raise_errors=False)
            if failure(res) is not None:   # no more parts for it: the round judges the failure
                self.left[m] = 0
                self.results[m] = res
            else:
                slots.step_s[m] = res.get("part_seconds", res["seconds"]) / k
                if "eval_seconds" in res:       # its last part: the interval's result
                    slots.eval_s[m] = res["eval_seconds"]
                    self.results[m] = res
            self.fill()
        return self.results
