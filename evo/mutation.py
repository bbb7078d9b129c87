"""Mutation operators: a genome in, a nearby genome inside the search space out.

Every operator finishes with `space.clip`, so the result satisfies the genes' bounds, grids
and choices and the architecture constraints, whatever the move was. Randomness comes only
from the `rng` argument, drawn gene by gene in `space.genes` order.
"""

from __future__ import annotations

import numpy as np

from evo.genome import Genome
from evo.space import ChoiceGene, FloatGene, IntGene, SearchSpace


def mut_perturb(
    g: Genome,
    space: SearchSpace,
    rng: np.random.Generator,
    factors: tuple[float, ...] = (0.8, 1.2),
    include_architecture: bool = True,
) -> Genome:
    """PBT's explore-by-perturbation (Jaderberg et al. 2017; Ray Tune's rule):

    float genes:  value x factor, the factor drawn uniformly from `factors`, clipped to bounds;
    int genes:    the same, rounded to the step grid; if that gives the old value back the
                  gene moves one step up for a factor above 1, down below 1 (so small integers
                  and zero evolve too);
    choice genes: the neighbouring choice, index -1 or +1 with equal probability (clipped to
                  the ends), never multiplied.
    Architecture genes take part unless `include_architecture` is False.
    """
    values = space.clip(g).as_dict()  # also: a clear error for a missing gene
    for gene in space.genes:
        if gene.is_architecture and not include_architecture:
            continue
        v = values[gene.path]
        if isinstance(gene, ChoiceGene):
            shift = 1 if rng.random() < 0.5 else -1
            i = min(max(gene.index(gene.clip(v)) + shift, 0), gene.size - 1)
            values[gene.path] = gene.value_at(i)
            continue
        factor = float(factors[int(rng.integers(len(factors)))])
        if isinstance(gene, FloatGene):
            values[gene.path] = gene.clip(v * factor)
        elif isinstance(gene, IntGene):
            old = gene.clip(v)
            new = gene.clip(old * factor)
            if new == old and factor != 1.0:  # e.g. 2 x 1.2 -> 2, or 0 x anything
                new = gene.clip(old + (gene.step if factor > 1.0 else -gene.step))
            values[gene.path] = new
    return space.clip(Genome.from_dict(values))


def mut_resample(
    g: Genome,
    space: SearchSpace,
    rng: np.random.Generator,
    probability: float,
    include_architecture: bool = True,
) -> Genome:
    """Each gene redrawn from its prior with probability `probability` (PBT's resample)."""
    values = space.clip(g).as_dict()  # also: a clear error for a missing gene
    for gene in space.genes:
        if gene.is_architecture and not include_architecture:
            continue
        if rng.random() < probability:
            values[gene.path] = gene.sample(rng)
    return space.clip(Genome.from_dict(values))


def mut_polynomial(
    g: Genome,
    space: SearchSpace,
    rng: np.random.Generator,
    eta: float = 20.0,
    probability: float | None = None,
    only: int | None = None,
    grow: bool = False,
) -> Genome:
    """Polynomial bounded mutation (Deb; DEAP `mutPolynomialBounded`) on the normalised
    coordinates in [0, 1], each gene with probability `probability` (default 1/n).

    Larger `eta` gives smaller moves. An int gene whose move rounds back to the same value
    steps one grid value in the move's direction; a choice gene (unordered) takes another
    choice drawn uniformly. `only`: mutate gene `only` (an index into `space.genes`) and no
    other, with no per-gene draw. `grow`: architecture genes only move up (a downward move is
    mirrored upward; a choice gene takes a larger value drawn uniformly, and stays when it has
    none), as `strategy.grow_only` asks of a child.
    """
    n = len(space.genes)
    indpb = 1.0 / n if probability is None else probability
    x = space.encode(g)  # (n,)
    for i, gene in enumerate(space.genes):
        if only is not None:
            if i != only:
                continue
        elif rng.random() > indpb:  # DEAP: mutate when random() <= indpb
            continue
        up = grow and gene.is_architecture
        if isinstance(gene, ChoiceGene):
            current = gene.decode(x[i])
            if up:
                larger = [j for j in range(gene.size) if gene.value_at(j) > current]
                if larger:
                    x[i] = gene.encode_index(larger[int(rng.integers(len(larger)))])
            elif gene.size > 1:
                j = int(rng.integers(gene.size - 1))
                current = gene.index(gene.decode(x[i]))
                x[i] = gene.encode_index(j if j < current else j + 1)
            continue
        new = _polynomial(x[i], eta, rng)
        if up and new < x[i]:
            new = min(2.0 * x[i] - new, 1.0)
        if isinstance(gene, IntGene):
            old = gene.decode(x[i])
            if gene.decode(new) == old and new != x[i]:
                new = gene.encode(gene.clip(old + (gene.step if new > x[i] else -gene.step)))
        x[i] = new
    return space.decode(x)


