"""Records' commit without Ray: the member texts it re-encodes only in part, the checksums the
members report, the checkpoints it prunes in the background."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from evo.genome import Genome
from evo.strategies import make_strategy
from evo.strategy import Exploit
from population.decisions import record_applied, records_before
from population.records import Records, _encode
from population.store import CHECKPOINT_SLOTS, KEEP_STATES, RunStore
from tests.population.conftest import make_setup


def _records(tmp_path, cache_dir, name: str, size: int = 6) -> Records:
    setup = make_setup(tmp_path, name, cache_dir, size=size, interval=5, total=100)
    records = Records(setup, RunStore(tmp_path, name), make_strategy(setup.strategy, setup.space), 1)
    assert records.open() == "new"
    return records


def _write(store: RunStore, paths: dict) -> dict[int, tuple[str, str]]:
    """What the members do: each checkpoint and its checksum beside it; what they report."""
    out = {}
    for m, (rel, step) in paths.items():
        size, sha = store.write_checkpoint(rel, {"step": step, "member": m})
        assert sha == hashlib.sha256((Path(store.uri) / rel).read_bytes()).hexdigest() == store.checkpoint_sha256(rel)
        out[m] = (rel, sha)
    return out


def _committed_members(store: RunStore) -> list[str]:
    """The members of the committed state (rebuilt from the last whole body and the deltas
    after it), each encoded as the whole record is."""
    return [_encode(d) for d in store.read_state()["members"]]


def _pointer(store: RunStore) -> dict:
    return json.loads(store.read_text("state.json"))


@pytest.mark.parametrize("chain", [16, 3, 0])
def test_commit_and_snapshot_equal_whole_encodings_and_views(tmp_path, cache_dir, chain):
    """Snapshots equal every record's own view(); members re-encoded only in part (history appended, genome and schedule kept, one member
    changed in an async-like event, a record set back or restarted, non-finite and numpy values) are committed -- whole or as
    deltas of the commit before (``chain``: deltas between whole states; 0: every commit whole) -- so that the state read back
    equals, byte for byte, encoding each whole record, and a resume reads them back equal."""
    records = _records(tmp_path, cache_dir, "enc")
    records.chain = chain
    store, rng = records.store, np.random.default_rng(0)
    for r in range(1, 6):
        records.record_results({m: {"step": r * 5, "val_bpb": float(3 - 0.1 * r + rng.normal(0, 0.05)),
                                    "params": 100 + m, "tokens_per_s": 1e3} for m in records.ids})
        if r == 2:   # an exploit: 0 takes 5's weights and a new genome
            d = Exploit(member=0, donor=5, genome=records.snapshot(r).member(5).genome.replace({"train.lr": 1e-3}),
                        how="perturb")
            record_applied(records, d, records_before(records, [d]), 5, r, step=records[5].step, params=105)
        if r == 4:   # non-finite and numpy values: the encoder's own texts
            records.record_results({3: {"step": r * 5, "val_bpb": float("inf"), "params": 103,
                                        "tokens_per_s": float("-inf")},
                                    1: {"step": r * 5, "val_bpb": np.float64(2.5), "params": 101, "tokens_per_s": -0.0}})
        if r == 3:
            records.set_back(1)
            records.fresh(2, dict(records[2].genome), seed=11)
        records.saved(_write(store, records.set_checkpoints(records.ids, r)))
        records.commit(r, steps_done=r * 5)
        assert _committed_members(store) == [_encode(records[m].fields()) for m in records.ids]
        # the snapshot reuses genomes and histories: what each record's own view() gives
        assert records.snapshot(r).members == tuple(records[m].view() for m in records.ids)
        # one member changes alone (async): only it is re-encoded, the rest reused
        records.record_results({4: {"step": r * 5 + 1, "val_bpb": 2.5, "params": 104, "tokens_per_s": 2e3}})
        records.saved(_write(store, records.set_checkpoints([4], 100 + r)))
        records.commit(r, steps_done=r * 5, events=r)
        assert _committed_members(store) == [_encode(records[m].fields()) for m in records.ids]
        body = json.loads(store.read_text(_pointer(store)["file"]))
        if chain and ("needs" in _pointer(store)):   # a delta: member 4's changes alone
            assert "members" not in body and body["round"] == r and body["events"] == r
            assert {f: ids for f, (ids, _) in body["delta"]["members"].items()} == {
                "age": [4], "checkpoint": [4], "checkpoint_sha256": [4], "intervals": [4], "step": [4]}
            ids, keys, columns = body["delta"]["objectives_cols"]   # the figures as columns
            assert ids == [4] and dict(zip(keys, (c[0] for c in columns))) == records[4].objectives
            assert body["delta"]["history_add"] == [[4], [[[r * 5 + 1, 2.5]]]]
        else:
            assert len(body["members"]) == len(records.ids)
        assert records.snapshot(r).members == tuple(records[m].view() for m in records.ids)
    assert records[0].parent == 5 and records[0].genome["train.lr"] == 1e-3
    again = Records(records.setup, RunStore(tmp_path, "enc"), make_strategy(records.setup.strategy, records.setup.space), 1)
    assert again.open() == "resumed"
    assert [again[m].to_dict() for m in again.ids] == records.member_dicts()


def test_reported_checksums_are_committed_without_reading_them_back(tmp_path, cache_dir):
    """A checksum the member reported is what the commit names (the file beside the checkpoint
    is not read); a member that reported none gets the one written beside its checkpoint."""
    records = _records(tmp_path, cache_dir, "sha", size=3)
    store = records.store
    written = _write(store, records.set_checkpoints(records.ids, 1))
    (Path(store.uri) / (written[0][0] + ".sha256")).write_text("0" * 64 + "\n")   # not what 0 reported
    records.saved({m: written[m] for m in (0, 1)})
    records.saved({2: ("checkpoints/m2/r9.pt", "f" * 64)})   # another path than its record's: ignored
    records.commit(1, steps_done=5)
    state = store.read_state()
    assert [m["checkpoint_sha256"] for m in state["members"]] == [written[0][1], written[1][1], written[2][1]]


def _kept_intact(store: RunStore) -> set[str]:
    """The checkpoints the kept commits name, each asserted intact against its committed checksum."""
    named = set()
    for _, state in store.committed_states():
        for d in state["members"]:
            if d["checkpoint"]:
                assert store.check_checkpoint(d["checkpoint"], d["checkpoint_sha256"]) is None, d["checkpoint"]
                named.add(d["checkpoint"])
    return named


def test_checkpoints_rotate_through_slots_never_one_a_kept_commit_names(tmp_path, cache_dir):
    """Each member writes its checkpoints into CHECKPOINT_SLOTS slots in turn (round % slots),
    overwritten in place: no file is created or deleted once every slot exists, every checkpoint
    a kept commit names stays intact, and a member set back to an older round (async) or a
    resume that fell back gets a slot no kept commit names."""
    records = _records(tmp_path, cache_dir, "slots", size=3)
    store, root = records.store, Path(records.store.uri)
    for r in range(1, 9):
        paths = records.set_checkpoints(records.ids, r)
        assert {rel for rel, _ in paths.values()} == {f"checkpoints/m{m}/s{r % CHECKPOINT_SLOTS}.pt" for m in records.ids}
        records.saved(_write(store, paths))
        records.commit(r, steps_done=5 * r)
        store.wait_pruned()
        named = _kept_intact(store)
        assert len(named) == 3 * min(r, KEEP_STATES)
        on_disk = {str(p.relative_to(root)) for p in root.glob("checkpoints/*/*")}
        slots = {f"checkpoints/m{m}/s{k % CHECKPOINT_SLOTS}.pt{x}" for m in records.ids
                 for k in range(1, r + 1) for x in ("", ".sha256")}
        assert on_disk == slots and named <= on_disk
    assert store.delete_cpu_s == 0.0   # nothing was ever deleted
    # the kept commits (rounds 8, 7, 6) name slots 0, 3, 2: a member set back to round 7 takes slot 1
    (rel, _), = records.set_checkpoints([0], 7).values()
    assert rel == "checkpoints/m0/s1.pt"
    records.saved(_write(store, {0: (rel, 40)}))
    records.commit(9, steps_done=45)
    assert store.read_state()["members"][0]["checkpoint"] == rel
    _kept_intact(store)


def test_a_run_with_round_named_checkpoints_resumes_into_slots_and_prunes_the_old_files(tmp_path, cache_dir):
    """A run an older evo wrote (checkpoints/m<i>/r<round>.pt) resumes: the committed files are
    kept while a kept commit names them, the new checkpoints go into slots, and the old files are
    deleted once no kept commit names them."""
    records = _records(tmp_path, cache_dir, "old", size=2)
    store, root = records.store, Path(records.store.uri)
    for r in (1, 2):   # what the older evo wrote and committed
        for m in records.ids:
            rel = store.checkpoint_path(m, r)
            _, sha = store.write_checkpoint(rel, {"step": 5 * r, "member": m})
            records[m].checkpoint, records[m].checkpoint_sha256, records[m].step = rel, sha, 5 * r
        records.commit(r, steps_done=5 * r)
        store.wait_pruned()
    again = Records(records.setup, RunStore(tmp_path, "old"), make_strategy(records.setup.strategy, records.setup.space), 1)
    assert again.open() == "resumed" and again.notes == []
    store = again.store
    assert {again[m].checkpoint for m in again.ids} == {"checkpoints/m0/r2.pt", "checkpoints/m1/r2.pt"}
    for r in range(3, 3 + KEEP_STATES):
        again.saved(_write(store, again.set_checkpoints(again.ids, r)))
        again.commit(r, steps_done=5 * r)
        store.wait_pruned()
        named = _kept_intact(store)
        old = {str(p.relative_to(root)) for p in root.glob("checkpoints/*/r*.pt")}
        assert old == {n for n in named if "/r" in n}
    assert not list(root.glob("checkpoints/*/r*"))   # no kept commit names them any more
    assert {again[m].checkpoint for m in again.ids} == {f"checkpoints/m{m}/s{(2 + KEEP_STATES) % CHECKPOINT_SLOTS}.pt"
                                                        for m in again.ids}


def test_start_base_draws_the_first_members_at_the_base_shape_with_the_fixed_shape_search_s_other_genes(tmp_path):
    """population.start: base on experiments/arch_search.yaml: every first member has the base
    `model:` shape, and its train.lr is the one the same search without architecture genes draws
    for that member (bench/arch_search.py's base variant), so the two start alike."""
    from experiments.config import SEARCH_CONSTRAINTS, build_setup, load_config
    from tests.helpers import REPO

    path = REPO / "experiments" / "arch_search.yaml"
    common = ["population.start=base"]
    drawn = {}
    for variant, extra in (("search", []), ("fixed", None)):
        cfg = load_config(path, common + (extra if extra is not None else []), strings={"storage": str(tmp_path)})
        if extra is None:   # the architecture genes and constraints removed, as the benchmark does
            arch = [p for p in cfg.search if p.startswith("model.")]
            cfg = load_config(path, common + [f"search.{p}=null" for p in [*arch, *SEARCH_CONSTRAINTS]],
                              strings={"storage": str(tmp_path)})
        setup = build_setup(cfg)
        records = Records(setup, RunStore(tmp_path, variant), make_strategy(setup.strategy, setup.space), 1)
        assert records.open() == "new"
        drawn[variant] = [records[m].genome for m in records.ids]
    assert len(drawn["search"]) == 6
    for g, f in zip(drawn["search"], drawn["fixed"]):
        assert {p: v for p, v in g.items() if p.startswith("model.")} == {
            "model.hidden_size": 64, "model.intermediate_size": 172, "model.num_attention_heads": 4,
            "model.num_hidden_layers": 2, "model.num_key_value_heads": 2}
        assert g["train.lr"] == f["train.lr"] and set(f) == {"train.lr"}
    assert len({g["train.lr"] for g in drawn["search"]}) == 6


def _round(records: Records, r: int, rng: np.random.Generator) -> None:
    records.record_results({m: {"step": r * 5, "val_bpb": float(3 - 0.1 * r + rng.normal(0, 0.05)),
                                "params": 100 + m, "tokens_per_s": 1e3} for m in records.ids})
    records.saved(_write(records.store, records.set_checkpoints(records.ids, r)))
    records.commit(r, steps_done=r * 5)


def _reopen(records: Records) -> Records:
    again = Records(records.setup, RunStore(records.store.storage, records.store.name),
                    make_strategy(records.setup.strategy, records.setup.space), 1)
    assert again.open() == "resumed"
    return again


def test_a_run_written_whole_at_every_commit_resumes_and_goes_on_in_deltas(tmp_path, cache_dir):
    """A run directory of the format before deltas (every commit a whole body and a pointer
    without "needs": what evo wrote up to 2026-12-04, and what ``chain = 0`` writes) resumes with
    its records intact; the resumed run commits a whole body, then deltas of it, and a second
    resume reads those back equal. Nothing of the old commits is rewritten."""
    records = _records(tmp_path, cache_dir, "old")
    records.chain = 0
    rng = np.random.default_rng(1)
    for r in range(1, 4):
        _round(records, r, rng)
    store, root = records.store, Path(records.store.uri)
    pointer = _pointer(store)
    assert "needs" not in pointer and all("needs" not in p for p in pointer["previous"])
    old_bodies = {p.name: p.read_bytes() for p in (root / "states").glob("*.json")}
    assert all(b'"delta"' not in b and b'"members": [' in b for b in old_bodies.values())
    store.wait_pruned()

    again = _reopen(records)
    assert again.round == 3 and [again[m].to_dict() for m in again.ids] == records.member_dicts()
    assert {p.name: p.read_bytes() for p in (root / "states").glob("*.json")} == old_bodies   # opening writes nothing
    for r in range(4, 7):
        _round(again, r, rng)
    pointer = _pointer(again.store)
    assert pointer["round"] == 6 and len(pointer["needs"]) == 2   # the whole round-4 body, the round-5 delta
    again.store.wait_pruned()

    third = _reopen(again)
    assert third.round == 6 and [third[m].to_dict() for m in third.ids] == again.member_dicts()
    assert [len(third[m].history) for m in third.ids] == [6] * 6


def test_a_damaged_delta_falls_back_to_an_intact_commit(tmp_path, cache_dir):
    """A delta body torn (its checksum no longer matches) is reported naming it, and a resume
    uses the newest commit whose whole chain is intact; nothing is deleted."""
    records = _records(tmp_path, cache_dir, "torn")
    rng = np.random.default_rng(2)
    for r in range(1, 4):
        _round(records, r, rng)
    store, root = records.store, Path(records.store.uri)
    store.wait_pruned()
    pointer = _pointer(store)
    last = root / pointer["file"]
    last.write_bytes(last.read_bytes()[:-20])
    states = list(store.committed_states())
    assert "does not match the checksum" in str(states[0][1]) and pointer["file"] in str(states[0][1])
    files = sorted(p.name for p in root.rglob("*"))
    again = _reopen(records)
    assert again.round == 2 and len(again.notes) == 1 and pointer["file"] in again.notes[0]
    assert [len(again[m].history) for m in again.ids] == [2] * 6
    assert sorted(p.name for p in root.rglob("*")) == files


def test_start_base_and_largest_alternates_the_base_and_the_largest_shape_with_the_fixed_shape_search_s_lr(tmp_path):
    """population.start: base_and_largest on experiments/arch_search.yaml: members 0, 2, 4 at the
    base `model:` shape, members 1, 3, 5 at the largest shape under the budget (the one
    bench/arch_search.py's largest variant trains), each with the train.lr the fixed-shape search
    draws for that member."""
    from experiments.config import SEARCH_CONSTRAINTS, build_setup, load_config
    from tests.helpers import REPO

    path = REPO / "experiments" / "arch_search.yaml"
    drawn = {}
    for variant in ("search", "fixed"):
        over = ["population.start=base_and_largest"]
        if variant == "fixed":
            arch = [p for p in load_config(path).search if p.startswith("model.")]
            over += [f"search.{p}=null" for p in [*arch, *SEARCH_CONSTRAINTS]]
        setup = build_setup(load_config(path, over, strings={"storage": str(tmp_path)}))
        records = Records(setup, RunStore(tmp_path, variant), make_strategy(setup.strategy, setup.space), 1)
        assert records.open() == "new"
        drawn[variant] = [records[m].genome for m in records.ids]
        if variant == "search":
            space = setup.space
    base = {"model.hidden_size": 64, "model.intermediate_size": 172, "model.num_attention_heads": 4,
            "model.num_hidden_layers": 2, "model.num_key_value_heads": 2}
    largest = {"model.hidden_size": 128, "model.intermediate_size": 192, "model.num_attention_heads": 8,
               "model.num_hidden_layers": 3, "model.num_key_value_heads": 1}
    assert len(drawn["search"]) == 6
    for i, (g, f) in enumerate(zip(drawn["search"], drawn["fixed"])):
        assert {p: v for p, v in g.items() if p.startswith("model.")} == (base if i % 2 == 0 else largest)
        assert g["train.lr"] == f["train.lr"] and set(f) == {"train.lr"}
    assert space.count_parameters(Genome.from_dict(drawn["search"][1])) == 398_208   # at most max_params 400,000


def test_pb2_state_is_committed_as_a_delta_of_its_intervals(tmp_path, cache_dir):
    """PB2's per-member intervals go into a delta commit as the entries that changed (sync: every
    member evaluated; an async-like event: one), its observations whole; the state read back, and
    the strategy a resume loads, equal the live strategy's state_dict at every commit."""
    setup = make_setup(tmp_path, "pb2", cache_dir, size=6, interval=5, total=100, strategy="pb2")
    strategy = make_strategy(setup.strategy, setup.space)
    records = Records(setup, RunStore(tmp_path, "pb2"), strategy, 1)
    assert records.open() == "new"
    store, rng = records.store, np.random.default_rng(0)

    def body() -> dict:
        return json.loads(store.read_text(_pointer(store)["file"]))

    for r in range(1, 8):
        ready = records.ids if r < 6 else [r - 6]   # rounds 6 and 7: one member each, as in async
        records.record_results({m: {"step": records[m].step + 5, "val_bpb": float(3 - 0.1 * r + rng.normal(0, 0.05)),
                                    "params": 100 + m, "tokens_per_s": 1e3} for m in ready})
        decisions = strategy.plan(records.snapshot(r), np.random.default_rng([0, r]), ready=None if r < 6 else ready)
        for d in decisions:
            if isinstance(d, Exploit):
                before = records_before(records, [d])
                record_applied(records, d, before, d.donor, r, step=before[d.donor].step, params=100, latency=0.0,
                               received={})
        records.commit(r, steps_done=5 * r)
        expected = json.loads(json.dumps(strategy.state_dict()))
        assert store.read_state()["strategy"] == expected
        if r > 1:   # deltas from the session's second commit
            b = body()
            assert "strategy" not in b and set(b["delta"]["strategy"]["whole"]) == {"observations"}
            changed = b["delta"]["strategy"]["items"]["intervals"]["set"]
            assert set(changed) <= {str(m) for m in ready} and changed
    again = make_strategy(setup.strategy, setup.space)
    assert Records(setup, RunStore(tmp_path, "pb2"), again, 1).open() == "resumed"
    assert json.loads(json.dumps(again.state_dict())) == expected


def test_results_give_objectives_with_named_and_scored_figures_only(tmp_path, cache_dir):
    """A member's objectives are val_bpb, params and tokens_per_s, then any val_bpb.<name> and the
    fitness function's score of its result in their order; the result's other keys are not
    objectives; a result without such keys gives the three alone, and a failed one changes none."""
    records = _records(tmp_path, cache_dir, "obj", size=3)
    base = {"step": 5, "val_bpb": 2.5, "params": 100, "tokens_per_s": 1e3, "seconds": 1.0, "cpu_seconds": 0.5,
            "train_loss": 2.0, "val_loss": 1.7}
    records.record_results({0: dict(base), 1: {**base, "val_bpb.docs": 2.75, "losses": [1.0], "score": 0.5,
                                               "score_error": "x"},
                            2: {**base, "failed": True}})
    assert records[0].objectives == {"val_bpb": 2.5, "params": 100, "tokens_per_s": 1e3}
    assert list(records[1].objectives.items()) == [("val_bpb", 2.5), ("params", 100), ("tokens_per_s", 1e3),
                                                   ("val_bpb.docs", 2.75), ("score", 0.5)]
    assert records[2].objectives == {} and records[2].history == []
    assert records.eval_failures == [{"member": 1, "step": 5, "error": "x"}]


