"""Population-based training (Jaderberg et al. 2017): exploit the fit, explore around them.

Each time a member is ready (every member each round in sync mode):

    rank the members that have a fitness (val_bpb, lower is better)
    exploit:  truncation -- a member in the bottom quantile copies the weights of a member
                            drawn uniformly from the top quantile;
              tournament -- a member compares itself with `tournament_size - 1` other members
                            drawn at random and copies the best of them if it is fitter
    explore:  the copied genome, per gene: resampled from the prior with probability
              `resample_probability`, else perturbed (floats x 0.8 / x 1.2, integers and
              choices one step) -- Ray Tune's PBT rule; architecture genes included, the
              result brought back inside the constraints
    everyone else keeps training as is.

The truncation count for n ranked members is k = min(ceil(quantile * n), floor(n / 2)), and 0
when n < 2 or quantile = 0 -- Ray Tune's rule: any positive quantile replaces at least one
member of a population of two or more, and the two quantiles never overlap. In async mode
(`ready=[i]`) member i is ranked within the whole snapshot, so the same rule applies.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from evo.genome import Genome
from evo.mutation import perturb_column, sample_column
from evo.selection import sel_truncation
from evo.space import SearchSpace
from evo.strategy import Decision, Exploit, Keep, MemberView, Snapshot, Strategy
from evo.strategies import fitness_key, inside, is_fitter, ranked, ranked_keys, ready_members


def explore(
    genomes: Sequence[Genome],
    space: SearchSpace,
    rng: np.random.Generator,
    resample_probability: float,
    factors: tuple[float, float],
) -> list[tuple[Genome, str]]:
    """PBT's explore step on each donor genome of `genomes`: per gene, resample from the prior
    with probability `resample_probability`, else perturb (`mut_perturb`'s move). Returns, for
    each, (genome inside the space, "resample" if any gene was resampled else "perturb").

    All genomes at once, a column of the population per gene: the draws are arrays of
    [genomes, genes] (which genes resample, each factor, each choice's direction, a fresh
    value per gene and genome), taken in that order from `rng`, so one call costs a few
    array draws instead of several scalar draws per gene and genome."""
    n, genes = len(genomes), space.genes
    if n == 0:
        return []
    resample = rng.random((n, len(genes))) < resample_probability   # (n, G)
    factor = np.asarray(factors, dtype=np.float64)[rng.integers(len(factors), size=(n, len(genes)))]   # (n, G)
    up = rng.random((n, len(genes))) < 0.5   # (n, G): choice genes move one index up, else down
    dicts = [space._values(g) for g in genomes]   # also: a clear error for a missing gene
    columns = []
    for j, gene in enumerate(genes):
        values = [d[gene.path] for d in dicts]
        moved = perturb_column(gene, values, factor[:, j], up[:, j])
        rows = np.flatnonzero(resample[:, j])
        if len(rows):
            for i, v in zip(rows.tolist(), sample_column(gene, rng, len(rows))):
                moved[i] = v
        columns.append(moved)
    any_resampled = resample.any(axis=1).tolist()
    out = []
    for i, g in enumerate(genomes):
        candidate = Genome(tuple((gene.path, col[i]) for gene, col in zip(genes, columns)))
        out.append((inside(space, candidate, g), "resample" if any_resampled[i] else "perturb"))
    return out


def truncation_donors(snapshot: Snapshot, quantile: float) -> dict[int, Sequence[MemberView]]:
    """{bottom-quantile member id: the top-quantile members strictly fitter than it, best first}.

    The top quantile is sorted by fitness, so the members fitter than a receiver are a prefix of
    it: each receiver gets a view of that prefix (found by bisection), not a copy -- O(n log n)
    in all rather than O(n^2)."""
    members, keys = ranked_keys(snapshot)
    if len(members) < 2 or quantile <= 0:
        return {}
    bottom, top = sel_truncation(np.array(keys), quantile)
    top_members = [members[i] for i in top]
    top_keys = [keys[i] for i in top]   # ascending
    return {members[i].id: Prefix(top_members, bisect.bisect_left(top_keys, keys[i])) for i in bottom}


class Prefix(Sequence):
    """The first `size` items of `items`, without copying them."""

    def __init__(self, items: Sequence, size: int) -> None:
        self.items, self.size = items, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.items[j] for j in range(*i.indices(self.size))]
        if not -self.size <= i < self.size:
            raise IndexError(i)
        return self.items[i % self.size]


class PBT(Strategy):
    """Population-based training: truncation (or tournament) exploit, perturb/resample explore."""

    def plan(
        self, snapshot: Snapshot, rng: np.random.Generator, ready: Sequence[int] | None = None
    ) -> list[Decision]:
        members = ready_members(snapshot, ready)
        if self.config.selection == "truncation":
            donors_of = truncation_donors(snapshot, self.config.quantile)
            candidates = [donors_of.get(m.id, ()) for m in members]
            sizes = np.array([len(c) for c in candidates], dtype=np.int64)
            # one draw per receiver, uniform over its candidates (a member without any draws nothing)
            drawn = iter(rng.integers(sizes[sizes > 0]).tolist())
            donors = [c[next(drawn)] if len(c) else None for c in candidates]
        else:
            contestants = ranked(snapshot)
            position = {c.id: i for i, c in enumerate(contestants)}
            donors = [tournament_donor(m, contestants, self.config.tournament_size, rng, position) for m in members]
        # every receiver's genome explored at once, once the donors are drawn
        explored = iter(explore([d.genome for d in donors if d is not None], self.space, rng,
                                self.config.resample_probability, self.config.perturb_factors))
        decisions: list[Decision] = []
        for m, donor in zip(members, donors):
            if donor is None:
                decisions.append(Keep(m.id))
                continue
            genome, how = next(explored)
            decisions.append(Exploit(m.id, donor.id, genome, how))
        return decisions


def tournament_donor(
    member: MemberView, contestants: list[MemberView], size: int, rng: np.random.Generator,
    position: dict[int, int] | None = None,
) -> MemberView | None:
    """The best of `size - 1` other members drawn at random, if strictly fitter than `member`
    (binary tournament when size = 2); None for a member without fitness.

    The others are `contestants` without `member`, indexed without building that list
    (`position`: {id: index in contestants}, built once per plan)."""
    if not member.history:
        return None
    if position is None:
        position = {c.id: i for i, c in enumerate(contestants)}
    skip = position.get(member.id)
    n_others = len(contestants) - (skip is not None)
    if n_others == 0:
        return None
    drawn = rng.choice(n_others, size=min(size - 1, n_others), replace=False)
    others = (contestants[i + (skip is not None and i >= skip)] for i in drawn)
    best = min(others, key=lambda c: (fitness_key(c), c.id))
    return best if is_fitter(best, member) else None
