"""Selection, crossover and mutation operators.

The central property: over random spaces (all gene kinds, log scales, steps, choices,
architecture constraints, parameter budgets) and genomes anywhere in them -- the bounds
included -- no operator ever returns a genome outside the space. Plus PBT's perturbation
rule, faithfulness to DEAP's formulas, determinism, and untouched global RNGs.
"""

from __future__ import annotations

import math
import random

import deap.base
import deap.tools
import deap.tools.crossover
import deap.tools.mutation
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from evo.crossover import _sbx_first_child, cx_sbx, cx_uniform
from evo.ga import _crossover_coordinates, _polynomial_coordinates
from evo.genome import Genome
from evo.mutation import _polynomial, mut_perturb, mut_polynomial, mut_resample
from evo.pbt import explore
from evo.selection import (crowding_distances, front_ranks, pareto_front, sel_aging, sel_nsga2, sel_tournament,
                           sel_truncation)
from evo.space import ChoiceGene, FloatGene, IntGene, SearchSpace
from tests.evo.test_space import BASE, RULES, SETTINGS, bound_value, spaces


def _lr_space(genes: dict) -> SearchSpace:
    """train.lr (log-uniform 1e-4..1e-2) first, then ``genes``, at the test base shape."""
    lr = {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}
    return SearchSpace.from_dict({"train.lr": lr, **genes}, BASE, architecture=RULES)


def _grow_case() -> tuple[SearchSpace, Genome, Genome]:
    """The grow tests' space (lr, 1-4 layers, kv heads 1/2/4), a genome in the middle of both
    architecture genes and the same genome at their top."""
    space = _lr_space({"model.num_hidden_layers": {"type": "int", "low": 1, "high": 4},
                       "model.num_key_value_heads": {"type": "choice", "choices": [1, 2, 4]}})
    g = Genome.from_dict({"train.lr": 1e-3, "model.num_hidden_layers": 2, "model.num_key_value_heads": 2})
    return space, g, g.replace({"model.num_hidden_layers": 4, "model.num_key_value_heads": 4})


# ----------------------------------------------------------------------------------------------
# no operator leaves the space


@st.composite
def space_and_two_genomes(draw):
    """A random space and two genomes inside it: sampled, or from the bounds (clipped)."""
    space = draw(spaces())
    genomes = []
    for _ in range(2):
        if draw(st.booleans()):
            genomes.append(space.sample(np.random.default_rng(draw(st.integers(0, 2**32 - 1)))))
        else:
            genomes.append(space.clip(Genome.from_dict({g.path: bound_value(draw, g) for g in space.genes})))
    return space, genomes[0], genomes[1], np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


@SETTINGS
@given(space_and_two_genomes(), st.sampled_from([(0.8, 1.2), (0.5, 2.0), (0.9,), (1.5, 3.0, 0.1)]), st.booleans())
def test_mut_perturb_stays_inside(s, factors, include_architecture):
    space, a, _, rng = s
    for _ in range(3):
        a = mut_perturb(a, space, rng, factors=factors, include_architecture=include_architecture)
        assert space.contains(a)


@SETTINGS
@given(space_and_two_genomes(), st.floats(0.0, 1.0))
def test_mut_resample_stays_inside(s, probability):
    space, a, _, rng = s
    assert space.contains(mut_resample(a, space, rng, probability))


