"""The conformance suite every strategy passes, plus a few strategy-specific behaviours.

Random snapshots (populations 2..12, members without fitness, tied and diverged fitness,
spaces with constrained architecture genes) go through every strategy; the decisions must be
valid (one per ready id, in order; donors alive and fitter; genomes inside the space),
reproducible from the seed, and identical after a state_dict -> JSON -> load_state_dict resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from fractions import Fraction

import numpy as np
import pytest
from pydantic import ValidationError

from evo.genome import Genome
from evo.nsga2 import NSGA2
from evo.pb2 import MIN_OBSERVATIONS
from evo.space import ChoiceGene, FloatGene, IntGene, SearchSpace
from evo.strategy import (OBJECTIVE_SENSE, Crossover, Exploit, Keep, MemberView, Restart, Snapshot, clears_hurdle,
                          hurdles, in_grace, layer_sources)
from evo.strategies import JUDGEMENTS, StrategyConfig, inside, make_strategy, ready_every
from evo.toy import toy_space
from tests.evo.test_space import RULES

STRATEGIES = {
    "pbt": dict(name="pbt"),
    "pbt-tournament": dict(name="pbt", selection="tournament", tournament_size=3),
    "ga-uniform": dict(name="ga", crossover="uniform"),
    "ga-sbx": dict(name="ga", crossover="sbx", elitism=2, mutation_probability=0.5),
    "nsga2": dict(name="nsga2", objectives=("val_bpb", "params", "tokens_per_s")),
    "pb2": dict(name="pb2"),
    "random": dict(name="random"),
}

BASE = {
    "model.vocab_size": 256,
    "model.hidden_size": 64,
    "model.intermediate_size": 172,
    "model.num_hidden_layers": 2,
    "model.num_attention_heads": 4,
    "model.num_key_value_heads": 2,
    "model.rope_theta": 10000.0,
    "train.lr": 1e-3,
    "train.beta2": 0.95,
    "train.warmup_steps": 20,
    "train.schedule": "cosine",
}


def arch_space(max_params: int | None = None) -> SearchSpace:
    genes = [
        FloatGene("train.lr", 1e-4, 1e-2, log=True),
        FloatGene("train.beta2", 0.9, 0.999),
        IntGene("train.warmup_steps", 0, 100, step=10),
        ChoiceGene("train.schedule", ("cosine", "constant")),
        IntGene("model.num_hidden_layers", 1, 4),
        ChoiceGene("model.hidden_size", (32, 48, 64, 96, 128)),
        IntGene("model.num_attention_heads", 1, 8),
        ChoiceGene("model.num_key_value_heads", (1, 2, 4)),
        FloatGene("model.rope_theta", 1e3, 1e6, log=True),
    ]
    return SearchSpace(genes, BASE, max_params=max_params, architecture=RULES)


SPACES = {"arch": arch_space, "arch-budget": lambda: arch_space(max_params=200_000), "toy": toy_space}


def random_snapshot(space: SearchSpace, rng: np.random.Generator, n: int, round_: int = 3) -> Snapshot:
    """n members with distinct, non-contiguous ids; ~15% without fitness, some ties, rare NaN."""
    ids = rng.choice(100, size=n, replace=False)
    members = []
    for i in ids:
        genome = space.sample(rng)
        u = rng.random()
        if u < 0.15:
            history: tuple = ()
        else:
            k = int(rng.integers(1, 4))
            fits = np.round(rng.uniform(1.0, 3.0, size=k), 1 if u < 0.4 else 6)  # coarse -> ties
            if u > 0.97:
                fits[-1] = math.nan  # diverged
            history = tuple((50 * (j + 1), float(f)) for j, f in enumerate(fits))
        objectives = {}
        if history:
            objectives["val_bpb"] = history[-1][1]
            objectives["params"] = float(space.count_parameters(genome)) if "model.vocab_size" in space.base else 1e5
            if rng.random() < 0.9:  # a few members lack a measured throughput
                objectives["tokens_per_s"] = float(rng.uniform(1e3, 1e4))
        members.append(MemberView(int(i), genome, history, int(rng.integers(0, 5)), 50 * len(history), objectives))
    return Snapshot(round_, tuple(members))


def fitness(m: MemberView) -> float:
    return m.fitness if m.fitness is not None and math.isfinite(m.fitness) else math.inf


def protected(member: MemberView, snapshot: Snapshot, config: StrategyConfig) -> bool:
    """Whether the grace period protects ``member``, from its definition: in grace, and with
    grace 'hurdles' 1+ intervals into it, either no fitness, no other member of its age
    (since_change) with a finite fitness, or a fitness at or below their mean (exactly)."""
    if not in_grace(member, config.grace_intervals):
        return False
    if config.grace == "intervals" or member.since_change == 0 or member.fitness is None:
        return True
    peers = [Fraction(m.fitness) for m in snapshot.members if m.id != member.id
             and m.since_change == member.since_change and m.fitness is not None and math.isfinite(m.fitness)]
    return not peers or (math.isfinite(member.fitness) and Fraction(member.fitness) <= sum(peers) / len(peers))


def assert_valid(strategy, space: SearchSpace, snapshot: Snapshot, decisions: list, ready: list[int]) -> None:
    """The decision contract, for any strategy."""
    assert [d.member for d in decisions] == ready
    ranks = strategy.ranks(snapshot) if isinstance(strategy, NSGA2) else None

    def fitter(donor_id: int, receiver: MemberView) -> bool:
        donor = snapshot.member(donor_id)  # alive: KeyError otherwise
        if ranks is not None:
            return donor_id in ranks and receiver.id in ranks and ranks[donor_id] < ranks[receiver.id]
        return donor.history != () and fitness(donor) < fitness(receiver)

    for d in decisions:
        receiver = snapshot.member(d.member)
        assert isinstance(d, (Keep, Exploit, Crossover, Restart))
        if not receiver.history:
            assert isinstance(d, Keep), f"member {d.member} has no fitness yet but got {d}"
        if protected(receiver, snapshot, strategy.config):
            assert isinstance(d, Keep), f"member {d.member} is in its grace period but got {d}"
        if isinstance(d, Exploit):
            assert d.donor != d.member
            assert fitter(d.donor, receiver), f"donor {d.donor} is not fitter than {d.member}"
            assert d.how in ("perturb", "resample", "model")
        if isinstance(d, Crossover):
            assert d.parents[0] != d.parents[1] and d.member not in d.parents
            shapes = [snapshot.member(p).genome.architecture() for p in d.parents]
            if d.alpha is not None:
                assert strategy.config.merge and 0.0 <= d.alpha <= 1.0
            if d.alpha is not None and d.layers is None:   # interpolation: parents and child share one architecture
                assert all(s == d.genome.architecture() for s in shapes)
            if d.layers is not None:         # layer-wise: each child unit from a parent that has it
                assert d.alpha is not None and shapes[0] != shapes[1]
                depth = space.model_fields(d.genome)["num_hidden_layers"]
                assert list(d.layers) == ["tok_embeddings", *(f"layers.{i}" for i in range(depth)), "norm", "output"]
                for unit, p in d.layers.items():
                    have = [q for q in d.parents if not unit.startswith("layers.")
                            or int(unit.split(".")[1]) < space.model_fields(snapshot.member(q).genome)["num_hidden_layers"]]
                    assert p in have if have else p is None
            assert d.weights_from in d.parents
            for p in d.parents:
                snapshot.member(p)
            assert fitter(d.weights_from, receiver)
        if isinstance(d, (Exploit, Crossover, Restart)):
            assert space.contains(d.genome), f"{d.genome} is outside the space"
            f = space.model_fields(d.genome)
            assert f["hidden_size"] % f["num_attention_heads"] == 0 if "hidden_size" in f else True
            if "num_key_value_heads" in f:
                assert f["num_attention_heads"] % f["num_key_value_heads"] == 0
                assert (f["hidden_size"] // f["num_attention_heads"]) % 2 == 0
            if space.max_params is not None:
                assert space.count_parameters(d.genome) <= space.max_params


def plan(kind: str | StrategyConfig, space: SearchSpace, snapshot: Snapshot, seed: int, ready=None):
    """(strategy, its plan for ``snapshot`` with rng ``seed``); ``kind`` names one of STRATEGIES
    or is a StrategyConfig."""
    config = kind if isinstance(kind, StrategyConfig) else StrategyConfig(**STRATEGIES[kind])
    strategy = make_strategy(config, space)
    return strategy, strategy.plan(snapshot, np.random.default_rng(seed), ready)


def valid_plan(config: StrategyConfig, space: SearchSpace, seed: int) -> tuple[Snapshot, list]:
    """A random snapshot of 4-12 members for ``seed`` and ``config``'s plan for it, checked valid."""
    rng = np.random.default_rng([seed, 17])
    snapshot = random_snapshot(space, rng, n=int(rng.integers(4, 13)))
    strategy, decisions = plan(config, space, snapshot, seed)
    assert_valid(strategy, space, snapshot, decisions, [m.id for m in snapshot.members])
    return snapshot, decisions


