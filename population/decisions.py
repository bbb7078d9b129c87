"""What the loops do with a judged population: apply the strategy's decisions, restore the members
whose process died, replace the members that failed.

- :func:`apply_decisions`: Exploit / Crossover — the receiver becomes a copy of the donor
  (population/handoff.py), then takes its new genome (a merge crossover first blends in the other
  parent's weights, or, for parents of two shapes, takes each layer from one parent); an Exploit of a member by itself is an
  explore (new hyperparameters in place); Restart — a fresh trainer; Keep — nothing. A member
  whose process dies while its decision is applied keeps its own state: the decision is dropped.
- :func:`restore_dead`: a member whose process died (SIGKILL, OOM kill, a lost node: the
  ``restored`` record says which, "process died …" or "node lost: node <id> at <ip> …") gets a new
  process with its *own* state — the state its record describes, kept in Ray's object store by
  the driver (:attr:`Handoff.current`), else its last committed checkpoint (the record set back
  to that commit) — and the loop trains the lost steps again. Only when neither exists is it
  re-cloned from a donor. These are the platform's faults: they never count as failures. A
  member that dies MAX_DEATHS_ON_STATE times on the same state is given up (one line), as a
  failure: a copy of the best member with a resampled genome.
- :func:`replace_failed`: a member that diverged (non-finite loss) gets a "died" record, then
  becomes a copy of the best healthy member with a resampled genome (a fresh trainer when no
  member is healthy). More than population.max_failures failures in a run end the search, with
  a line naming the gene that likely made the population diverge (:func:`likely_cause`).

Each change is written to the member's record and to the lineage (population/records.py).
"""
from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from evo.space import FloatGene, IntGene, SearchSpace
from evo.strategy import Crossover, Exploit, Keep, Restart
from population.members import SearchError, failure
from population.records import member_seed, plain
from trainers.architecture import unit_of

if TYPE_CHECKING:
    from population.driver import Search
    from population.records import MemberRecord, Records
    from population.slots import Interval

MAX_DEATHS_ON_STATE = 3   # deaths of one member on one state before that state is given up


def apply_decisions(s: Search, decisions: list, round: int, event: int) -> None:
    """Apply a plan. Receivers first load their donors' states (every donor's state as it was
    judged, whatever changes meanwhile), then genomes are set and trainers restarted; each
    changed member publishes its new state; then the records and the lineage say what happened.

    A member whose process dies on the way is not recorded as changed: it is restored to its
    own state and its decision applied again, so a fault does not change the search. A receiver
    whose donor's state was lost (the donor's node) keeps its own state.
    """
    pending = [d for d in decisions if not isinstance(d, Keep)]
    before = records_before(s.records, pending)
    states = dict(s.handoff.current)
    while pending:
        died = _apply(s, pending, before, states, round, event)
        outcome = restore_dead(s, round)
        pending = [d for d in died if outcome.get(d.member) == "restored"]


def _apply(s: Search, decisions: list, before: Mapping[int, Any], states: Mapping[int, Any],
           round: int, event: int) -> list:
    """One pass of apply_decisions; returns the decisions whose member died on the way."""
    sources = {}   # receiver -> member whose weights it takes
    for d in decisions:
        if isinstance(d, Exploit) and d.donor != d.member:
            sources[d.member] = d.donor
        elif isinstance(d, Crossover) and d.weights_from != d.member:
            sources[d.member] = d.weights_from
    loaded, latency = s.handoff.move(sources, states)
    live = [d for d in decisions if d.member not in s.members.dead
            and (d.member not in sources or d.member in loaded)]
    for d in live:
        if isinstance(d, Restart):
            fresh(s, d.member, plain(d.genome.as_dict()), member_seed(s.setup.seed, d.member, event, 1),
                  round, parents=[])
    merges = {d.member: (d, d.parents[1] if d.parents[0] == d.weights_from else d.parents[0])
              for d in live if isinstance(d, Crossover) and d.alpha is not None}
    inherited: dict[int, dict] = {}
    if merges:   # merge crossover: the receiver holds weights_from's state; blend in the other parent's,
        # or (parents of two shapes) take each layer from one of them (0: its own, 1: the other's)
        shrink = s.setup.strategy.merge_shrink
        inherited = s.members.call({
            m: s.members[m].inherit_layers.remote(
                [states[other]], plain(d.genome.as_dict()),
                {u: None if p is None else int(p != d.weights_from) for u, p in d.layers.items()}, shrink)
            if d.layers is not None else s.members[m].merge.remote([states[other]], d.alpha)
            for m, (d, other) in merges.items()})
        live = [d for d in live if d.member not in s.members.dead]
    applied = s.members.call({d.member: s.members[d.member].apply_genome.remote(plain(d.genome.as_dict()))
                              for d in live if isinstance(d, (Exploit, Crossover))})
    published = s.handoff.refresh(applied)

    for d in live:
        m = d.member
        if isinstance(d, Restart) or m not in published:
            continue
        source = sources.get(m, m)
        s.slots.forget_speed(m, s.records[m].genome, plain(d.genome.as_dict()))
        record_applied(s.records, d, before, source, round,
                       step=loaded[m]["step"] if m in loaded else s.records[m].step,
                       params=applied[m]["params"], latency=latency.get(m), received=loaded.get(m),
                       val_loss_jump=applied[m].get("val_loss_jump"),
                       perturbed=inherited.get(m, {}).get("perturbed"))
    return [d for d in decisions if d.member in s.members.dead]


