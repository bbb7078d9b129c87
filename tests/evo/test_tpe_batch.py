"""evo/tpe_batch.py proposes what Optuna's TPESampler proposes through a study (PB2's plain path),
number for number, on every kind of gene PB2 hands it."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from evo import tpe_batch
from evo.pb2 import MIN_OBSERVATIONS, _study_proposals
from evo.space import ChoiceGene, FloatGene, IntGene, SearchSpace

GENES = {
    "float": FloatGene("train.weight_decay", 0.0, 0.2),
    "log": FloatGene("train.lr", 1e-4, 3e-2, log=True),
    "step": IntGene("train.warmup_steps", 0, 100, step=10),
    "int-log": IntGene("train.batch_size", 4, 64, log=True),
    "choice": ChoiceGene("train.schedule", ("cosine", "constant", "linear")),
}
BASE = {"train.weight_decay": 0.1, "train.lr": 1e-3, "train.warmup_steps": 20, "train.batch_size": 16,
        "train.schedule": "cosine"}
SPACES = {
    "quickstart": ("log", "float"),
    "all": ("float", "log", "step", "int-log", "choice"),
    "choice": ("choice",),
    "step": ("step",),
}


def history(names: tuple[str, ...], n: int, seed: int) -> tuple[dict, list[dict], list[float]]:
    """Optuna distributions of the genes, n observations drawn from them and their values,
    ~1/3 of the values tied (as PB2's z-scores are 0 for a lone or flat step)."""
    space = SearchSpace([GENES[g] for g in names], BASE)
    distributions = space.to_optuna()
    rng = np.random.default_rng(seed)
    params = [{p: space.sample(rng)[p] for p in distributions} for _ in range(n)]
    values = [0.0 if rng.random() < 0.33 else float(rng.standard_normal()) for _ in range(n)]
    return distributions, params, values


def tpe(seed: int, **kwargs) -> optuna.samplers.TPESampler:
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=MIN_OBSERVATIONS, multivariate=True, **kwargs)


@pytest.mark.parametrize("space_name", SPACES)
@pytest.mark.parametrize("n, k", [(MIN_OBSERVATIONS, 0), (MIN_OBSERVATIONS, 1), (MIN_OBSERVATIONS, 16), (40, 16), (200, 16), (200, 3)])
@pytest.mark.parametrize("constant_liar", [True, False])
def test_array_proposals_equal_the_studys(space_name: str, n: int, k: int, constant_liar: bool) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for seed in range(3):
        distributions, params, values = history(SPACES[space_name], n, seed)
        fast = tpe(seed, constant_liar=constant_liar)
        assert tpe_batch.usable(fast, distributions, n)
        got = tpe_batch.proposals(fast, distributions, params, values, k)
        want = _study_proposals(tpe(seed, constant_liar=constant_liar), distributions, params, values, k)
        assert got == want
        assert [[type(v) for v in p.values()] for p in got] == [[type(v) for v in p.values()] for p in want]
        assert [list(p) for p in got] == [list(distributions)] * k


def test_proposals_spread_out_under_the_constant_liar() -> None:
    distributions, params, values = history(SPACES["quickstart"], 200, 0)
    got = tpe_batch.proposals(tpe(0), distributions, params, values, 16)
    assert len({tuple(p.values()) for p in got}) == 16
    for p in got:
        assert 1e-4 <= p["train.lr"] <= 3e-2 and 0.0 <= p["train.weight_decay"] <= 0.2


def test_only_the_samplers_it_reproduces_are_usable() -> None:
    distributions, _, _ = history(SPACES["all"], 1, 0)
    assert tpe_batch.usable(tpe(0), distributions, MIN_OBSERVATIONS)
    assert not tpe_batch.usable(tpe(0), distributions, MIN_OBSERVATIONS - 1)   # start-up: random sampling
    assert not tpe_batch.usable(optuna.samplers.TPESampler(seed=0, n_startup_trials=MIN_OBSERVATIONS),
                                distributions, MIN_OBSERVATIONS)   # multivariate left to Optuna
    assert not tpe_batch.usable(optuna.samplers.RandomSampler(seed=0), distributions, MIN_OBSERVATIONS)
    single = {**distributions, "train.beta2": optuna.distributions.FloatDistribution(0.9, 0.9)}
    assert not tpe_batch.usable(tpe(0), single, MIN_OBSERVATIONS)