# ------------------------------------------------------------------------------------------------
# conformance


@pytest.mark.parametrize("kind", STRATEGIES)
@pytest.mark.parametrize("space_name", SPACES)
def test_decisions_are_valid_and_reproducible(kind: str, space_name: str) -> None:
    space = SPACES[space_name]()
    for seed in range(12):
        rng = np.random.default_rng([seed, 7])
        snapshot = random_snapshot(space, rng, n=int(rng.integers(2, 13)))
        ids = [m.id for m in snapshot.members]
        strategy, decisions = plan(kind, space, snapshot, seed)
        assert_valid(strategy, space, snapshot, decisions, ids)
        _, again = plan(kind, space, snapshot, seed)
        assert again == decisions  # same seed, same snapshot -> same decisions
        # a ready subset in a shuffled order: one decision each, in that order
        subset = [int(i) for i in rng.permutation(ids)[: max(1, len(ids) // 2)]]
        strategy, decisions = plan(kind, space, snapshot, seed, ready=subset)
        assert_valid(strategy, space, snapshot, decisions, subset)


def worse_half_changed(snapshot: Snapshot, rng: np.random.Generator, low: int, high: int) -> Snapshot:
    """``snapshot`` with the worse half of its members changed architecture ``low``..``high - 1``
    intervals ago (drawn from ``rng`` in order of fitness); the better half never did."""
    worse = sorted(snapshot.members, key=fitness)[len(snapshot.members) // 2:]
    changed = {m.id: int(rng.integers(low, high)) for m in worse}
    return Snapshot(snapshot.round, tuple(dataclasses.replace(m, since_change=changed.get(m.id))
                                          for m in snapshot.members))


@pytest.mark.parametrize("kind", STRATEGIES)
@pytest.mark.parametrize("grace", [1, 3])
def test_a_member_in_its_grace_period_is_never_a_receiver(kind: str, grace: int) -> None:
    """The worse half of each population changed architecture 0..4 intervals ago (sync and async
    plans): whoever is within `grace_intervals` of the change keeps; without a grace period the
    same members are receivers (except for random search, which always keeps)."""
    space = arch_space()
    config = StrategyConfig(**STRATEGIES[kind], grace_intervals=grace)
    protected = 0
    for seed in range(10):
        rng = np.random.default_rng([seed, 13])
        snapshot = random_snapshot(space, rng, n=int(rng.integers(4, 13)))
        snapshot = worse_half_changed(snapshot, rng, 0, 5)
        ids = [m.id for m in snapshot.members]
        for ready in (None, [ids[-1]]):
            strategy = make_strategy(config, space)
            decisions = strategy.plan(snapshot, np.random.default_rng(seed), ready)
            assert_valid(strategy, space, snapshot, decisions, ready or ids)
            free = make_strategy(dataclasses.replace(config, grace_intervals=0), space)
            for d in free.plan(snapshot, np.random.default_rng(seed), ready):
                graced = in_grace(snapshot.member(d.member), grace)
                protected += graced and not isinstance(d, Keep)
    assert protected > 0 or kind == "random"


@pytest.mark.parametrize("kind", STRATEGIES)
@pytest.mark.parametrize("grace", [1, 2])
def test_hurdles_protect_only_a_member_that_keeps_up_with_its_age(kind: str, grace: int) -> None:
    """grace 'hurdles': the worse half of each population changed 1..grace+1 intervals ago (sync
    and async plans, many rngs). A member in grace at or below its hurdle keeps (assert_valid's
    `protected`), though the same plan without a grace period makes some of them receivers; one
    above its hurdle is judged, and some of those are receivers (random search always keeps)."""
    space = arch_space()
    config = StrategyConfig(**STRATEGIES[kind], grace_intervals=grace, grace="hurdles")
    kept = exposed = 0
    for seed in range(30):
        rng = np.random.default_rng([seed, 19])
        snapshot = random_snapshot(space, rng, n=int(rng.integers(4, 13)))
        snapshot = worse_half_changed(snapshot, rng, 1, grace + 2)
        ids = [m.id for m in snapshot.members]
        for ready in (None, [ids[-1]]):
            strategy = make_strategy(config, space)
            decisions = strategy.plan(snapshot, np.random.default_rng(seed), ready)
            assert_valid(strategy, space, snapshot, decisions, ready or ids)
            free = make_strategy(StrategyConfig(**STRATEGIES[kind], grace_intervals=0), space)
            for d, f in zip(decisions, free.plan(snapshot, np.random.default_rng(seed), ready)):
                m = snapshot.member(d.member)
                if in_grace(m, grace):
                    kept += protected(m, snapshot, config) and not isinstance(f, Keep)
                    exposed += not protected(m, snapshot, config) and not isinstance(d, Keep)
    assert (kept > 0 and exposed > 0) or kind == "random"


@pytest.mark.parametrize("kind", STRATEGIES)
def test_hurdles_expose_a_member_behind_its_age_and_protect_one_without_peers(kind: str) -> None:
    """Eight members, val_bpb 1.0 .. 1.7 by id (10 .. 17), one genome. 16 and 17 (the worst)
    changed one interval ago: 16's hurdle is 17's 1.7, which it clears, so it keeps under every
    rng; 17's is 1.6, which it does not: it is a receiver under some rng (as without a grace
    period), while grace 'intervals' keeps it. With 16 two intervals after its change instead,
    17 has no peer of its age and keeps."""
    space = shape_space()
    base = one_genome_snapshot(space.sample(np.random.default_rng(0)), 8, STRATEGIES[kind].get("objectives", ()))
    pair = Snapshot(3, tuple(dataclasses.replace(m, since_change=1 if m.id in (16, 17) else None)
                             for m in base.members))
    alone = Snapshot(3, tuple(dataclasses.replace(m, since_change={16: 2, 17: 1}.get(m.id)) for m in base.members))
    fit = {m.id: m.fitness for m in base.members}
    assert hurdles(pair, 2) == {16: Fraction(fit[17]), 17: Fraction(fit[16])}
    assert hurdles(alone, 2) == {16: None, 17: None}
    hurdled = StrategyConfig(**STRATEGIES[kind], grace_intervals=2, grace="hurdles")
    intervals = StrategyConfig(**STRATEGIES[kind], grace_intervals=2)
    free = StrategyConfig(**STRATEGIES[kind], grace_intervals=0)
    received = {"hurdles": 0, "free": 0}
    for seed in range(20):
        for ready in (None, [17], [16]):
            for name, config, snapshot in (("hurdles", hurdled, pair), ("intervals", intervals, pair),
                                           ("alone", hurdled, alone), ("free", free, pair)):
                strategy, decisions = plan(config, space, snapshot, seed, ready)
                assert_valid(strategy, space, snapshot, decisions, ready or [m.id for m in snapshot.members])
                by = {d.member: d for d in decisions}
                if name != "free" and 16 in by:
                    assert isinstance(by[16], Keep), (name, seed, by[16])
                if name in ("intervals", "alone") and 17 in by:
                    assert isinstance(by[17], Keep), (name, seed, by[17])
                if name in received and 17 in by:
                    received[name] += not isinstance(by[17], Keep)
    if kind == "random":
        assert received == {"hurdles": 0, "free": 0}
    else:
        assert received["hurdles"] > 0 and received["free"] > 0


def test_hurdle_is_the_mean_of_the_other_members_of_the_same_age() -> None:
    """h(k) for each member 1..grace_intervals intervals after its change: the mean val_bpb of the
    others with the same since_change, non-finite ones left out; None without such a peer. Members
    at since_change 0 (not yet trained since) or beyond the grace period have none."""
    genome = toy_space().sample(np.random.default_rng(0))
    rows = [  # (id, since_change, val_bpb or None)
        (1, 1, 2.0), (2, 1, 2.5), (3, 1, 3.5), (4, 1, math.nan),
        (5, 2, 1.0), (6, 2, None),
        (7, 3, 1.0), (8, None, 1.0), (9, 0, 1.0), (10, 2, math.inf),
    ]
    snapshot = Snapshot(4, tuple(MemberView(i, genome, () if f is None else ((80, f),), 4, 80, since_change=k)
                                 for i, k, f in rows))
    h = hurdles(snapshot, 2)
    assert h == {1: Fraction(3), 2: Fraction(11, 4), 3: Fraction(9, 4), 4: Fraction(8, 3),
                 5: None, 6: Fraction(1), 10: Fraction(1)}
    assert [clears_hurdle(snapshot.member(i), h.get(i)) for i in range(1, 11)] == [
        True, True, False, False, True, True, True, True, True, False]
    # members level with their peers clear their hurdle, whatever their order
    level = Snapshot(4, tuple(MemberView(i, genome, ((80, 0.1 * 3),), 4, 80, since_change=1) for i in (3, 1, 2)))
    assert all(clears_hurdle(m, hurdles(level, 1)[m.id]) for m in level.members)
    # grace 2 vs 1: age 2 is beyond a 1-interval grace period
    assert hurdles(snapshot, 1) == {i: h[i] for i in (1, 2, 3, 4)}


@pytest.mark.parametrize("kind", STRATEGIES)
def test_grace_intervals_is_the_default_and_ignores_hurdles(kind: str) -> None:
    """The default grace is 'intervals': every member in its grace period keeps, also the ones
    that hurdles would expose; the decisions equal those of an explicit 'intervals'."""
    assert StrategyConfig().grace == "intervals"
    space = arch_space()
    for seed in range(10):
        rng = np.random.default_rng([seed, 23])
        snapshot = random_snapshot(space, rng, n=int(rng.integers(4, 13)))
        snapshot = Snapshot(snapshot.round, tuple(dataclasses.replace(m, since_change=int(rng.integers(0, 3)))
                                                  for m in snapshot.members))
        default = StrategyConfig(**STRATEGIES[kind], grace_intervals=2)
        strategy, decisions = plan(default, space, snapshot, seed)
        assert_valid(strategy, space, snapshot, decisions, [m.id for m in snapshot.members])
        assert all(isinstance(d, Keep) for d in decisions if in_grace(snapshot.member(d.member), 2))
        explicit = dataclasses.replace(default, grace="intervals")
        assert plan(explicit, space, snapshot, seed)[1] == decisions


@pytest.mark.parametrize("kind", ["ga-uniform", "ga-sbx", "nsga2"])
def test_grow_only_children_never_shrink_below_the_weight_donor(kind: str) -> None:
    """With strategy.grow_only every child's architecture genes are at least those of the member
    whose weights it takes (so each shape change is a function-preserving growth); the same plans
    without it do shrink some, and grow_only still lets some children grow."""
    space = arch_space(max_params=200_000)
    shrunk = {False: 0, True: 0}
    grown = 0
    for grow_only in (False, True):
        config = StrategyConfig(**{**STRATEGIES[kind], "mutation_probability": 0.6}, grow_only=grow_only)
        for seed in range(15):
            snapshot, decisions = valid_plan(config, space, seed)
            for d in decisions:
                if isinstance(d, (Exploit, Crossover)):
                    source = d.donor if isinstance(d, Exploit) else d.weights_from
                    donor = snapshot.member(source).genome.architecture()
                    child = d.genome.architecture()
                    shrunk[grow_only] += any(child[p] < v for p, v in donor.items())
                    grown += grow_only and child != donor
    assert shrunk[True] == 0 and shrunk[False] > 0 and grown > 0


def shape_space(max_params: int = 400_000) -> SearchSpace:
    """experiments/arch_search.yaml's space: lr and five architecture genes, width and heads at a
    fixed head_dim (most genes are architecture genes, so most mutations move the shape)."""
    genes = [
        FloatGene("train.lr", 3e-4, 1e-2, log=True),
        IntGene("model.num_hidden_layers", 1, 4),
        ChoiceGene("model.num_attention_heads", (2, 4, 6, 8)),
        ChoiceGene("model.hidden_size", (32, 64, 96, 128)),
        ChoiceGene("model.num_key_value_heads", (1, 2)),
        IntGene("model.intermediate_size", 52, 392, step=20),
    ]
    return SearchSpace(genes, BASE, max_params=max_params, architecture=RULES, head_dim=16)


def one_genome_snapshot(genome: Genome, n: int, objectives: tuple[str, ...]) -> Snapshot:
    """n members that all have ``genome`` (as after a few exploits copied one member), fitness
    1.0, 1.1, ... by id."""
    return Snapshot(3, tuple(
        MemberView(10 + i, genome, ((120, 1.0 + 0.1 * i),), 3, 120,
                   {"val_bpb": 1.0 + 0.1 * i, **{o: 1.0 for o in objectives if o != "val_bpb"}})
        for i in range(n)))


@pytest.mark.parametrize("kind", ["ga-uniform", "ga-sbx", "nsga2"])
def test_grow_only_children_are_never_clones_of_the_weight_donor(kind: str) -> None:
    """With strategy.grow_only a mutation that would shrink the shape is not turned back into a
    copy of the donor: another gene moves instead, an architecture gene only upward. Before, in a
    one-genome population more than half the grow_only children were clones, and a fifth of the
    others (their lr a few ulps off the donor's, which `==` told apart): each an interval spent
    training what the donor trains already. A donor at the top of every gene that can move stays the
    only child there is (and the decision is still valid)."""
    space = shape_space()
    at_base = space.clip(Genome.from_dict({**BASE, "train.lr": 3e-3}))
    largest = space.clip(at_base.replace({"model.num_hidden_layers": 3, "model.hidden_size": 128,
                                          "model.num_attention_heads": 8, "model.num_key_value_heads": 1,
                                          "model.intermediate_size": 192}))
    assert space.contains(largest) and space.count_parameters(largest) == 398_208
    children = clones = grown = 0
    for start in (at_base, largest):
        for grow_only in (False, True):
            config = StrategyConfig(**{**STRATEGIES[kind], "quantile": 0.5}, grow_only=grow_only)
            for seed in range(40):
                snapshot = one_genome_snapshot(start, 6, config.objectives)
                strategy, decisions = plan(config, space, snapshot, seed)
                assert_valid(strategy, space, snapshot, decisions, [m.id for m in snapshot.members])
                for d in decisions:
                    if isinstance(d, (Exploit, Crossover)):
                        # never a clone, grow_only or not (a float gene a few ulps away is still one)
                        assert np.abs(space.encode(d.genome) - space.encode(start)).max() > 1e-9, (grow_only, d)
                        children += grow_only
                        grown += grow_only and d.genome.architecture() != start.architecture()
                        if grow_only:
                            assert not any(d.genome[p] < v for p, v in start.architecture().items())
    assert children == 2 * 40 * 3 and grown > 0
    # nothing can move: one architecture gene, at its top -> the donor's genome is all there is
    top = SearchSpace([IntGene("model.num_hidden_layers", 1, 4)], BASE, architecture=RULES)
    genome = top.clip(Genome.from_dict({**BASE, "model.num_hidden_layers": 4}))
    config = StrategyConfig(**{**STRATEGIES[kind], "quantile": 0.5}, grow_only=True)
    snapshot = one_genome_snapshot(genome, 4, config.objectives)
    strategy, decisions = plan(config, top, snapshot, 0)
    assert_valid(strategy, top, snapshot, decisions, [m.id for m in snapshot.members])
    assert [d.genome for d in decisions if not isinstance(d, Keep)] == [genome, genome]


def test_grow_only_keeps_the_growth_of_a_child_that_also_proposes_a_shrink() -> None:
    """inside(grow_only): a gene proposed below the donor's is put back at the donor's value and
    the other genes' growth stays (before, one shrunk gene took the donor's whole shape back); a
    width shrink whose heads the head_dim rule then asks back is the donor's width again."""
    space = shape_space()
    donor = space.clip(Genome.from_dict({**BASE, "train.lr": 3e-3}))
    child = donor.replace({"model.num_hidden_layers": 1, "model.intermediate_size": 212, "train.lr": 4e-3})
    got = inside(space, child, donor, grow_only=True)
    assert got == donor.replace({"model.intermediate_size": 212, "train.lr": 4e-3})
    narrow = donor.replace({"model.hidden_size": 32, "model.num_attention_heads": 2, "model.num_hidden_layers": 3})
    got = inside(space, narrow, donor, grow_only=True)
    assert got == donor.replace({"model.num_hidden_layers": 3})
    assert inside(space, child, donor) == donor.replace({"model.num_hidden_layers": 1, "model.intermediate_size": 212,
                                                         "train.lr": 4e-3})   # without grow_only: as proposed


@pytest.mark.parametrize("kind", ["ga-uniform", "ga-sbx", "nsga2"])
def test_merge_crossover_interpolates_one_shape_and_takes_layers_across_two(kind: str) -> None:
    """strategy.merge: parents and child of one shape get alpha alone (interpolation); parents of
    two shapes get alpha and a layer map (layer-wise inheritance); parents of one shape with a
    mutated child neither (weights_from's weights, carried)."""
    space = toy_space()                     # no architecture genes: every crossover interpolates
    arch = arch_space()
    for sp in (space, arch):
        config = StrategyConfig(**STRATEGIES[kind], merge=True, crossover_probability=1.0)
        seen = {"interpolated": 0, "layered": 0}
        for seed in range(6):
            snapshot, decisions = valid_plan(config, sp, seed)
            assert decisions == plan(config, sp, snapshot, seed)[1]
            for d in (d for d in decisions if isinstance(d, Crossover)):
                shapes = [snapshot.member(p).genome.architecture() for p in d.parents]
                if shapes[0] != shapes[1]:
                    assert d.layers is not None and d.alpha is not None
                    seen["layered"] += 1
                elif shapes[0] == d.genome.architecture():
                    assert d.layers is None and d.alpha is not None
                    seen["interpolated"] += 1
                else:
                    assert d.layers is None and d.alpha is None
        if sp is space:
            assert seen["interpolated"] > 0 and seen["layered"] == 0
        else:
            assert seen["layered"] > 0


def test_layer_sources_follow_alpha_and_the_parents_depths() -> None:
    """A unit both parents have comes from weights_from with probability alpha (alpha 1: all of
    them, 0: none); a layer only the deeper parent has comes from it; deeper than both: None."""
    rng = np.random.default_rng(0)
    assert layer_sources(4, {7: 2, 9: 3}, 7, 1.0, rng) == {
        "tok_embeddings": 7, "layers.0": 7, "layers.1": 7, "layers.2": 9, "layers.3": None, "norm": 7, "output": 7}
    assert layer_sources(2, {7: 2, 9: 3}, 7, 0.0, rng) == {
        "tok_embeddings": 9, "layers.0": 9, "layers.1": 9, "norm": 9, "output": 9}
    picks = [layer_sources(1, {7: 1, 9: 1}, 7, 0.3, rng)["layers.0"] == 7 for _ in range(2000)]
    assert 0.25 < np.mean(picks) < 0.35


@pytest.mark.parametrize("kind", ["ga-sbx", "nsga2"])
def test_fitness_weighted_merge_alpha_follows_the_parents_val_bpb(kind: str) -> None:
    """strategy.merge_alpha: fitness gives alpha = 2^-b / (2^-b + 2^-b') for the weights' parent
    (val_bpb b) and the other (b'), so the better parent weighs more; the same plan otherwise."""
    space = toy_space()
    n = 0
    for seed in range(6):
        rng = np.random.default_rng([seed, 17])
        snapshot = random_snapshot(space, rng, n=int(rng.integers(4, 13)))
        config = StrategyConfig(**STRATEGIES[kind], merge=True, merge_alpha="fitness", crossover_probability=1.0)
        decisions = make_strategy(config, space).plan(snapshot, np.random.default_rng(seed))
        uniform = make_strategy(dataclasses.replace(config, merge_alpha="uniform"), space).plan(
            snapshot, np.random.default_rng(seed))
        assert [dataclasses.replace(d, alpha=None) if isinstance(d, Crossover) else d for d in decisions] == \
            [dataclasses.replace(d, alpha=None) if isinstance(d, Crossover) else d for d in uniform]
        for d in decisions:
            if isinstance(d, Crossover):
                other = next(p for p in d.parents if p != d.weights_from) if len(set(d.parents)) > 1 else d.weights_from
                b, b2 = snapshot.member(d.weights_from).fitness, snapshot.member(other).fitness
                assert d.alpha == pytest.approx(2.0 ** -b / (2.0 ** -b + 2.0 ** -b2), rel=1e-12)
                assert (d.alpha >= 0.5) == (b <= b2) or b == b2
                n += 1
    assert n > 0
    with pytest.raises(ValueError):
        StrategyConfig(name="ga", merge=True, merge_alpha="best")


@pytest.mark.parametrize("kind", STRATEGIES)
def test_async_ready_member_gets_one_decision(kind: str) -> None:
    space = arch_space()
    for seed in range(4):
        rng = np.random.default_rng([seed, 11])
        snapshot = random_snapshot(space, rng, n=int(rng.integers(2, 13)))
        for m in snapshot.members:
            strategy, decisions = plan(kind, space, snapshot, seed, ready=[m.id])
            assert len(decisions) == 1
            assert_valid(strategy, space, snapshot, decisions, [m.id])


@pytest.mark.parametrize("kind", STRATEGIES)
def test_unknown_or_repeated_ready_ids_are_refused(kind: str) -> None:
    space = toy_space()
    snapshot = random_snapshot(space, np.random.default_rng(0), n=4)
    with pytest.raises(KeyError):
        plan(kind, space, snapshot, 0, ready=[1000])
    with pytest.raises(ValueError):
        plan(kind, space, snapshot, 0, ready=[snapshot.members[0].id] * 2)


def run_world(strategy, space: SearchSpace, seed: int, rounds: int, *, snapshots=None, stop_after=None):
    """A tiny sync driver: fitness falls by a random share each round, exploits copy the
    donor's fitness, member 3 fails and restarts empty at round 3. Returns (snapshots, decisions);
    with `snapshots` given it replays them instead of simulating."""
    rng = np.random.default_rng([seed, 99])
    genomes = {i: space.sample(rng) for i in range(8)}
    histories: dict[int, list] = {i: [(50, float(rng.uniform(2.0, 3.0)))] for i in range(8)}
    seen, planned = [], []
    for r in range(rounds):
        if snapshots is not None:
            snap = snapshots[r]
        else:
            if r == 3:
                histories[3] = []
            snap = Snapshot(
                r,
                tuple(
                    MemberView(i, genomes[i], tuple(histories[i]), r, 50 * (r + 1),
                               {"val_bpb": histories[i][-1][1], "params": 1e5, "tokens_per_s": 1e4} if histories[i] else {})
                    for i in range(8)
                ),
            )
        seen.append(snap)
        decisions = strategy.plan(snap, np.random.default_rng([seed, snap.round]))
        planned.append(decisions)
        if stop_after is not None and r + 1 == stop_after:
            break
        if snapshots is None:
            before = {i: list(h) for i, h in histories.items()}
            for d in decisions:
                if isinstance(d, (Exploit, Crossover)):
                    donor = d.donor if isinstance(d, Exploit) else d.weights_from
                    histories[d.member] = list(before[donor])
                if not isinstance(d, Keep):
                    genomes[d.member] = d.genome
            for i in range(8):
                last = histories[i][-1][1] if histories[i] else 3.0
                histories[i].append((50 * (r + 2), last * (1 - 0.1 * rng.random())))
    return seen, planned


@pytest.mark.parametrize("kind", STRATEGIES)
def test_resume_from_state_dict_decides_as_never_stopped(kind: str) -> None:
    space = arch_space()
    rounds, stop = 7, 2
    for seed in range(2):
        config = StrategyConfig(**STRATEGIES[kind])
        snapshots, uninterrupted = run_world(make_strategy(config, space), space, seed, rounds)
        first = make_strategy(config, space)
        _, before = run_world(first, space, seed, rounds, snapshots=snapshots, stop_after=stop)
        state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
        resumed = make_strategy(config, space)
        resumed.load_state_dict(state)
        _, after = run_world(resumed, space, seed, rounds - stop, snapshots=snapshots[stop:])
        assert before + after == uninterrupted
        for snap, decisions in zip(snapshots, uninterrupted):
            assert_valid(resumed, space, snap, decisions, [m.id for m in snap.members])


# ------------------------------------------------------------------------------------------------
# strategy-specific behaviour


def ranked_snapshot(space: SearchSpace, fitnesses: list[float | None], seed: int = 0) -> Snapshot:
    rng = np.random.default_rng(seed)
    return Snapshot(
        1,
        tuple(
            MemberView(10 + i, space.sample(rng), () if f is None else ((100, f),), 1, 100,
                       {} if f is None else {"val_bpb": f})
            for i, f in enumerate(fitnesses)
        ),
    )


@pytest.mark.parametrize("seed", range(5))
def test_pbt_truncation_replaces_exactly_the_bottom_quantile_from_the_top(seed: int) -> None:
    space = arch_space()
    fits = list(np.random.default_rng(seed).permutation([1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]))
    snapshot = ranked_snapshot(space, fits, seed)
    by_fitness = sorted(snapshot.members, key=lambda m: m.fitness)
    worst2, best2 = {m.id for m in by_fitness[-2:]}, {m.id for m in by_fitness[:2]}
    _, decisions = plan("pbt", space, snapshot, seed)
    exploits = [d for d in decisions if isinstance(d, Exploit)]
    assert {d.member for d in exploits} == worst2
    assert all(d.donor in best2 for d in exploits)
    assert all(isinstance(d, Keep) for d in decisions if d.member not in worst2)


def test_pbt_members_without_fitness_keep_and_never_donate() -> None:
    space = arch_space()
    snapshot = ranked_snapshot(space, [None, 1.5, None, 2.0, 1.0, 3.0, None, 2.5])
    unevaluated = {m.id for m in snapshot.members if not m.history}
    for kind in STRATEGIES:
        for seed in range(10):
            _, decisions = plan(kind, space, snapshot, seed)
            for d in decisions:
                if d.member in unevaluated:
                    assert isinstance(d, Keep)
                assert getattr(d, "donor", None) not in unevaluated
                assert not set(getattr(d, "parents", ())) & unevaluated
    # PBT: 5 ranked members -> k = ceil(0.25 * 5) = 2: the two worst (3.0, 2.5) exploit
    _, decisions = plan("pbt", space, snapshot, 0)
    assert {d.member for d in decisions if isinstance(d, Exploit)} == {15, 17}


def test_equal_fitness_never_exploits() -> None:
    space = toy_space()
    snapshot = ranked_snapshot(space, [2.0] * 6)
    for kind in STRATEGIES:
        _, decisions = plan(kind, space, snapshot, 0)
        assert all(isinstance(d, Keep) for d in decisions), kind


def test_pbt_tournament_exploits_only_fitter_opponents() -> None:
    space = toy_space()
    snapshot = ranked_snapshot(space, [1.0, 2.0, 3.0, 4.0])
    exploited = set()
    for seed in range(20):
        _, decisions = plan("pbt-tournament", space, snapshot, seed)
        assert isinstance(decisions[0], Keep)  # the best member has no fitter opponent
        exploited |= {d.member for d in decisions if isinstance(d, Exploit)}
    assert exploited == {11, 12, 13}


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
def test_members_are_judged_only_every_ready_intervals(kind: str) -> None:
    """strategy.ready_intervals = 3: a member whose age is not a multiple of 3 keeps; each other
    member gets the decision the same plan gives it when every member is judged."""
    space = arch_space()
    rng = np.random.default_rng(0)
    fits = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]
    ages = [3, 1, 6, 2, 3, 4, 9, 5]   # judged: ids 10, 12, 14, 16
    snapshot = Snapshot(1, tuple(MemberView(10 + i, space.sample(rng), ((100, f),), age, 100, {"val_bpb": f})
                                 for i, (f, age) in enumerate(zip(fits, ages))))
    spaced = make_strategy(StrategyConfig(**STRATEGIES[kind], ready_intervals=3), space).plan(snapshot, np.random.default_rng(1))
    every = make_strategy(StrategyConfig(**STRATEGIES[kind], ready_intervals=1), space).plan(snapshot, np.random.default_rng(1))
    for m, d, e in zip(snapshot.members, spaced, every):
        assert d == (Keep(m.id) if m.age % 3 else e), (kind, m.id)
    if kind.startswith(("pbt", "pb2", "ga")):   # the worst judged member (16, fitness 1.6) is replaced; 17 (age 5) is not
        assert not isinstance(spaced[6], Keep) and not isinstance(every[7], Keep) and isinstance(spaced[7], Keep)


def test_ready_intervals_auto_judges_each_member_about_judgements_times() -> None:
    auto = StrategyConfig()
    assert auto.ready_intervals == "auto" and JUDGEMENTS == 8
    assert [ready_every(auto, n) for n in (None, 1, 8, 10, 15, 16, 32, 120)] == [1, 1, 1, 1, 1, 2, 4, 15]
    assert ready_every(StrategyConfig(ready_intervals=3), 120) == 3
    assert make_strategy(auto, toy_space()).plan(ranked_snapshot(toy_space(), [1.0, 2.0]), np.random.default_rng(0))[1] != Keep(11)
    for bad in (0, -2, "often"):
        with pytest.raises(ValueError, match="strategy.ready_intervals: must be a whole number"):
            StrategyConfig(ready_intervals=bad)


def test_ga_keeps_the_elite_and_breeds_from_fitter_parents() -> None:
    space = arch_space()
    snapshot = ranked_snapshot(space, [1.0, 1.1, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5])
    kinds = set()
    for seed in range(20):
        _, decisions = plan("ga-sbx", space, snapshot, seed)  # elitism 2
        assert isinstance(decisions[0], Keep) and isinstance(decisions[1], Keep)
        kinds |= {type(d).__name__ for d in decisions}
    assert kinds == {"Keep", "Exploit", "Crossover"}


@pytest.mark.parametrize("quantile", [0.25, 0.5])
@pytest.mark.parametrize("kind", ["ga-uniform", "ga-sbx"])
def test_ga_replaces_the_bottom_quantile_from_the_survivors_and_never_clones(kind: str, quantile: float) -> None:
    """Only the bottom `quantile` are bred, their parents are the survivors, and no child is a
    copy of the genome whose weights it takes (the pre-issue-14 GA bred every member but the
    elite from all the others, and cloned: on the quickstart task it lost to random search)."""
    space = toy_space()   # 2 float genes: crossover of two parents often gives one of them back
    fits = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]
    config = dict(STRATEGIES[kind], quantile=quantile, crossover_probability=0.5)
    n_replace = int(quantile * len(fits))
    bred = 0
    for seed in range(30):
        snapshot = ranked_snapshot(space, fits, seed=seed)
        decisions = make_strategy(StrategyConfig(**config), space).plan(snapshot, np.random.default_rng(seed))
        by_id = {m.id: m for m in snapshot.members}
        survivors = {m.id for m in snapshot.members[: len(fits) - n_replace]}
        for d in decisions:
            if d.member in survivors:
                assert isinstance(d, Keep)
                continue
            assert isinstance(d, (Exploit, Crossover)), d   # the bottom always has fitter survivors
            source = d.donor if isinstance(d, Exploit) else d.weights_from
            parents = (d.donor,) if isinstance(d, Exploit) else d.parents
            assert set(parents) <= survivors
            assert d.genome != by_id[source].genome
            bred += 1
    assert bred == 30 * n_replace


def test_nsga2_pareto_front_and_replacement() -> None:
    space = toy_space()
    # (val_bpb, params): 10, 11, 12 are mutually non-dominated; 13 is dominated by 11;
    # 14 and 15 are dominated by everything else
    points = [(1.0, 9.0), (2.0, 5.0), (3.0, 1.0), (2.5, 6.0), (4.0, 9.5), (5.0, 10.0)]
    rng = np.random.default_rng(0)
    snapshot = Snapshot(
        2,
        tuple(
            MemberView(10 + i, space.sample(rng), ((100, v),), 2, 100, {"val_bpb": v, "params": p})
            for i, (v, p) in enumerate(points)
        ),
    )
    strategy = make_strategy(StrategyConfig(name="nsga2", objectives=("val_bpb", "params"), quantile=0.5), space)
    assert strategy.pareto_front(snapshot) == [10, 11, 12]
    assert strategy.ranks(snapshot) == {10: 0, 11: 0, 12: 0, 13: 1, 14: 2, 15: 3}
    decisions = strategy.plan(snapshot, np.random.default_rng(0))
    # n_replace = 3: the three in the worst fronts breed from the better ones
    assert {d.member for d in decisions if not isinstance(d, Keep)} == {13, 14, 15}


def test_nsga2_maximises_throughput() -> None:
    assert OBJECTIVE_SENSE["tokens_per_s"] == "max"
    space = toy_space()
    rng = np.random.default_rng(0)
    snapshot = Snapshot(
        1,
        tuple(
            MemberView(i, space.sample(rng), ((100, 2.0),), 1, 100, {"val_bpb": 2.0, "tokens_per_s": t})
            for i, t in enumerate([100.0, 300.0, 200.0])
        ),
    )
    strategy = make_strategy(StrategyConfig(name="nsga2", objectives=("val_bpb", "tokens_per_s")), space)
    assert strategy.pareto_front(snapshot) == [1]


def test_pb2_proposes_from_the_model_once_it_has_observations() -> None:
    space = toy_space()
    strategy = make_strategy(StrategyConfig(name="pb2"), space)
    _, decisions = run_world(strategy, space, seed=0, rounds=6)
    hows = [d.how for ds in decisions for d in ds if isinstance(d, Exploit)]
    assert "model" in hows
    assert len(strategy.observations) >= MIN_OBSERVATIONS


def test_random_search_always_keeps() -> None:
    space = arch_space()
    snapshot = ranked_snapshot(space, [1.0, 2.0, 3.0, 4.0])
    _, decisions = plan("random", space, snapshot, 0)
    assert decisions == [Keep(m.id) for m in snapshot.members]


# ------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("name", "pbtx", "did you mean 'pbt'"),
        ("quantile", 0.7, "less_than_equal"),
        ("quantile", "a lot", "float_type"),
        ("quantile", True, "float_type"),              # YAML's `yes` is no number
        ("resample_probability", -0.1, "greater_than_equal"),
        ("perturb_factors", (0.8,), "missing"),
        ("perturb_factors", (0.8, -1.2), "greater_than"),
        ("perturb_factors", (0.8, math.inf), "finite_number"),
        ("selection", "tournamnet", "literal_error"),
        ("tournament_size", 1, "greater_than_equal"),
        ("tournament_size", 2.5, "int_type"),
        ("elitism", -1, "greater_than_equal"),
        ("elitism", True, "int_type"),
        ("crossover", "onepoint", "literal_error"),
        ("crossover_probability", 1.5, "less_than_equal"),
        ("mutation_probability", math.nan, "less_than_equal"),
        ("objectives", (), "too_short"),
        ("objectives", ("val_bpb", "latency"), "or val_bpb.<held-out set>, got 'latency'"),
        ("objectives", ("val_bpb.",), "or val_bpb.<held-out set>, got 'val_bpb.'"),
        ("objectives", ("val_bpb", "val_bpb"), "listed twice"),
        ("sampler", "cmaes", "literal_error"),
        ("grace", "hurdle", "literal_error"),
        ("seed", -1, "greater_than_equal"),
        ("quantil", 0.2, "unexpected_keyword_argument"),
    ],
)
def test_config_errors_name_the_field(field: str, value, error: str) -> None:
    # pydantic's error (a ValueError) locates the field; a cross-field check names it in its
    # message. experiments/config.py turns either into one line (tests/experiments/test_config.py).
    with pytest.raises(ValidationError) as err:
        StrategyConfig(**{field: value})
    assert isinstance(err.value, ValueError)
    first = err.value.errors()[0]
    if first["type"] == "value_error":
        assert str(first["ctx"]["error"]).startswith(f"strategy.{field}: ") and error in first["msg"]
    else:
        assert first["loc"][0] == field and first["type"] == error