@SETTINGS
@given(space_and_two_genomes(), st.floats(0.5, 100.0), st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_mut_polynomial_stays_inside(s, eta, probability):
    space, a, _, rng = s
    for _ in range(3):
        a = mut_polynomial(a, space, rng, eta=eta, probability=probability)
        assert space.contains(a)


@SETTINGS
@given(space_and_two_genomes(), st.floats(0.0, 1.0), st.floats(0.5, 100.0))
def test_crossovers_stay_inside(s, prob, eta):
    space, a, b, rng = s
    child = cx_uniform(a, b, space, rng, prob=prob)
    assert space.contains(child)
    child = cx_sbx(a, b, space, rng, eta=eta)
    assert space.contains(child)


@SETTINGS
@given(spaces(architecture=False), st.integers(0, 2**32 - 1))
def test_uniform_crossover_child_takes_each_gene_from_a_parent(space, seed):
    # (without architecture constraints no repair can move a gene)
    rng = np.random.default_rng(seed)
    a, b = space.sample(rng), space.sample(rng)
    child = cx_uniform(a, b, space, rng)
    assert all(child[p] in (a[p], b[p]) for p in space.paths)


# ----------------------------------------------------------------------------------------------
# PBT perturbation rule


def one_gene_space(gene):
    return SearchSpace([gene], dict(BASE, **{gene.path: 0}), architecture=RULES)


def perturbed_values(gene, value, n=60, **kw):
    space = one_gene_space(gene)
    g = Genome.from_dict({gene.path: value})
    return [mut_perturb(g, space, np.random.default_rng(seed), **kw)[gene.path] for seed in range(n)]


def test_perturb_multiplies_a_float_by_one_of_the_factors():
    values = perturbed_values(FloatGene("train.lr", 1e-5, 1e-1, log=True), 1e-3)
    assert set(values) == {8e-4, 1.2e-3}


def test_perturb_at_the_upper_bound_stays_at_the_bound():
    values = perturbed_values(FloatGene("train.lr", 1e-5, 1e-2, log=True), 1e-2)
    assert set(values) == {8e-3, 1e-2}
    values = perturbed_values(FloatGene("train.lr", 1e-3, 1e-1), 1e-3)
    assert set(values) == {1e-3, 1.2e-3}


def test_perturb_rounds_integers_and_always_moves_them():
    gene = IntGene("train.warmup_steps", 0, 100)
    assert set(perturbed_values(gene, 10)) == {8, 12}
    assert set(perturbed_values(gene, 2)) == {1, 3}  # 1.6 and 2.4 round back to 2: one step instead
    assert set(perturbed_values(gene, 1)) == {0, 2}
    assert set(perturbed_values(gene, 0)) == {0, 1}  # 0 x factor is 0: one step up (down is clipped)
    assert set(perturbed_values(gene, 100)) == {80, 100}
    stepped = IntGene("train.batch_size", 8, 64, step=8)
    assert set(perturbed_values(stepped, 16)) == {8, 24}  # 12.8 -> 16, 19.2 -> 16: a step each way
    assert all(isinstance(v, int) for v in perturbed_values(stepped, 40))


def test_perturb_moves_a_choice_to_a_neighbour_only():
    gene = ChoiceGene("train.schedule", ("a", "b", "c", "d"))
    assert set(perturbed_values(gene, "b")) == {"a", "c"}
    assert set(perturbed_values(gene, "a")) == {"a", "b"}
    assert set(perturbed_values(gene, "d")) == {"c", "d"}
    numeric = ChoiceGene("train.batch_size", (8, 16, 32))
    assert set(perturbed_values(numeric, 16, factors=(0.8, 1.2))) == {8, 32}  # never 12.8 or 19.2


def test_perturb_leaves_architecture_alone_when_asked():
    space = _lr_space({"model.num_hidden_layers": {"type": "int", "low": 1, "high": 8},
                       "model.hidden_size": {"type": "choice", "choices": [32, 64, 128]}})
    g = Genome.from_dict({"train.lr": 1e-3, "model.num_hidden_layers": 4, "model.hidden_size": 64})
    for seed in range(20):
        h = mut_perturb(g, space, np.random.default_rng(seed), include_architecture=False)
        assert h.architecture() == g.architecture() and h["train.lr"] != g["train.lr"]
    moved = [mut_perturb(g, space, np.random.default_rng(s)).architecture() != g.architecture() for s in range(20)]
    assert all(moved)


# ----------------------------------------------------------------------------------------------
# PBT's explore of many genomes at once (evo.pbt.explore): the same moves, as arrays


@SETTINGS
@given(space_and_two_genomes(), st.floats(0.0, 1.0), st.sampled_from([(0.8, 1.2), (0.5, 2.0), (0.9,)]))
def test_explore_stays_inside(s, probability, factors):
    space, a, b, rng = s
    out = explore([a, b, a], space, rng, probability, factors)
    assert len(out) == 3 and all(space.contains(g) and how in ("perturb", "resample") for g, how in out)


@pytest.mark.parametrize("gene, value", [
    (FloatGene("train.lr", 1e-5, 1e-1, log=True), 1e-3),
    (FloatGene("train.lr", 1e-5, 1e-2, log=True), 1e-2),
    (FloatGene("train.lr", 1e-3, 1e-1), 1e-3),
    (IntGene("train.warmup_steps", 0, 100), 10),
    (IntGene("train.warmup_steps", 0, 100), 2),
    (IntGene("train.warmup_steps", 0, 100), 0),
    (IntGene("train.warmup_steps", 0, 100), 100),
    (IntGene("train.batch_size", 8, 64, step=8), 16),
    (ChoiceGene("train.schedule", ("a", "b", "c", "d")), "b"),
    (ChoiceGene("train.schedule", ("a", "b", "c", "d")), "a"),
    (ChoiceGene("train.batch_size", (8, 16, 32)), 16),
])
def test_explore_without_resampling_makes_exactly_mut_perturbs_moves(gene, value):
    space = one_gene_space(gene)
    g = Genome.from_dict({gene.path: value})
    out = explore([g] * 200, space, np.random.default_rng(0), 0.0, (0.8, 1.2))
    assert {h[gene.path] for h, _ in out} == set(perturbed_values(gene, value))
    assert {how for _, how in out} == {"perturb"}
    assert all(type(h[gene.path]) is type(value) for h, _ in out)


def test_explore_resamples_each_gene_at_its_rate_from_the_prior():
    space = _lr_space({"train.warmup_steps": {"type": "int", "low": 0, "high": 100},
                       "train.schedule": {"type": "choice", "choices": ["a", "b", "c"]}})
    g = Genome.from_dict({"train.lr": 1e-3, "train.warmup_steps": 50, "train.schedule": "b"})
    out = explore([g] * 4000, space, np.random.default_rng(1), 0.25, (0.8, 1.2))
    resampled = np.mean([how == "resample" for _, how in out])
    assert abs(resampled - (1 - 0.75 ** 3)) < 0.03    # any of three genes, each with probability 1/4
    lrs = np.array([h["train.lr"] for h, _ in out])
    fresh = lrs[(lrs != 8e-4) & (lrs != 1.2e-3)]       # neither perturbation: resampled
    assert abs(len(fresh) / len(lrs) - 0.25) < 0.03
    assert abs(np.mean(np.log10(fresh)) + 3.0) < 0.1   # log-uniform on [1e-4, 1e-2]: mean log10 = -3
    steps = np.array([h["train.warmup_steps"] for h, _ in out])
    assert set(steps[(steps != 40) & (steps != 60)]) <= set(range(101)) and len(set(steps)) > 50


def test_explore_of_no_genomes_draws_nothing():
    space = one_gene_space(FloatGene("train.lr", 1e-5, 1e-1, log=True))
    rng = np.random.default_rng(3)
    assert explore([], space, rng, 0.25, (0.8, 1.2)) == []
    assert rng.random() == np.random.default_rng(3).random()


class Draws:
    """An rng whose random() returns the given numbers in turn (to replay a scalar operator)."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_polynomial_on_arrays_is_the_scalar_formula():
    space = SearchSpace.from_dict({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                                   "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.2}}, BASE)
    x = np.random.default_rng(5).random((300, 2))
    x[:4] = [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1e-9, 1 - 1e-9]]
    new = _polynomial_coordinates(x, space, 1.0, np.random.default_rng(6))
    replay = np.random.default_rng(6)
    replay.random(x.shape)               # the coins (all move with probability 1)
    rand = replay.random(x.shape)
    expected = [[_polynomial(x[i, j], 20.0, Draws(rand[i, j])) for j in range(2)] for i in range(len(x))]
    np.testing.assert_allclose(new, expected, rtol=1e-12, atol=1e-15)


def test_sbx_on_arrays_is_the_scalar_formula():
    space = SearchSpace.from_dict({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                                   "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.2}}, BASE)
    gen = np.random.default_rng(7)
    xa, xb = gen.random((300, 2)), gen.random((300, 2))
    xb[:3] = xa[:3]                      # equal parents: the child is the first
    xa[3:6], xb[3:6] = 0.0, 1.0
    child = _crossover_coordinates(xa, xb, space, "sbx", np.random.default_rng(8))
    replay = np.random.default_rng(8)
    skip, rand, pick = replay.random(xa.shape), replay.random(xa.shape), replay.random(xa.shape)
    expected = [[_sbx_first_child(xa[i, j], xb[i, j], 15.0, Draws(skip[i, j], rand[i, j], pick[i, j]))
                 for j in range(2)] for i in range(len(xa))]
    np.testing.assert_allclose(child, expected, rtol=1e-12, atol=1e-15)


def test_resample_probability_zero_and_one():
    space = _lr_space({})
    g = Genome.from_dict({"train.lr": 1e-3})
    assert mut_resample(g, space, np.random.default_rng(0), 0.0) == g
    assert len({mut_resample(g, space, np.random.default_rng(s), 1.0)["train.lr"] for s in range(10)}) == 10


def test_polynomial_changes_choices_and_small_ints():
    space = SearchSpace.from_dict(
        {
            "train.schedule": {"type": "choice", "choices": ["cosine", "constant"]},
            "model.num_hidden_layers": {"type": "int", "low": 1, "high": 4},
        },
        BASE,
        architecture=RULES,
    )
    g = Genome.from_dict({"train.schedule": "cosine", "model.num_hidden_layers": 2})
    for seed in range(20):
        h = mut_polynomial(g, space, np.random.default_rng(seed), probability=1.0)
        assert h["train.schedule"] == "constant" and h["model.num_hidden_layers"] in (1, 3)


def test_polynomial_on_arrays_with_grow_moves_architecture_genes_only_up():
    """The GA's array mutation with grow_only: as mut_polynomial(grow=True), per row."""
    space, g, top = _grow_case()
    x = np.stack([space.encode(g)] * 200 + [space.encode(top)] * 200)
    children = [space.decode(r) for r in _polynomial_coordinates(x, space, 1.0, np.random.default_rng(4), grow=True)]
    assert 3 in {c["model.num_hidden_layers"] for c in children[:200]} <= {3, 4}
    assert {c["model.num_key_value_heads"] for c in children[:200]} == {4}
    assert {c["train.lr"] > 1e-3 for c in children[:200]} == {True, False}
    assert all(c.architecture() == top.architecture() for c in children[200:])


def test_polynomial_grow_moves_architecture_genes_only_up():
    """grow=True (strategy.grow_only's redraw): an architecture gene never goes down -- an int
    gene's downward move is mirrored up, a choice gene takes a larger choice, and at its top it
    stays; a gene outside the architecture still moves both ways."""
    space, g, top = _grow_case()
    layers, kv, lr = set(), set(), set()
    for seed in range(40):
        h = mut_polynomial(g, space, np.random.default_rng(seed), probability=1.0, grow=True)
        layers.add(h["model.num_hidden_layers"])
        kv.add(h["model.num_key_value_heads"])
        lr.add(h["train.lr"] > 1e-3)
        t = mut_polynomial(top, space, np.random.default_rng(seed), probability=1.0, grow=True)
        assert t.architecture() == top.architecture()
    assert 3 in layers and layers <= {3, 4}
    assert kv == {4} and lr == {True, False}
    # without grow the same draws do move down
    assert any(mut_polynomial(g, space, np.random.default_rng(s), probability=1.0)["model.num_hidden_layers"] == 1
               for s in range(40))


# ----------------------------------------------------------------------------------------------
# the same numbers as DEAP's operators, given the same random numbers


class _Draws:
    """Stands in for the `random` module inside DEAP: yields given numbers."""

    def __init__(self, values):
        self._values = iter(values)

    def random(self):
        return float(next(self._values))


UNIT_GENES = [FloatGene(f"train.g{i}", 0.0, 1.0) for i in range(6)]
UNIT_SPACE = SearchSpace(UNIT_GENES, dict(BASE, **{g.path: 0.0 for g in UNIT_GENES}), architecture=RULES)


def test_generator_scalar_draws_match_a_vector_of_draws():
    rng = np.random.default_rng(5)
    assert [rng.random() for _ in range(5)] == list(np.random.default_rng(5).random(5))


@pytest.mark.parametrize("seed", range(10))
def test_sbx_is_deap_cx_simulated_binary_bounded(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    a, b = UNIT_SPACE.sample(rng), UNIT_SPACE.sample(rng)
    monkeypatch.setattr(deap.tools.crossover, "random", _Draws(np.random.default_rng(seed + 100).random(100)))
    ind1, _ = deap.tools.crossover.cxSimulatedBinaryBounded(list(UNIT_SPACE.encode(a)), list(UNIT_SPACE.encode(b)), 15.0, 0.0, 1.0)
    child = cx_sbx(a, b, UNIT_SPACE, np.random.default_rng(seed + 100), eta=15.0)
    assert list(UNIT_SPACE.encode(child)) == ind1
    assert child != a  # something was recombined


@pytest.mark.parametrize("seed", range(10))
def test_polynomial_is_deap_mut_polynomial_bounded(seed, monkeypatch):
    a = UNIT_SPACE.sample(np.random.default_rng(seed))
    monkeypatch.setattr(deap.tools.mutation, "random", _Draws(np.random.default_rng(seed + 100).random(100)))
    (ind,) = deap.tools.mutation.mutPolynomialBounded(list(UNIT_SPACE.encode(a)), 20.0, 0.0, 1.0, 0.5)
    mutant = mut_polynomial(a, UNIT_SPACE, np.random.default_rng(seed + 100), eta=20.0, probability=0.5)
    assert list(UNIT_SPACE.encode(mutant)) == ind


def test_sbx_works_in_log_space():
    space = SearchSpace.from_dict({"train.lr": {"type": "float", "low": 1e-6, "high": 1.0, "log": True}}, BASE,
                                  architecture=RULES)
    a, b = Genome.from_dict({"train.lr": 1e-5}), Genome.from_dict({"train.lr": 1e-3})
    children = [cx_sbx(a, b, space, np.random.default_rng(s), eta=15.0)["train.lr"] for s in range(200)]
    # children spread around the parents in log space: the geometric middle 1e-4 is as likely
    # as the arithmetic one (5e-4) is rare
    assert all(1e-6 <= c <= 1.0 for c in children)
    assert np.median(np.log10(children)) == pytest.approx(-4, abs=1.0)


# ----------------------------------------------------------------------------------------------
# determinism and global RNGs


ARCH = SearchSpace.from_dict(
    {
        "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "train.warmup_steps": {"type": "int", "low": 0, "high": 100, "step": 5},
        "train.schedule": {"type": "choice", "choices": ["cosine", "constant"]},
        "model.hidden_size": {"type": "int", "low": 32, "high": 256, "step": 8},
        "model.num_attention_heads": {"type": "choice", "choices": [2, 4, 8]},
        "model.num_key_value_heads": {"type": "int", "low": 1, "high": 8},
        "model.num_hidden_layers": {"type": "int", "low": 1, "high": 6},
    },
    BASE,
    max_params=400_000,
    architecture=RULES,
)


def run_everything(seed):
    rng = np.random.default_rng(seed)
    a, b = ARCH.sample(rng), ARCH.sample(rng)
    fit = rng.random(8)
    return [
        a, b,
        mut_perturb(a, ARCH, rng), mut_resample(a, ARCH, rng, 0.5), mut_polynomial(a, ARCH, rng, probability=0.5),
        cx_uniform(a, b, ARCH, rng), cx_sbx(a, b, ARCH, rng),
        sel_tournament(fit, 3, 2, rng), sel_truncation(fit, 0.25), sel_nsga2(rng.random((8, 2)), 4), sel_aging([1, 2], 1),
    ]


def test_same_seed_same_results_different_seed_different_results():
    assert run_everything(3) == run_everything(3)
    assert run_everything(3) != run_everything(4)


def test_operators_do_not_touch_the_global_rngs():
    random.seed(1)
    np.random.seed(1)
    py_state, np_state = random.getstate(), np.random.get_state()
    for seed in range(5):
        run_everything(seed)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


# ----------------------------------------------------------------------------------------------
# selection


def test_truncation_excludes_missing_fitness():
    fitness = [0.5, None, 0.1, math.nan, 0.3, 0.9, 0.2, 0.4]
    bottom, top = sel_truncation(fitness, 0.25)  # 6 ranked: k = min(ceil(1.5), 3) = 2
    assert top == [2, 6] and bottom == [5, 0]
    assert sel_truncation(np.array([0.3, 0.1]), 0.25) == ([0], [1])
    assert sel_truncation([0.3, 0.1, 0.2, 0.5], 0.5) == ([3, 0], [1, 2])
    assert sel_truncation([0.3], 0.25) == ([], [])
    assert sel_truncation([0.3, 0.1], 0.0) == ([], [])
    with pytest.raises(ValueError, match="quantile"):
        sel_truncation([0.3, 0.1], 0.7)


def test_tournament_picks_the_best_aspirant_and_skips_missing_fitness():
    fitness = [0.5, None, 0.1, math.nan, 0.3]
    winners = sel_tournament(fitness, 200, 2, np.random.default_rng(0))
    assert len(winners) == 200 and set(winners) <= {0, 2, 4}
    counts = np.bincount(winners, minlength=5)
    assert counts[2] > counts[4] > counts[0]  # binary tournament: P = 5/9, 3/9, 1/9
    assert sel_tournament(fitness, 5, 50, np.random.default_rng(0)) == [2] * 5
    assert sel_tournament(fitness, 4, 2, np.random.default_rng(9)) == sel_tournament(fitness, 4, 2, np.random.default_rng(9))
    with pytest.raises(ValueError):
        sel_tournament([None, math.nan], 1, 2, np.random.default_rng(0))


def test_nsga2_selects_whole_fronts_then_by_crowding():
    obj = np.array([[1, 5], [2, 3], [3, 1], [2, 4], [4, 4], [np.nan, 0.0], [1.5, 4.5]])
    selected, front = sel_nsga2(obj, 4)
    assert front == [0, 1, 2, 6]
    assert sorted(selected) == [0, 1, 2, 6]
    selected, _ = sel_nsga2(obj, 7)
    assert sorted(selected[:4]) == [0, 1, 2, 6] and selected[4:] == [3, 4, 5]  # NaN row last
    # cutting the first front keeps its extremes (infinite crowding distance) first
    selected, _ = sel_nsga2(obj, 2)
    assert sorted(selected) == [0, 2]


@given(st.integers(2, 12), st.integers(1, 3), st.integers(0, 2**16), st.data())
@SETTINGS
def test_nsga2_never_drops_a_member_that_dominates_a_selected_one(n, m, seed, data):
    obj = np.random.default_rng(seed).integers(0, 4, size=(n, m)).astype(float)  # ties on purpose
    k = data.draw(st.integers(0, n))
    selected, front = sel_nsga2(obj, k)
    assert len(selected) == k == len(set(selected))
    dominates = lambda i, j: np.all(obj[i] <= obj[j]) and np.any(obj[i] < obj[j])
    for j in set(range(n)) - set(selected):
        assert not any(dominates(j, i) for i in selected)
    assert front == [i for i in range(n) if not any(dominates(j, i) for j in range(n))]
    assert pareto_front(obj) == front


def reference_fronts(obj: np.ndarray) -> list[list[int]]:
    """Non-dominated sorting the straightforward O(n^2) way: peel off the rows nobody left dominates."""
    n = len(obj)
    dominates = [[bool(np.all(obj[i] <= obj[j]) and np.any(obj[i] < obj[j])) for j in range(n)] for i in range(n)]
    left, fronts = set(range(n)), []
    while left:
        front = sorted(j for j in left if not any(dominates[i][j] for i in left))
        fronts.append(front)
        left -= set(front)
    return fronts


def reference_crowding(obj: np.ndarray, front: list[int]) -> list[float]:
    """DEAP assignCrowdingDist, written out: per objective a stable sort of the front."""
    m = obj.shape[1]
    dist = [0.0] * len(front)
    for j in range(m):
        order = sorted(range(len(front)), key=lambda i: obj[front[i], j])
        dist[order[0]] = dist[order[-1]] = math.inf
        lo, hi = obj[front[order[0]], j], obj[front[order[-1]], j]
        if lo == hi:
            continue
        for a, b, c in zip(order, order[1:], order[2:]):
            dist[b] += (obj[front[c], j] - obj[front[a], j]) / (m * (hi - lo))
    return dist


objective_arrays = st.tuples(st.integers(0, 60), st.integers(1, 4), st.integers(0, 2**16), st.booleans()).map(
    lambda a: (np.random.default_rng(a[2]).integers(0, 5, size=(a[0], a[1])).astype(float) if a[3]   # ties
               else np.random.default_rng(a[2]).random((a[0], a[1]))))


@given(objective_arrays)
@SETTINGS
def test_front_ranks_and_crowding_equal_the_quadratic_reference(obj):
    fronts = reference_fronts(obj)
    ranks = front_ranks(obj)
    assert [sorted(np.flatnonzero(ranks == f).tolist()) for f in range(len(fronts))] == fronts
    for front in fronts:
        assert crowding_distances(obj, np.array(front)).tolist() == pytest.approx(reference_crowding(obj, front))
    # selection: whole fronts in order, the cut front by crowding (largest first, ties by index)
    for k in sorted({0, len(obj) // 3, len(obj) // 2, len(obj)}):
        expected, taken = [], 0
        for front in fronts:
            if taken + len(front) <= k:
                expected += front
                taken += len(front)
            else:
                crowd = reference_crowding(obj, front)
                expected += [front[i] for i in sorted(range(len(front)), key=lambda i: -crowd[i])][: k - taken]
                break
        assert sel_nsga2(obj, k)[0] == expected
    assert pareto_front(obj) == (fronts[0] if fronts else [])


@given(objective_arrays)
@SETTINGS
def test_fronts_are_deaps_and_so_are_the_crowding_distances_without_ties(obj):
    fitness = type("F", (deap.base.Fitness,), {"weights": (-1.0,) * obj.shape[1]})
    individuals = [type("I", (list,), {})([i]) for i in range(len(obj))]
    for ind in individuals:
        ind.fitness = fitness(tuple(obj[ind[0]]))
    theirs = deap.tools.sortNondominated(individuals, len(individuals)) if individuals else []
    ranks = front_ranks(obj)
    assert [sorted(ind[0] for ind in f) for f in theirs] == [sorted(np.flatnonzero(ranks == r).tolist())
                                                               for r in range(len(theirs))]
    if all(len(np.unique(col)) == len(col) for col in obj.T):   # no ties: crowding does not depend on the order
        for f in theirs:
            deap.tools.emo.assignCrowdingDist(f)
            ours = crowding_distances(obj, np.array([ind[0] for ind in f]))
            assert ours.tolist() == pytest.approx([ind.fitness.crowding_dist for ind in f])


def test_front_ranks_grow_n_log_n_not_n_squared():
    """4,096 members on 2 and 3 objectives sort in one call (the old O(n^2) matrix took seconds);
    checked on their result, not their time: equal to the reference on a subsample's fronts."""
    rng = np.random.default_rng(0)
    for m in (2, 3):
        obj = rng.random((4096, m))
        ranks = front_ranks(obj)
        sub = np.sort(rng.choice(4096, 200, replace=False))
        assert (ranks >= 0).all() and ranks.max() < 4096
        # a row's rank is 1 + the largest rank of the rows dominating it (0 when none)
        for i in sub:
            dominating = np.all(obj <= obj[i], axis=1) & np.any(obj < obj[i], axis=1)
            assert ranks[i] == (ranks[dominating].max() + 1 if dominating.any() else 0)


def test_aging_removes_the_oldest():
    assert sel_aging([3, 7, 7, 1]) == [1]
    assert sel_aging([3, 7, 7, 1], 2) == [1, 2]
    assert sel_aging(np.array([0, 0]), 0) == []
