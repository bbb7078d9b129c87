"""PB2-style search (Parker-Holder et al. 2020): PBT's exploit, a model's explore.

Each time members are ready (every member each round in sync mode):

    observe:  for every member evaluated since the last plan, record one observation
              (hyperparameters it trained with during the interval -> improvement
              = fitness at the start of the interval - fitness now); the start is the
              donor's fitness when the member had just copied a donor
    exploit:  PBT truncation -- a bottom-quantile member copies a top-quantile member
    explore:  the hyperparameter genes are proposed by an Optuna sampler (TPE, or GP with
              `sampler: gp`) fitted on the recent observations, maximising the improvement;
              the architecture genes come from the donor, explored by PBT's rule (they change
              the model's shape, which the sampler knows nothing about);
              until MIN_OBSERVATIONS observations exist, PBT's explore is used instead, and
              only the first MAX_PROPOSALS receivers of a plan get a proposal (the others
              explore like PBT), so that the model's cost per round stays bounded;
              TPE's proposals are computed on arrays (evo/tpe_batch.py), the same numbers
              as asking the study for them one by one (`_study_proposals`, the plain path).

The improvement of a good configuration shrinks as training goes on, so observations are
compared only with those ending at the same step: the model is fitted on per-step z-scores
of the improvement, over the last WINDOW evaluation steps (the optimum drifts, old
observations mislead). Observations and the per-member interval starts live in
`state_dict`; a resumed strategy fits the same model on the same observations and, with a sampler
seeded from the `rng` given to `plan`, proposes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from evo import tpe_batch
from evo.pbt import explore, truncation_donors
from evo.space import SearchSpace
from evo.strategy import Decision, Exploit, Keep, MemberView, Snapshot, Strategy
from evo.strategies import StrategyConfig, inside, ready_members

MIN_OBSERVATIONS = 8  # below this the model knows too little: explore like PBT
WINDOW = 4  # the model sees the observations of the last WINDOW evaluation steps
MAX_OBSERVATIONS = 200  # the state keeps at most this many (the oldest are dropped)
# proposals asked of the sampler per plan (each ask costs milliseconds: a population of
# thousands would spend seconds); receivers beyond these explore like PBT
MAX_PROPOSALS = 16


class PB2(Strategy):
    """PBT exploit + model-based explore of the hyperparameters (Optuna TPE or GP)."""

    state_replaced_items = ("intervals",)   # each member's interval is a new dict when it changes

    def __init__(self, space: SearchSpace, config: StrategyConfig) -> None:
        super().__init__(space, config)
        self.hparams = tuple(g.path for g in space.genes if not g.is_architecture)
        # [{"params": {path: value}, "step": int, "improvement": float}], oldest first
        self.observations: list[dict[str, Any]] = []
        # member id -> {"seen": [[step, fitness], ...] history ends that start the interval,
        #               "start": fitness at the start, "params": hyperparameters trained with}
        self.intervals: dict[int, dict[str, Any]] = {}

    def plan(
        self, snapshot: Snapshot, rng: np.random.Generator, ready: Sequence[int] | None = None
    ) -> list[Decision]:
        members = ready_members(snapshot, ready)
        self._observe(snapshot)
        donors = truncation_donors(snapshot, self.config.quantile)
        with_donors = [(m.id, c) for m in members if (c := donors.get(m.id))]
        # one draw per receiver, uniform over its candidates, as one array draw (the same
        # numbers as a scalar draw each, in member order)
        drawn = rng.integers(np.array([len(c) for _, c in with_donors], dtype=np.int64)).tolist() if with_donors else []
        chosen: dict[int, MemberView] = {i: c[j] for (i, c), j in zip(with_donors, drawn)}
        proposals = iter(self._propose(min(len(chosen), MAX_PROPOSALS), rng) if chosen else [])
        explored = iter(explore([chosen[m.id].genome for m in members if m.id in chosen], self.space, rng,
                                self.config.resample_probability, self.config.perturb_factors))
        decisions: list[Decision] = []
        for m in members:
            donor = chosen.get(m.id)
            if donor is None:
                decisions.append(Keep(m.id))
                continue
            genome, how = next(explored)
            proposal = next(proposals, None)
            if proposal is not None:
                genome, how = inside(self.space, genome.replace(proposal), donor.genome), "model"
            decisions.append(Exploit(m.id, donor.id, genome, how))
            self.intervals[m.id] = {
                "seen": [_end(m), _end(donor)],
                "start": float(donor.fitness),
                "params": genome.hyperparameters(),
            }
        return decisions

    def _observe(self, snapshot: Snapshot) -> None:
        """Record the intervals that ended since the last plan; start the next ones."""
        intervals = self.intervals
        alive = {m.id for m in snapshot.members}
        for i in [i for i in intervals if i not in alive]:
            del intervals[i]  # gone from the population
        ended = []  # (interval, end step, fitness now) of each interval that ended, in member order
        isfinite = math.isfinite
        for m in snapshot.members:   # (_end inlined: thousands of members a round)
            history = m.history
            if not history or not isfinite(history[-1][1]):
                intervals.pop(m.id, None)  # no fitness (yet, or after a restart) or diverged
                continue
            step, fitness = history[-1]
            end = [int(step), float(fitness)]
            interval = intervals.get(m.id)
            if interval is not None:
                if end in interval["seen"]:
                    continue  # not evaluated since the interval started
                ended.append((interval, end[0], fitness))
            intervals[m.id] = {"seen": [end], "start": end[1], "params": m.genome.hyperparameters()}
        # only the last MAX_OBSERVATIONS are kept: build no more than those
        self.observations.extend({"params": interval["params"], "step": step, "improvement": interval["start"] - f}
                                 for interval, step, f in ended[-MAX_OBSERVATIONS:])
        del self.observations[:-MAX_OBSERVATIONS]

    def _propose(self, k: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        """k hyperparameter proposals from a sampler fitted on the recent observations
        ([] while there are too few observations or no hyperparameter genes)."""
        steps = sorted({o["step"] for o in self.observations})[-WINDOW:]
        recent = [o for o in self.observations if o["step"] in steps]
        if len(recent) < MIN_OBSERVATIONS or not self.hparams:
            return []
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        distributions = {p: d for p, d in self.space.to_optuna().items() if p in self.hparams}
        params, values = [o["params"] for o in recent], _zscores(recent)
        seed = int(rng.integers(2**31))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.config.sampler == "gp":
                sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=MIN_OBSERVATIONS)
            else:
                sampler = optuna.samplers.TPESampler(
                    seed=seed, n_startup_trials=MIN_OBSERVATIONS, multivariate=True
                )
            if tpe_batch.usable(sampler, distributions, len(values)):
                return tpe_batch.proposals(sampler, distributions, params, values, k)   # the same, faster
            return _study_proposals(sampler, distributions, params, values, k)

    def state_dict(self) -> dict:
        return {
            "observations": self.observations,
            "intervals": {str(i): v for i, v in self.intervals.items()},   # v: replaced, never changed
        }

    def load_state_dict(self, state: dict) -> None:
        self.observations = [dict(o) for o in state["observations"]]
        self.intervals = {int(i): dict(v) for i, v in state["intervals"].items()}


def _end(member: MemberView) -> list:
    """The member's last history entry as JSON-friendly [step, fitness]."""
    step, fitness = member.history[-1]
    return [int(step), float(fitness)]


def _study_proposals(
    sampler: Any, distributions: dict[str, Any], params: Sequence[dict[str, Any]],
    values: Sequence[float], k: int,
) -> list[dict[str, Any]]:
    """k proposals of `sampler` on an in-memory study holding one complete trial per (params,
    value); asked trials stay running, so TPE's constant liar spreads the k proposals out."""
    import optuna

    study = optuna.create_study(direction="maximize", sampler=sampler)
    for p, value in zip(params, values):
        study.add_trial(optuna.trial.create_trial(params=p, distributions=distributions, value=value))
    return [study.ask(distributions).params for _ in range(k)]


def _zscores(observations: list[dict[str, Any]]) -> list[float]:
    """Each improvement standardised among the observations ending at the same step
    (0 when it is alone or all are equal), so early and late intervals compare."""
    groups: dict[int, list[float]] = defaultdict(list)
    for o in observations:
        groups[o["step"]].append(o["improvement"])
    stats = {s: (float(np.mean(v)), float(np.std(v))) for s, v in groups.items()}
    return [
        (o["improvement"] - stats[o["step"]][0]) / stats[o["step"]][1] if stats[o["step"]][1] > 0 else 0.0
        for o in observations
    ]
