"""Selection operators: which members breed, which are replaced.

Plain functions over fitness values (lower is better: fitness is validation bits per byte)
returning member indices. A member without a fitness (None / NaN: not evaluated yet, or
diverged) is never selected as a parent and never counted in a quantile. Randomness comes
only from the `rng` argument.
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import numpy as np


def _fitness_array(fitnesses: Sequence[float | None] | np.ndarray) -> np.ndarray:
    """float64 array with NaN where a fitness is missing."""
    return np.array([np.nan if f is None else float(f) for f in fitnesses], dtype=np.float64)


def _valid_order(fitnesses: Sequence[float | None] | np.ndarray) -> list[int]:
    """Indices of members with a fitness, best first (ties: lower index first)."""
    f = _fitness_array(fitnesses)
    valid = [i for i in range(len(f)) if not math.isnan(f[i])]
    return sorted(valid, key=lambda i: (f[i], i))


def truncation_count(n: int, quantile: float) -> int:
    """How many of `n` ranked members a truncation replaces: k = min(ceil(quantile * n),
    floor(n / 2)), 0 below two members (Ray Tune's rule: any positive quantile replaces at least
    one of two or more, and the bottom and top quantiles never overlap)."""
    return min(math.ceil(quantile * n), n // 2) if n >= 2 else 0


def sel_truncation(fitnesses: Sequence[float | None] | np.ndarray, quantile: float) -> tuple[list[int], list[int]]:
    """PBT truncation selection: `(bottom, top)` index lists, each of the k = min(ceil(quantile * n),
    floor(n / 2)) members (n = members with a fitness; Ray Tune's rule, so the two never
    overlap and any positive quantile picks one member out of two). `bottom` is worst first,
    `top` best first."""
    if not 0.0 <= quantile <= 0.5:
        raise ValueError(f"quantile ({quantile}) must be in [0, 0.5]")
    order = _valid_order(fitnesses)
    k = truncation_count(len(order), quantile)
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


def front_ranks(objectives: np.ndarray) -> np.ndarray:
    """Non-dominated sorting: the front index of each row of `objectives` [n, m] (all minimised,
    finite): 0 for the rows no other row dominates, 1 for those dominated only by front 0, and so
    on. Row a dominates b when it is no worse in every objective and better in one; equal rows
    share a front.

    Equal rows are merged first and the distinct rows sorted lexicographically, so that a row can
    only be dominated by one before it; each is then placed into the first front holding no row
    that dominates it, found by bisection over the fronts (ENS-BS, Zhang et al. 2015: a row
    dominated by front f is dominated by every front before f). With two objectives a front's
    smallest second objective decides, so the whole sort is O(n log n); with three, a front's
    staircase of (second, third) answers a probe by bisection, O(n log^2 n); with more, each of
    the O(n log n) probes compares the row with one front's rows at once."""
    obj = np.asarray(objectives, dtype=np.float64)
    if obj.ndim != 2:
        raise ValueError(f"objectives must be a 2-D array [members, objectives], got shape {obj.shape}")
    n, m = obj.shape
    if n == 0 or m == 0:
        return np.zeros(n, dtype=np.int64)
    rows, inverse = np.unique(obj + 0.0, axis=0, return_inverse=True)   # + 0.0: -0.0 is 0.0   # distinct rows, lexicographic
    inverse = inverse.reshape(-1)
    if m == 1:
        return inverse.astype(np.int64)   # distinct values, ascending: the k-th smallest is front k
    ranks = np.empty(len(rows), dtype=np.int64)
    if m == 2:
        # an earlier distinct row q dominates p iff q[1] <= p[1]; best[f], the smallest second
        # objective in front f, is non-decreasing in f
        best: list[float] = []
        for i, y in enumerate(rows[:, 1].tolist()):
            f = bisect.bisect_right(best, y)
            if f == len(best):
                best.append(y)
            else:
                best[f] = y   # y < best[f]
            ranks[i] = f
        return ranks[inverse]
    if m == 3:
        return np.array(_staircase_ranks(rows[:, 1].tolist(), rows[:, 2].tolist()), dtype=np.int64)[inverse]
    fronts: list[_Rows] = []
    tail = rows[:, 1:]   # the rows are sorted by the first objective: an earlier one is <= in it
    for i in range(len(rows)):
        lo, hi = 0, len(fronts)   # the first front in [lo, hi) without a row dominating row i
        while lo < hi:
            mid = (lo + hi) // 2
            if fronts[mid].dominates(tail[i]):
                lo = mid + 1
            else:
                hi = mid
        if lo == len(fronts):
            fronts.append(_Rows(m - 1))
        fronts[lo].add(tail[i])
        ranks[i] = lo
    return ranks[inverse]


def _staircase_ranks(xs: list[float], ys: list[float]) -> list[int]:
    """`front_ranks`' loop for three objectives (the distinct rows sorted, without the first
    objective: `xs`, `ys`). Each front is a staircase: the points (x, y) no other point of the
    front covers, x ascending and y descending, so that "some row of the front is <= (x, y)" is
    one bisection; held as two plain lists and probed inline (populations of thousands)."""
    front_xs: list[list[float]] = []   # per front: its staircase's x, ascending
    front_ys: list[list[float]] = []   # per front: its staircase's y, descending
    bisect_left, bisect_right = bisect.bisect_left, bisect.bisect_right
    ranks = []
    for x, y in zip(xs, ys):
        lo, hi = 0, len(front_xs)   # the first front in [lo, hi) without a row dominating (x, y)
        while lo < hi:
            mid = (lo + hi) // 2
            j = bisect_right(front_xs[mid], x) - 1   # the smallest y among the x <= row's
            if j >= 0 and front_ys[mid][j] <= y:
                lo = mid + 1
            else:
                hi = mid
        if lo == len(front_xs):
            front_xs.append([])
            front_ys.append([])
        fx, fy = front_xs[lo], front_ys[lo]   # add (x, y), dropping the points it covers
        i = bisect_left(fx, x)
        j = i
        while j < len(fy) and fy[j] >= y:
            j += 1
        fx[i:j] = [x]
        fy[i:j] = [y]
        ranks.append(lo)
    return ranks


