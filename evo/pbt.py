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
from evo.mutation import mut_perturb, mut_resample
from evo.selection import sel_truncation
from evo.space import SearchSpace
from evo.strategy import Decision, Exploit, Keep, MemberView, Snapshot, Strategy
from evo.strategies import fitness_key, inside, is_fitter, ranked, ready_members


def explore(
    genome: Genome,
    space: SearchSpace,
    rng: np.random.Generator,
    resample_probability: float,
    factors: tuple[float, float],
) -> tuple[Genome, str]:
    """PBT's explore step on a donor's genome: per gene, resample from the prior with
    probability `resample_probability`, else perturb. Returns (genome inside the space,
    "resample" if any gene was resampled else "perturb")."""
    resample = rng.random(len(space.paths)) < resample_probability
    candidate = mut_perturb(genome, space, rng, factors=factors)
    if resample.any():
        fresh = mut_resample(genome, space, rng, probability=1.0)
        candidate = candidate.replace({p: fresh[p] for p, r in zip(space.paths, resample) if r})
    return inside(space, candidate, genome), "resample" if resample.any() else "perturb"


def truncation_donors(snapshot: Snapshot, quantile: float) -> dict[int, Sequence[MemberView]]:
    """{bottom-quantile member id: the top-quantile members strictly fitter than it, best first}.

    The top quantile is sorted by fitness, so the members fitter than a receiver are a prefix of
    it: each receiver gets a view of that prefix (found by bisection), not a copy -- O(n log n)
    in all rather than O(n^2)."""
    members = ranked(snapshot)
    if len(members) < 2 or quantile <= 0:
        return {}
    keys = [fitness_key(m) for m in members]
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
            donors = truncation_donors(snapshot, self.config.quantile)
        else:
            contestants = ranked(snapshot)
            position = {c.id: i for i, c in enumerate(contestants)}
        decisions: list[Decision] = []
        for m in members:
            if self.config.selection == "truncation":
                candidates = donors.get(m.id, [])
                donor = candidates[rng.integers(len(candidates))] if candidates else None
            else:
                donor = tournament_donor(m, contestants, self.config.tournament_size, rng, position)
            if donor is None:
                decisions.append(Keep(m.id))
                continue
            genome, how = explore(
                donor.genome, self.space, rng, self.config.resample_probability, self.config.perturb_factors
            )
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