def records_before(records: Records, decisions: Sequence) -> dict[int, MemberRecord]:
    """Copies of the records a plan reads while it is applied (receivers, donors, parents), as
    they were judged: only those, not the whole population's."""
    ids = set()
    for d in decisions:
        ids.add(d.member)
        if isinstance(d, Exploit):
            ids.add(d.donor)
        elif isinstance(d, Crossover):
            ids.update((*d.parents, d.weights_from))
    return {m: r.copy() for m in sorted(ids) if (r := records.members.get(m)) is not None}


def record_applied(records: Records, d: Exploit | Crossover, before: Mapping[int, MemberRecord], source: int,
                   round: int, step: int, params: int, latency: float | None = None,
                   received: Mapping[str, Any] | None = None,
                   val_loss_jump: float | None = None, perturbed: Sequence[str] | None = None) -> None:
    """The records' side of an Exploit / Crossover that was applied: member ``d.member`` now runs
    ``d.genome`` on the weights of ``source`` (itself for an explore) at ``step``, with ``params``
    parameters; its record takes ``source``'s schedule and a lineage record says what happened
    (``latency``, ``received``: the exploit's seconds and what the receiver reported;
    ``val_loss_jump``: a lossy architecture change's jump in validation loss, measured at the change;
    ``perturbed``: a layer-wise merge's shrunk-and-perturbed tensors, recorded by unit)."""
    m = d.member
    genome = records.genome_dict(d.genome)
    src = before[source]
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
        if d.alpha is not None:          # weights = alpha * weights_from's + (1 - alpha) * the other's
            extra["alpha"] = d.alpha
        if d.layers is not None:         # layer-wise: each unit of the child from one parent (None: new)
            extra["layers"] = dict(d.layers)
            extra["perturbed"] = sorted({unit_of(n) for n in perturbed or ()}, key=list(d.layers).index)
    if latency is not None:
        extra["latency_s"] = latency
        extra["receiver_s"] = {k: received[k] for k in ("read_s", "load_s") if k in (received or {})}
        records.exploit_latencies.append(latency)
    extra["parent_fitness"] = [before[p].fitness for p in parents]
    if val_loss_jump is not None:
        extra["val_loss_jump"] = val_loss_jump
    records.took_weights(m, src, genome, step, params,
                         merged=isinstance(d, Crossover) and d.alpha is not None)
    records.lineage(event_name, round, m, parents=parents, genome=genome, step=step,
                    fitness=before[m].fitness, changed_from=src.genome, **extra)


def restore_dead(s: Search, round: int) -> dict[int, str]:
    """Every member in ``s.members.dead`` gets a new process with its own state (see the module
    docstring); returns {member: "restored" | "replaced"}. The record says the step it is back
    at: the loop trains the steps lost since."""
    handled: dict[int, str] = {}
    while s.members.dead:
        m, why = min(s.members.dead.items())
        handled[m] = "replaced"
        rec = s.records[m]
        deaths = s.records.deaths_on_state[m] = s.records.deaths_on_state.get(m, 0) + 1
        if deaths > 2 * MAX_DEATHS_ON_STATE:   # even new processes die at once: nothing to restore on
            raise SearchError(f"member {m} died {deaths} times in a row ({why}): the cluster "
                              f"cannot keep its process alive (see `ray status` and the Ray logs)")
        if deaths >= MAX_DEATHS_ON_STATE:
            s.progress.console.print(
                f"{s.setup.name}: member {m} died {deaths} times on its state at step {rec.step} "
                f"(last: {why}): that state is given up; the member continues as a copy of another")
            s.members.revive(m, rec.genome, rec.seed)
            if m not in s.members.dead:
                _replace(s, m, f"given up: died {deaths} times on its state at step {rec.step} ({why})",
                         round, event=round, counts=True)
            continue
        s.members.revive(m, rec.genome, rec.seed)
        if m in s.members.dead:
            continue
        source = _load_own_state(s, m)
        if m in s.members.dead:
            continue
        why = s.members.cause(m, why)   # its node may have been found dead since
        if source is None:   # no state of its own anywhere: a copy of another member
            _replace(s, m, f"{why}; its state was lost", round, event=round, counts=False)
            continue
        if source != "object store" and m not in s.handoff.refresh([m]):
            continue
        s.records.restored(m, round, why, source)
        handled[m] = "restored"
    return handled