def _polynomial(x: float, eta: float, rng: np.random.Generator) -> float:
    """DEAP `mutPolynomialBounded` for one coordinate with xl = 0, xu = 1 (same formulas; `rng`
    instead of the global `random`)."""
    xl, xu = 0.0, 1.0
    delta_1 = (x - xl) / (xu - xl)
    delta_2 = (xu - x) / (xu - xl)
    rand = rng.random()
    mut_pow = 1.0 / (eta + 1.0)
    if rand < 0.5:
        xy = 1.0 - delta_1
        val = 2.0 * rand + (1.0 - 2.0 * rand) * xy ** (eta + 1)
        delta_q = val ** mut_pow - 1.0
    else:
        xy = 1.0 - delta_2
        val = 2.0 * (1.0 - rand) + 2.0 * (rand - 0.5) * xy ** (eta + 1)
        delta_q = 1.0 - val ** mut_pow
    x = x + delta_q * (xu - xl)
    return min(max(x, xl), xu)


# ----------------------------------------------------------------------------------------------
# The same moves on a whole column of genomes at once (PBT's explore for hundreds of receivers)


def perturb_column(gene: FloatGene | IntGene | ChoiceGene, values: list, factor: np.ndarray,
                   up: np.ndarray) -> list:
    """`mut_perturb`'s move of one gene for many genomes: `values` (one per genome, inside the
    gene or clipped into it first), `factor` the drawn factor of each (float and int genes),
    `up` whether each choice moves one index up (else down). Returns plain Python values."""
    if isinstance(gene, ChoiceGene):
        out = []
        for v, u in zip(values, up.tolist()):
            i = min(max(gene.index(gene.clip(v)) + (1 if u else -1), 0), gene.size - 1)
            out.append(gene.value_at(i))
        return out
    if isinstance(gene, FloatGene):
        old = np.array([gene.clip(v) for v in values], dtype=np.float64)   # (R,)
        return np.minimum(np.maximum(old * factor, gene.low), gene.high).tolist()
    old = np.array([gene.clip(v) for v in values], dtype=np.int64)   # (R,) on the grid
    new = _int_indices(gene, old * factor)
    stuck = (new == (old - gene.low) // gene.step) & (factor != 1.0)   # e.g. 2 x 1.2 -> 2, or 0 x anything
    moved = old + np.where(factor > 1.0, gene.step, -gene.step)
    new = np.where(stuck, np.clip((moved - gene.low) // gene.step, 0, gene.size - 1), new)
    return (gene.low + new * gene.step).tolist()


def _int_indices(gene: IntGene, x: np.ndarray) -> np.ndarray:
    """Grid index of the nearest grid value of each float in `x` (halves round up, as
    `IntGene.clip`), inside the bounds."""
    i = np.floor((x - gene.low) / gene.step + 0.5)
    return np.clip(i, 0, gene.size - 1).astype(np.int64)


def sample_column(gene: FloatGene | IntGene | ChoiceGene, rng: np.random.Generator, n: int) -> list:
    """`n` values drawn from the gene's prior (the distribution of `gene.sample`), as plain
    Python values."""
    if isinstance(gene, ChoiceGene):
        return [gene.choices[i] for i in rng.integers(gene.size, size=n).tolist()]
    if isinstance(gene, IntGene):
        if gene.log:   # log-uniform over [low - 1/2, high + 1/2], as IntGene.sample
            x = np.exp(rng.uniform(np.log(gene.low - 0.5), np.log(gene.high + 0.5), size=n))
            return (gene.low + _int_indices(gene, x) * gene.step).tolist()
        return (gene.low + rng.integers(gene.size, size=n) * gene.step).tolist()
    x = rng.random(n)
    if gene.log:
        v = np.exp(np.log(gene.low) + x * (np.log(gene.high) - np.log(gene.low)))
    else:
        v = gene.low + x * (gene.high - gene.low)
    return np.minimum(np.maximum(v, gene.low), gene.high).tolist()
