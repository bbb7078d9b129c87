"""The strategy interface: a population snapshot in, one decision per member out.

A strategy is the "evolve" step of the driver's round loop (train -> evaluate -> plan -> apply).
It sees a `Snapshot` of the population (each member's genome, fitness history, age, objectives)
and returns decisions the driver applies: keep training as is, copy a fitter member's weights
and take a new genome (`Exploit`), take weights from one of two parents and a recombined genome
(`Crossover`), or start again from fresh weights (`Restart`).

Conventions every strategy follows (checked by tests/evo/test_strategies.py):
- fitness is `val_bpb`, lower is better; a member whose history is empty has no fitness yet and
  is neither a donor nor a receiver (its decision is `Keep`); a non-finite fitness (a diverged
  member) ranks last;
- a donor (`Exploit.donor`, `Crossover.weights_from`) is alive (in the snapshot) and strictly
  fitter than its receiver;
- every decision's genome lies inside the search space (`space.contains`);
- every random choice comes from the `rng` passed to `plan`, and a strategy's own state
  (`state_dict`) is JSON-serialisable, so a restored strategy decides exactly as one that never
  stopped.

The implementations live in evo/pbt.py, evo/ga.py, evo/nsga2.py, evo/pb2.py and
evo/random_search.py; `make_strategy` picks one by `StrategyConfig.name`.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from evo.genome import Genome

if TYPE_CHECKING:
    from evo.space import SearchSpace

OBJECTIVE_SENSE = {"val_bpb": "min", "val_loss": "min", "params": "min", "tokens_per_s": "max"}
STRATEGIES = ("pbt", "ga", "nsga2", "pb2", "random")


# ----------------------------------------------------------------------------------------------
# What a strategy sees


@dataclass(frozen=True)
class MemberView:
    """One member as the strategy sees it at the end of a round (read-only)."""

    id: int
    genome: Genome
    history: tuple[tuple[int, float], ...] = ()  # (step, fitness) after each evaluation, oldest first
    age: int = 0  # rounds since born / last restart
    step: int = 0  # optimizer steps done
    objectives: Mapping[str, float] = field(default_factory=dict)  # {"val_bpb", "params", "tokens_per_s"}

    @property
    def fitness(self) -> float | None:
        """The latest val_bpb (lower is better); None before the first evaluation."""
        return self.history[-1][1] if self.history else None


@dataclass(frozen=True)
class Snapshot:
    """The population at the end of a round: every living member."""

    round: int
    members: tuple[MemberView, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))
        ids = [m.id for m in self.members]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"snapshot: member id {dup} appears twice")

    def member(self, member_id: int) -> MemberView:
        for m in self.members:
            if m.id == member_id:
                return m
        raise KeyError(f"snapshot: no member {member_id}")


# ----------------------------------------------------------------------------------------------
# What a strategy decides


@dataclass(frozen=True)
class Keep:
    """Go on training with the same weights and genome."""

    member: int


@dataclass(frozen=True)
class Exploit:
    """Copy `donor`'s weights (and optimizer state), then train with `genome`.
    `how` says how the genome was explored: "perturb" | "resample" | "model"."""

    member: int
    donor: int
    genome: Genome
    how: str


@dataclass(frozen=True)
class Crossover:
    """Take the weights of `weights_from` (one of `parents`), then train with `genome`,
    a recombination of both parents' genomes."""

    member: int
    parents: tuple[int, int]
    weights_from: int
    genome: Genome


@dataclass(frozen=True)
class Restart:
    """Throw the weights away and start again from fresh weights with `genome`."""

    member: int
    genome: Genome


Decision = Keep | Exploit | Crossover | Restart


# ----------------------------------------------------------------------------------------------
# Configuration


class StrategyConfigError(ValueError):
    """A bad `strategy:` value; the message is one line naming `strategy.<field>`."""


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _choice(name: str, value: Any, options: Sequence[str], noun: str) -> None:
    if not isinstance(value, str) or value not in options:
        hint = _did_you_mean(value, options) if isinstance(value, str) else ""
        raise StrategyConfigError(
            f"strategy.{name}: unknown {noun} {value!r} (choose from {', '.join(options)}{hint})"
        )


def _number(name: str, value: Any, low: float, high: float, *, integer: bool = False) -> float:
    kind = "an integer" if integer else "a number"
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        raise StrategyConfigError(f"strategy.{name}: must be {kind}, got {value!r}")
    if not (low <= value <= high) or (not integer and not math.isfinite(value)):
        bounds = f"at least {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
        raise StrategyConfigError(f"strategy.{name}: must be {bounds}, got {value!r}")
    return value if integer else float(value)