def finish_interval(s: Search, training: Interval, round: int, target: int,
                    started: Mapping[int, int]) -> dict[int, Any]:
    """{member: result} of a sync interval once every member has trained to ``target`` steps.

    A member whose process died during the interval — or that got a new process after the
    interval started (``started``: members.generation then) — is restored from its own state
    and trains the lost steps again; the round waits for it. Training is a pure function of
    the state, so the round's results are the ones an interval without the fault gives.
    """
    results = training.wait()
    while True:
        lost = []
        for m, res in results.items():
            f = failure(res)
            if f is not None and f[1]:
                s.members.note_dead(m, res)
                lost.append(m)
            elif s.members.generation[m] != started[m]:
                lost.append(m)
        if not lost:
            return results
        restore_dead(s, round)
        for m in lost:   # a new process that may have trained meanwhile starts from its state again
            if s.members.generation[m] != started[m] and m not in s.members.dead:
                _load_own_state(s, m)
        restore_dead(s, round)
        started = dict(s.members.generation)
        by_steps: dict[int, list[int]] = {}
        for m in sorted(lost):
            by_steps.setdefault(target - s.records[m].step, []).append(m)
        for n, ms in sorted(by_steps.items()):
            if n > 0:
                results.update(s.slots.start_interval(ms, n).wait())


def checkpoint_dead(s: Search, round: int, key: Callable[[int], int]) -> None:
    """Members that died before their checkpoint was written: restored, then their checkpoint
    (named by ``key(member)``: the round, or the member's intervals in async) written again, so
    the commit names only complete checkpoints."""
    while s.members.dead:
        ms = sorted(m for m in restore_dead(s, round) if m not in s.members.dead)
        checkpoints: dict[int, tuple[str, int]] = {}
        for m in ms:
            checkpoints.update(s.records.set_checkpoints([m], key(m)))
        s.members.start_checkpoints(checkpoints)
        s.records.saved(s.members.finish_checkpoints(sorted(checkpoints)))


def _load_own_state(s: Search, m: int) -> str | None:
    """Member m's new process takes its own state: the reference the driver keeps (the record
    stays), else the last committed checkpoint (the record goes back to that commit), else — a
    member that never trained since its commit — the fresh trainer it already is. Returns where
    the state came from, or None when it has none."""
    rec, actor = s.records[m], s.members[m]
    ref = s.handoff.current.get(m)
    if ref is not None:
        got = s.members.call({m: actor.load_state.remote([ref])})
        if m in got and got[m]["step"] == rec.step:
            return "object store"
        if m in s.members.dead:
            return None
    committed = s.records.set_back(m)
    if committed.checkpoint:
        store = s.members.store
        got = s.members.call({m: actor.load_checkpoint.remote(store.storage, store.name, committed.checkpoint)},
                             failed_ok=True)
        if isinstance(got.get(m), dict) and got[m]["step"] == committed.step:
            return "checkpoint"
        return None
    if committed.step == 0 and len(committed.schedule) <= 1:   # born (or restarted) and not trained since
        if m in s.members.call({m: actor.restart.remote(committed.genome, committed.seed)}):
            return "fresh trainer"
    return None


def replace_failed(s: Search, failed: Mapping[int, tuple[str, bool]], round: int, event: int) -> None:
    """Each member that diverged (``failed``: {member: (why, process died)}): a "died" record,
    then a copy of the best healthy member's state with a resampled genome, or a fresh trainer
    if no member is healthy. More than population.max_failures failures in a run is a
    SearchError whose line names the likely cause."""
    for m, (why, _) in sorted(failed.items()):
        s.records.diverged.append(dict(s.records[m].genome))
        _replace(s, m, why, round, event, counts=True, failed=failed)


def _replace(s: Search, m: int, why: str, round: int, event: int, counts: bool,
             failed: Mapping[int, Any] | None = None) -> None:
    """m's state is gone: a "died" record, then a copy of the best healthy member with a
    resampled genome (a fresh trainer if none is healthy)."""
    pop, failed = s.setup.population, failed or {}
    s.records.died(m, why, round, counts=counts)
    if s.records.failures > pop.max_failures:
        cause = likely_cause(s.setup.space, s.records.diverged,
                             [s.records[j].genome for j in s.records.ids
                              if j not in failed and j != m and s.records[j].history])
        raise SearchError(f"member {m} failed ({why}): {s.records.failures} failures exceed "
                          f"population.max_failures ({pop.max_failures})" + (f"; {cause}" if cause else ""))
    healthy = [s.records[j] for j in s.records.ids
               if j not in failed and j != m and s.records[j].history and j not in s.members.dead]
    best = min(healthy, key=lambda r: (r.fitness, r.id)) if healthy else None
    genome = plain(s.setup.space.sample(s.rng(round, m, 1 + s.records.failures + s.records.restores)).as_dict())
    if best is not None and _copy_into(s, m, best.id, genome, round, parents=[best.id]):
        rec = s.records[m]
        rec.history.append([rec.step, best.fitness])
        rec.objectives = dict(best.objectives)
    elif m not in s.members.dead:
        fresh(s, m, genome, member_seed(s.setup.seed, m, event, 2), round, parents=[])


