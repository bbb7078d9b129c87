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
- a member in its grace period (its weights changed architecture, or were merged, at most
  `strategy.grace_intervals` intervals ago: `in_grace`) is never a receiver:
  its decision is `Keep`, so a lossy change is not judged before it had time to recover. The
  base class enforces it on every implementation's `plan` (`_with_grace`). With
  `strategy.grace: hurdles` (Progressive Dynamic Hurdles, after So et al. 2019, The Evolved
  Transformer) that protection is earned: a member k >= 1 intervals into its grace period keeps
  it only while its fitness is at or below its hurdle (`hurdles`), the mean fitness of the other
  members k intervals into theirs (no such member: protected); one above its hurdle is judged
  like any other member. The newly changed are compared with their own age, not with members
  that trained on undisturbed;
- a member is judged only once every `strategy.ready_intervals` intervals (when its `age` is a
  multiple of it; the driver resolves 'auto' from the run's length): in between its decision is
  `Keep`, also enforced by `_with_grace`. Judging a long run after every interval keeps whatever
  gains most within one interval (a lower learning rate) over what ends best;
- every random choice comes from the `rng` passed to `plan`, and a strategy's own state
  (`state_dict`) is JSON-serialisable, so a restored strategy decides exactly as one that never
  stopped.

The implementations live in evo/pbt.py, evo/ga.py, evo/nsga2.py, evo/pb2.py and
evo/random_search.py; evo/strategies.py holds their config (`StrategyConfig`), the factory that
picks one by name (`make_strategy`) and the ranking helpers they share.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from evo.genome import Genome

if TYPE_CHECKING:
    from evo.space import SearchSpace
    from evo.strategies import StrategyConfig

# The objectives a member may report (`MemberView.objectives`) and which way is better.
OBJECTIVE_SENSE = {"val_bpb": "min", "val_loss": "min", "params": "min", "tokens_per_s": "max"}
# Besides those, each held-out set's bits/byte (val_bpb.<set>: a fitness.eval set, or a data source),
# and the value of the user's fitness.function, whose sense the run declares (Snapshot.senses).
HELD_OUT_OBJECTIVE = re.compile(r"val_bpb\.[A-Za-z_][A-Za-z0-9_-]*")
SCORE = "score"


def objective_sense(name: str, senses: Mapping[str, str] | None = None) -> str:
    """"min" or "max" for an objective a member may report (``senses``: the run's declared ones,
    e.g. {"score": "max"}); KeyError for an unknown one."""
    if senses and name in senses:
        return senses[name]
    if name in OBJECTIVE_SENSE:
        return OBJECTIVE_SENSE[name]
    if HELD_OUT_OBJECTIVE.fullmatch(name):
        return "min"
    raise KeyError(name)


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
    # intervals trained since its weights' architecture last changed (or they were merged);
    # None when they never did
    since_change: int | None = None

    @property
    def fitness(self) -> float | None:
        """The latest val_bpb (lower is better); None before the first evaluation."""
        return self.history[-1][1] if self.history else None


@dataclass(frozen=True)
class Snapshot:
    """The population at the end of a round: every living member."""

    round: int
    members: tuple[MemberView, ...]
    senses: Mapping[str, str] = field(default_factory=dict)   # declared senses of objectives ({"score": "max"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))
        index = {m.id: m for m in self.members}   # member() in O(1): snapshots hold thousands
        if len(index) != len(self.members):
            ids = [m.id for m in self.members]
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"snapshot: member id {dup} appears twice")
        object.__setattr__(self, "_index", index)   # not a field: equality and repr are unchanged

    def member(self, member_id: int) -> MemberView:
        try:
            return self._index[member_id]
        except KeyError:
            raise KeyError(f"snapshot: no member {member_id}") from None


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
    a recombination of both parents' genomes. With `alpha` (merge crossover, `strategy.merge`)
    and no `layers` (parents and child of one architecture) the weights and Adam moments are
    alpha * weights_from's + (1 - alpha) * the other parent's. With `layers` (parents of
    different architectures) the child takes each of its layers whole from one parent:
    `layers` maps each unit of the child ("tok_embeddings", "layers.<i>", "norm", "output") to
    the parent it comes from, or to None for a layer deeper than both parents (a new layer, as a
    depth change makes it); a unit both parents have came from weights_from with probability
    alpha."""

    member: int
    parents: tuple[int, int]
    weights_from: int
    genome: Genome
    alpha: float | None = None
    layers: Mapping[str, int | None] | None = None


@dataclass(frozen=True)
class Restart:
    """Throw the weights away and start again from fresh weights with `genome`."""

    member: int
    genome: Genome


Decision = Keep | Exploit | Crossover | Restart


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

    # keys of `state_dict()` whose value is a dict whose entries are replaced, never changed in
    # place: a commit writes only the entries that are not the objects it wrote last time
    state_replaced_items: tuple[str, ...] = ()

    def __init__(self, space: SearchSpace, config: StrategyConfig) -> None:
        self.space = space
        self.config = config

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "plan" in cls.__dict__:                    # every implementation's plan keeps the grace period
            cls.plan = _with_grace(cls.__dict__["plan"])

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


def in_grace(member: MemberView, grace_intervals: int) -> bool:
    """Whether ``member`` is in its grace period: its weights changed architecture (or were
    merged) and it trained at most ``grace_intervals`` intervals since (0: no grace period)."""
    return grace_intervals > 0 and member.since_change is not None and member.since_change <= grace_intervals


def hurdles(snapshot: Snapshot, grace_intervals: int) -> dict[int, Fraction | None]:
    """Progressive Dynamic Hurdles for the grace period (`strategy.grace: hurdles`): for each
    member 1..``grace_intervals`` intervals after its change (``since_change`` = k), its hurdle:
    the mean fitness of the *other* members with ``since_change`` = k, those with a finite one,
    exact (a Fraction of the floats: a member level with its peers is never put above them by a
    rounding, and the members' order does not matter); None when there is none (it stays
    protected: nothing to compare with).

    The peers are the members of its age *now*, each with its latest fitness. A member further
    on (since_change s > k) is no peer: its fitness at age k cannot be read from its history,
    which is its own evaluations while since_change follows the weights (an exploit hands the
    receiver its donor's since_change, not its donor's history; a failed interval counts without
    an evaluation). In sync mode the peers are the members changed in the same round (and those
    that took their weights since).
    Members with ``since_change`` 0 (changed, not trained since: their fitness is the old
    weights') have no hurdle and are not in the result."""
    groups: dict[int, list[MemberView]] = {}
    for m in snapshot.members:
        k = m.since_change
        if k is not None and 1 <= k <= grace_intervals:
            groups.setdefault(k, []).append(m)
    out: dict[int, Fraction | None] = {}
    for group in groups.values():
        fits = {m.id: Fraction(m.fitness) for m in group if m.fitness is not None and math.isfinite(m.fitness)}
        total = sum(fits.values(), Fraction(0))
        for m in group:
            own = fits.get(m.id)
            n = len(fits) - (own is not None)
            out[m.id] = (total - (own or 0)) / n if n else None
    return out


def clears_hurdle(member: MemberView, hurdle: Fraction | None) -> bool:
    """Whether ``member`` keeps its grace period under `strategy.grace: hurdles`: no hurdle (no
    peer of its age), no fitness yet, or a fitness at or below the hurdle (lower is better)."""
    f = member.fitness
    return hurdle is None or f is None or (math.isfinite(f) and Fraction(f) <= hurdle)


def _with_grace(plan):
    """``plan`` with every decision for a member in its grace period (with `strategy.grace:
    hurdles`, one that clears its hurdle), or between two of its judgements (its age not a
    multiple of `strategy.ready_intervals`), turned into `Keep`, and, with `strategy.merge`, each
    crossover made a merge (`_merged`)."""

    @functools.wraps(plan)
    def planned(self: Strategy, snapshot: Snapshot, rng: np.random.Generator,
                ready: Sequence[int] | None = None) -> list[Decision]:
        decisions = plan(self, snapshot, rng, ready)
        grace = getattr(self.config, "grace_intervals", 0)
        every = getattr(self.config, "ready_intervals", 1)
        every = every if isinstance(every, int) else 1   # 'auto' unresolved: the run's length is unknown
        if getattr(self.config, "grace", "intervals") == "hurdles":
            hurdle = hurdles(snapshot, grace)
            graced = {m.id for m in snapshot.members
                      if (in_grace(m, grace) and clears_hurdle(m, hurdle.get(m.id))) or m.age % every}
        else:
            graced = {m.id for m in snapshot.members if in_grace(m, grace) or m.age % every}
        decisions = [Keep(d.member) if d.member in graced and not isinstance(d, Keep) else d for d in decisions]
        if getattr(self.config, "merge", False):
            by = getattr(self.config, "merge_alpha", "uniform")
            decisions = [_merged(d, snapshot, rng, by, self.space) if isinstance(d, Crossover) else d
                         for d in decisions]
        return decisions

    return planned


def _merged(d: Crossover, snapshot: Snapshot, rng: np.random.Generator, by: str,
            space: SearchSpace) -> Crossover:
    """``d`` as a merge crossover, its draws from ``rng`` after the plan.

    Parents and child of one architecture: `Crossover.alpha` — `strategy.merge_alpha` "uniform"
    draws it in [0, 1]; "fitness" gives each parent a weight proportional to 2^-val_bpb, its
    geometric-mean probability per byte, and draws nothing. Parents of two architectures:
    alpha as well, then `Crossover.layers` (`layer_sources`). Parents of one architecture and a
    child of another (a mutated shape): unchanged, weights_from's weights carried to the child."""
    parent_shapes = [snapshot.member(p).genome.architecture() for p in d.parents]
    differ = parent_shapes[0] != parent_shapes[1]
    if not differ and parent_shapes[0] != d.genome.architecture():
        return d
    if by == "uniform":
        d = dataclasses.replace(d, alpha=float(rng.uniform(0.0, 1.0)))
    else:
        d = dataclasses.replace(d, alpha=_fitness_alpha(d, snapshot))
    if differ:
        depths = {p: space.model_fields(snapshot.member(p).genome)["num_hidden_layers"] for p in d.parents}
        d = dataclasses.replace(d, layers=layer_sources(
            space.model_fields(d.genome)["num_hidden_layers"], depths, d.weights_from, d.alpha, rng))
    return d


def layer_sources(depth: int, parent_depths: Mapping[int, int], weights_from: int, alpha: float,
                  rng: np.random.Generator) -> dict[str, int | None]:
    """Which parent each unit of a child of ``depth`` layers comes from (layer-wise inheritance):
    {"tok_embeddings", "layers.0", …, "norm", "output": parent id, or None for a layer neither
    parent has}. A unit both parents have comes from ``weights_from`` with probability ``alpha``
    (one draw from ``rng`` per such unit, in this order); one only a parent has, from that parent."""
    other = next((p for p in parent_depths if p != weights_from), weights_from)
    units = ["tok_embeddings", *(f"layers.{i}" for i in range(depth)), "norm", "output"]
    out: dict[str, int | None] = {}
    for unit in units:
        i = int(unit.split(".")[1]) if unit.startswith("layers.") else -1
        have = [p for p in (weights_from, other) if i < parent_depths[p]]
        if len(have) == 2 and have[0] != have[1]:
            out[unit] = weights_from if rng.random() < alpha else other
        else:
            out[unit] = have[0] if have else None
    return out


def _fitness_alpha(d: Crossover, snapshot: Snapshot) -> float:
    other = next((p for p in d.parents if p != d.weights_from), d.weights_from)
    mine, theirs = snapshot.member(d.weights_from).fitness, snapshot.member(other).fitness
    if mine is None or theirs is None or not (math.isfinite(mine) and math.isfinite(theirs)):
        return 0.5
    # 2^-mine / (2^-mine + 2^-theirs), written so that no power overflows
    return 1.0 / (1.0 + 2.0 ** (mine - theirs)) if mine >= theirs else 1.0 - 1.0 / (1.0 + 2.0 ** (theirs - mine))
