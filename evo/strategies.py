"""What the strategy implementations share: their config, the factory that picks one, and the
ranking helpers.

The interface they implement (`Strategy`, `Snapshot`, the decisions) is evo/strategy.py; the
implementations are evo/pbt.py, evo/ga.py, evo/nsga2.py, evo/pb2.py and evo/random_search.py.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from pydantic.dataclasses import dataclass

from evo.genome import Genome
from evo.strategy import HELD_OUT_OBJECTIVE, OBJECTIVE_SENSE, SCORE, MemberView, Snapshot, Strategy

if TYPE_CHECKING:
    from collections.abc import Sequence

    from evo.space import SearchSpace

STRATEGIES = ("pbt", "ga", "nsga2", "pb2", "random")
# strategy.grace_intervals: how many intervals a lossy architecture change needs to win back
# its validation-loss jump on the quickstart-size model (bench/grace_recovery.py, BENCHMARKS.md)
GRACE_DEFAULT = 1

# strategy.ready_intervals 'auto': judgements of each member per run (bench/peers.py's table A judges
# 8 times, 4 x 400 steps every 50; longer runs judged every interval ended worse than no search:
# BENCHMARKS.md, "PBT's short-horizon bias")
JUDGEMENTS = 8

Probability = Annotated[StrictFloat, Field(ge=0, le=1)]
Factor = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
Objective = Annotated[str, Field(min_length=1)]   # OBJECTIVE_SENSE's, or val_bpb.<held-out set>


@dataclass(config=ConfigDict(extra="forbid"))
class StrategyConfig:
    """The YAML `strategy:` mapping. Fields that a strategy does not use are ignored by it.

    Validated by pydantic on construction (a bad value raises its ValidationError, a
    ValueError, naming the field); it stays a dataclass (`dataclasses.replace`, `asdict`)."""

    name: Annotated[str, Field(description="the strategy: pbt, ga, nsga2, pb2 or random")] = "pbt"
    quantile: Annotated[StrictFloat, Field(ge=0, le=0.5, description=(
        # 0.5 at most: the bottom and top quantiles never overlap (as in Ray Tune's PBT)
        "pbt/pb2/ga/nsga2: share of the ranked members replaced each round (at most 0.5)"))] = 0.25
    resample_probability: Annotated[Probability, Field(description=(
        "pbt/pb2: per gene, the chance to resample from the prior instead of perturbing"))] = 0.25
    perturb_factors: Annotated[tuple[Factor, Factor], Field(description=(
        "pbt/pb2: the two multiplicative perturbations of a float gene"))] = (0.8, 1.2)
    ready_intervals: Annotated[StrictInt | str, Field(description=(
        "intervals a member trains between two judgements of it (only a judgement replaces it): 1 judges "
        "it after every interval; 'auto' spaces them so that a run judges each member about "
        f"{JUDGEMENTS} times (the run's intervals // {JUDGEMENTS}, at least 1), since judging a long run "
        "every interval keeps whatever gains most in one interval (a lower learning rate) over what "
        "ends best"))] = "auto"
    selection: Annotated[Literal["truncation", "tournament"], Field(description=(
        "pbt: how a member finds its donor"))] = "truncation"
    tournament_size: Annotated[StrictInt, Field(ge=2, description=(
        "pbt (tournament), ga: members drawn per tournament"))] = 2
    elitism: Annotated[StrictInt, Field(ge=0, description="ga: the best members kept as they are")] = 1
    crossover: Annotated[Literal["uniform", "sbx"], Field(description=(
        "ga/nsga2: uniform, or simulated binary crossover"))] = "uniform"
    crossover_probability: Annotated[Probability, Field(description=(
        "ga/nsga2: chance that a child is a crossover of two parents"))] = 0.9
    mutation_probability: Annotated[Probability, Field(description=(
        "ga/nsga2: per gene, the chance of a polynomial mutation"))] = 0.2
    objectives: Annotated[tuple[Objective, ...], Field(min_length=1, description=(
        "nsga2: objectives among val_bpb, val_loss, params, tokens_per_s, score (fitness.function's) "
        "and val_bpb.<set> (a fitness.eval set or a data source)"))] = ("val_bpb",)
    sampler: Annotated[Literal["tpe", "gp"], Field(description=(
        "pb2: Optuna sampler proposing hyperparameters (gp needs scipy and torch)"))] = "tpe"
    grace_intervals: Annotated[StrictInt, Field(ge=0, description=(
        "intervals after an architecture change (or merge) during which a member is never a "
        "receiver (0: none)"))] = GRACE_DEFAULT
    grace: Annotated[Literal["intervals", "hurdles"], Field(description=(
        "how the grace period protects: 'intervals', for all its grace_intervals; 'hurdles' "
        "(Progressive Dynamic Hurdles, as in the Evolved Transformer), only while the member's val_bpb "
        "is at or below the mean val_bpb of the other members as many intervals after their own change "
        "(if there are none, it is protected)"))] = "intervals"
    grow_only: Annotated[StrictBool, Field(description=(
        "ga/nsga2: a child's architecture genes never go below those of the parent whose weights it "
        "takes (a gene proposed below keeps that parent's value, and a child that would be the parent "
        "again grows or changes another gene instead), so every shape change is a "
        "function-preserving growth"))] = False
    merge: Annotated[StrictBool, Field(description=(
        "ga/nsga2: a crossover whose parents and child share the architecture merges the "
        "parents' weights and Adam moments (alpha uniform in [0, 1]) instead of copying one; "
        "parents of two architectures give the child each layer from one of them (the weights' "
        "parent with probability alpha)"))] = False
    merge_alpha: Annotated[Literal["uniform", "fitness"], Field(description=(
        "merge crossover's alpha: 'uniform' in [0, 1], or 'fitness': each parent weighted by "
        "2^-val_bpb (its probability per byte)"))] = "uniform"
    merge_shrink: Annotated[StrictFloat, Field(ge=0.0, le=1.0, description=(
        "layer-wise merge: a tensor whose shape differs from its parent's becomes shrink x "
        "reconciled + (1 - shrink) x a fresh init (shrink-and-perturb; 1: kept as reconciled)"))] = 0.9
    seed: Annotated[StrictInt, Field(ge=0, description=(
        "for the caller that derives the rng passed to plan(); strategies never seed themselves"))] = 0

    def __post_init__(self) -> None:
        if self.ready_intervals != "auto" and (not isinstance(self.ready_intervals, int) or self.ready_intervals < 1):
            raise ValueError(f"strategy.ready_intervals: must be a whole number of intervals >= 1 or 'auto', "
                             f"got {self.ready_intervals!r}")
        if self.grace == "hurdles" and self.grace_intervals < 1:
            raise ValueError("strategy.grace: 'hurdles' judges members during their grace period, which "
                             f"strategy.grace_intervals {self.grace_intervals} turns off; set it to 1 or more")
        if self.name not in STRATEGIES:
            close = difflib.get_close_matches(self.name, STRATEGIES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"strategy.name: unknown strategy {self.name!r} (choose from {', '.join(STRATEGIES)}{hint})")
        for o in self.objectives:
            if o not in OBJECTIVE_SENSE and o != SCORE and not HELD_OUT_OBJECTIVE.fullmatch(o):
                raise ValueError(f"strategy.objectives: must be one of {', '.join(OBJECTIVE_SENSE)}, {SCORE} "
                                 f"(fitness.function's) or val_bpb.<held-out set>, got {o!r}")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"strategy.objectives: listed twice in {list(self.objectives)}")
        if self.name == "pb2" and self.sampler == "gp":
            missing = [m for m in ("scipy", "torch") if importlib.util.find_spec(m) is None]
            if missing:
                raise ValueError(f"strategy.sampler: 'gp' needs {' and '.join(missing)} installed "
                                 f"(pip install {' '.join(missing)}), or use 'tpe'")


def ready_every(config: StrategyConfig, intervals: int | None) -> int:
    """`config.ready_intervals` as a number, for a run of `intervals` intervals per member
    ('auto': intervals // JUDGEMENTS, at least 1; 1 when the run's length is unknown)."""
    if config.ready_intervals != "auto":
        return config.ready_intervals
    return max(1, (intervals or 0) // JUDGEMENTS)


def make_strategy(config: StrategyConfig, space: SearchSpace) -> Strategy:
    """The strategy named by `config.name`."""
    if config.name == "pbt":
        from evo.pbt import PBT

        return PBT(space, config)
    elif config.name == "ga":
        from evo.ga import GA

        return GA(space, config)
    elif config.name == "nsga2":
        from evo.nsga2 import NSGA2

        return NSGA2(space, config)
    elif config.name == "pb2":
        from evo.pb2 import PB2

        return PB2(space, config)
    elif config.name == "random":
        from evo.random_search import RandomSearch

        return RandomSearch(space, config)
    raise ValueError(f"strategy.name: unknown strategy {config.name!r}")


# ----------------------------------------------------------------------------------------------
# Helpers shared by the implementations


def fitness_key(member: MemberView) -> float:
    """The member's fitness for ranking: non-finite (diverged) counts as +inf, i.e. worst.
    Only meaningful for members with a fitness."""
    f = member.fitness
    return float(f) if f is not None and math.isfinite(f) else math.inf


def is_fitter(a: MemberView, b: MemberView) -> bool:
    """a is strictly fitter than b (lower val_bpb); both must have a fitness."""
    return fitness_key(a) < fitness_key(b)


def ranked(snapshot: Snapshot) -> list[MemberView]:
    """The members with a fitness, best first (ties broken by id so the order is stable)."""
    return ranked_keys(snapshot)[0]


def ranked_keys(snapshot: Snapshot) -> tuple[list[MemberView], list[float]]:
    """`ranked(snapshot)` and each one's `fitness_key`, in that order (one sort of arrays:
    populations of thousands)."""
    members = [m for m in snapshot.members if m.history]
    keys = np.array([m.history[-1][1] for m in members], dtype=np.float64)   # (n,)
    keys[~np.isfinite(keys)] = np.inf   # diverged (non-finite) ranks last, as fitness_key
    order = np.lexsort((np.array([m.id for m in members], dtype=np.int64), keys))
    return [members[i] for i in order.tolist()], keys[order].tolist()


def ready_members(snapshot: Snapshot, ready: Sequence[int] | None) -> list[MemberView]:
    """The members to decide for, in order; refuses unknown or repeated ids."""
    if ready is None:
        return list(snapshot.members)
    ids = [int(i) for i in ready]
    if len(set(ids)) != len(ids):
        raise ValueError(f"plan: ready lists a member twice: {ids}")
    return [snapshot.member(i) for i in ids]


def inside(space: SearchSpace, candidate: Genome, fallback: Genome, grow_only: bool = False) -> Genome:
    """`candidate` brought inside the space.

    `space.clip` first; if a constraint still fails (e.g. heads no longer divide the width),
    the architecture genes come from `fallback` (a genome already in the space, usually the
    donor's), and in the last resort `fallback` itself. With `grow_only`, an architecture gene
    below `fallback`'s is put back at `fallback`'s value (the growth of the other genes kept);
    if the constraints then still ask for a shrink, all the architecture genes are `fallback`'s
    (the other genes kept): every shape change is then a growth.
    """
    genome = candidate if space.contains(candidate) else space.clip(candidate)   # clip: the identity inside
    if grow_only and _shrinks(genome, fallback):   # each shrunk gene back at fallback's value
        genome = space.clip(genome.replace({p: v for p, v in fallback.architecture().items() if genome[p] < v}))
    if (genome is candidate or space.contains(genome)) and not (grow_only and _shrinks(genome, fallback)):
        return genome
    genome = space.clip(candidate.replace(fallback.architecture()))
    if space.contains(genome):
        return genome
    return fallback


def _shrinks(genome: Genome, donor: Genome) -> bool:
    """Whether any architecture gene of `genome` is below `donor`'s."""
    return any(genome[p] < v for p, v in donor.architecture().items())
