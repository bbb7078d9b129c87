"""What the loops do with a judged population: apply the strategy's decisions, replace failures.

- :func:`apply_decisions`: Exploit / Crossover — the receiver becomes a copy of the donor
  (population/handoff.py), then takes its new genome; an Exploit of a member by itself is an
  explore (new hyperparameters in place); Restart — a fresh trainer; Keep — nothing.
- :func:`replace_failed`: a member that diverged or whose process died gets a "died" record,
  then becomes a copy of the best healthy member with a resampled genome (a fresh trainer when
  no member is healthy). More than population.max_failures failures in a run end the search.

Each change is written to the member's record and to the lineage (population/records.py).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

from evo.strategy import Crossover, Exploit, Keep, Restart
from population.members import SearchError
from population.records import member_seed, plain

if TYPE_CHECKING:
    from population.driver import Search


def apply_decisions(s: Search, decisions: list, round: int, event: int) -> None:
    """Apply a plan. Receivers first load their donors' states (every donor's state is taken
    before any member changes), then genomes are set and trainers restarted; then the records
    and the lineage say what happened."""
    before = {m: dataclasses.replace(r, schedule=list(r.schedule), genome=dict(r.genome))
              for m, r in s.records.members.items()}
    sources = {}   # receiver -> member whose weights it takes
    for d in decisions:
        if isinstance(d, Exploit) and d.donor != d.member:
            sources[d.member] = d.donor
        elif isinstance(d, Crossover) and d.weights_from != d.member:
            sources[d.member] = d.weights_from
    loaded, latency = s.handoff.move(sources)
    for d in decisions:
        if not isinstance(d, Keep):
            s.handoff.forget(d.member)
    calls = {d.member: s.members[d.member].apply_genome.remote(plain(d.genome.as_dict()))
             for d in decisions if isinstance(d, (Exploit, Crossover))}
    applied = s.members.gather(calls, raise_errors=True)

    for d in decisions:
        m = d.member
        if isinstance(d, Keep):
            continue
        if isinstance(d, Restart):
            fresh(s, m, plain(d.genome.as_dict()), member_seed(s.setup.seed, m, event, 1), round, parents=[])
            continue
        rec, genome = s.records[m], plain(d.genome.as_dict())
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
            s.records.exploit_latencies.append(latency[m])
        extra["parent_fitness"] = [before[p].fitness for p in parents]
        s.slots.forget_speed(m, rec.genome, genome)
        s.records.took_weights(m, src, genome, step, applied[m]["params"])
        s.records.lineage(event_name, round, m, parents=parents, genome=genome, step=step,
                          fitness=before[m].fitness, changed_from=src.genome, **extra)


def replace_failed(s: Search, failed: Mapping[int, tuple[str, bool]], round: int, event: int) -> None:
    """Each failed member (``failed``: {member: (why, process died)}, its actor already
    replaced if it died): a "died" record, then a copy of the best healthy member's state with
    a resampled genome, or a fresh trainer if no member is healthy. More than
    population.max_failures failures in a run is a SearchError."""
    pop = s.setup.population
    healthy = [s.records[m] for m in s.records.ids if m not in failed and s.records[m].history]
    best = min(healthy, key=lambda r: (r.fitness, r.id)) if healthy else None
    for m, (why, _) in sorted(failed.items()):
        s.records.died(m, why, round)
        if s.records.failures > pop.max_failures:
            raise SearchError(f"member {m} failed ({why}): {s.records.failures} failures exceed "
                              f"population.max_failures ({pop.max_failures})")
        genome = plain(s.setup.space.sample(s.rng(round, m, 1 + s.records.failures)).as_dict())
        if best is not None:
            _copy_into(s, m, best.id, genome, round, parents=[best.id])
            rec = s.records[m]
            rec.history.append([rec.step, best.fitness])
            rec.objectives = dict(best.objectives)
        else:
            fresh(s, m, genome, member_seed(s.setup.seed, m, event, 2), round, parents=[])


def _copy_into(s: Search, m: int, donor: int, genome: dict, round: int, parents: list[int]) -> None:
    """m takes donor's evaluated state (as an exploit does), then ``genome``: a "restart"."""
    loaded, latency = s.handoff.move({m: donor})
    applied = s.members.gather({m: s.members[m].apply_genome.remote(genome)}, raise_errors=True)[m]
    src = s.records[donor]
    s.slots.forget_speed(m, s.records[m].genome, genome)
    s.records.took_weights(m, src, genome, int(loaded[m]["step"]), applied["params"])
    s.records.lineage("restart", round, m, parents=parents, genome=genome, step=int(loaded[m]["step"]),
                      fitness=src.fitness, changed_from=src.genome, latency_s=latency[m])


def fresh(s: Search, m: int, genome: dict, seed: int, round: int, parents: list[int]) -> None:
    """m throws its weights away: a fresh trainer with ``genome`` and a new seed."""
    s.handoff.forget(m)
    s.members.gather({m: s.members[m].restart.remote(genome, seed)}, raise_errors=True)
    old = s.records.fresh(m, genome, seed)
    s.slots.forget_speed(m, old.genome, genome)
    s.records.lineage("restart", round, m, parents=parents, genome=genome, step=0,
                      fitness=old.fitness, changed_from=old.genome, seed=seed)
