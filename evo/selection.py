"""Selection operators: which members breed, which are replaced.

Plain functions over fitness values (lower is better: fitness is validation bits per byte)
returning member indices. A member without a fitness (None / NaN: not evaluated yet, or
diverged) is never selected as a parent and never counted in a quantile. Randomness comes
only from the `rng` argument.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from deap import base, tools


def _fitness_array(fitnesses: Sequence[float | None] | np.ndarray) -> np.ndarray:
    """float64 array with NaN where a fitness is missing."""
    return np.array([np.nan if f is None else float(f) for f in fitnesses], dtype=np.float64)


def _valid_order(fitnesses: Sequence[float | None] | np.ndarray) -> list[int]:
    """Indices of members with a fitness, best first (ties: lower index first)."""
    f = _fitness_array(fitnesses)
    valid = [i for i in range(len(f)) if not math.isnan(f[i])]
    return sorted(valid, key=lambda i: (f[i], i))


def sel_truncation(fitnesses: Sequence[float | None] | np.ndarray, quantile: float) -> tuple[list[int], list[int]]:
    """PBT truncation selection: `(bottom, top)` index lists, each of the k = min(ceil(quantile * n),
    floor(n / 2)) members (n = members with a fitness; Ray Tune's rule, so the two never
    overlap and any positive quantile picks one member out of two). `bottom` is worst first,
    `top` best first."""
    if not 0.0 <= quantile <= 0.5:
        raise ValueError(f"quantile ({quantile}) must be in [0, 0.5]")
    order = _valid_order(fitnesses)
    n = len(order)
    k = min(math.ceil(quantile * n), n // 2)
    if k == 0:
        return [], []
    return order[::-1][:k], order[:k]


def sel_tournament(
    fitnesses: Sequence[float | None] | np.ndarray, k: int, size: int, rng: np.random.Generator
) -> list[int]:
    """`k` tournament winners (DEAP `selTournament`): each tournament draws `size` aspirants
    uniformly with replacement among the members with a fitness; the fittest wins (the first
    drawn among equals)."""
    if size < 1:
        raise ValueError(f"tournament size ({size}) must be at least 1")
    f = _fitness_array(fitnesses)
    valid = np.flatnonzero(~np.isnan(f))
    if len(valid) == 0:
        raise ValueError("tournament selection needs at least one member with a fitness")
    winners = []
    for _ in range(k):
        aspirants = valid[rng.integers(len(valid), size=size)]
        winners.append(int(aspirants[np.argmin(f[aspirants])]))  # argmin: first of equals
    return winners


def pareto_front(objectives: np.ndarray) -> list[int]:
    """Indices of the non-dominated rows of `objectives` [n, m] (all minimised; rows with a NaN
    are left out). Row a dominates b when it is no worse in every objective and better in one."""
    obj = np.asarray(objectives, dtype=np.float64)
    if obj.ndim != 2:
        raise ValueError(f"objectives must be a 2-D array [members, objectives], got shape {obj.shape}")
    valid = ~np.isnan(obj).any(axis=1)
    front = []
    for i in np.flatnonzero(valid):
        others = obj[valid]
        dominated = np.any(np.all(others <= obj[i], axis=1) & np.any(others < obj[i], axis=1))
        if not dominated:
            front.append(int(i))
    return front


def sel_nsga2(objectives: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """NSGA-II survivor selection (DEAP `selNSGA2`, standard non-dominated sort, which draws
    no random numbers): `(selected, pareto_front)`.

    `objectives` [n, m] are all minimised. `selected` holds k indices: whole fronts in order,
    the last one cut by crowding distance (largest first); rows with a NaN come after every
    complete row. `pareto_front` is the first front, ascending."""
    obj = np.asarray(objectives, dtype=np.float64)
    if obj.ndim != 2:
        raise ValueError(f"objectives must be a 2-D array [members, objectives], got shape {obj.shape}")
    if not 0 <= k <= len(obj):
        raise ValueError(f"k ({k}) must be between 0 and the number of members ({len(obj)})")
    valid = [i for i in range(len(obj)) if not np.isnan(obj[i]).any()]
    invalid = [i for i in range(len(obj)) if np.isnan(obj[i]).any()]
    # DEAP individuals without `creator`: a list subclass carrying a locally built Fitness
    fitness_cls = type("MinFitness", (base.Fitness,), {"weights": (-1.0,) * obj.shape[1]})
    individuals = [_Individual(i, fitness_cls(tuple(obj[i]))) for i in valid]
    chosen = tools.selNSGA2(individuals, min(k, len(individuals)), nd="standard") if individuals else []
    selected = [ind.index for ind in chosen] + invalid[: k - len(chosen)]
    return selected, pareto_front(obj)


class _Individual(list):
    """A DEAP individual: the member index, plus the `fitness` attribute DEAP reads."""

    def __init__(self, index: int, fitness: Any):
        super().__init__([index])
        self.index = index
        self.fitness = fitness


def sel_aging(ages: Sequence[int] | np.ndarray, k: int = 1) -> list[int]:
    """Regularized evolution (Real et al. 2019): the `k` oldest members, to be removed,
    oldest first (ties: lower index first)."""
    a = np.asarray(ages)
    if not 0 <= k <= len(a):
        raise ValueError(f"k ({k}) must be between 0 and the number of members ({len(a)})")
    order = sorted(range(len(a)), key=lambda i: (-a[i], i))
    return [int(i) for i in order[:k]]