def test_hurdles_need_a_grace_period() -> None:
    with pytest.raises(ValidationError, match=r"strategy\.grace: 'hurdles' judges members during their grace period, "
                                              r"which strategy\.grace_intervals 0 turns off; set it to 1 or more"):
        StrategyConfig(grace="hurdles", grace_intervals=0)
    assert StrategyConfig(grace="hurdles", grace_intervals=1).grace == "hurdles"


def test_config_takes_yaml_lists_and_stays_a_dataclass() -> None:
    config = StrategyConfig(name="ga", perturb_factors=[0.5, 2], objectives=["val_bpb", "params"])
    assert config.perturb_factors == (0.5, 2.0) and config.objectives == ("val_bpb", "params")
    assert dataclasses.replace(config, elitism=2).elitism == 2 and dataclasses.asdict(config)["name"] == "ga"
    assert pickle.loads(pickle.dumps(config)) == config   # it travels to Ray with the setup
    with pytest.raises(ValidationError):
        dataclasses.replace(config, elitism=-1)


def test_gp_sampler_needs_its_dependencies() -> None:
    import importlib.util

    if importlib.util.find_spec("scipy") and importlib.util.find_spec("torch"):
        assert StrategyConfig(name="pb2", sampler="gp").sampler == "gp"
    else:
        with pytest.raises(ValueError, match=r"strategy\.sampler: 'gp' needs "):
            StrategyConfig(name="pb2", sampler="gp")


