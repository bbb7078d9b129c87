"""SearchSpace: parsing and its errors, sampling, clip/encode/decode, architecture constraints.

Also home of the hypothesis strategies for random spaces and genomes (used by
test_operators.py too).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from evo.genome import Genome
from evo.space import ArchitectureRules, ChoiceGene, FloatGene, IntGene, SearchSpace, SpaceError
from trainers import architecture
from trainers.architecture import count_parameters

BASE = {
    "train.lr": 1e-3,
    "train.batch_size": 16,
    "train.weight_decay": 0.1,
    "train.warmup_steps": 20,
    "train.schedule": "cosine",
    "train.beta2": 0.95,
    "model.vocab_size": 256,
    "model.hidden_size": 64,
    "model.intermediate_size": 172,
    "model.num_hidden_layers": 2,
    "model.num_attention_heads": 4,
    "model.num_key_value_heads": 2,
    "model.bias": False,
    "model.rope_theta": 10000.0,
}

# InternLM2's rules, as experiments/config.py hands them to the space (trainers.architecture is
# pure Python: these tests still run without torch)
RULES = ArchitectureRules(architecture.SHAPE_FIELDS, architecture.SIZE_FIELDS, architecture.SWITCH_FIELDS,
                          architecture.shape_violations, architecture.count_parameters)

# 60 examples a property (derandomized: the same 60 every run), the same for test_operators.py:
# each draws a whole random space, so the 14 properties took about a minute at 150
SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ----------------------------------------------------------------------------------------------
# hypothesis strategies: random spaces (all three gene kinds, with and without architecture
# constraints and a parameter budget) and random genomes (inside, at the bounds, outside)


@st.composite
def float_genes(draw, path):
    if draw(st.booleans()):
        low = 10.0 ** draw(st.floats(-8, 3))
        return FloatGene(path, low, low * 10.0 ** draw(st.floats(0.01, 6)), log=True)
    low = draw(st.floats(-1e3, 1e3))
    high = low + draw(st.floats(1e-3, 1e3))
    assume(high > low)
    return FloatGene(path, low, high)


@st.composite
def int_genes(draw, path):
    if draw(st.booleans()):
        low = draw(st.integers(1, 100))
        return IntGene(path, low, low + draw(st.integers(1, 1000)), log=True)
    low, step = draw(st.integers(-50, 50)), draw(st.integers(1, 5))
    return IntGene(path, low, low + step * draw(st.integers(1, 30)), step=step)


CHOICE_VALUES = st.one_of(
    st.integers(-5, 5), st.sampled_from(["a", "b", "c", "d"]), st.booleans(), st.none(),
    st.floats(-1, 1, allow_nan=False).filter(lambda f: f != 0.0),
)


@st.composite
def choice_genes(draw, path):
    choices = draw(st.lists(CHOICE_VALUES, min_size=1, max_size=5, unique_by=lambda v: (type(v), v)))
    return ChoiceGene(path, tuple(choices))


def gene_kinds(path):
    return st.one_of(float_genes(path), int_genes(path), choice_genes(path))


@st.composite
def positive_int_genes(draw, path, values):
    """An int or choice gene over a few of `values` (sorted positive ints)."""
    if draw(st.booleans()):
        chosen = draw(st.lists(st.sampled_from(values), min_size=1, max_size=4, unique=True))
        return ChoiceGene(path, tuple(chosen))
    lo = draw(st.integers(0, len(values) - 2))
    hi = draw(st.integers(lo + 1, min(len(values) - 1, lo + 5)))
    low, high = values[lo], values[hi]
    step = draw(st.sampled_from([s for s in (1, 2, 4, 8) if (high - low) % s == 0]))
    log = step == 1 and draw(st.booleans())
    return IntGene(path, low, high, log=log, step=step)


@st.composite
def architecture_genes(draw):
    genes = []
    if draw(st.booleans()):
        genes.append(draw(positive_int_genes("model.hidden_size", [8, 12, 16, 24, 32, 48, 64, 96, 128])))
    if draw(st.booleans()):
        genes.append(draw(positive_int_genes("model.num_attention_heads", [1, 2, 3, 4, 6, 8])))
    if draw(st.booleans()):
        genes.append(draw(positive_int_genes("model.num_key_value_heads", [1, 2, 3, 4])))
    if draw(st.booleans()):
        genes.append(draw(positive_int_genes("model.num_hidden_layers", [1, 2, 3, 4])))
    if draw(st.booleans()):
        genes.append(draw(positive_int_genes("model.intermediate_size", [16, 32, 48, 64, 128])))
    if draw(st.booleans()):
        genes.append(ChoiceGene("model.bias", (False, True)))
    if draw(st.booleans()):
        genes.append(draw(float_genes("model.rope_theta")))
    return genes


@st.composite
def spaces(draw, architecture=None):
    """A random SearchSpace: 1-5 hyperparameter genes of any kind, plus (maybe) architecture
    genes with the shape constraints and (maybe) a parameter budget that some genomes break."""
    n = draw(st.integers(1, 5))
    paths = [f"train.g{i}" for i in range(n)]
    genes = [draw(gene_kinds(p)) for p in paths]
    base = dict(BASE)
    base.update({p: 0.0 for p in paths})
    base.update({"model.hidden_size": 48, "model.num_attention_heads": 4, "model.num_key_value_heads": 2})
    if architecture is None:
        architecture = draw(st.booleans())
    if architecture:
        genes += draw(architecture_genes())
    max_params = None
    try:
        space = SearchSpace(genes, base, architecture=RULES)
        if architecture and draw(st.booleans()):
            # a budget that cuts through the space: a random member's size times 1-3
            probe = space.sample(np.random.default_rng(draw(st.integers(0, 2**16))))
            max_params = int(space.count_parameters(probe) * draw(st.floats(1.0, 3.0)))
            space = SearchSpace(genes, base, max_params, architecture=RULES)
    except SpaceError:
        assume(False)  # infeasible shape constraints: construction refuses it (tested below)
    return space


def raw_value(draw, gene):
    """A value for `gene`, often outside it (outside the bounds, off the grid, not a choice)."""
    if isinstance(gene, FloatGene):
        width = gene.high - gene.low
        return draw(st.one_of(
            st.sampled_from([gene.low, gene.high]),
            st.floats(gene.low - width, gene.high + width, allow_nan=False),
        ))
    if isinstance(gene, IntGene):
        width = gene.high - gene.low
        return draw(st.one_of(st.sampled_from([gene.low, gene.high]), st.integers(gene.low - width, gene.high + width)))
    return draw(st.one_of(st.sampled_from(gene.choices), CHOICE_VALUES))


def bound_value(draw, gene):
    if isinstance(gene, ChoiceGene):
        return draw(st.sampled_from([gene.choices[0], gene.choices[-1]]))
    return draw(st.sampled_from([gene.low, gene.high]))


@st.composite
def raw_genomes(draw, space):
    return Genome.from_dict({g.path: raw_value(draw, g) for g in space.genes})


@st.composite
def space_and_genome(draw, architecture=None):
    """(space, genome inside it): sampled, or any raw / at-the-bounds genome clipped."""
    space = draw(spaces(architecture))
    how = draw(st.sampled_from(["sample", "raw", "bounds"]))
    if how == "sample":
        genome = space.sample(np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    elif how == "raw":
        genome = space.clip(draw(raw_genomes(space)))
    else:
        genome = space.clip(Genome.from_dict({g.path: bound_value(draw, g) for g in space.genes}))
    return space, genome


def assert_close_genomes(space, a, b):
    for gene in space.genes:
        if isinstance(gene, FloatGene):
            assert a[gene.path] == pytest.approx(b[gene.path], rel=1e-9, abs=1e-12)
        else:
            assert a[gene.path] == b[gene.path] and type(a[gene.path]) is type(b[gene.path])


# ----------------------------------------------------------------------------------------------
# properties over random spaces


@SETTINGS
@given(space_and_genome())
def test_genomes_from_sample_and_clip_are_inside(sg):
    space, genome = sg
    assert space.contains(genome)
    assert genome.paths == space.paths
    if space.max_params is not None:
        assert space.count_parameters(genome) <= space.max_params


@SETTINGS
@given(st.data())
def test_clip_is_idempotent_and_the_identity_inside(data):
    space = data.draw(spaces())
    raw = data.draw(raw_genomes(space))
    clipped = space.clip(raw)
    assert space.contains(clipped)
    assert space.clip(clipped) == clipped
    if space.contains(raw):
        assert clipped == raw


@SETTINGS
@given(space_and_genome())
def test_encode_is_in_unit_cube_and_decode_inverts_it(sg):
    space, genome = sg
    x = space.encode(genome)
    assert x.shape == (len(space.genes),)
    assert np.all((x >= 0.0) & (x <= 1.0))
    back = space.decode(x)
    assert space.contains(back)
    assert_close_genomes(space, back, genome)


@SETTINGS
@given(st.data())
def test_decode_of_any_point_is_inside(data):
    space = data.draw(spaces())
    x = np.array(data.draw(st.lists(st.floats(-0.5, 1.5), min_size=len(space.genes), max_size=len(space.genes))))
    assert space.contains(space.decode(x))


@SETTINGS
@given(spaces())
def test_to_optuna_distributions_contain_sampled_values(space):
    dists = space.to_optuna()
    assert list(dists) == list(space.paths)
    for gene, (path, dist) in zip(space.genes, dists.items()):
        if isinstance(gene, ChoiceGene):
            assert type(dist).__name__ == "CategoricalDistribution" and dist.choices == gene.choices
        else:
            assert (dist.low, dist.high, dist.log) == (gene.low, gene.high, gene.log)
            kind = "FloatDistribution" if isinstance(gene, FloatGene) else "IntDistribution"
            assert type(dist).__name__ == kind
            if isinstance(gene, IntGene):
                assert dist.step == gene.step


# ----------------------------------------------------------------------------------------------
# genes


def test_float_gene_log_encoding_is_in_log_space():
    gene = FloatGene("train.lr", 1e-4, 1e-2, log=True)
    assert gene.encode(1e-3) == pytest.approx(0.5)
    assert gene.decode(0.5) == pytest.approx(1e-3)
    assert gene.decode(0.0) == 1e-4 and gene.decode(1.0) <= 1e-2


def test_int_gene_rounds_to_the_step_grid():
    gene = IntGene("model.hidden_size", 32, 256, step=32)
    assert [gene.clip(v) for v in (0, 32, 47, 48, 63.9, 250, 1000)] == [32, 32, 32, 64, 64, 256, 256]
    assert gene.decode(gene.encode(96)) == 96
    assert not gene.contains(40) and not gene.contains(96.0) and gene.contains(96)


def test_int_gene_with_log_samples_the_whole_range():
    gene = IntGene("train.warmup_steps", 1, 1000, log=True)
    rng = np.random.default_rng(0)
    samples = [gene.sample(rng) for _ in range(2000)]
    assert min(samples) == 1 and max(samples) > 500
    assert all(isinstance(s, int) and 1 <= s <= 1000 for s in samples)
    # log-uniform: about half the draws below sqrt(1000) ~ 32
    assert 0.4 < np.mean(np.array(samples) < 32) < 0.6


def test_choice_gene_keeps_types_apart():
    gene = ChoiceGene("train.x", (1, True, 1.5, "a", None))
    assert gene.contains(1) and gene.contains(True) and not gene.contains(1.0)
    assert gene.clip(1.0) == 1 and type(gene.clip(1.0)) is int
    assert gene.clip(1.4) == 1.5
    assert gene.clip("zzz") == 1  # nothing near: the first choice
    assert [gene.decode(gene.encode(c)) for c in gene.choices] == list(gene.choices)


def test_gene_default_outside_its_range_is_fine():
    base = dict(BASE, **{"train.lr": 0.5})
    space = SearchSpace.from_dict({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}, base,
                                  architecture=RULES)
    genome = space.sample(np.random.default_rng(0))
    assert 1e-4 <= genome["train.lr"] <= 1e-2


# ----------------------------------------------------------------------------------------------
# from_dict and its one-line errors


GOOD_SPEC = {
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "train.warmup_steps": {"type": "int", "low": 0, "high": 100, "step": 10},
    "train.schedule": {"type": "choice", "choices": ["cosine", "constant"]},
    "model.num_hidden_layers": {"type": "int", "low": 1, "high": 8, "log": True},
    "model.hidden_size": {"type": "choice", "choices": [32, 64, 128]},
}


def test_from_dict_builds_typed_genes_sorted_by_path():
    space = SearchSpace.from_dict(GOOD_SPEC, BASE, architecture=RULES)
    assert space.paths == tuple(sorted(GOOD_SPEC))
    assert space.gene("train.lr") == FloatGene("train.lr", 1e-4, 1e-2, log=True)
    assert space.gene("train.warmup_steps") == IntGene("train.warmup_steps", 0, 100, step=10)
    assert space.gene("train.schedule") == ChoiceGene("train.schedule", ("cosine", "constant"))
    assert space.gene("model.hidden_size").is_architecture and not space.gene("train.lr").is_architecture


@pytest.mark.parametrize(
    "path, gene, expected",
    [
        ("train.lr", {"type": "float", "low": 0.1, "high": 0.01}, "search.train.lr: low (0.1) must be below high (0.01)"),
        ("train.lr", {"type": "float", "low": 0.1, "high": 0.1}, "must be below high"),
        ("train.lr", {"type": "float", "low": 0, "high": 0.1, "log": True}, "log scale needs low > 0"),
        ("train.warmup_steps", {"type": "int", "low": -1, "high": 10, "log": True}, "log scale needs low > 0"),
        ("train.warmup_steps", {"type": "int", "low": 10, "high": 5}, "low (10) must be below high (5)"),
        ("train.warmup_steps", {"type": "int", "low": 0, "high": 10, "step": 0}, "step (0) must be positive"),
        ("train.warmup_steps", {"type": "int", "low": 0, "high": 10, "step": -2}, "step (-2) must be positive"),
        ("train.warmup_steps", {"type": "int", "low": 0, "high": 10, "step": 3}, "multiple of step (3)"),
        ("train.warmup_steps", {"type": "int", "low": 0.5, "high": 10}, "low must be an integer"),
        ("train.lr", {"type": "float", "low": "small", "high": 0.1}, "low must be a finite number"),
        ("train.lr", {"type": "float", "low": 0.01, "high": 0.1, "log": "yes"}, "log must be true or false"),
        ("train.schedule", {"type": "choice", "choices": []}, "choices must not be empty"),
        ("train.schedule", {"type": "choice", "choices": "cosine"}, "choices must be a list"),
        ("train.schedule", {"type": "choice", "choices": ["a", "a"]}, "appears twice"),
        ("train.schedule", {"type": "choice", "choices": [[1, 2]]}, "must be a number, string, bool or null"),
        ("train.lr", {"type": "floaty", "low": 0.1, "high": 1}, "unknown type 'floaty'"),
        ("train.lr", {"low": 0.1, "high": 1}, "missing 'type'"),
        ("train.lr", {"type": "float", "high": 1}, "missing 'low'"),
        ("train.lr", {"type": "float", "lo": 0.1, "high": 1}, "unknown key 'lo' for a float gene; did you mean 'low'?"),
        ("train.lr", {"type": "float", "low": 0.1, "high": 1, "step": 0.1}, "unknown key 'step'"),
        ("train.lr", 0.1, "expected a mapping"),
        ("train.lrr", {"type": "float", "low": 0.1, "high": 1}, "search.train.lrr: unknown field; did you mean 'train.lr'?"),
        ("optim.lr", {"type": "float", "low": 0.1, "high": 1}, "unknown field"),
        ("model.hidden_size", {"type": "float", "low": 32, "high": 64}, "must be an int or choice gene"),
        ("model.num_attention_heads", {"type": "int", "low": 0, "high": 4}, "must be at least 1"),
    ],
)
def test_bad_gene_spec_is_one_line_naming_the_gene(path, gene, expected):
    with pytest.raises(SpaceError) as info:
        SearchSpace.from_dict({path: gene}, BASE, architecture=RULES)
    message = str(info.value)
    assert message.startswith(f"search.{path}: ")
    assert expected in message
    assert "\n" not in message


def test_impossible_constraints_are_refused_naming_the_genes():
    spec = {"model.hidden_size": {"type": "choice", "choices": [36, 44]}}  # head_dim 9, 11 with 4 heads
    with pytest.raises(SpaceError, match=r"model\.hidden_size") as info:
        SearchSpace.from_dict(spec, BASE, architecture=RULES)
    assert "\n" not in str(info.value)
    spec = {"model.num_key_value_heads": {"type": "choice", "choices": [3]}}
    with pytest.raises(SpaceError, match=r"model\.num_key_value_heads"):
        SearchSpace.from_dict(spec, BASE, architecture=RULES)


def test_budget_below_the_smallest_model_is_refused():
    with pytest.raises(SpaceError, match=r"max_params \(1000\) is below the smallest .*model\.hidden_size=32"):
        SearchSpace.from_dict(GOOD_SPEC, BASE, max_params=1000, architecture=RULES)
    with pytest.raises(SpaceError, match="max_params must be a positive integer"):
        SearchSpace.from_dict(GOOD_SPEC, BASE, max_params=0, architecture=RULES)


# ----------------------------------------------------------------------------------------------
# architecture constraints


ARCH_SPEC = {
    "model.hidden_size": {"type": "int", "low": 16, "high": 256, "step": 8},
    "model.num_attention_heads": {"type": "choice", "choices": [1, 2, 4, 8]},
    "model.num_key_value_heads": {"type": "int", "low": 1, "high": 8},
    "model.num_hidden_layers": {"type": "int", "low": 1, "high": 6},
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
}


def valid_shape(f):
    return (
        f["hidden_size"] % f["num_attention_heads"] == 0
        and f["num_attention_heads"] % f["num_key_value_heads"] == 0
        and (f["hidden_size"] // f["num_attention_heads"]) % 2 == 0
    )


def test_samples_satisfy_the_shape_constraints_and_cover_them():
    space = SearchSpace.from_dict(ARCH_SPEC, BASE, architecture=RULES)
    rng = np.random.default_rng(1)
    genomes = [space.sample(rng) for _ in range(300)]
    assert all(valid_shape(space.model_fields(g)) for g in genomes)
    assert {g["model.num_attention_heads"] for g in genomes} == {1, 2, 4, 8}
    assert len({g["model.num_key_value_heads"] for g in genomes}) >= 4


def test_clip_repairs_to_the_nearest_valid_architecture():
    space = SearchSpace.from_dict(ARCH_SPEC, BASE, architecture=RULES)
    bad = Genome.from_dict({
        "model.hidden_size": 72, "model.num_attention_heads": 8, "model.num_key_value_heads": 3,
        "model.num_hidden_layers": 2, "train.lr": 1e-3,
    })
    fixed = space.clip(bad)
    assert space.contains(fixed)
    # 72 / 8 = 9 is odd: hidden moves one grid step to 80 or 64; kv 3 -> 2 or 4 (divides 8)
    assert fixed["model.num_attention_heads"] == 8
    assert fixed["model.hidden_size"] in (64, 80)
    assert fixed["model.num_key_value_heads"] in (2, 4)
    assert fixed["model.num_hidden_layers"] == 2 and fixed["train.lr"] == 1e-3


def test_budget_is_respected_by_sample_and_clip():
    space = SearchSpace.from_dict(ARCH_SPEC, BASE, max_params=200_000, architecture=RULES)
    rng = np.random.default_rng(0)
    for _ in range(100):
        assert space.count_parameters(space.sample(rng)) <= 200_000
    big = Genome.from_dict({
        "model.hidden_size": 256, "model.num_attention_heads": 8, "model.num_key_value_heads": 8,
        "model.num_hidden_layers": 6, "train.lr": 1e-3,
    })
    assert space.count_parameters(big) > 200_000
    fixed = space.clip(big)
    assert space.contains(fixed) and space.count_parameters(fixed) <= 200_000


def test_sample_at_base_keeps_the_base_shape_and_draws_the_rest_like_a_space_without_shape_genes():
    space = SearchSpace.from_dict(ARCH_SPEC, BASE, max_params=200_000, architecture=RULES)
    lr_only = SearchSpace.from_dict({"train.lr": ARCH_SPEC["train.lr"]}, BASE, architecture=RULES)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(20):
        g, h = space.sample_at_base(a), lr_only.sample_at_base(b)
        assert space.contains(g)
        assert {p: g[p] for p in space.paths if p.startswith("model.")} == {
            "model.hidden_size": 64, "model.num_attention_heads": 4, "model.num_key_value_heads": 2,
            "model.num_hidden_layers": 2}
        assert g["train.lr"] == h["train.lr"]       # the same draws as the fixed-shape space
    c, d = np.random.default_rng(5), np.random.default_rng(5)
    assert [lr_only.sample_at_base(c) for _ in range(5)] == [lr_only.sample(d) for _ in range(5)]


@pytest.mark.parametrize("spec, max_params, expected", [
    ({"model.num_hidden_layers": {"type": "int", "low": 3, "high": 6}}, None,
     "model.num_hidden_layers: the base value 2 is not one of the gene's values"),
    ({"model.num_hidden_layers": {"type": "int", "low": 1, "high": 6}}, 100_000,
     "the base shape breaks the constraints (parameters ("),
])
def test_sample_at_base_refuses_a_base_shape_outside_the_space(spec, max_params, expected):
    space = SearchSpace.from_dict(spec, BASE, max_params=max_params, architecture=RULES)
    with pytest.raises(SpaceError) as e:
        space.sample_at_base(np.random.default_rng(0))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_largest_shape_is_the_valid_shape_with_the_most_parameters_and_keeps_the_base_s_draws():
    space = SearchSpace.from_dict(ARCH_SPEC, BASE, max_params=200_000, architecture=RULES)
    largest = space.largest_shape()
    n = space.count_parameters(Genome.from_dict({**largest, "train.lr": 1e-3}))
    assert n <= 200_000 and set(largest) == {p for p in ARCH_SPEC if p.startswith("model.")}
    # every combination of the genes' values: none valid has more parameters
    import itertools
    genes = [space.gene(p) for p in largest]
    for combo in itertools.product(*(range(g.size) for g in genes)):
        genome = Genome.from_dict({"train.lr": 1e-3, **{g.path: g.value_at(i) for g, i in zip(genes, combo)}})
        if space.contains(genome):
            assert space.count_parameters(genome) <= n
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(5):
        g, h = space.sample_at_largest(a), space.sample_at_base(b)
        assert space.contains(g) and {p: g[p] for p in largest} == largest
        assert g["train.lr"] == h["train.lr"]       # the same draws as at the base shape
    # without architecture genes the largest shape is the base shape: the same genomes as sample_at_base
    lr_only = SearchSpace.from_dict({"train.lr": ARCH_SPEC["train.lr"]}, BASE, architecture=RULES)
    assert lr_only.largest_shape() == {}
    c, d = np.random.default_rng(5), np.random.default_rng(5)
    assert [lr_only.sample_at_largest(c) for _ in range(3)] == [lr_only.sample_at_base(d) for _ in range(3)]


def test_largest_shape_refuses_a_space_it_cannot_enumerate():
    wide = {"model.hidden_size": {"type": "int", "low": 8, "high": 8_000_000, "step": 8},
            "model.num_hidden_layers": {"type": "int", "low": 1, "high": 6}}
    with pytest.raises(SpaceError) as e:
        SearchSpace.from_dict(wide, BASE, architecture=RULES).largest_shape()
    assert str(e.value) == ("search: the model.* genes have 6,000,000 combinations, more than the 200,000 the "
                            "largest shape is searched among; coarsen their grids")


def test_count_parameters_matches_the_internlm2_layout():
    f = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "bias": False}
    head_dim = 16
    wqkv = (4 + 2 * 2) * head_dim * 64
    wo = 64 * 64
    ffn = 3 * 64 * 172
    expected = 2 * 256 * 64 + 2 * (wqkv + wo + ffn + 2 * 64) + 64
    assert count_parameters(f) == expected == 123_712
    assert count_parameters(dict(f, bias=True)) == expected + 2 * ((4 + 2 * 2) * head_dim + 64)
    # InternLM2-1.8B: hidden 2048, ffn 8192, 24 layers, 16/8 heads, vocab 92544 -> about 1.89 B
    big = {"vocab_size": 92544, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
           "num_attention_heads": 16, "num_key_value_heads": 8}
    assert count_parameters(big) == 1_889_110_016


FINE_SPEC = {  # thousands of values per gene: the nearest-valid search cannot enumerate them
    "model.hidden_size": {"type": "int", "low": 16, "high": 2048, "step": 2},
    "model.intermediate_size": {"type": "int", "low": 16, "high": 8192},
    "model.num_hidden_layers": {"type": "int", "low": 1, "high": 64},
    "model.num_attention_heads": {"type": "int", "low": 1, "high": 32},
    "model.num_key_value_heads": {"type": "int", "low": 1, "high": 32},
}


def test_clip_with_fine_grained_genes_shrinks_into_the_budget():
    space = SearchSpace.from_dict(FINE_SPEC, BASE, max_params=5_000_000, architecture=RULES)
    huge = Genome.from_dict({
        "model.hidden_size": 2048, "model.intermediate_size": 8192, "model.num_hidden_layers": 64,
        "model.num_attention_heads": 32, "model.num_key_value_heads": 32,
    })
    fixed = space.clip(huge)
    assert space.contains(fixed)
    # not the smallest model: the budget is mostly used
    assert 4_000_000 < space.count_parameters(fixed) <= 5_000_000
    # a shape violation far from the budget is fixed locally
    odd = huge.replace({"model.hidden_size": 512, "model.intermediate_size": 1000, "model.num_hidden_layers": 2,
                        "model.num_attention_heads": 7, "model.num_key_value_heads": 3})
    fixed = space.clip(odd)
    assert space.contains(fixed)
    assert abs(fixed["model.hidden_size"] - 512) <= 16 and fixed["model.num_hidden_layers"] == 2
    assert abs(fixed["model.num_attention_heads"] - 7) <= 2


def test_sampling_gives_up_naming_the_constraint_when_valid_genomes_are_too_rare():
    space = SearchSpace.from_dict(FINE_SPEC, BASE, max_params=9584, architecture=RULES)  # exactly the smallest model
    smallest = Genome.from_dict({
        "model.hidden_size": 16, "model.intermediate_size": 16, "model.num_hidden_layers": 1,
        "model.num_attention_heads": 8, "model.num_key_value_heads": 1,
    })
    assert space.contains(smallest) and space.clip(smallest.replace({"model.num_hidden_layers": 9})) == smallest
    with pytest.raises(SpaceError, match=r"^search: none of 10000 .*most often broken: parameters must not exceed max_params"
                       ) as info:
        space.sample(np.random.default_rng(0))
    assert "\n" not in str(info.value)


def test_constraints_use_base_values_of_fields_that_are_not_genes():
    # heads fixed at 4 in the base: hidden must be a multiple of 8 (head_dim even)
    space = SearchSpace.from_dict({"model.hidden_size": {"type": "int", "low": 20, "high": 40}}, BASE,
                                  architecture=RULES)
    rng = np.random.default_rng(0)
    assert {space.sample(rng)["model.hidden_size"] for _ in range(200)} == {24, 32, 40}
    assert space.model_fields(Genome.from_dict({"model.hidden_size": 24}))["num_attention_heads"] == 4


def test_clip_refuses_a_genome_missing_a_gene_and_drops_extra_paths():
    space = SearchSpace.from_dict(GOOD_SPEC, BASE, architecture=RULES)
    g = space.sample(np.random.default_rng(0))
    with pytest.raises(SpaceError, match=r"search\.train\.lr: genome .* has no value"):
        space.clip(Genome.from_dict({p: v for p, v in g.as_dict().items() if p != "train.lr"}))
    extra = g.replace({"train.beta2": 0.9})
    assert not space.contains(extra)
    assert space.clip(extra) == g


def test_sampling_is_deterministic_given_the_seed():
    space = SearchSpace.from_dict(ARCH_SPEC, BASE, max_params=300_000, architecture=RULES)
    a = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    b = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    c = np.random.default_rng(7)
    d = np.random.default_rng(8)
    assert [space.sample(c) for _ in range(5)] != [space.sample(d) for _ in range(5)]


def test_space_pickles():
    import pickle

    space = SearchSpace.from_dict(ARCH_SPEC, BASE, max_params=300_000, architecture=RULES)
    again = pickle.loads(pickle.dumps(space))
    assert again.genes == space.genes
    assert again.sample(np.random.default_rng(3)) == space.sample(np.random.default_rng(3))


def test_float_values_stay_floats_and_ints_stay_ints():
    space = SearchSpace.from_dict(GOOD_SPEC, BASE, architecture=RULES)
    g = space.clip(Genome.from_dict({
        "train.lr": np.float32(0.001), "train.warmup_steps": np.int64(33), "train.schedule": "constant",
        "model.num_hidden_layers": 3.4, "model.hidden_size": 64.0,
    }))
    assert type(g["train.lr"]) is float and math.isclose(g["train.lr"], 0.001, rel_tol=1e-6)
    assert g["train.warmup_steps"] == 30 and type(g["train.warmup_steps"]) is int
    assert g["model.num_hidden_layers"] == 3 and g["model.hidden_size"] == 64
    assert type(g["model.hidden_size"]) is int


def test_without_the_model_rules_model_genes_are_only_bounded():
    # a space built without ArchitectureRules (evo knows no model) checks no shape and keeps no budget
    spec = {"model.hidden_size": {"type": "choice", "choices": [36, 44]}}   # odd head_dim with 4 heads
    space = SearchSpace.from_dict(spec, BASE)
    assert space.contains(Genome.from_dict({"model.hidden_size": 36}))
    with pytest.raises(SpaceError, match=r"^search: max_params needs the model's parameter count"):
        SearchSpace.from_dict(spec, BASE, max_params=10**6)
    with pytest.raises(SpaceError, match="counting parameters needs the model's rules"):
        space.count_parameters(Genome.from_dict({"model.hidden_size": 36}))


def test_decode_rows_equals_decode_row_by_row():
    spec = {**GOOD_SPEC, "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.3}}
    space = SearchSpace.from_dict(spec, BASE, architecture=RULES)
    g = len(space.paths)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.random((200, g)), rng.uniform(-0.5, 1.5, (50, g)), np.zeros((1, g)), np.ones((1, g))])
    rows = space.decode_rows(x)
    one_by_one = [space.decode(r) for r in x]
    assert [c.values for c in rows] == [c.values for c in one_by_one]
    assert all(type(a) is type(b) for c, d in zip(rows, one_by_one) for (_, a), (_, b) in zip(c.values, d.values))
    bad = np.full((1, g), 0.5)
    bad[0, space.paths.index("train.weight_decay")] = np.nan
    with pytest.raises(ValueError, match="train.weight_decay"):
        space.decode_rows(bad)
