"""Strategies against random search on the drifting-optimum toy problem (evo/toy.py).

Equal budget for all (8 members x 20 rounds x 50 steps). The figures are printed
(`pytest -s tests/evo/test_synthetic.py`); measured on seeds 0-4 each of PBT, PB2 and the GA
ended below random search on every seed, with means 10-25x lower, so the assertions
(lower mean, and lower on at least 4 of 5 seeds) leave a wide margin.
"""

from __future__ import annotations

import numpy as np
import pytest

from evo.toy import ToyProblem, run_toy

SEEDS = range(5)


@pytest.fixture(scope="module")
def random_losses() -> list[float]:
    return [run_toy("random", seed) for seed in SEEDS]


@pytest.mark.parametrize("name", ["pbt", "pb2", "ga"])
def test_strategy_beats_random_search_at_equal_budget(name: str, random_losses: list[float]) -> None:
    losses = [run_toy(name, seed) for seed in SEEDS]
    print(f"\n{'seed':>8} " + " ".join(f"{s:>8d}" for s in SEEDS) + f" {'mean':>8}")
    for label, values in (("random", random_losses), (name, losses)):
        print(f"{label:>8} " + " ".join(f"{v:8.4f}" for v in values) + f" {np.mean(values):8.4f}")
    wins = sum(a < b for a, b in zip(losses, random_losses))
    assert np.mean(losses) < np.mean(random_losses)
    assert wins >= 4, f"{name} beat random search on {wins} of {len(SEEDS)} seeds"


def test_toy_is_deterministic() -> None:
    assert run_toy("pb2", 3, rounds=6) == run_toy("pb2", 3, rounds=6)
    assert run_toy("ga", 3, rounds=6) != run_toy("ga", 4, rounds=6)


def test_toy_rewards_a_schedule_over_every_fixed_learning_rate() -> None:
    """The premise: the best learning rate drifts (high early, low late), so an annealed
    learning rate beats the best of a grid of fixed ones."""
    problem = ToyProblem.make(0)
    grid = np.logspace(0, -3, 13)  # one row per fixed lr
    n = len(grid) + 1  # the last row follows the schedule
    rng = np.random.default_rng(0)
    theta = np.zeros((n, len(problem.curvature)))
    for block in range(20):  # 20 x 50 steps; the schedule: 0.3 for 100 steps, then decays to 0.003
        lr = np.append(grid, 0.3 if block < 2 else 0.3 * 0.01 ** ((block - 1) / 19))
        theta = problem.train(theta, lr, np.zeros(n), rng.normal(size=(50, n, theta.shape[1])))
    loss = problem.loss(theta)
    assert loss[-1] < loss[:-1].min()