def test_genomes_in_decisions_are_plain_genomes() -> None:
    space = arch_space()
    snapshot = ranked_snapshot(space, [1.0, 2.0, 3.0, 4.0])
    for kind in STRATEGIES:
        _, decisions = plan(kind, space, snapshot, 1)
        for d in decisions:
            if hasattr(d, "genome"):
                assert isinstance(d.genome, Genome)
                assert Genome.from_dict(json.loads(json.dumps(d.genome.as_dict()))) == d.genome


def test_held_out_sets_and_a_declared_score_are_objectives():
    """val_bpb.<set> is minimised; the user's score goes the way the run declares (Snapshot.senses);
    a failed score (nan) is the worst whatever its sense."""
    from evo.nsga2 import objective_vector
    from evo.strategy import objective_sense

    m = MemberView(0, Genome.from_dict({}), ((10, 2.0),), objectives={"score": 0.25, "val_bpb.docs": 1.5})
    assert objective_vector(m, ["score", "val_bpb.docs"], {"score": "max"}).tolist() == [-0.25, 1.5]
    assert objective_vector(m, ["score"], {"score": "min"}).tolist() == [0.25]
    failed = dataclasses.replace(m, objectives={"score": math.nan})
    assert objective_vector(failed, ["score"], {"score": "max"}).tolist() == [math.inf]
    assert objective_sense("val_bpb.code") == "min" and objective_sense("tokens_per_s") == "max"
    with pytest.raises(KeyError):
        objective_sense("score")          # undeclared
    assert StrategyConfig(name="nsga2", objectives=("score", "val_bpb.docs")).objectives == ("score", "val_bpb.docs")
