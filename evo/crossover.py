"""Crossover operators: one child genome from two parents, inside the search space.

Numeric genes are recombined in the normalised space `[0, 1]^n` of `SearchSpace.encode`, so
log-scaled genes mix in log space; choice genes have no order worth interpolating and are
inherited from either parent with equal probability. The child goes through `space.clip`,
so it always satisfies the bounds and the architecture constraints.
"""

from __future__ import annotations

import numpy as np

from evo.genome import Genome
from evo.space import ChoiceGene, SearchSpace


def cx_uniform(a: Genome, b: Genome, space: SearchSpace, rng: np.random.Generator, prob: float = 0.5) -> Genome:
    """Uniform crossover (DEAP `cxUniform`): each gene from `b` with probability `prob`,
    else from `a`."""
    a, b = space.clip(a), space.clip(b)  # also: a clear error for a missing gene
    from_b = rng.random(len(space.genes)) < prob  # (n,)
    child = {g.path: (b[g.path] if take_b else a[g.path]) for g, take_b in zip(space.genes, from_b)}
    return space.clip(Genome.from_dict(child))


def cx_sbx(a: Genome, b: Genome, space: SearchSpace, rng: np.random.Generator, eta: float = 15.0) -> Genome:
    """Simulated binary crossover (Deb & Agrawal 1995) on the normalised coordinates, bounded
    to [0, 1]; the first of DEAP `cxSimulatedBinaryBounded`'s two children. Larger `eta` keeps
    the child closer to its parents. Choice genes: uniform crossover."""
    xa, xb = space.encode(a), space.encode(b)  # (n,) each
    child = xa.copy()
    for i, gene in enumerate(space.genes):
        if isinstance(gene, ChoiceGene):
            child[i] = xb[i] if rng.random() < 0.5 else xa[i]
        else:
            child[i] = _sbx_first_child(xa[i], xb[i], eta, rng)
    return space.decode(child)


def _sbx_first_child(v1: float, v2: float, eta: float, rng: np.random.Generator) -> float:
    """DEAP `cxSimulatedBinaryBounded` for one coordinate with xl = 0, xu = 1 (same formulas,
    same order of random draws; `rng` instead of the global `random`), returning ind1's value."""
    xl, xu = 0.0, 1.0
    if rng.random() > 0.5 or abs(v1 - v2) <= 1e-14:
        return v1
    x1, x2 = min(v1, v2), max(v1, v2)
    rand = rng.random()

    c1 = 0.5 * (x1 + x2 - _sbx_spread(1.0 + 2.0 * (x1 - xl) / (x2 - x1), rand, eta) * (x2 - x1))
    c2 = 0.5 * (x1 + x2 + _sbx_spread(1.0 + 2.0 * (xu - x2) / (x2 - x1), rand, eta) * (x2 - x1))

    c1, c2 = min(max(c1, xl), xu), min(max(c2, xl), xu)
    return c2 if rng.random() <= 0.5 else c1


def _sbx_spread(beta: float, rand: float, eta: float) -> float:
    """DEAP's bounded spread factor beta_q for one side, given the distance to its bound (beta)."""
    alpha = 2.0 - beta ** -(eta + 1)
    if rand <= 1.0 / alpha:
        return (rand * alpha) ** (1.0 / (eta + 1))
    return (1.0 / (2.0 - rand * alpha)) ** (1.0 / (eta + 1))