@dataclass
class StrategyConfig:
    """The YAML `strategy:` mapping. Fields that a strategy does not use are ignored by it."""

    name: str = "pbt"  # pbt | ga | nsga2 | pb2 | random
    quantile: float = 0.25  # pbt/pb2/nsga2: share of the ranked members replaced each round
    resample_probability: float = 0.25  # pbt/pb2: per gene, resample from the prior instead of perturbing
    perturb_factors: tuple[float, float] = (0.8, 1.2)  # pbt/pb2: multiplicative perturbations
    selection: str = "truncation"  # pbt: truncation | tournament
    tournament_size: int = 2  # pbt (tournament), ga: members drawn per tournament
    elitism: int = 1  # ga: the best `elitism` members are kept as they are
    crossover: str = "uniform"  # ga/nsga2: uniform | sbx
    crossover_probability: float = 0.9  # ga/nsga2
    mutation_probability: float = 0.2  # ga/nsga2: per gene, polynomial mutation
    objectives: tuple[str, ...] = ("val_bpb",)  # nsga2 uses several (see OBJECTIVE_SENSE)
    sampler: str = "tpe"  # pb2: tpe | gp (gp needs scipy and torch)
    seed: int = 0  # for the caller that derives the rng passed to plan(); strategies never seed themselves

    def __post_init__(self) -> None:
        _choice("name", self.name, STRATEGIES, "strategy")
        # 0.5 at most: the bottom and top quantiles must not overlap (as in Ray Tune's PBT)
        self.quantile = _number("quantile", self.quantile, 0.0, 0.5)
        self.resample_probability = _number("resample_probability", self.resample_probability, 0.0, 1.0)
        factors = self.perturb_factors
        if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or len(factors) != 2:
            raise StrategyConfigError(f"strategy.perturb_factors: must be two numbers, got {factors!r}")
        for f in factors:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 < f < math.inf):
                raise StrategyConfigError(f"strategy.perturb_factors: must be positive numbers, got {factors!r}")
        self.perturb_factors = (float(factors[0]), float(factors[1]))
        _choice("selection", self.selection, ("truncation", "tournament"), "selection")
        self.tournament_size = int(_number("tournament_size", self.tournament_size, 2, math.inf, integer=True))
        self.elitism = int(_number("elitism", self.elitism, 0, math.inf, integer=True))
        _choice("crossover", self.crossover, ("uniform", "sbx"), "crossover")
        self.crossover_probability = _number("crossover_probability", self.crossover_probability, 0.0, 1.0)
        self.mutation_probability = _number("mutation_probability", self.mutation_probability, 0.0, 1.0)
        objectives = self.objectives
        if isinstance(objectives, str):
            objectives = (objectives,)
        if not isinstance(objectives, Sequence) or len(objectives) == 0:
            raise StrategyConfigError(f"strategy.objectives: must be a non-empty list, got {self.objectives!r}")
        for o in objectives:
            _choice("objectives", o, tuple(OBJECTIVE_SENSE), "objective")
        if len(set(objectives)) != len(objectives):
            raise StrategyConfigError(f"strategy.objectives: listed twice in {list(objectives)}")
        self.objectives = tuple(objectives)
        _choice("sampler", self.sampler, ("tpe", "gp"), "sampler")
        if self.name == "pb2" and self.sampler == "gp":
            missing = [m for m in ("scipy", "torch") if importlib.util.find_spec(m) is None]
            if missing:
                raise StrategyConfigError(
                    f"strategy.sampler: 'gp' needs {' and '.join(missing)} installed "
                    f"(pip install {' '.join(missing)}), or use 'tpe'"
                )
        self.seed = int(_number("seed", self.seed, 0, math.inf, integer=True))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StrategyConfig:
        """Build from the YAML mapping; unknown keys are refused with a suggestion."""
        if not isinstance(d, Mapping):
            raise StrategyConfigError(f"strategy: must be a mapping, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                hint = _did_you_mean(str(key), known) or f" (known: {', '.join(known)})"
                raise StrategyConfigError(f"strategy.{key}: unknown key{hint}")
        return cls(**dict(d))


# ----------------------------------------------------------------------------------------------
# The interface


class Strategy(ABC):
    """Plans the evolution step of a population-based search.

    The driver builds one strategy per run (`make_strategy`) and calls:

    - `plan` once per round in sync mode (after every member trained its interval and was
      evaluated; `ready=None`), or each time a member reaches its interval in async mode
      (`ready=[that member]`, the other members as last evaluated);
    - `state_dict` whenever it commits a round to the run store, and `load_state_dict` on a
      fresh strategy when it resumes a run, before the first `plan` after the resume.

    Implementations may keep state across `plan` calls (observations, counters) but only in
    what `state_dict` returns, and draw every random number from the `rng` given to `plan`.
    """

    def __init__(self, space: SearchSpace, config: StrategyConfig) -> None:
        self.space = space
        self.config = config

    @abstractmethod
    def plan(
        self, snapshot: Snapshot, rng: np.random.Generator, ready: Sequence[int] | None = None
    ) -> list[Decision]:
        """One decision per member id in `ready` (every member of `snapshot` when None),
        in that order. Called after evaluation; the decisions are applied before the next
        interval of training."""

    def state_dict(self) -> dict:
        """The strategy's state as JSON-serialisable values (called when a round is committed)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (called once on resume, before `plan`)."""
        if state:
            raise ValueError(f"{type(self).__name__}: unexpected state keys {sorted(state)}")


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
    raise StrategyConfigError(f"strategy.name: unknown strategy {config.name!r}")


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
    return sorted((m for m in snapshot.members if m.history), key=lambda m: (fitness_key(m), m.id))


def ready_members(snapshot: Snapshot, ready: Sequence[int] | None) -> list[MemberView]:
    """The members to decide for, in order; refuses unknown or repeated ids."""
    if ready is None:
        return list(snapshot.members)
    ids = [int(i) for i in ready]
    if len(set(ids)) != len(ids):
        raise ValueError(f"plan: ready lists a member twice: {ids}")
    return [snapshot.member(i) for i in ids]


def inside(space: SearchSpace, candidate: Genome, fallback: Genome) -> Genome:
    """`candidate` brought inside the space.

    `space.clip` first; if a constraint still fails (e.g. heads no longer divide the width),
    the architecture genes come from `fallback` (a genome already in the space, usually the
    donor's), and in the last resort `fallback` itself.
    """
    genome = space.clip(candidate)
    if space.contains(genome):
        return genome
    genome = space.clip(candidate.replace(fallback.architecture()))
    if space.contains(genome):
        return genome
    return fallback
