"""The run store on real local files and on fsspec's memory:// filesystem.

Crashes and competing drivers are real processes: a subprocess that writes states or holds the
lock and is killed with SIGKILL.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from population.store import (
    CHECKPOINT_SLOTS,
    KEEP_STATES,
    CorruptRunError,
    RunLockedError,
    RunStore,
    StoreError,
    dumps,
    list_runs,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path):
    """A storage location of each kind, empty."""
    if request.param == "local":
        yield str(tmp_path / "runs")
        return
    uri = f"memory://evo-test-{uuid.uuid4().hex}"
    yield uri
    fs, root = fsspec.core.url_to_fs(uri)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def raw(store: RunStore) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path behind a store, to damage files as a crash would."""
    return fsspec.core.url_to_fs(store.uri)


def put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write raw bytes, making the parent directory where the filesystem has them."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def snapshot(store: RunStore) -> dict[str, bytes]:
    fs, root = raw(store)
    return {p: fs.cat_file(p) for p in fs.find(root)}


def spawn(code: str, *args: str) -> subprocess.Popen:
    """A Python subprocess running ``code`` with the repo importable, stdin/stdout piped."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


HOLD_LOCK = """
import sys
from population.store import RunStore
store = RunStore(sys.argv[1], sys.argv[2])
with store.lock():
    print("locked", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""

COMMIT_FOREVER = """
import sys
from population.store import RunStore
store = RunStore(sys.argv[1], sys.argv[2])
payload = "x" * 2_000_000
r = 0
while True:
    r += 1
    store.commit_state({"round": r, "check": 7 * r, "payload": payload})
    if r == 1:
        print("committed", flush=True)
"""


# ---------------------------------------------------------------------- names, create, config
@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../evil", "a b", "x\n", "ü", "a\\b"])
def test_invalid_run_names_are_rejected_and_nothing_is_created(tmp_path, name):
    with pytest.raises(StoreError, match="run name"):
        RunStore(str(tmp_path / "runs"), name)
    assert not (tmp_path / "runs").exists()


def test_constructing_a_store_creates_nothing(tmp_path):
    store = RunStore(str(tmp_path / "runs"), "r1")
    assert not (tmp_path / "runs").exists()
    assert not store.exists()
    assert store.read_state() is None
    assert store.read_lineage() == []
    assert list_runs(str(tmp_path / "runs")) == []
    assert not (tmp_path / "runs").exists()
    with pytest.raises(StoreError, match="does not exist"):
        store.read_config()


def test_create_and_read_config_keeps_key_order(storage):
    store = RunStore(storage, "run-1.a_b")
    config = {"name": "run-1.a_b", "seed": 3, "model": {"hidden_size": 64, "num_hidden_layers": 2},
              "search": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
              "objectives": ["val_bpb", "params"]}
    store.create(config)
    assert store.exists()
    assert store.read_config() == config
    assert store.read_text("config.yaml").startswith("name: run-1.a_b\nseed: 3\nmodel:")
    assert store.read_state() is None


def test_a_run_stored_with_a_retired_key_still_loads(storage):
    """population.transfer was written by evo before exploits went through the object store
    only: such a run's config reads back without it and loads with today's schema."""
    from experiments.config import config_from_dict, config_to_dict, load_config

    config = config_to_dict(load_config(REPO / "experiments" / "quickstart.yaml"))
    store = RunStore(storage, "old")
    store.create({**config, "population": {**config["population"], "transfer": "auto"}})
    assert "transfer: auto" in store.read_text("config.yaml")   # the file itself is left as it is
    assert store.read_config() == config
    assert config_to_dict(config_from_dict(store.read_config())) == config


def test_create_refuses_an_existing_run_and_leaves_its_files_unchanged(storage):
    store = RunStore(storage, "r")
    store.create({"seed": 1})
    store.commit_state({"round": 2, "members": [1, 2]})
    store.append_lineage([{"event": "born", "member": 0}])
    store.save_checkpoint(store.checkpoint_path(0, 2), {"w": torch.ones(2)})
    before = snapshot(store)

    again = RunStore(storage, "r")
    with pytest.raises(StoreError, match="already exists"):
        again.create({"seed": 2})
    with pytest.raises(StoreError, match="already exists"):
        again.create({"seed": object()})
    assert snapshot(store) == before
    assert again.read_config() == {"seed": 1}


def test_a_config_that_is_not_yaml_creates_nothing(tmp_path):
    store = RunStore(str(tmp_path / "runs"), "r")
    with pytest.raises(StoreError, match="YAML"):
        store.create({"betas": object()})
    assert not store.exists()
    assert not (tmp_path / "runs").exists()


def test_list_runs_lists_directories_with_a_config(storage):
    for name in ["beta", "alpha"]:
        RunStore(storage, name).create({"name": name})
    fs, root = fsspec.core.url_to_fs(storage)
    put(fs, f"{root}/gamma/notes.txt", b"no config here")
    put(fs, f"{root}/notes.txt", b"not a run")
    assert list_runs(storage) == ["alpha", "beta"]


def test_a_store_pickles_as_its_location(storage):
    store = RunStore(storage, "r")
    store.create({"a": 1})
    copy = pickle.loads(pickle.dumps(store))
    assert (copy.uri, copy.name, copy.storage) == (store.uri, "r", store.storage)
    assert copy.read_config() == {"a": 1}


def test_relative_paths_cannot_leave_the_run(storage):
    store = RunStore(storage, "r")
    store.create({})
    for bad in ["../other/config.yaml", "/etc/passwd", "a/../../x", "", "."]:
        with pytest.raises(StoreError, match="relative path inside the run"):
            store.write_text(bad, "x")
        with pytest.raises(StoreError, match="relative path inside the run"):
            store.load_checkpoint(bad)


def test_text_files_and_local_paths(storage):
    store = RunStore(storage, "r")
    store.create({})
    assert not store.exists_path("reports/summary.md")
    store.write_text("reports/summary.md", "# best: member 3\n")
    assert store.exists_path("reports/summary.md")
    assert store.read_text("reports/summary.md") == "# best: member 3\n"
    with pytest.raises(StoreError, match="no file"):
        store.read_text("reports/missing.md")
    local = store.local_path("reports/summary.md")
    if storage.startswith("memory://"):
        assert local is None
    else:
        assert Path(local).read_text() == "# best: member 3\n"
        assert store.local_path("optuna.db") == os.path.join(store.uri, "optuna.db")


# ---------------------------------------------------------------------- state
def test_commit_and_read_state(storage):
    store = RunStore(storage, "r")
    store.create({})
    for rnd in range(1, 7):
        store.commit_state({"round": rnd, "members": [{"id": 0, "val_bpb": 2.5 - rnd / 10}],
                            "strategy": {"seed": 0}})
        assert store.read_state()["round"] == rnd
    store.commit_state({"round": 6, "status": "finished"})   # the same round again
    assert store.read_state() == {"round": 6, "status": "finished"}
    assert RunStore(storage, "r").read_state() == {"round": 6, "status": "finished"}

    fs, root = raw(store)
    pointer = json.loads(fs.cat_file(f"{root}/state.json"))
    assert pointer["round"] == 6 and pointer["file"] == "states/000007.json"
    bodies = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/states", detail=False))
    assert bodies == [f"{seq:06d}.json" for seq in range(8 - KEEP_STATES, 8)]


def _as_json_reads(value):
    """json's text of what json.loads gives back (NaN and ±Infinity as json writes them)."""
    return json.dumps(value, sort_keys=True)


@pytest.mark.parametrize("value", [
    {"a": [None, [1, 2.5, None]], "b": None},           # a delta's "every member" marker, a column with None
    [None, [float("nan"), float("inf"), -float("inf"), 1.0]],   # non-finite floats beside a None
    {"x": {"y": [1e-05, 0.1, -0.0, 1e300, 123456789.125]}},     # floats orjson writes differently
    {"changed": "train.lr 9.42e-04→1.13e-03", "é": "ü"},   # non-ASCII: UTF-8 in place of \\u escapes
    {1: "int key", 2: 3},                                # non-str keys: json's key conversion
    {"big": 2 ** 70, "np": np.float64(2.5), "t": (1, 2)},
    [], {}, "null", None, float("nan"), True,
])
def test_dumps_reads_back_as_json_writes_it(value):
    """What the store writes (orjson where it can) reads back with json.loads as json's own
    text of the value does: a NaN stays NaN and a None stays null, side by side."""
    assert _as_json_reads(json.loads(dumps(value))) == _as_json_reads(json.loads(json.dumps(value, sort_keys=True)))


def _columns(bad):
    """A round's delta at 100 members, None among its values, ``bad`` (a float) hidden in one place."""
    schedules = [[{"step": 0, "genome": {"lr": 1e-3, "wd": 0.1}, "seed": i}] for i in range(100)]
    histories = [[[10, 2.5], [20, 2.25]] for _ in range(100)]
    mixed = [*range(60), None, "a", 1.5, [1.0, 2.0], {"x": 1.0}, *[[i] for i in range(10)]]
    where = {"schedule": lambda: schedules[57][0]["genome"].__setitem__("lr", bad),
             "history": lambda: histories[99][1].__setitem__(1, bad),
             "mixed scalar": lambda: mixed.__setitem__(62, bad),
             "mixed dict": lambda: mixed[64].__setitem__("x", bad),
             "none": lambda: None}
    return schedules, histories, mixed, where


@pytest.mark.parametrize("place", ["schedule", "history", "mixed scalar", "mixed dict", "none"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_dumps_finds_a_non_finite_float_anywhere_in_a_large_delta(place, bad):
    """orjson writes NaN and ±Infinity as null; the store's check that a text's nulls are all
    None walks columns of many values in C: a NaN or Infinity anywhere in them, in a list of
    lists, a list of dicts or a mix, is still found and written as json writes it."""
    schedules, histories, mixed, where = _columns(bad)
    where[place]()
    value = {"delta": {"members": {"schedule": [None, schedules], "parent": [None, [None] * 100]},
                       "history_add": [None, histories], "mixed": mixed}}
    text = dumps(value)
    assert _as_json_reads(json.loads(text)) == _as_json_reads(value)
    assert (b"NaN" in text or b"Infinity" in text) == (place != "none")


def test_dumps_keeps_nan_and_none_apart():
    got = json.loads(dumps({"cols": [None, [None, float("nan"), float("inf"), 2.0]]}))
    assert got["cols"][0] is None and got["cols"][1][0] is None
    assert np.isnan(got["cols"][1][1]) and got["cols"][1][2] == float("inf") and got["cols"][1][3] == 2.0


def test_a_run_written_by_json_alone_reads_and_goes_on(storage, monkeypatch):
    """Bodies and lineage lines written by json's encoder alone (an evo before orjson, or an
    install without it: spaces after separators, \\u escapes) read back as before, and the run
    goes on with orjson's texts: a delta applied on a json-written whole body, lines of both
    kinds in one lineage file."""
    import population.store as store_module

    store = RunStore(storage, "r")
    store.create({})
    first = {"round": 1, "members": [{"id": 0, "val_bpb": float("inf"), "note": "é"}, {"id": 1, "val_bpb": None}],
             "strategy": {"seed": 0}}
    with monkeypatch.context() as m:
        m.setattr(store_module, "orjson", None)
        entry = store.commit_state(first)
        store.append_lineage([{"event": "born", "member": 0, "changed": "a→b", "fitness": None}])
    fs, root = raw(store)
    assert b'"val_bpb": Infinity' in fs.cat_file(f"{root}/{entry['file']}")   # json's own text
    assert store.read_state() == first
    second = {"round": 2, "strategy": {"seed": 0}, "delta": {"members": {"val_bpb": [None, [2.5, float("nan")]]}}}
    store.commit_state(second, delta_of=entry)
    store.append_lineage([{"event": "exploit", "member": 1, "changed": "c→d", "fitness": 2.5}])
    state = RunStore(storage, "r").read_state()
    assert state["round"] == 2 and state["members"][0]["val_bpb"] == 2.5 and np.isnan(state["members"][1]["val_bpb"])
    assert [m["note"] for m in state["members"] if "note" in m] == ["é"]
    assert RunStore(storage, "r").read_lineage() == [
        {"event": "born", "member": 0, "changed": "a→b", "fitness": None},
        {"event": "exploit", "member": 1, "changed": "c→d", "fitness": 2.5}]


@pytest.mark.parametrize("bad", [{"epoch": 1}, {"round": -1}, {"round": True}, {"round": "3"}])
def test_a_state_without_a_valid_round_is_refused(storage, bad):
    store = RunStore(storage, "r")
    store.create({})
    with pytest.raises(StoreError, match="state.round"):
        store.commit_state(bad)
    with pytest.raises(StoreError, match="JSON"):
        store.commit_state({"round": 1, "genome": {1, 2}})
    assert store.read_state() is None


def test_a_commit_that_died_midway_leaves_the_previous_state(storage):
    store = RunStore(storage, "r")
    store.create({})
    store.commit_state({"round": 1, "payload": [1.5] * 100})
    fs, root = raw(store)
    # commit 2 died while writing its body (torn file) and, locally, while writing the pointer
    put(fs, f"{root}/states/000002.json", b'{"round": 2, "payload": [1.5, 1.')
    if not storage.startswith("memory://"):
        put(fs, f"{root}/states/000003.json.tmp-deadbeef", b'{"round": 2')
        put(fs, f"{root}/state.json.tmp-deadbeef", b'{"commit": 3, "ro')
    assert store.read_state() == {"round": 1, "payload": [1.5] * 100}

    store.commit_state({"round": 2, "payload": [2.5]})   # resumed run commits again
    assert store.read_state() == {"round": 2, "payload": [2.5]}
    assert not [p for p in fs.find(root) if ".tmp-" in p]


def test_sigkill_while_committing_leaves_a_committed_state_intact(tmp_path):
    store = RunStore(str(tmp_path / "runs"), "r")
    store.create({})
    writer = spawn(COMMIT_FOREVER, store.storage, store.name)
    try:
        assert writer.stdout.readline().strip() == "committed"
        time.sleep(0.5)   # let it get well into the loop, then kill it mid-whatever
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    state = RunStore(store.storage, "r").read_state()
    assert state["round"] >= 1
    assert state["check"] == 7 * state["round"]
    assert state["payload"] == "x" * 2_000_000

    store.commit_state({"round": state["round"] + 1, "check": 0})
    assert store.read_state() == {"round": state["round"] + 1, "check": 0}


def test_a_damaged_state_is_reported_naming_the_file(storage):
    store = RunStore(storage, "r")
    store.create({})
    store.commit_state({"round": 1, "x": 1})
    fs, root = raw(store)
    pointer = fs.cat_file(f"{root}/state.json")
    body = fs.cat_file(f"{root}/states/000001.json")

    put(fs, f"{root}/states/000001.json", body.replace(b'"x": 1', b'"x": 2'))
    with pytest.raises(CorruptRunError, match=r"states/000001\.json does not match the checksum"):
        store.read_state()

    fs.rm_file(f"{root}/states/000001.json")
    with pytest.raises(CorruptRunError, match=r"names states/000001\.json, which is missing"):
        store.read_state()

    put(fs, f"{root}/state.json", pointer[: len(pointer) // 2])
    with pytest.raises(CorruptRunError, match=r"state\.json is not valid JSON"):
        store.read_state()


# ---------------------------------------------------------------------- lineage
def test_lineage_append_read_truncate(storage):
    store = RunStore(storage, "r")
    store.create({})
    a, b, c, d = ({"event": e, "member": i} for i, e in enumerate("abcd"))
    assert store.append_lineage([a, b]) == 2
    assert store.append_lineage([c]) == 3
    assert store.append_lineage([]) == 3
    assert store.read_lineage() == [a, b, c]

    store.truncate_lineage(2)   # resume: the committed state had seen two records
    assert store.read_lineage() == [a, b]
    assert store.append_lineage([d]) == 3
    assert RunStore(storage, "r").read_lineage() == [a, b, d]
    with pytest.raises(CorruptRunError, match=r"lineage\.jsonl to 5 records: it has 3"):
        store.truncate_lineage(5)
    store.truncate_lineage(0)
    assert store.read_lineage() == []


def test_lineage_ignores_and_then_drops_a_line_torn_by_a_crash(storage):
    store = RunStore(storage, "r")
    store.create({})
    store.append_lineage([{"n": 1}, {"n": 2}])
    fs, root = raw(store)
    path = f"{root}/lineage.jsonl"
    put(fs, path, fs.cat_file(path) + b'{"n": 3, "ev')   # a crash mid-append
    assert store.read_lineage() == [{"n": 1}, {"n": 2}]
    assert store.append_lineage([{"n": 4}]) == 3
    assert store.read_lineage() == [{"n": 1}, {"n": 2}, {"n": 4}]
    assert fs.cat_file(path).count(b"\n") == 3


def test_bad_lineage_is_refused_or_reported(storage):
    store = RunStore(storage, "r")
    store.create({})
    store.append_lineage([{"n": 1}])
    with pytest.raises(StoreError, match="lineage record 1 is not JSON-serialisable"):
        store.append_lineage([{"n": 2}, {"genome": object()}])
    with pytest.raises(StoreError, match="lineage record 0 must be a dict"):
        store.append_lineage(["born"])
    assert store.read_lineage() == [{"n": 1}]

    fs, root = raw(store)
    put(fs, f"{root}/lineage.jsonl", b'{"n": 1}\nnot json\n')
    with pytest.raises(CorruptRunError, match=r"lineage\.jsonl: line 2 is not valid JSON"):
        store.read_lineage()


# ---------------------------------------------------------------------- checkpoints
def trainer_like_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"model.tok_embeddings.weight": torch.randn(16, 8, generator=g),
                  "output.weight": torch.randn(16, 8, generator=g)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(16, 8, generator=g)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]},
        "step": 3 + seed,
        "rng": g.get_state(),
        "np_rng": np.random.default_rng(seed).bit_generator.state,   # plain dicts of ints
        "model_config": {"hidden_size": 8, "rope_scaling": None},
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_checkpoint_round_trip(storage):
    store = RunStore(storage, "r")
    store.create({})
    rel = store.checkpoint_path(3, 12)
    assert rel == "checkpoints/m3/r12.pt"
    state = trainer_like_state(0)
    written = store.save_checkpoint(rel, state)
    fs, root = raw(store)
    assert written == fs.size(f"{root}/{rel}") > 0
    assert_same(state, store.load_checkpoint(rel))
    assert_same(state, RunStore(storage, "r").load_checkpoint(rel))
    with pytest.raises(StoreError, match="checkpoint member"):
        store.checkpoint_path(-1, 0)


def test_checkpoints_saved_from_background_threads(storage):
    store = RunStore(storage, "r")
    store.create({})
    paths = [store.checkpoint_path(m, 1) for m in range(4)] + [store.checkpoint_path(0, 1)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        sizes = list(pool.map(lambda i: store.save_checkpoint(paths[i], trainer_like_state(i % 4)),
                              range(len(paths))))
    assert all(size > 0 for size in sizes)
    for m in range(4):
        assert_same(trainer_like_state(m), store.load_checkpoint(store.checkpoint_path(m, 1)))
    fs, root = raw(store)
    assert not [p for p in fs.find(root) if ".tmp-" in p]


def test_a_damaged_checkpoint_is_reported_naming_the_file(storage):
    store = RunStore(storage, "r")
    store.create({})
    rel = store.checkpoint_path(1, 4)
    store.save_checkpoint(rel, trainer_like_state(1))
    fs, root = raw(store)
    path = f"{root}/{rel}"
    data = fs.cat_file(path)
    where = f"{store.uri}/{rel}"

    put(fs, path, data[: len(data) // 2])   # truncated
    with pytest.raises(CorruptRunError, match="truncated or corrupt") as info:
        store.load_checkpoint(rel)
    assert where in str(info.value) and "\n" not in str(info.value)

    garbled = bytearray(data)
    garbled[100:400] = os.urandom(300)
    put(fs, path, bytes(garbled))
    with pytest.raises(CorruptRunError, match="truncated or corrupt") as info:
        store.load_checkpoint(rel)
    assert where in str(info.value)

    fs.rm_file(path)
    with pytest.raises(CorruptRunError, match="is missing"):
        store.load_checkpoint(rel)


def test_a_checkpoint_holding_arbitrary_objects_is_refused_on_load(storage):
    store = RunStore(storage, "r")
    store.create({})
    rel = store.checkpoint_path(0, 0)
    store.save_checkpoint(rel, {"x": np.zeros(3)})
    with pytest.raises(StoreError, match="weights_only") as info:
        store.load_checkpoint(rel)
    assert not isinstance(info.value, CorruptRunError)


def test_prune_keeps_what_is_kept_or_committed(storage):
    store = RunStore(storage, "r")
    store.create({})
    for m in range(2):
        for r in range(1, 3):
            store.save_checkpoint(store.checkpoint_path(m, r), {"w": torch.full((2,), float(r))})
    store.commit_state({"round": 2, "members": [{"id": 1, "checkpoint": "checkpoints/m1/r1.pt"}]})
    fs, root = raw(store)
    put(fs, f"{root}/checkpoints/m0/r3.pt.tmp-inflight", b"a save in progress")
    put(fs, f"{root}/checkpoints/notes.txt", b"not a checkpoint")

    keep = {"checkpoints/m0/r2.pt", "./checkpoints/m1/r2.pt"}
    assert store.prune_checkpoints(keep) == ["checkpoints/m0/r1.pt", "checkpoints/m0/r1.pt.sha256"]
    left = sorted(p[len(root) + 1:] for p in fs.find(f"{root}/checkpoints"))
    assert left == ["checkpoints/m0/r2.pt", "checkpoints/m0/r2.pt.sha256", "checkpoints/m0/r3.pt.tmp-inflight",
                    "checkpoints/m1/r1.pt", "checkpoints/m1/r1.pt.sha256", "checkpoints/m1/r2.pt",
                    "checkpoints/m1/r2.pt.sha256", "checkpoints/notes.txt"]
    assert torch.equal(store.load_checkpoint("checkpoints/m1/r1.pt")["w"], torch.ones(2))
    assert store.prune_checkpoints(keep) == []


def test_prune_leaves_checkpoint_slots_and_slots_avoid_what_a_kept_commit_names(storage):
    """Slot files (s0.pt .. s{CHECKPOINT_SLOTS - 1}.pt and their checksums) are overwritten in
    turn, never pruned, named or not; other files no kept commit names are; checkpoint_slots
    hands out round % slots unless a kept commit names it."""
    store = RunStore(storage, "r")
    store.create({})
    assert store.checkpoint_slots({0: 5, 1: 0}) == {0: f"checkpoints/m0/s{5 % CHECKPOINT_SLOTS}.pt", 1: "checkpoints/m1/s0.pt"}
    for k in range(CHECKPOINT_SLOTS + 1):   # the last one is no slot (its index is past them)
        store.save_checkpoint(f"checkpoints/m0/s{k}.pt", {"w": torch.full((2,), float(k))})
    store.commit_state({"round": 1, "members": [{"id": 0, "checkpoint": "checkpoints/m0/s1.pt"}]})
    store.commit_state({"round": 2, "members": [{"id": 0, "checkpoint": "checkpoints/m0/s2.pt"}]})
    assert store.prune_checkpoints(set()) == [f"checkpoints/m0/s{CHECKPOINT_SLOTS}.pt",
                                              f"checkpoints/m0/s{CHECKPOINT_SLOTS}.pt.sha256"]
    fs, root = raw(store)
    assert len([p for p in fs.find(f"{root}/checkpoints") if p.endswith(".pt")]) == CHECKPOINT_SLOTS
    assert store.checkpoint_slots({0: 1, 1: 1}) == {0: "checkpoints/m0/s3.pt", 1: "checkpoints/m1/s1.pt"}
    with pytest.raises(StoreError, match="non-negative"):
        store.checkpoint_slots({0: -1})


def test_prune_keeps_the_checkpoints_of_the_older_commits_kept(storage):
    """A resume may fall back to an older commit: its checkpoints stay until its body goes."""
    store = RunStore(storage, "r")
    store.create({})
    for r in range(1, KEEP_STATES + 2):
        rel = store.checkpoint_path(0, r)
        store.save_checkpoint(rel, {"w": torch.full((2,), float(r))})
        store.commit_state({"round": r, "members": [{"id": 0, "checkpoint": rel}]})
        store.prune_checkpoints({rel})
    fs, root = raw(store)
    left = sorted(p[len(root) + 1:] for p in fs.find(f"{root}/checkpoints") if p.endswith(".pt"))
    assert left == [store.checkpoint_path(0, r) for r in range(2, KEEP_STATES + 2)]


def test_a_checkpoint_is_checked_against_the_checksum_written_with_it(storage):
    """Truncated, garbled, another member's checkpoint copied over it, missing: each is named."""
    store = RunStore(storage, "r")
    store.create({})
    mine, other = store.checkpoint_path(1, 4), store.checkpoint_path(0, 4)
    store.save_checkpoint(mine, trainer_like_state(1))
    store.save_checkpoint(other, trainer_like_state(0))
    sha = store.checkpoint_sha256(mine)
    fs, root = raw(store)
    data = fs.cat_file(f"{root}/{mine}")
    assert sha == hashlib.sha256(data).hexdigest() != store.checkpoint_sha256(other)
    assert store.check_checkpoint(mine, sha) is None
    assert store.check_checkpoint(mine, None) is None            # a run of an older evo: no checksum

    garbled = bytearray(data)
    garbled[100:140] = os.urandom(40)
    for damaged in (data[: len(data) // 2], bytes(garbled), fs.cat_file(f"{root}/{other}")):
        put(fs, f"{root}/{mine}", damaged)
        why = store.check_checkpoint(mine, sha)
        assert why == (f"checkpoint {store.uri}/{mine} does not match its checksum in the committed state "
                       "(truncated, corrupt, or another checkpoint copied over it)")
    fs.rm_file(f"{root}/{mine}")
    assert store.check_checkpoint(mine, sha) == f"checkpoint {store.uri}/{mine} is missing"
    assert store.check_checkpoint(mine, None) == f"checkpoint {store.uri}/{mine} is missing"


def test_a_failing_checkpoint_write_is_one_line_and_leaves_nothing(tmp_path):
    store = RunStore(str(tmp_path / "runs"), "r")
    store.create({})
    rel = store.checkpoint_path(0, 1)
    (Path(store.uri) / rel).mkdir(parents=True)   # something in the way of the file
    with pytest.raises(StoreError) as info:
        store.save_checkpoint(rel, {"w": torch.ones(2)})
    assert str(info.value) == f"cannot write checkpoint {store.uri}/{rel}: Is a directory"
    assert sorted(p.name for p in (Path(store.uri) / "checkpoints/m0").iterdir()) == ["r1.pt"]


def test_committed_states_fall_back_past_a_damaged_body(storage):
    store = RunStore(storage, "r")
    store.create({})
    assert list(store.committed_states()) == []
    for r in range(1, KEEP_STATES + 3):
        store.commit_state({"round": r})
    newest = KEEP_STATES + 2
    files = [f"states/{c:06d}.json" for c in range(newest, newest - KEEP_STATES, -1)]
    assert list(store.committed_states()) == [(f, {"round": newest - i}) for i, f in enumerate(files)]

    fs, root = raw(store)
    body = fs.cat_file(f"{root}/{files[0]}")
    put(fs, f"{root}/{files[0]}", body[:-3])
    found = list(store.committed_states())
    assert isinstance(found[0][1], CorruptRunError) and files[0] in str(found[0][1])
    assert found[1:] == [(f, {"round": newest - i}) for i, f in enumerate(files) if i]
    fs.rm_file(f"{root}/{files[1]}")
    assert "which is missing" in str(list(store.committed_states())[1][1])


def test_prune_deletes_temporaries_of_long_dead_saves(tmp_path):
    store = RunStore(str(tmp_path / "runs"), "r")
    store.create({})
    store.save_checkpoint("checkpoints/m0/r1.pt", {"w": torch.ones(1)})
    dead = Path(store.uri) / "checkpoints/m0/r2.pt.tmp-0123456789ab"
    dead.write_bytes(b"half a checkpoint")
    two_hours_ago = time.time() - 7200
    os.utime(dead, (two_hours_ago, two_hours_ago))
    assert store.prune_checkpoints({"checkpoints/m0/r1.pt"}) == ["checkpoints/m0/r2.pt.tmp-0123456789ab"]
    assert not dead.exists()


# ---------------------------------------------------------------------- lock
def test_a_second_driver_process_is_locked_out_until_release(tmp_path):
    store = RunStore(str(tmp_path / "runs"), "r")
    holder = spawn(HOLD_LOCK, store.storage, store.name)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"run 'r' is locked by pid {holder.pid} on host \S+ since"):
            with store.lock():
                pytest.fail("took a lock another process holds")
        lock = json.loads((Path(store.uri) / "lock.json").read_text())
        assert lock["pid"] == holder.pid   # the failed attempt left the holder's lock alone

        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
    finally:
        holder.kill()
        holder.wait()
    with store.lock():
        assert json.loads((Path(store.uri) / "lock.json").read_text())["pid"] == os.getpid()
    assert not (Path(store.uri) / "lock.json").exists()


def test_the_lock_of_a_killed_driver_is_taken_over(tmp_path):
    store = RunStore(str(tmp_path / "runs"), "r")
    holder = spawn(HOLD_LOCK, store.storage, store.name)
    try:
        assert holder.stdout.readline().strip() == "locked"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((Path(store.uri) / "lock.json").read_text())["pid"] == holder.pid
    with pytest.warns(RuntimeWarning, match=rf"stale lock of pid {holder.pid} .*is not running"):
        with store.lock():
            assert json.loads((Path(store.uri) / "lock.json").read_text())["pid"] == os.getpid()
    assert not (Path(store.uri) / "lock.json").exists()


def write_foreign_lock(store: RunStore, heartbeat: float) -> None:
    fs, root = raw(store)
    put(fs, f"{root}/lock.json", json.dumps({
        "pid": 4242, "host": "node-7.elsewhere", "pid_start": 1, "started": "2026-01-01T00:00:00Z",
        "heartbeat": heartbeat, "token": "f" * 32}).encode())


def test_a_lock_from_another_host_is_stale_only_after_its_heartbeat_ages(storage):
    store = RunStore(storage, "r")
    write_foreign_lock(store, heartbeat=time.time())
    with pytest.raises(RunLockedError, match="locked by pid 4242 on host node-7.elsewhere since 2026-01-01"):
        with store.lock(stale_after=300):
            pass
    write_foreign_lock(store, heartbeat=time.time() - 1000)
    stale = r"pid 4242 on host node-7.elsewhere \(last heartbeat 1000 s ago\)"
    with pytest.warns(RuntimeWarning, match=stale):
        with store.lock(stale_after=300):
            assert store.exists_path("lock.json")
    assert not store.exists_path("lock.json")


def test_two_stores_in_one_process_exclude_each_other(storage):
    first, second = RunStore(storage, "r"), RunStore(storage, "r")
    with first.lock():
        with pytest.raises(RunLockedError, match=f"locked by pid {os.getpid()}"):
            with second.lock():
                pass
        with pytest.raises(StoreError, match="already holds the lock"):
            with first.lock():
                pass
    with second.lock():
        pass


def test_heartbeat_refreshes_the_lock_and_detects_a_takeover(storage):
    store = RunStore(storage, "r")
    with pytest.raises(StoreError, match="needs lock"):
        store.heartbeat()
    fs, root = raw(store)
    with store.lock(stale_after=1.0):   # the background thread beats every 0.2 s
        first = json.loads(fs.cat_file(f"{root}/lock.json"))["heartbeat"]
        time.sleep(1.0)
        assert json.loads(fs.cat_file(f"{root}/lock.json"))["heartbeat"] > first
        store.heartbeat()

    with pytest.warns(RuntimeWarning, match="taken over by another driver; leaving it"):
        with store.lock():
            store.create({})
            store.commit_state({"round": 1})
            write_foreign_lock(store, heartbeat=time.time())   # another driver took over
            with pytest.raises(RunLockedError, match="taken over by pid 4242 on host node-7.elsewhere"):
                store.heartbeat()
            with pytest.raises(RunLockedError, match="taken over"):
                store.commit_state({"round": 2})
            with pytest.raises(RunLockedError, match="taken over"):
                store.append_lineage([{"n": 1}])
    assert json.loads(fs.cat_file(f"{root}/lock.json"))["pid"] == 4242   # theirs stays
    assert store.read_state() == {"round": 1}


def test_driver_alive_follows_the_lock(tmp_path):
    store = RunStore(str(tmp_path), "alive")
    assert not store.driver_alive()              # no lock at all
    with store.lock():
        assert store.driver_alive()              # held by this (live) process
        assert RunStore(str(tmp_path), "alive").driver_alive()
    assert not store.driver_alive()              # released
