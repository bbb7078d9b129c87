"""The driver on a real local Ray (2 CPUs) with tiny searches: files, resume, refusals, modes."""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from population.config import PopulationConfig, ResourcesConfig
from population.driver import ConfigConflictError, ResourceFitError, SearchError, run_search
from population.inspect import export_run, run_status
from population.replay import replay_run
from population.slots import concurrent_slots
from population.store import CHECKPOINT_SLOTS, KEEP_STATES, RunStore
from tests.helpers import sigterm_at_round
from tests.population.conftest import make_setup

ROUNDS = 6   # reference search: 3 members, 6 rounds of 5 steps
SEED_OF_JUMP = 1   # a seed whose exploits both shrink and grow the depth (test_lineage_records_the_val_loss_jump…)


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def _state(run_dir: Path) -> dict:
    return RunStore(run_dir.parent, run_dir.name).read_state()


def _lineage(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "lineage.jsonl").read_text().splitlines()]


def _comparable(records: list[dict]) -> list[dict]:
    """Lineage without wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("time", "latency_s", "receiver_s")} for r in records]


def _table(state: dict) -> list[tuple]:
    return [(m["id"], m["step"], m["history"], m["genome"], m["parent"], m["schedule"]) for m in state["members"]]


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _reference(storage, name, cache_dir, **kw):
    return make_setup(storage, name, cache_dir, size=3, interval=5, total=5 * ROUNDS, seed=3, **kw)


@pytest.fixture(scope="module")
def reference(ray_local, cache_dir, tmp_path_factory):
    """One uninterrupted sync search, shared by the tests that inspect or compare against it."""
    storage = tmp_path_factory.mktemp("runs")
    summary = run_search(_reference(storage, "ref", cache_dir), console=_quiet())
    return storage, summary


def test_sync_search_writes_a_complete_run(reference):
    storage, summary = reference
    run_dir = storage / "ref"
    state = _state(run_dir)
    assert summary["status"] == "finished" and summary["round"] == ROUNDS
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    assert state["status"] == "finished" and state["round"] == ROUNDS
    assert [m["step"] for m in state["members"]] == [5 * ROUNDS] * 3

    lineage = _lineage(run_dir)
    assert len(lineage) == state["lineage_count"]
    assert sorted(r["member"] for r in lineage if r["event"] == "born") == [0, 1, 2]
    exploits = [r for r in lineage if r["event"] == "exploit"]
    assert exploits and all(r["parents"] and r["changed"] and r["latency_s"] > 0 for r in exploits)
    assert len(state["exploit_latencies"]) == len(exploits)

    # every committed checkpoint exists with the checksum its record holds; the files are each
    # member's CHECKPOINT_SLOTS slots, written in turn (round % slots), nothing else
    referenced = {m["checkpoint"] for m in state["members"]}
    on_disk = {str(p.relative_to(run_dir)) for p in (run_dir / "checkpoints").rglob("*.pt")}
    assert referenced == {f"checkpoints/m{i}/s{ROUNDS % CHECKPOINT_SLOTS}.pt" for i in range(3)}
    assert on_disk == {f"checkpoints/m{i}/s{r % CHECKPOINT_SLOTS}.pt" for i in range(3) for r in range(1, ROUNDS + 1)}
    store = RunStore(storage, "ref")
    assert all(store.check_checkpoint(m["checkpoint"], m["checkpoint_sha256"]) is None
               and len(m["checkpoint_sha256"]) == 64 for m in state["members"])
    assert not (run_dir / "lock.json").exists()

    # the search made progress: the best member beats the median of the first evaluations
    first = [m["history"][0][1] for m in state["members"]]
    assert summary["best"]["val_bpb"] < statistics.median(first)
    assert summary["best"]["val_bpb"] == min(m["history"][-1][1] for m in state["members"])
    timing = state["timing"]
    assert 0 < timing["member_compute_s"] and 0 < timing["wall_s"]


def test_status_export_and_replay_of_the_best_member(reference, tmp_path):
    storage, summary = reference
    status = run_status(str(storage), "ref")
    assert status["status"] == "finished" and status["round"] == ROUNDS
    assert status["best"]["member"] == summary["best"]["member"]

    out = export_run(str(storage), "ref", "internlm2", str(tmp_path / "hf"))
    assert (Path(out) / "config.json").is_file() and (Path(out) / "model.safetensors").is_file()

    replay = replay_run(str(storage), "ref")
    # one trainer following the schedule (genomes, batch order switches) lands on the member's score
    assert replay["val_bpb"] == pytest.approx(replay["best_val_bpb"], rel=1e-6)
    assert replay["step"] == 5 * ROUNDS
    assert json.loads((storage / "ref" / "replay.json").read_text())["val_bpb"] == replay["val_bpb"]


def test_resuming_a_finished_run_changes_nothing(reference, cache_dir):
    storage, summary = reference
    before = _files(storage / "ref")
    again = run_search(_reference(storage, "ref", cache_dir), console=_quiet())
    assert again["status"] == "finished" and again["round"] == ROUNDS
    assert again["best"] == summary["best"]
    assert _files(storage / "ref") == before


def test_same_seed_same_search(reference, cache_dir):
    """Sync mode on CPU is deterministic: the basis of 'resume equals uninterrupted'."""
    storage, _ = reference
    run_search(_reference(storage, "twin", cache_dir), console=_quiet())
    assert _table(_state(storage / "twin")) == _table(_state(storage / "ref"))
    assert _comparable(_lineage(storage / "twin")) == _comparable(_lineage(storage / "ref"))


def test_slots_change_when_members_train_not_what_they_compute(reference, cache_dir):
    """On 2 CPUs the reference's 3 members (one thread each) share 2 slots, their intervals cut
    into parts; with a slot each they train whole intervals at once. Same search either way."""
    storage, _ = reference
    assert _state(storage / "ref")["timing"]["slots"] == 2
    run_search(_reference(storage, "all-at-once", cache_dir, max_concurrent=3), console=_quiet())
    state = _state(storage / "all-at-once")
    assert state["timing"]["slots"] == 3
    assert _table(state) == _table(_state(storage / "ref"))
    assert _comparable(_lineage(storage / "all-at-once")) == _comparable(_lineage(storage / "ref"))


def test_sigterm_stops_at_a_committed_round_and_resume_equals_uninterrupted(reference, cache_dir):
    storage, _ = reference
    store = RunStore(storage, "stopped")

    watcher = sigterm_at_round(store, 2, timeout=120)
    stopped = run_search(_reference(storage, "stopped", cache_dir), console=_quiet())
    watcher.join()
    assert stopped["status"] == "stopped", "the signal arrived after the run finished"
    state = _state(storage / "stopped")
    assert state["status"] == "stopped" and 2 <= state["round"] < ROUNDS
    assert len(_lineage(storage / "stopped")) >= state["lineage_count"]
    assert not (storage / "stopped" / "lock.json").exists()
    assert run_status(str(storage), "stopped")["status"] == "stopped"

    resumed = run_search(_reference(storage, "stopped", cache_dir), console=_quiet())
    assert resumed["status"] == "finished" and resumed["round"] == ROUNDS
    # identical to the uninterrupted reference run: nothing of the stop shows in the result
    assert _table(_state(storage / "stopped")) == _table(_state(storage / "ref"))
    assert _comparable(_lineage(storage / "stopped")) == _comparable(_lineage(storage / "ref"))


def test_resume_with_a_larger_budget_continues_the_rounds(ray_local, cache_dir, tmp_path):
    first = run_search(make_setup(tmp_path, "grow", cache_dir, size=2, interval=5, total=10), console=_quiet())
    assert first["status"] == "finished" and first["round"] == 2
    committed = _lineage(tmp_path / "grow")

    more = run_search(make_setup(tmp_path, "grow", cache_dir, size=2, interval=5, total=20), console=_quiet())

    state = _state(tmp_path / "grow")
    assert more["status"] == "finished" and state["round"] == 4
    assert [m["id"] for m in state["members"]] == [0, 1]
    assert all(m["alive"] and m["step"] == 20 and len(m["history"]) == 4 for m in state["members"])
    lineage = _lineage(tmp_path / "grow")
    assert lineage[: len(committed)] == committed   # history is appended, never rewritten
    rounds = [r["round"] for r in lineage]
    assert rounds == sorted(rounds)


def test_conflicting_config_is_refused_and_the_run_is_untouched(reference, cache_dir):
    storage, _ = reference
    before = _files(storage / "ref")
    with pytest.raises(ConfigConflictError) as err:
        run_search(_reference(storage, "ref", cache_dir, strategy="random"), console=_quiet())
    assert str(err.value) == ("config conflicts with stored run 'ref': "
                              "strategy.name is 'random' here but 'pbt' in the run")
    assert _files(storage / "ref") == before


def test_a_population_that_does_not_fit_is_refused_at_once(ray_local, cache_dir, tmp_path):
    """Refused before anything starts (no run directory, no member waiting for CPUs that never
    come: a wait would hang until the suite's timeout), with the fix named."""
    with pytest.raises(ResourceFitError) as err:
        run_search(make_setup(tmp_path, "big", cache_dir, size=4, num_cpus=2.0), console=_quiet())
    assert not (tmp_path / "big").exists()
    assert str(err.value) == ("population of 4 members × 2.0 CPU does not fit this cluster (2.0 CPUs): "
                              "use population.resources.num_cpus: 0.5")
    with pytest.raises(ResourceFitError, match=r"num_cpus: 0\.66 or population\.size: 2"):
        run_search(make_setup(tmp_path, "big", cache_dir, size=3, num_cpus=1.0), console=_quiet())
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize("num_cpus,num_gpus,max_concurrent,cluster,slots", [
    (0.5, 0, None, {"CPU": 2.0}, 2),          # one thread each: as many as the cores
    (1, 0, None, {"CPU": 16.0}, 4),           # never more than the population
    (2, 0, None, {"CPU": 5.0}, 2),            # two threads each on 5 CPUs
    (4, 0, None, {"CPU": 2.0}, 1),            # at least one
    (1, 0.125, None, {"CPU": 2.0, "GPU": 1.0}, 4),   # GPU fractions are meant to be shared
    (0.5, 0, 3, {"CPU": 2.0}, 3),             # population.max_concurrent wins
    (0.5, 0, 9, {"CPU": 2.0}, 4),
])
def test_concurrent_slots(num_cpus, num_gpus, max_concurrent, cluster, slots):
    pop = PopulationConfig(size=4, resources=ResourcesConfig(num_cpus=num_cpus, num_gpus=num_gpus),
                           max_concurrent=max_concurrent)
    assert concurrent_slots(pop, cluster) == slots


@pytest.mark.parametrize("value", [0, -1, 1.5, "two", True])
def test_max_concurrent_must_be_a_positive_integer(value):
    with pytest.raises(ValidationError, match="max_concurrent"):   # a ValueError
        PopulationConfig(size=4, max_concurrent=value)


def test_efficiency_divides_compute_by_the_slots_used_not_the_members(ray_local, cache_dir, tmp_path):
    """4 members on 2 slots take turns: timing.efficiency = member compute / (wall x 2), at most
    1; dividing by the 4 members (the old rule) would halve it."""
    setup = make_setup(tmp_path, "eff", cache_dir, size=4, interval=5, total=10, max_concurrent=2)
    summary = run_search(setup, console=_quiet())
    timing = summary["timing"]
    assert timing["slots"] == 2
    assert timing["slot_s"] == pytest.approx(timing["wall_s"] * 2)   # one session
    assert timing["efficiency"] == pytest.approx(timing["member_compute_s"] / (timing["wall_s"] * 2))
    # 2 slots: the members' compute fits in 2 x the wall
    assert 0 < timing["efficiency"] <= 1 and timing["member_compute_s"] <= 2 * timing["wall_s"]
    on_disk = json.loads((tmp_path / "eff" / "summary.json").read_text())
    assert on_disk["timing"] == timing
    assert _state(tmp_path / "eff")["timing"]["slot_s"] == timing["slot_s"]
    print(f"efficiency {timing['efficiency']:.3f} = compute {timing['member_compute_s']:.2f} s / "
          f"(wall {timing['wall_s']:.2f} s x 2 slots)")


def test_async_search_brings_every_member_to_the_budget(ray_local, cache_dir, tmp_path):
    summary = run_search(make_setup(tmp_path, "free", cache_dir, size=3, interval=5, total=20, mode="async"),
                         console=_quiet())
    state = _state(tmp_path / "free")
    assert summary["status"] == state["status"] == "finished"
    assert all(m["step"] == 20 for m in state["members"])
    assert state["events"] >= 3 and state["round"] == state["events"] // 3
    events = {r["event"] for r in _lineage(tmp_path / "free")}
    assert "born" in events and events & {"exploit", "explore"}
    on_disk = {str(p.relative_to(tmp_path / "free")) for p in (tmp_path / "free" / "checkpoints").rglob("*.pt")}
    assert {m["checkpoint"] for m in state["members"]} <= on_disk


def test_members_that_keep_diverging_end_the_search(ray_local, cache_dir, tmp_path):
    setup = make_setup(tmp_path, "nan", cache_dir, size=2, interval=5, total=20, max_failures=2,
                       train={"grad_clip": 0.0, "warmup_steps": 0})
    setup.space = type(setup.space).from_dict({"train.lr": {"type": "float", "low": 1e5, "high": 1e6}},
                                              base=setup.space.base)
    setup.config["search"] = {"train.lr": {"type": "float", "low": 1e5, "high": 1e6}}
    with pytest.raises(SearchError, match=r"exceed population.max_failures \(2\)"):
        run_search(setup, console=_quiet())
    state = _state(tmp_path / "nan")
    assert state["status"] == "failed" and state["round"] == 1   # round 1: both restarted afresh
    died = [r for r in _lineage(tmp_path / "nan") if r["event"] == "died"]
    assert len(died) == 3 and all("non-finite" in r["error"] for r in died)


def test_status_says_interrupted_when_a_running_run_has_no_live_driver(tmp_path):
    store = RunStore(tmp_path, "orphan")
    store.create({"name": "orphan", "population": {"mode": "sync", "total_steps": 20}})
    member = {"id": 0, "genome": {"train.lr": 1e-3}, "step": 10, "history": [[10, 3.5]], "parent": None,
              "alive": True}
    store.commit_state({"round": 2, "status": "running", "members": [member], "updated": time.time()})
    assert run_status(str(tmp_path), "orphan")["status"] == "interrupted"   # no lock: the driver is gone
    with store.lock():
        status = run_status(str(tmp_path), "orphan")
    assert status["status"] == "running" and status["round"] == 2
    assert status["best"] == {"member": 0, "val_bpb": 3.5, "genome": {"train.lr": 1e-3}}


def test_records_count_intervals_since_the_weights_changed_shape(tmp_path, cache_dir):
    """The grace period's clock (MemberView.since_change): 0 when a member's weights take a new
    architecture or merged weights (a merge crossover), +1 per interval trained, the donor's own
    clock on a copy of the same shape, None after a restart; committed and resumed with the records."""
    from evo.strategies import make_strategy
    from population.records import Records

    setup = make_setup(tmp_path, "grace", cache_dir)
    records = Records(setup, RunStore(tmp_path, "grace"), make_strategy(setup.strategy, setup.space), 1)
    assert records.open() == "new"
    assert all(records[m].view().since_change is None for m in (0, 1))
    layers = records[0].genome["model.num_hidden_layers"]
    grown = dict(records[0].genome, **{"model.num_hidden_layers": layers % 2 + 1})
    records.took_weights(0, records[0], grown, 5, 100)                   # explore to a new shape
    assert records[0].view().since_change == 0
    records.record_results({0: {"failed": True}, 1: {"failed": True}})
    assert records[0].view().since_change == 1 and records[1].since_change is None
    records.took_weights(1, records[0], dict(grown), 5, 100)             # a copy of the same shape
    assert records[1].since_change == 1
    records.took_weights(1, records[0], dict(records[0].genome, **{"train.lr": 1e-3}), 5, 100)
    assert records[1].since_change == 1                                  # hyperparameters only
    records.took_weights(1, records[0], dict(records[1].genome), 5, 100, merged=True)
    assert records[1].since_change == 0                                  # merged weights, same shape
    records.commit(1, steps_done=5)
    again = Records(setup, RunStore(tmp_path, "grace"), make_strategy(setup.strategy, setup.space), 1)
    assert again.open() == "resumed"
    assert [again[m].since_change for m in (0, 1)] == [1, 0]
    again.fresh(0, grown, 7)
    assert again[0].since_change is None


@pytest.mark.slow
def test_merge_crossover_blends_both_parents_and_says_so(ray_local, cache_dir, tmp_path):
    """strategy.merge with ga: crossovers of same-shape parents merge their weights; the lineage
    names both parents and alpha; a merged member starts a grace period."""
    import dataclasses

    setup = make_setup(tmp_path, "merge", cache_dir, size=4, interval=5, total=20, strategy="ga")
    strategy = dataclasses.replace(setup.strategy, merge=True, crossover_probability=1.0, mutation_probability=0.0)
    setup = dataclasses.replace(setup, strategy=strategy,
                                config=dict(setup.config, strategy=dataclasses.asdict(strategy)))
    run_search(setup, console=_quiet())
    crossovers = [r for r in _lineage(tmp_path / "merge") if r["event"] == "crossover"]
    merged = [r for r in crossovers if "alpha" in r]
    assert merged, crossovers
    for r in merged:
        assert len(r["parents"]) == 2 and r["weights_from"] in r["parents"] and 0.0 <= r["alpha"] <= 1.0
        shapes = {g["model.num_hidden_layers"] for g in r["parent_genomes"]}
        if "layers" not in r:                                    # interpolated: one shape throughout
            assert shapes == {r["genome"]["model.num_hidden_layers"]}


@pytest.mark.slow
def test_merge_crossover_of_two_shapes_takes_layers_and_the_child_trains_on(ray_local, cache_dir, tmp_path):
    """strategy.merge with parents of two architectures (depth and FFN width genes): the child
    takes each layer from one parent; the lineage names both parents, alpha and the layer map
    (and which units were shrunk and perturbed); the child trains on to the budget."""
    import dataclasses

    from evo.space import SearchSpace

    setup = make_setup(tmp_path, "xmerge", cache_dir, size=4, interval=4, total=8, strategy="ga")
    search = {"train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
              "model.num_hidden_layers": {"type": "int", "low": 1, "high": 2},
              "model.intermediate_size": {"type": "choice", "choices": [64, 96]}}
    strategy = dataclasses.replace(setup.strategy, merge=True, crossover_probability=1.0, mutation_probability=0.0)
    setup = dataclasses.replace(setup, strategy=strategy, space=SearchSpace.from_dict(search, base=setup.space.base),
                                config=dict(setup.config, strategy=dataclasses.asdict(strategy), search=search))
    run_search(setup, console=_quiet())
    lineage = _lineage(tmp_path / "xmerge")
    layered = [r for r in lineage if r["event"] == "crossover" and "layers" in r]
    assert any(r["perturbed"] for r in layered), [r for r in lineage if r["event"] == "crossover"]
    for r in layered:
        parents = r["parent_genomes"]
        assert parents[0] != parents[1] and 0.0 <= r["alpha"] <= 1.0 and r["weights_from"] in r["parents"]
        depth = r["genome"]["model.num_hidden_layers"]
        assert set(r["layers"]) == {"tok_embeddings", *(f"layers.{i}" for i in range(depth)), "norm", "output"}
        for unit, p in r["layers"].items():
            assert p in r["parents"] or (p is None and unit.startswith("layers."))
        ffn = {q: g["model.intermediate_size"] for q, g in zip(r["parents"], parents)}
        for unit in r["layers"]:                                 # shrunk exactly where the FFN width changed
            p = r["layers"][unit]
            want = unit.startswith("layers.") and p is not None and ffn[p] != r["genome"]["model.intermediate_size"]
            assert (unit in r["perturbed"]) == want, (unit, r)
    assert not [r for r in lineage if r["event"] == "died"]
    state = _state(tmp_path / "xmerge")
    for r in layered:                                           # the child trained on and was judged again
        m = next(x for x in state["members"] if x["id"] == r["member"])
        assert m["step"] == 8 and any(step > r["step"] for step, _ in m["history"])
        assert all(math.isfinite(v) for _, v in m["history"])


@pytest.mark.slow
def test_lineage_records_the_val_loss_jump_of_a_lossy_change_and_none_for_growth(ray_local, cache_dir, tmp_path):
    """An exploit whose new genome is shallower than the donor's (a lossy change) writes the
    validation loss's jump into its lineage record: the loss of the receiver's weights just after
    the change minus the donor's just before it, both on the run's held-out batches, as a fresh
    Trainer measures them from the round's checkpoints. An exploit that adds layers keeps the
    function (new layers start as identities): no jump recorded, and the same loss before and after."""
    import dataclasses

    from evo.space import SearchSpace
    from trainers.model import InternLM2Config
    from trainers.trainer import TrainConfig, Trainer

    # pbt, every gene of a receiver redrawn: depth 1-3 changes both ways on the exploits of rounds 1
    # and 2 (3 rounds: every kept commit, and the checkpoints they name, are still in the store)
    setup = make_setup(tmp_path, "jump", cache_dir, size=4, interval=3, total=9, seed=SEED_OF_JUMP)
    search = {"train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
              "model.num_hidden_layers": {"type": "int", "low": 1, "high": 3}}
    strategy = dataclasses.replace(setup.strategy, resample_probability=1.0)
    setup = dataclasses.replace(setup, strategy=strategy, space=SearchSpace.from_dict(search, base=setup.space.base),
                                config=dict(setup.config, strategy=dataclasses.asdict(strategy), search=search))
    run_search(setup, console=_quiet())
    store = RunStore(tmp_path, "jump")
    checkpoints = {}   # (member, round) -> the member's checkpoint of that round (after its decision)
    for _, state in store.committed_states():
        for m in state["members"]:
            checkpoints[m["id"], state["round"]] = m["checkpoint"]

    def val_loss(member: int, round: int) -> float:
        ckpt = store.load_checkpoint(checkpoints[member, round])
        trainer = Trainer(InternLM2Config(**ckpt["model_config"]), TrainConfig(**ckpt["train_config"]), setup.data)
        trainer.load_state_dict(ckpt)
        return trainer.evaluate()["val_loss"]

    depth = "model.num_hidden_layers"
    exploits = [r for r in store.read_lineage() if r["event"] == "exploit"]
    # "diff": the genes that differ from the donor's genome, [donor's, new]
    shrunk = [r for r in exploits if depth in r["diff"] and r["diff"][depth][1] < r["diff"][depth][0]]
    grown = [r for r in exploits if depth in r["diff"] and r["diff"][depth][1] > r["diff"][depth][0]]
    assert shrunk and grown, [(r["round"], r["diff"]) for r in exploits]
    for r in shrunk:
        donor = r["parents"][0]
        before, after = val_loss(donor, r["round"]), val_loss(r["member"], r["round"])
        assert math.isfinite(r["val_loss_jump"]) and r["val_loss_jump"] != 0
        assert r["val_loss_jump"] == pytest.approx(after - before, abs=1e-5)
        # "before" is the donor as it was judged: its fitness in the record, in nats per byte token
        assert before / math.log(2) == pytest.approx(r["parent_fitness"][0], abs=1e-5)
    for r in grown:
        assert "val_loss_jump" not in r
        assert val_loss(r["member"], r["round"]) == pytest.approx(val_loss(r["parents"][0], r["round"]), abs=1e-5)
