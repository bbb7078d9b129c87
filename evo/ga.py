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
from evo.space import SearchSpace
from evo.strategy import Crossover, Decision, Exploit, Keep, MemberView, Snapshot, Strategy
from evo.strategies import StrategyConfig, fitness_key, inside, is_fitter, ranked, ready_members


def crossover_operator(config: StrategyConfig) -> Callable[[Genome, Genome, SearchSpace, np.random.Generator], Genome]:
    """The crossover named by `config.crossover`."""
    return cx_sbx if config.crossover == "sbx" else cx_uniform


class Pool:
    """The parents a member may draw from: `members[:size]` without the positions in
    `excluded`, indexed without building that list, with each member's tournament `scores`
    (lower wins) computed once per plan. Pool index j is `members`' j-th position left."""

    def __init__(self, members: Sequence[MemberView], scores: np.ndarray, size: int | None = None,
                 excluded: tuple[int, ...] = ()) -> None:
        self.members, self.scores = members, scores
        self.size = len(members) if size is None else size
        self.excluded = tuple(sorted(excluded))

    def __len__(self) -> int:
        return self.size - len(self.excluded)

    def _positions(self, j: np.ndarray) -> np.ndarray:
        for e in self.excluded:   # ascending: each skipped position shifts the rest by one
            j = j + (j >= e)
        return j

    def __getitem__(self, j: int) -> MemberView:
        return self.members[int(self._positions(np.int64(j)))]

    def tournament(self, size: int, rng: np.random.Generator) -> int:
        """Pool index of one tournament winner: `size` draws with replacement, the lowest
        score wins, the first drawn among equals (the draws of `sel_tournament`)."""
        drawn = rng.integers(len(self), size=size)
        return int(drawn[np.argmin(self.scores[self._positions(drawn)])])

    def without(self, j: int) -> Pool:
        return Pool(self.members, self.scores, self.size, (*self.excluded, int(self._positions(np.int64(j)))))


def breed(
    member: MemberView,
    pool: Pool,
    fitter: Callable[[MemberView, MemberView], bool],
    space: SearchSpace,
    config: StrategyConfig,
    rng: np.random.Generator,
) -> Decision:
    """One offspring for `member`'s slot from parents drawn by tournament in `pool` (members
    other than `member`), or Keep when the weights would come from a member that is not
    `fitter` than `member`. Shared by the GA and NSGA-II."""
    if not len(pool):
        return Keep(member.id)
    i1 = pool.tournament(config.tournament_size, rng)
    p1 = pool[i1]
    if len(pool) >= 2 and rng.random() < config.crossover_probability:
        rest = pool.without(i1)
        p2 = rest[rest.tournament(config.tournament_size, rng)]
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
        position = {p.id: i for i, p in enumerate(population)}
        scores = np.array([fitness_key(p) for p in population])
        decisions: list[Decision] = []
        for m in members:
            if not m.history or m.id in elite:
                decisions.append(Keep(m.id))
                continue
            pool = Pool(population, scores, excluded=(position[m.id],))   # the others
            decisions.append(breed(m, pool, is_fitter, self.space, self.config, rng))
        self.generation += 1
        return decisions

    def state_dict(self) -> dict:
        return {"generation": self.generation}

    def load_state_dict(self, state: dict) -> None:
        self.generation = int(state["generation"])
