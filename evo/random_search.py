"""Random search: the initial random configurations, trained to the end, never exploited.

The baseline every strategy must beat at equal budget: the driver samples the population from
the search space (`SearchSpace.sample`) and this strategy keeps every member as it is, so the
run is `population` independent trainings of random configurations.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from evo.strategy import Decision, Keep, Snapshot, Strategy
from evo.strategies import ready_members


class RandomSearch(Strategy):
    """Always Keep."""

    def plan(
        self, snapshot: Snapshot, rng: np.random.Generator, ready: Sequence[int] | None = None
    ) -> list[Decision]:
        return [Keep(m.id) for m in ready_members(snapshot, ready)]
