"""NSGA-II (Deb et al. 2002) over the members' objectives, with weight inheritance.

Each round (sync mode; in async mode the same for the one ready member):

    objectives <- config.objectives of every member that has them (max objectives negated,
                  so all are minimised; a non-finite value counts as the worst)
    front rank <- non-dominated sorting (0 = the Pareto front; evo.selection.front_ranks,
                  O(n log n) for two objectives)
    survivors  <- sel_nsga2: the best n - k members by front, then crowding distance,
                  with k = min(ceil(quantile * n), floor(n / 2)) as in PBT
    for every member m not among the survivors:
        parents <- binary tournaments by front rank among the survivors in a better front
                   than m (so the first front is preferred)
        child   <- crossover of two parents (probability `crossover_probability`) or a copy
                   of one, then polynomial mutation
        m takes the weights of the parent in the better front -> Crossover / Exploit
        (Keep when no survivor lies in a better front than m)

"Fitter" here means "in a better (lower) front": a donor's front rank is always lower than its
receiver's. `val_bpb` falls back to the member's fitness when `objectives` lacks it; a member
without a fitness, or missing another objective, is kept and is never a parent.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from evo.ga import breed_all
from evo.selection import front_ranks, sel_nsga2, truncation_count
from evo.strategy import Decision, Keep, MemberView, Snapshot, Strategy, objective_sense
from evo.strategies import ready_members


def objective_vector(member: MemberView, objectives: Sequence[str],
                     senses: Mapping[str, str] | None = None) -> np.ndarray | None:
    """The member's objectives as a minimised vector [m], or None if one is missing (``senses``:
    the run's declared ones, Snapshot.senses)."""
    values = _objective_values(member, objectives, senses)
    return None if values is None else np.array(values)


def _objective_values(member: MemberView, objectives: Sequence[str],
                      senses: Mapping[str, str] | None = None,
                      maximised: dict[str, bool] | None = None) -> list[float] | None:
    """`objective_vector` as a list of floats (NSGA-II stacks thousands of them at once);
    `maximised`: {name: whether its sense is "max"}, filled as the names are first met, when one
    dict serves every member of a snapshot."""
    if not member.history:
        return None
    values = []
    for name in objectives:
        v = member.objectives.get(name)
        if v is None and name == "val_bpb":
            v = member.fitness
        if v is None:
            return None
        v = float(v)
        if not math.isfinite(v):
            values.append(math.inf)  # diverged or unmeasured: the worst, whatever the sense
        else:
            if maximised is None:
                flip = objective_sense(name, senses) == "max"
            else:
                flip = maximised.get(name)
                if flip is None:
                    flip = maximised[name] = objective_sense(name, senses) == "max"
            values.append(-v if flip else v)
    return values


class NSGA2(Strategy):
    """Multi-objective selection by non-dominated sorting and crowding; children inherit weights."""

    def ranks(self, snapshot: Snapshot) -> dict[int, int]:
        """{member id: front rank} for the members that have every objective (0 = Pareto front)."""
        members, objectives = self._eligible(snapshot)
        if not members:
            return {}
        return {m.id: r for m, r in zip(members, front_ranks(objectives).tolist())}

    def pareto_front(self, snapshot: Snapshot) -> list[int]:
        """Ids of the non-dominated members (the report's Pareto front), sorted."""
        return sorted(i for i, r in self.ranks(snapshot).items() if r == 0)

    def plan(
        self, snapshot: Snapshot, rng: np.random.Generator, ready: Sequence[int] | None = None
    ) -> list[Decision]:
        todo = ready_members(snapshot, ready)
        members, objectives = self._eligible(snapshot)
        n = len(members)
        n_replace = truncation_count(n, self.config.quantile)
        if n_replace == 0:
            return [Keep(m.id) for m in todo]
        fronts = front_ranks(objectives)
        rank = {m.id: r for m, r in zip(members, fronts.tolist())}
        selected, _ = sel_nsga2(objectives, n - n_replace, fronts)
        survivors = [members[i] for i in selected]   # by front, best first
        survivor_ids = {m.id for m in survivors}
        survivor_ranks = np.array([rank[s.id] for s in survivors])

        bred = [m for m in todo if m.id in rank and m.id not in survivor_ids]
        keys = np.array([rank[m.id] for m in bred], dtype=np.int64)
        # each breeds from the survivors in a better front than its own: a prefix of them
        children = iter(breed_all(bred, keys, survivors, survivor_ranks, np.searchsorted(survivor_ranks, keys),
                                  self.space, self.config, rng))
        return [next(children) if m.id in rank and m.id not in survivor_ids else Keep(m.id) for m in todo]

    def _eligible(self, snapshot: Snapshot) -> tuple[list[MemberView], np.ndarray]:
        """The members with every objective, and their minimised objectives [n, m]."""
        members, rows = [], []
        maximised: dict[str, bool] = {}
        for m in snapshot.members:
            v = _objective_values(m, self.config.objectives, snapshot.senses, maximised)
            if v is not None:
                members.append(m)
                rows.append(v)
        objectives = np.array(rows).reshape(len(rows), len(self.config.objectives))
        # a diverged member's inf becomes "just worse than the worst finite value", so crowding
        # distances stay finite
        for col in objectives.T:
            finite = np.isfinite(col)
            col[~finite] = (col[finite].max() + 1.0) if finite.any() else 0.0
        return members, objectives