class _Rows:
    """The rows of one front (without the first objective), in a buffer that doubles as it fills."""

    def __init__(self, width: int) -> None:
        self.buffer = np.empty((4, width))
        self.size = 0

    def add(self, row: np.ndarray) -> None:
        if self.size == len(self.buffer):
            self.buffer = np.concatenate([self.buffer, np.empty_like(self.buffer)])
        self.buffer[self.size] = row
        self.size += 1

    def dominates(self, row: np.ndarray) -> bool:
        """Some row here (each distinct from `row` and before it lexicographically) is <= `row`
        in every remaining objective."""
        return bool((self.buffer[: self.size] <= row).all(axis=1).any())


def crowding_distances(objectives: np.ndarray, front: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each row of `front` (indices into `objectives` [n, m]) within
    that front (DEAP `assignCrowdingDist`'s formula): per objective, the front sorted by it (ties
    in `front`'s order), the two ends get infinity, every other row adds the gap between its two
    neighbours divided by m x the objective's range in the front."""
    values = np.asarray(objectives, dtype=np.float64)[np.asarray(front, dtype=np.int64)]   # [k, m]
    k, m = values.shape
    distances = np.zeros(k)
    if k == 0:
        return distances
    for j in range(m):
        order = np.argsort(values[:, j], kind="stable")
        v = values[order, j]
        distances[order[0]] = distances[order[-1]] = np.inf
        if v[-1] == v[0]:
            continue
        distances[order[1:-1]] += (v[2:] - v[:-2]) / (m * (v[-1] - v[0]))
    return distances


def pareto_front(objectives: np.ndarray) -> list[int]:
    """Indices of the non-dominated rows of `objectives` [n, m] (all minimised; rows with a NaN
    are left out). Row a dominates b when it is no worse in every objective and better in one."""
    obj = np.asarray(objectives, dtype=np.float64)
    if obj.ndim != 2:
        raise ValueError(f"objectives must be a 2-D array [members, objectives], got shape {obj.shape}")
    valid = np.flatnonzero(~np.isnan(obj).any(axis=1))
    return [int(i) for i in valid[front_ranks(obj[valid]) == 0]]


def sel_nsga2(objectives: np.ndarray, k: int, ranks: np.ndarray | None = None) -> tuple[list[int], list[int]]:
    """NSGA-II survivor selection (DEAP `selNSGA2`'s rule; draws no random numbers):
    `(selected, pareto_front)`.

    `objectives` [n, m] are all minimised. `selected` holds k indices: whole fronts in order
    (each front's rows ascending), the last one cut by crowding distance (largest first, ties
    ascending); rows with a NaN come after every complete row. `pareto_front` is the first front,
    ascending. Sorting as in `front_ranks` (`ranks`: its result for `objectives`, when the caller
    has it and no row has a NaN); crowding only for the front that is cut."""
    obj = np.asarray(objectives, dtype=np.float64)
    if obj.ndim != 2:
        raise ValueError(f"objectives must be a 2-D array [members, objectives], got shape {obj.shape}")
    if not 0 <= k <= len(obj):
        raise ValueError(f"k ({k}) must be between 0 and the number of members ({len(obj)})")
    nan = np.isnan(obj).any(axis=1)
    valid, invalid = np.flatnonzero(~nan), np.flatnonzero(nan)
    ranks = front_ranks(obj[valid]) if ranks is None or len(invalid) else np.asarray(ranks)
    order = np.argsort(ranks, kind="stable")   # by front, rows ascending within one
    by_front, sorted_ranks = valid[order], ranks[order]
    take = min(k, len(valid))
    selected = by_front[:take]
    if 0 < take < len(valid) and sorted_ranks[take - 1] == sorted_ranks[take]:   # a front is cut
        start, end = np.searchsorted(sorted_ranks, sorted_ranks[take - 1], side="left"), \
            np.searchsorted(sorted_ranks, sorted_ranks[take - 1], side="right")
        front = by_front[start:end]
        kept = front[np.argsort(-crowding_distances(obj, front), kind="stable")[: take - start]]
        selected = np.concatenate([by_front[:start], kept])
    front0 = [int(i) for i in valid[ranks == 0]]
    return [int(i) for i in selected] + [int(i) for i in invalid[: k - take]], front0


def sel_aging(ages: Sequence[int] | np.ndarray, k: int = 1) -> list[int]:
    """Regularized evolution (Real et al. 2019): the `k` oldest members, to be removed,
    oldest first (ties: lower index first)."""
    a = np.asarray(ages)
    if not 0 <= k <= len(a):
        raise ValueError(f"k ({k}) must be between 0 and the number of members ({len(a)})")
    order = sorted(range(len(a)), key=lambda i: (-a[i], i))
    return [int(i) for i in order[:k]]