def _copy_into(s: Search, m: int, donor: int, genome: dict, round: int, parents: list[int]) -> bool:
    """m takes donor's state (as an exploit does), then ``genome``: a "restart". False if m died."""
    loaded, latency = s.handoff.move({m: donor})
    if m not in loaded:
        return False
    applied = s.members.call({m: s.members[m].apply_genome.remote(genome)})
    if m not in applied or m not in s.handoff.refresh([m]):
        return False
    src = s.records[donor]
    s.slots.forget_speed(m, s.records[m].genome, genome)
    s.records.took_weights(m, src, genome, int(loaded[m]["step"]), applied[m]["params"])
    s.records.lineage("restart", round, m, parents=parents, genome=genome, step=int(loaded[m]["step"]),
                      fitness=src.fitness, changed_from=src.genome, latency_s=latency[m])
    return True


def fresh(s: Search, m: int, genome: dict, seed: int, round: int, parents: list[int]) -> bool:
    """m throws its weights away: a fresh trainer with ``genome`` and a new seed. False if m died."""
    if m not in s.members.call({m: s.members[m].restart.remote(genome, seed)}) or m not in s.handoff.refresh([m]):
        return False
    old = s.records.fresh(m, genome, seed)
    s.slots.forget_speed(m, old.genome, genome)
    s.records.lineage("restart", round, m, parents=parents, genome=genome, step=0,
                      fitness=old.fitness, changed_from=old.genome, seed=seed)
    return True


def likely_cause(space: SearchSpace, diverged: Sequence[Mapping[str, Any]],
                 healthy: Sequence[Mapping[str, Any]]) -> str | None:
    """The gene that most likely made members diverge, as a phrase for the error line.

    Each numeric gene's values are placed in its range (0 = low, 1 = high, log-scaled for log
    genes). With healthy members to compare against, the gene whose diverged values sit furthest
    from the healthy ones is named; when every member diverged there is nothing to compare, and
    the gene whose whole range lies furthest from the run's base value (the config the search
    starts from) is named instead. None when no gene stands out.
    """
    genes = [g for g in space.genes if isinstance(g, (FloatGene, IntGene))]
    if not diverged or not genes:
        return None
    scores = []
    for g in genes:
        values = [float(d[g.path]) for d in diverged if g.path in d]
        if not values:
            continue
        pos = statistics.mean(g.encode(v) for v in values)
        side = "upper" if pos >= 0.5 else "lower"
        median = statistics.median(values)
        if healthy:
            gap = pos - statistics.mean(g.encode(h[g.path]) for h in healthy if g.path in h)
            if abs(gap) >= 0.25:
                scores.append((abs(gap), g.path, f"{g.path} is the likely cause: the diverged members had it "
                               f"towards its {'upper' if gap > 0 else 'lower'} bound (median {median:.3g} "
                               f"in [{g.low:.3g}, {g.high:.3g}]); narrow its range in `search`"))
            continue
        base = space.base.get(g.path)
        far = _outside(g, float(base)) if isinstance(base, (int, float)) else 0.0
        if far > 0:
            where = "above" if g.low > base else "below"
            scores.append((far, g.path, f"{g.path} is the likely cause: every member diverged, and its whole "
                           f"range [{g.low:.3g}, {g.high:.3g}] lies {where} the base config's {base:.3g}; "
                           f"narrow its range in `search`"))
        elif pos >= 0.75 or pos <= 0.25:
            scores.append((abs(pos - 0.5), g.path, f"{g.path} is the likely cause: the diverged members had "
                           f"it near its {side} bound (median {median:.3g} in [{g.low:.3g}, {g.high:.3g}]); "
                           f"narrow its range in `search`"))
    if not scores:
        return None
    return max(scores)[2]


def _outside(g: FloatGene | IntGene, base: float) -> float:
    """How far ``base`` lies outside the gene's range: decades for a log gene, range widths
    otherwise; 0 inside it."""
    if g.low <= base <= g.high:
        return 0.0
    if g.log and base > 0:
        return math.log10(g.low / base) if base < g.low else math.log10(base / g.high)
    return (g.low - base if base < g.low else base - g.high) / (g.high - g.low)
