"""A generational genetic algorithm whose children inherit weights instead of starting over.

Each round (sync mode; in async mode the same for the one ready member):

    rank the members that have a fitness (val_bpb, lower is better)
    the best `elitism` members are kept as they are
    for every other member m:
        p1 <- tournament of `tournament_size` among the other members
        with probability `crossover_probability` (and at least two others):
            p2 <- tournament among the others but p1
            child <- crossover(p1, p2) (uniform or SBX), then polynomial mutation
            m takes the weights of the fitter parent -> Crossover
        else:
            child <- polynomial mutation of p1's genome
            m takes p1's weights -> Exploit
        a member only takes weights from a strictly fitter member: if the weights would
        come from a member not fitter than m, m is kept (its slot survives this generation)

Unlike DEAP's `eaSimple` the offspring replace their slot in place and keep training from the
inherited weights, so the population never restarts from scratch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from evo.crossover import cx_sbx, cx_uniform
from evo.genome import Genome
from evo.mutation import mut_polynomial
from evo.selection import sel_tournament
from evo.space import SearchSpace
from evo.strategy import Crossover, Decision, Exploit, Keep, MemberView, Snapshot, Strategy
from evo.strategies import StrategyConfig, fitness_key, inside, is_fitter, ranked, ready_members


def crossover_operator(config: StrategyConfig) -> Callable[[Genome, Genome, SearchSpace, np.random.Generator], Genome]:
    """The crossover named by `config.crossover`."""
    return cx_sbx if config.crossover == "sbx" else cx_uniform


def breed(
    member: MemberView,
    pool: list[MemberView],
    score: Callable[[MemberView], float],
    fitter: Callable[[MemberView, MemberView], bool],
    space: SearchSpace,
    config: StrategyConfig,
    rng: np.random.Generator,
) -> Decision:
    """One offspring for `member`'s slot from parents drawn by tournament in `pool` (members
    other than `member`, lower `score` wins), or Keep when the weights would come from a
    member that is not `fitter` than `member`. Shared by the GA and NSGA-II."""
    if not pool:
        return Keep(member.id)
    p1 = pool[_tournament(pool, score, config.tournament_size, rng)]
    if len(pool) >= 2 and rng.random() < config.crossover_probability:
        rest = [p for p in pool if p.id != p1.id]
        p2 = rest[_tournament(rest, score, config.tournament_size, rng)]
        source = p2 if fitter(p2, p1) else p1
        if not fitter(source, member):
            return Keep(member.id)
        child = crossover_operator(config)(p1.genome, p2.genome, space, rng)
        child = mut_polynomial(child, space, rng, probability=config.mutation_probability)
        return Crossover(member.id, (p1.id, p2.id), source.id, inside(space, child, source.genome))
    if not fitter(p1, member):
        return Keep(member.id)
    child = mut_polynomial(p1.genome, space, rng, probability=config.mutation_probability)
    return Exploit(member.id, p1.id, inside(space, child, p1.genome), "perturb")


def _tournament(
    pool: list[MemberView], score: Callable[[MemberView], float], size: int, rng: np.random.Generator
) -> int:
    """Index in `pool` of one tournament winner (lower score wins)."""
    return int(sel_tournament(np.array([score(p) for p in pool]), 1, size, rng)[0])


class GA(Strategy):
    """Generational GA with elitism, tournament parents, crossover, mutation, weight inheritance."""

    def __init__(self, space: SearchSpace, config: StrategyConfig) -> None:
        super().__init__(space, config)
        self.generation = 0  # plan calls so far (rounds in sync mode); logged, resumed

    def plan(
        self, snapshot: Snapshot, rng: np.random.Generator, ready: Sequence[int] | None = None
    ) -> list[Decision]:
        members = ready_members(snapshot, ready)
        population = ranked(snapshot)
        elite = {m.id for m in population[: self.config.elitism]}
        decisions: list[Decision] = []
        for m in members:
            if not m.history or m.id in elite:
                decisions.append(Keep(m.id))
                continue
            pool = [p for p in population if p.id != m.id]
            decisions.append(breed(m, pool, fitness_key, is_fitter, self.space, self.config, rng))
        self.generation += 1
        return decisions

    def state_dict(self) -> dict:
        return {"generation": self.generation}

    def load_state_dict(self, state: dict) -> None:
        self.generation = int(state["generation"])
