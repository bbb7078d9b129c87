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

from typing import Sequence

import numpy as np

from evo.genome import Genome
from evo.mutation import mut_polynomial
from evo.selection import truncation_count
from evo.space import ChoiceGene, IntGene, SearchSpace
from evo.strategy import Crossover, Decision, Exploit, Keep, MemberView, Snapshot, Strategy
from evo.strategies import StrategyConfig, fitness_key, inside, ranked_keys, ready_members


def breed_all(
    members: Sequence[MemberView],
    keys: np.ndarray,
    pool: Sequence[MemberView],
    scores: np.ndarray,
    sizes: np.ndarray,
    space: SearchSpace,
    config: StrategyConfig,
    rng: np.random.Generator,
) -> list[Decision]:
    """One offspring (or Keep) for each of `members`, the draws as arrays over them (the GA's and
    NSGA-II's breeding): member i draws its
    parents by tournament among `pool[:sizes[i]]` (`scores`: each pool member's, lower wins;
    `keys[i]`: member i's on the same scale), and takes weights only from a parent whose score
    is below its key (else Keep). Children: crossover of the two parents with probability
    `crossover_probability` (at least two parents), then polynomial mutation, both on the
    normalised coordinates (`space.encode`; with `grow_only` architecture genes move only up)
    and decoded once, then `unlike` the genome whose weights they take (inside the space, never
    a clone of it).

    The draws, in order: the first parents' tournaments [n, size], the crossover coins [n], the
    second parents' tournaments [n, size] (among the pool without the first parent), then for
    the members that breed the crossover's draws (uniform: [k, genes]; SBX: three [k, genes]),
    the mutation's ([k, genes] coins, [k, genes] polynomial draws, [k, genes] choice draws)."""
    n = len(members)
    if n == 0 or len(pool) == 0:
        return [Keep(m.id) for m in members]
    size = config.tournament_size
    sizes = np.asarray(sizes, dtype=np.int64)   # (n,)
    rows = np.arange(n)
    first = rng.integers(0, np.maximum(sizes, 1)[:, None], size=(n, size))   # (n, size) pool indices
    p1 = first[rows, np.argmin(scores[np.minimum(first, len(scores) - 1)], axis=1)]   # the first drawn among equals
    cross = (sizes >= 2) & (rng.random(n) < config.crossover_probability)
    second = rng.integers(0, np.maximum(sizes - 1, 1)[:, None], size=(n, size))
    second = np.minimum(second + (second >= p1[:, None]), max(len(scores) - 1, 0))   # skip the first parent
    p2 = second[rows, np.argmin(scores[second], axis=1)]
    source = np.where(cross & (scores[p2] < scores[p1]), p2, p1)
    breeds = (sizes > 0) & (scores[np.minimum(source, len(scores) - 1)] < np.asarray(keys, dtype=np.float64))
    chosen = np.flatnonzero(breeds).tolist()
    if not chosen:
        return [Keep(m.id) for m in members]
    encoded: dict[int, list[float]] = {}   # each parent's coordinates, once

    def coordinates(g: Genome) -> list[float]:
        x = encoded.get(id(g))
        if x is None:
            x = encoded[id(g)] = space.encode_list(g)
        return x

    # the draws as Python ints and bools from here on: a loop over thousands of children
    first_parent, second_parent, weights_from = p1.tolist(), p2.tolist(), source.tolist()
    genes = len(space.genes)   # (a (k, 0) array when there are none, as np.stack made)
    xa = np.array([coordinates(pool[first_parent[i]].genome) for i in chosen], dtype=np.float64).reshape(-1, genes)   # (k, G)
    crossed = cross[chosen]
    if crossed.any():
        xb = np.array([coordinates(pool[second_parent[i]].genome) for i in chosen],
                      dtype=np.float64).reshape(-1, genes)
        xa = np.where(crossed[:, None], _crossover_coordinates(xa, xb, space, config.crossover, rng), xa)
    mutated = _polynomial_coordinates(xa, space, config.mutation_probability, rng, grow=config.grow_only)
    out: list[Decision | None] = [None] * n
    children = space.decode_rows(mutated)   # the decodes draw nothing: the same rng order as one at a time
    for row, (i, was_crossed) in enumerate(zip(chosen, crossed.tolist())):
        m, parent = members[i], pool[first_parent[i]]
        src = pool[weights_from[i]]
        genome = unlike(children[row], src.genome, space, rng, config.grow_only,
                        source_coordinates=coordinates(src.genome))
        if was_crossed:
            out[i] = Crossover(m.id, (parent.id, pool[second_parent[i]].id), src.id, genome)
        else:
            out[i] = Exploit(m.id, parent.id, genome, "perturb")
    return [Keep(m.id) if d is None else d for m, d in zip(members, out)]


