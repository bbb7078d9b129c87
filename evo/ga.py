"""A genetic algorithm whose children inherit weights instead of starting over.

Each round (sync mode; in async mode the same for the one ready member):

    rank the members that have a fitness (val_bpb, lower is better)
    the bottom `quantile` of them (at most half, never the best `elitism`) are replaced;
    the others survive as they are and are the parents
    for every member m to replace:
        p1 <- tournament of `tournament_size` among the survivors
        with probability `crossover_probability` (and at least two survivors):
            p2 <- tournament among the survivors but p1
            child <- crossover(p1, p2) (uniform or SBX), then polynomial mutation
            m takes the weights of the fitter parent -> Crossover
        else:
            child <- polynomial mutation of p1's genome
            m takes p1's weights -> Exploit
        a child equal (once inside the space, and with grow_only) to the genome whose weights it
        takes has one gene mutated instead, an architecture gene only upward with grow_only (a
        clone would spend its interval training what the donor trains already)
        a member only takes weights from a strictly fitter member: if the weights would
        come from a member not fitter than m, m is kept

Unlike DEAP's `eaSimple` the offspring replace their slot in place and keep training from the
inherited weights, so the population never restarts from scratch.

Why survivors and not a whole generation: until issue 14 every member but the elite was bred
each round, from parents drawn among all the others. With 4 members, 8 rounds and a fitness
measured after 50 steps, that replaced a member whose val_bpb was 0.005 behind the best, handed
children the learning rate of the worst member, and left one learning rate in the whole
population by the third round: on the quickstart task (lr, weight decay; 4 x 400 steps, 3 seeds)
it ended at 2.790 best val_bpb, worse than random search's 2.729 (BENCHMARKS.md, "The GA against
random search").
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from evo.crossover import cx_sbx, cx_uniform
from evo.genome import Genome
from evo.mutation import mut_polynomial
from evo.selection import truncation_count
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
        child = unlike(mut_polynomial(child, space, rng, probability=config.mutation_probability),
                       source.genome, space, rng, config.grow_only)
        return Crossover(member.id, (p1.id, p2.id), source.id, child)
    if not fitter(p1, member):
        return Keep(member.id)
    child = unlike(mut_polynomial(p1.genome, space, rng, probability=config.mutation_probability),
                   p1.genome, space, rng, config.grow_only)
    return Exploit(member.id, p1.id, child, "perturb")


def unlike(child: Genome, source: Genome, space: SearchSpace, rng: np.random.Generator,
           grow_only: bool = False, tries_per_gene: int = 8) -> Genome:
    """`child` brought inside the space (`inside`; with `grow_only` no architecture gene below
    `source`'s), or when that is `source` itself (the genome whose weights it takes: crossover of
    two near-identical parents, a mutation that drew no gene, a shrink that `grow_only` turned back
    or a shape the constraints refused all make a clone, which spends an interval training what
    the donor already trains) `source` with one gene, drawn uniformly, mutated polynomially, up to
    `tries_per_gene` draws per gene until it differs (a donor at the top of its shape has few genes
    that can still move). With `grow_only` that gene, if it is an architecture gene, only
    moves up (`mut_polynomial(grow=True)`), so the redraw is a growth or a change of another gene,
    never a shrink turned back into a clone; a clone is left only when no gene can move."""
    n = len(space.genes)
    genome = inside(space, child, source, grow_only)
    for _ in range(tries_per_gene * n):
        if not same_point(space, genome, source):
            return genome
        child = mut_polynomial(source, space, rng, only=int(rng.integers(n)), grow=grow_only)
        genome = inside(space, child, source, grow_only)
    return genome


def same_point(space: SearchSpace, a: Genome, b: Genome, atol: float = 1e-9) -> bool:
    """Whether `a` and `b` are one point of the space: equal coordinates up to float round-off
    (a float gene encoded and decoded again, as crossover and mutation do for the genes they
    leave alone, can come back a few ulps away, which `==` on genomes tells apart)."""
    return bool(np.allclose(space.encode(a), space.encode(b), rtol=0.0, atol=atol))


class GA(Strategy):
    """GA with truncation survival, tournament parents among the survivors, crossover,
    mutation, weight inheritance."""

    def __init__(self, space: SearchSpace, config: StrategyConfig) -> None:
        super().__init__(space, config)
        self.generation = 0  # plan calls so far (rounds in sync mode); logged, resumed

    def plan(
        self, snapshot: Snapshot, rng: np.random.Generator, ready: Sequence[int] | None = None
    ) -> list[Decision]:
        members = ready_members(snapshot, ready)
        population = ranked(snapshot)
        n = len(population)
        n_replace = max(min(truncation_count(n, self.config.quantile), n - self.config.elitism), 0)
        survivors = population[: n - n_replace]
        survivor_ids = {m.id for m in survivors}
        scores = np.array([fitness_key(p) for p in survivors])
        decisions: list[Decision] = []
        for m in members:
            if not m.history or m.id in survivor_ids:
                decisions.append(Keep(m.id))
                continue
            decisions.append(breed(m, Pool(survivors, scores), is_fitter, self.space, self.config, rng))
        self.generation += 1
        return decisions

    def state_dict(self) -> dict:
        return {"generation": self.generation}

    def load_state_dict(self, state: dict) -> None:
        self.generation = int(state["generation"])