def _crossover_coordinates(xa: np.ndarray, xb: np.ndarray, space: SearchSpace, kind: str,
                           rng: np.random.Generator) -> np.ndarray:
    """Children [k, G] of the rows of `xa` and `xb` on the normalised coordinates: uniform
    (each gene from either parent with probability 1/2) or SBX (`cx_sbx`'s formulas, choice
    genes uniform)."""
    if kind != "sbx":
        return np.where(rng.random(xa.shape) < 0.5, xb, xa)
    eta = 15.0
    skip, rand, pick = rng.random(xa.shape), rng.random(xa.shape), rng.random(xa.shape)
    x1, x2 = np.minimum(xa, xb), np.maximum(xa, xb)
    apart = np.abs(xa - xb) > 1e-14
    gap = np.where(apart, x2 - x1, 1.0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        c1 = 0.5 * (x1 + x2 - _spread(1.0 + 2.0 * x1 / gap, rand, eta) * gap)
        c2 = 0.5 * (x1 + x2 + _spread(1.0 + 2.0 * (1.0 - x2) / gap, rand, eta) * gap)
    child = np.where(pick <= 0.5, np.clip(c2, 0.0, 1.0), np.clip(c1, 0.0, 1.0))
    child = np.where((skip > 0.5) | ~apart, xa, child)
    choice = np.array([isinstance(g, ChoiceGene) for g in space.genes])
    return np.where(choice[None, :], np.where(skip < 0.5, xb, xa), child)


def _spread(beta: np.ndarray, rand: np.ndarray, eta: float) -> np.ndarray:
    """`crossover._sbx_spread` on arrays."""
    alpha = 2.0 - beta ** -(eta + 1)
    return np.where(rand <= 1.0 / alpha, (rand * alpha) ** (1.0 / (eta + 1)),
                    (1.0 / np.abs(2.0 - rand * alpha)) ** (1.0 / (eta + 1)))


def _polynomial_coordinates(x: np.ndarray, space: SearchSpace, probability: float | None,
                            rng: np.random.Generator, eta: float = 20.0, grow: bool = False) -> np.ndarray:
    """`mut_polynomial` on each row of `x` [k, G] (normalised coordinates): each gene with
    `probability` (default 1/G) moves polynomially; an int gene whose move rounds back to its
    value steps one grid value in the move's direction; a choice gene takes another choice
    drawn uniformly. `grow`: architecture genes only move up (a downward move mirrored upward; a
    choice gene takes a larger value drawn uniformly, and stays when it has none)."""
    k, n = x.shape
    indpb = 1.0 / n if probability is None else probability
    move = rng.random(x.shape) <= indpb   # DEAP: mutate when random() <= indpb
    rand = rng.random(x.shape)
    other = rng.random(x.shape)   # a choice gene's new choice, uniform among the others
    mut_pow = 1.0 / (eta + 1.0)
    low = rand < 0.5
    val = np.where(low, 2.0 * rand + (1.0 - 2.0 * rand) * (1.0 - x) ** (eta + 1),   # xy = 1 - delta_1 = 1 - x
                   2.0 * (1.0 - rand) + 2.0 * (rand - 0.5) * x ** (eta + 1))          # xy = 1 - delta_2 = x
    delta_q = np.where(low, val ** mut_pow - 1.0, 1.0 - val ** mut_pow)
    new = np.where(move, np.clip(x + delta_q, 0.0, 1.0), x)
    for j, gene in enumerate(space.genes):
        rows = np.flatnonzero(move[:, j]).tolist()
        up = grow and gene.is_architecture
        if up and not isinstance(gene, ChoiceGene):
            new[:, j] = np.where(new[:, j] < x[:, j], np.minimum(2.0 * x[:, j] - new[:, j], 1.0), new[:, j])
        if isinstance(gene, ChoiceGene):
            for i in rows:
                if up:
                    current = gene.decode(x[i, j])
                    larger = [c for c in range(gene.size) if gene.value_at(c) > current]
                    new[i, j] = gene.encode_index(larger[int(other[i, j] * len(larger))]) if larger else x[i, j]
                elif gene.size > 1:
                    c = int(other[i, j] * (gene.size - 1))
                    current = gene.index(gene.decode(x[i, j]))
                    new[i, j] = gene.encode_index(c if c < current else c + 1)
                else:
                    new[i, j] = x[i, j]
        elif isinstance(gene, IntGene):
            for i in rows:
                old = gene.decode(x[i, j])
                if gene.decode(new[i, j]) == old and new[i, j] != x[i, j]:
                    new[i, j] = gene.encode(gene.clip(old + (gene.step if new[i, j] > x[i, j] else -gene.step)))
    return new


def unlike(child: Genome, source: Genome, space: SearchSpace, rng: np.random.Generator,
           grow_only: bool = False, tries_per_gene: int = 8,
           source_coordinates: np.ndarray | list[float] | None = None) -> Genome:
    """`child` brought inside the space (`inside`; with `grow_only` no architecture gene below
    `source`'s), or when that is `source` itself (the genome whose weights it takes: crossover of
    two near-identical parents, a mutation that drew no gene, a shrink that `grow_only` turned back
    or a shape the constraints refused all make a clone, which spends an interval training what
    the donor already trains) `source` with one gene, drawn uniformly, mutated polynomially, up to
    `tries_per_gene` draws per gene until it differs (a donor at the top of its shape has few genes
    that can still move). With `grow_only` that gene, if it is an architecture gene, only
    moves up (`mut_polynomial(grow=True)`), so the redraw is a growth or a change of another gene,
    never a shrink turned back into a clone; a clone is left only when no gene can move.
    `source_coordinates`: `space.encode(source)` (array or list), when the caller has it."""
    n = len(space.genes)
    if source_coordinates is None:
        xs = space.encode_list(source)
    else:
        xs = source_coordinates.tolist() if isinstance(source_coordinates, np.ndarray) else source_coordinates
    genome = inside(space, child, source, grow_only)
    for _ in range(tries_per_gene * n):
        if not _close(space.encode_list(genome), xs, 1e-9):
            return genome
        child = mut_polynomial(source, space, rng, only=int(rng.integers(n)), grow=grow_only)
        genome = inside(space, child, source, grow_only)
    return genome


def _close(a: list[float], b: list[float], atol: float) -> bool:
    """``np.allclose(a, b, rtol=0, atol=atol)`` for two equally long lists of finite numbers
    (coordinates in [0, 1]), without numpy's per-call overhead (thousands of children a round):
    whether two genomes' encodings are one point of the space up to float round-off (a float
    gene encoded and decoded again can come back a few ulps away, which `==` tells apart)."""
    return all(abs(x - y) <= atol for x, y in zip(a, b))


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
        population, keys = ranked_keys(snapshot)   # keys: each one's fitness_key
        n = len(population)
        n_replace = max(min(truncation_count(n, self.config.quantile), n - self.config.elitism), 0)
        survivors = population[: n - n_replace]
        survivor_ids = {m.id for m in survivors}
        scores = np.array(keys[: n - n_replace], dtype=np.float64)
        # the members replaced, each breeding from all the survivors
        bred = [m for m in members if m.history and m.id not in survivor_ids]
        children = iter(breed_all(bred, np.array([fitness_key(m) for m in bred], dtype=np.float64), survivors,
                                  scores, np.full(len(bred), len(survivors)), self.space, self.config, rng))
        decisions: list[Decision] = [next(children) if m.history and m.id not in survivor_ids else Keep(m.id)
                                     for m in members]
        self.generation += 1
        return decisions

    def state_dict(self) -> dict:
        return {"generation": self.generation}

    def load_state_dict(self, state: dict) -> None:
        self.generation = int(state["generation"])
