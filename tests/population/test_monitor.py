"""The monitoring sinks, driven with a realistic committed sequence and read back from what they
wrote: W&B's offline ``.wandb`` files, the Optuna study (directly and through optuna-dashboard's
HTTP API), and Ray's Prometheus endpoint (in a subprocess with its own Ray).

The sequence (3 members, interval 10 steps): start → round 1 → round 2 (member 2 exploits
member 1 with a perturbed learning rate) → round 3 (member 0 diverges: "died", then a restart
from member 1; member 2's process dies and it is "restored" from its own state) → close("stopped"); a second Monitor(resumed=True) on the same store → rounds 4
and 5 → close("finished").
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from evo.genome import Genome
from evo.space import SearchSpace
from evo.strategies import StrategyConfig
from population.config import LoggingConfig, PopulationConfig, WandbConfig
from population.config import SearchSetup
from population.monitor import Monitor
from population.optuna_sink import DB_FILE, JOURNAL_FILE, SEGMENTS_FILE
from population.store import RunStore
from population.wandb_sink import STATE_FILE, run_key
from tests.helpers import REPO, free_port
from trainers.data import DataConfig
from trainers.model import InternLM2Config
from trainers.trainer import TrainConfig

SPEC = {
    "train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
    "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.2},
    "model.num_hidden_layers": {"type": "int", "low": 1, "high": 2},
}
GENOMES = [
    {"model.num_hidden_layers": 1, "train.lr": 1.0e-3, "train.weight_decay": 0.1},
    {"model.num_hidden_layers": 2, "train.lr": 3.0e-3, "train.weight_decay": 0.05},
    {"model.num_hidden_layers": 1, "train.lr": 5.0e-4, "train.weight_decay": 0.15},
]
EXPLOITED = dict(GENOMES[1], **{"train.lr": 3.6e-3})     # member 2's genome after round 2
RESTARTED = {"model.num_hidden_layers": 1, "train.lr": 2.0e-3, "train.weight_decay": 0.08}
VAL_BPB = {1: {0: 3.0, 1: 2.8, 2: 3.2}, 2: {0: 2.6, 1: 2.4, 2: 2.9}, 3: {1: 2.2, 2: 2.5},
           4: {0: 2.1, 1: 2.0, 2: 2.3}, 5: {0: 1.9, 1: 1.8, 2: 2.0}}
INTERVAL = 10
RESTORED_WHY = "node lost: node 8aab1ed97771 at 127.0.0.3 (health check failed)"


def make_setup(storage: str, name: str, wandb: str = "offline", optuna_on: bool = True) -> SearchSetup:
    """A real SearchSetup (real SearchSpace); nothing is trained."""
    model, train = InternLM2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1), TrainConfig()
    base = {f"train.{k}": v for k, v in dataclasses.asdict(train).items()}
    base.update({f"model.{k}": v for k, v in dataclasses.asdict(model).items()})
    space = SearchSpace.from_dict(SPEC, base=base)
    population = PopulationConfig(size=3, interval_steps=INTERVAL, total_steps=50)
    logging = LoggingConfig(wandb=WandbConfig(mode=wandb, project="evo-test"), optuna=optuna_on)
    config = {"name": name, "seed": 7, "storage": storage, "search": SPEC,
              "model": dataclasses.asdict(model), "train": dataclasses.asdict(train),
              "population": dataclasses.asdict(population), "logging": dataclasses.asdict(logging)}
    return SearchSetup(name=name, seed=7, storage=storage, data=DataConfig(), model=model, train=train,
                       space=space, strategy=StrategyConfig(), population=population, logging=logging,
                       config=config)


class Population:
    """Committed member records as the driver writes them, advanced by hand."""

    def __init__(self, space: SearchSpace) -> None:
        for g in (*GENOMES, EXPLOITED, RESTARTED):
            assert space.contains(Genome.from_dict(g))
        self.members = [{"id": m, "genome": dict(g), "seed": 100 + m, "step": 0, "history": [],
                         "objectives": {}, "checkpoint": None, "parent": None,
                         "schedule": [{"step": 0, "genome": dict(g), "seed": 100 + m}],
                         "alive": True, "age": 0, "intervals": 0} for m, g in enumerate(GENOMES)]

    def snapshot(self) -> list[dict]:
        return copy.deepcopy(self.members)

    def train(self, round: int) -> dict[int, object]:
        """Every member trains an interval; those without a VAL_BPB entry diverge."""
        results: dict[int, object] = {}
        for rec in self.members:
            rec["intervals"] += 1
            rec["age"] += 1
            if rec["id"] not in VAL_BPB[round]:
                results[rec["id"]] = {"failed": True, "error": "NonFiniteLossError: loss nan at step 25",
                                      "seconds": 0.4}
                continue
            step, val = rec["step"] + INTERVAL, VAL_BPB[round][rec["id"]]
            results[rec["id"]] = {"step": step, "train_loss": val * 0.7, "val_bpb": val,
                                  "val_loss": val * 0.69, "tokens_per_s": 1000.0 + 10 * rec["id"],
                                  "seconds": 1.5, "params": 50_000 + rec["id"]}
            rec["step"] = step
            rec["history"].append([step, val])
            rec["objectives"] = {"val_bpb": val, "params": 50_000, "tokens_per_s": 1000.0}
        return results

    def event(self, event: str, round: int, member: int, genome: dict, parents: list[int], **extra) -> dict:
        """Apply an event to a member's record the way the driver does; returns the lineage record."""
        rec = self.members[member]
        before = dict(rec["genome"])
        step = rec["step"]
        if parents and event != "died":
            donor = self.members[parents[0]]
            step = donor["step"]
            rec["parent"] = parents[0]
        if event == "restart":
            rec["history"].append([step, self.members[parents[0]]["history"][-1][1]])
        rec["genome"], rec["step"] = dict(genome), step
        return {"event": event, "round": round, "member": member, "parents": parents,
                "genome": dict(genome), "step": step, "fitness": (rec["history"] or [[0, None]])[-1][1],
                "changed": ", ".join(f"{p} {before[p]}→{genome[p]}" for p in genome if genome[p] != before[p]),
                "time": time.time(), **extra}


def play(monitor: Monitor, pop: Population, store: RunStore, rounds: range) -> None:
    """Commit each round's lineage to the store, then tell the monitor (as the driver does)."""
    for r in rounds:
        results = pop.train(r)
        lineage = []
        if r == 2:
            lineage.append(pop.event("exploit", r, 2, EXPLOITED, [1], how="perturb"))
        if r == 3:
            lineage.append(pop.event("died", r, 0, pop.members[0]["genome"], [], error=results[0]["error"]))
            lineage.append(pop.event("restart", r, 0, RESTARTED, [1]))
            lineage.append(pop.event("restored", r, 2, EXPLOITED, [], error=RESTORED_WHY, source="checkpoint"))
        if lineage:
            store.append_lineage(lineage)
        monitor.on_round(r, pop.snapshot(), lineage, results)


# ----------------------------------------------------------------------------------------------
# W&B's offline transaction log: the ":W&B" header, then LevelDB-log records of 32 KiB blocks,
# each a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last) + a protobuf


def read_wandb(path: str) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    pos, parts, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:      # block trailer: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            parts = chunk
        elif kind in (3, 4):
            parts += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def wandb_sessions(run_dir: Path, run_id: str) -> list[dict]:
    """Each offline session of a W&B run, in start order: its id, config, and history rows."""
    sessions = []
    # offline-run-<time>-<id>, or -<id>-1 when a session of the same run started the same second
    dirs = [d for d in glob.glob(str(run_dir / "wandb" / "offline-run-*"))
            if re.fullmatch(rf"offline-run-\d+_\d+-{re.escape(run_id)}(-\d+)?", os.path.basename(d))]
    for d in sorted(dirs):
        files = glob.glob(os.path.join(d, "*.wandb"))
        assert len(files) == 1, d
        ids, config, rows = set(), {}, []
        for rec in read_wandb(files[0]):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.add(rec.run.run_id)
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":   # a Table's fields come as nested keys: ("lineage", "path")
                row: dict = {}
                for i in rec.history.item:
                    *outer, last = list(i.nested_key) or [i.key]
                    into = row
                    for k in outer:
                        into = into.setdefault(k, {})
                    into[last] = json.loads(i.value_json)
                rows.append(row)
        sessions.append({"dir": d, "ids": ids, "config": config, "rows": rows})
    return sessions


# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    """The whole sequence once, with W&B offline and Optuna on, in a local run store."""
    storage = str(tmp_path_factory.mktemp("monitor-store"))
    name = "mon-run"
    setup = make_setup(storage, name)
    store = RunStore(storage, name)
    store.create(setup.config)
    pop = Population(setup.space)
    t0 = time.perf_counter()
    first = Monitor(setup, store, resumed=False)
    # (a "ray-metrics" sink joins them when another test of this process has started Ray)
    assert [s.name for s in first.sinks][:2] == ["wandb", "optuna"] and first.disabled == {}
    first.start(pop.snapshot(), 0)
    play(first, pop, store, range(1, 4))
    first.close("stopped")
    stopped = optuna.load_study(study_name=name, storage=f"sqlite:///{store.local_path(DB_FILE)}").get_trials()
    second = Monitor(setup, store, resumed=True)
    second.start(pop.snapshot(), 3)
    play(second, pop, store, range(4, 6))
    second.close("finished")
    assert second.disabled == {}
    return {"setup": setup, "store": store, "run_dir": Path(store.uri), "stopped": stopped,
            "seconds": time.perf_counter() - t0}


def test_wandb_offline_runs_per_member_and_driver(played):
    run_dir, store = played["run_dir"], played["store"]
    key = run_key(store.uri)
    ids = [f"mon-run-m{m}-{key}" for m in range(3)] + [f"mon-run-driver-{key}"]
    for run_id in ids:
        sessions = wandb_sessions(run_dir, run_id)
        assert len(sessions) == 2, run_id                       # the resume continued the same run
        assert all(s["ids"] == {run_id} for s in sessions)
        steps = [row["_step"] for s in sessions for row in s["rows"]]
        assert steps == list(range(len(steps)))                 # continuous across the resume
        for s in sessions:                                      # static config only
            assert s["config"]["population"]["size"] == 3
            assert not any(k.startswith("hp/") or k in SPEC for k in s["config"])
    assert json.loads(store.read_text(STATE_FILE))["steps"]["driver"] == sum(
        len(s["rows"]) for s in wandb_sessions(run_dir, ids[3]))


def test_wandb_member_rows_hold_metrics_and_the_schedule(played):
    key = run_key(played["store"].uri)
    sessions = wandb_sessions(played["run_dir"], f"mon-run-m2-{key}")
    assert sessions[0]["config"]["member"] == 2
    rows = [row for s in sessions for row in s["rows"]]
    evals = [r for r in rows if "val_bpb" in r]
    assert [(r["member/step"], r["val_bpb"]) for r in evals] == [
        (10, 3.2), (20, 2.9), (30, 2.5), (40, 2.3), (50, 2.0)]
    assert [r["tokens_per_s"] for r in evals] == [1020.0] * 5
    # hp/train.lr over every row: the genome that trained each interval, the exploit's new one
    assert [(r["member/step"], r["hp/train.lr"]) for r in rows] == [
        (0, 5.0e-4), (10, 5.0e-4), (20, 5.0e-4), (20, 3.6e-3), (30, 3.6e-3),
        (30, 3.6e-3), (30, 3.6e-3), (40, 3.6e-3), (50, 3.6e-3)]
    assert [(r["round"], r["member/step"]) for r in rows if r.get("event/restored")] == [(3, 30)]
    exploit = [r for r in rows if r.get("event/exploit") == 1]
    assert len(exploit) == 1 and exploit[0]["parent"] == 1 and exploit[0]["hp/model.num_hidden_layers"] == 2
    assert [r.get("event/resume") for r in sessions[1]["rows"][:1]] == [1]
    m0 = [row for s in wandb_sessions(played["run_dir"], f"mon-run-m0-{key}") for row in s["rows"]]
    assert [r["round"] for r in m0 if r.get("event/died")] == [3]
    assert [(r["round"], r["hp/train.lr"]) for r in m0 if r.get("event/restart")] == [(3, 2.0e-3)]


def test_wandb_logs_each_members_data_mix_as_shares(tmp_path):
    """With several data sources every member row carries mix/<source>: the source's share of the
    batches under the genome of that row (data.mix.<source> genes over data.mix, normalised)."""
    from population.wandb_sink import WandbSink

    setup = make_setup(str(tmp_path), "mix-run", optuna_on=False)
    data = {"sources": {"code": "stdlib", "docs": "stdlib-docs"}, "mix": {"code": 0.5}}
    setup = dataclasses.replace(setup, config={**setup.config, "data": data})
    store = RunStore(str(tmp_path), "mix-run")
    store.create(setup.config)
    genomes = [{"train.lr": 1e-3, "data.mix.docs": 1.5}, {"train.lr": 2e-3, "data.mix.docs": 0.5}]
    members = [{"id": m, "genome": dict(g), "seed": m, "step": 0, "history": [], "alive": True}
               for m, g in enumerate(genomes)]
    sink = WandbSink(setup, store, resumed=False)
    sink.start(copy.deepcopy(members), 0)
    for m, val in ((0, 2.0), (1, 3.0)):
        members[m].update(step=10, history=[[10, val]])
    members[1]["genome"] = {"train.lr": 1e-3, "data.mix.docs": 1.8}          # exploit of member 0
    exploit = {"event": "exploit", "round": 1, "member": 1, "parents": [0], "step": 10,
               "genome": dict(members[1]["genome"])}
    results = {m: {"step": 10, "val_bpb": val} for m, val in ((0, 2.0), (1, 3.0))}
    sink.on_round(1, copy.deepcopy(members), [exploit], results)
    sink.close("finished")
    key = run_key(store.uri)
    rows = {m: [r for s in wandb_sessions(Path(store.uri), f"mix-run-m{m}-{key}") for r in s["rows"]]
            for m in (0, 1)}
    # member 0: born and evaluated with docs 1.5 beside code's fixed 0.5
    assert [(r["mix/code"], r["mix/docs"]) for r in rows[0]] == [(0.25, 0.75)] * 2
    # member 1: born with docs 0.5 (half), evaluated on it, then the exploit's docs 1.8
    assert [(r["member/step"], r["mix/docs"]) for r in rows[1]] == [
        (0, 0.5), (10, 0.5), (10, pytest.approx(1.8 / 2.3))]
    assert all(r["mix/code"] + r["mix/docs"] == pytest.approx(1.0) for r in rows[1])


def test_wandb_driver_rows_and_lineage_table(played):
    key = run_key(played["store"].uri)
    sessions = wandb_sessions(played["run_dir"], f"mon-run-driver-{key}")
    rows = [row for s in sessions for row in s["rows"]]
    per_round = {r["round"]: r for r in rows if "exploits" in r}
    assert sorted(per_round) == [1, 2, 3, 4, 5]
    assert [per_round[r]["best_val_bpb"] for r in range(1, 6)] == [2.8, 2.4, 2.2, 2.0, 1.8]
    assert per_round[2]["median_val_bpb"] == 2.6 and per_round[5]["best_member"] == 1
    assert [per_round[r]["exploits"] for r in range(1, 6)] == [0, 1, 0, 0, 0]
    assert (per_round[3]["failures"], per_round[3]["restarts"], per_round[3]["restores"]) == (1, 1, 1)
    assert per_round[5]["total/exploits"] == 1 and per_round[5]["total/failures"] == 1   # kept over the resume
    assert [per_round[r]["total/restores"] for r in range(1, 6)] == [0, 0, 1, 1, 1]
    assert per_round[1]["tokens_per_s"] == 3030.0
    tables = [r["lineage"] for r in rows if "lineage" in r]
    assert len(tables) == 2 and all(t["_type"] == "table-file" for t in tables)   # at each close
    last = sessions[-1]["dir"]
    table = json.loads(Path(last, "files", tables[-1]["path"]).read_text())
    events = [(row[table["columns"].index("event")], row[table["columns"].index("member")])
              for row in table["data"]]
    assert events == [("exploit", 2), ("died", 0), ("restart", 0), ("restored", 2)]


def test_wandb_sync_finds_the_offline_runs(played):
    """`wandb sync --dry-run` (no server needed) lists every run's files, resumed ones included."""
    wandb_dir = played["run_dir"] / "wandb"
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", str(wandb_dir)],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, WANDB_MODE="offline"))
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"offline-run-\d+_\d+-(\S+?)/run-", out.stdout + out.stderr))
    key = run_key(played["store"].uri)
    assert {f"mon-run-m{m}-{key}" for m in range(3)} | {f"mon-run-driver-{key}"} <= listed


def test_optuna_trial_per_segment(played):
    store = played["store"]
    study = optuna.load_study(study_name="mon-run", storage=f"sqlite:///{store.local_path(DB_FILE)}")
    trials = study.get_trials()
    got = [(t.user_attrs["member"], t.user_attrs["event"], t.user_attrs["round"], t.state) for t in trials]
    assert got == [
        (0, "born", 0, TrialState.FAIL),           # died at round 3
        (1, "born", 0, TrialState.COMPLETE),       # lived through the stop and the resume
        (2, "born", 0, TrialState.COMPLETE),       # ended by the exploit at round 2
        (2, "exploit", 2, TrialState.COMPLETE),
        (0, "restart", 3, TrialState.COMPLETE),
    ]
    by = {(t.user_attrs["member"], t.user_attrs["event"]): t for t in trials}
    assert by[0, "born"].intermediate_values == {10: 3.0, 20: 2.6}
    assert by[0, "born"].user_attrs["end_event"] == "died" and "NonFinite" in by[0, "born"].user_attrs["error"]
    assert by[1, "born"].intermediate_values == {10: 2.8, 20: 2.4, 30: 2.2, 40: 2.0, 50: 1.8}
    assert by[1, "born"].value == 1.8 and by[1, "born"].user_attrs["end_event"] == "finished"
    assert by[2, "born"].intermediate_values == {10: 3.2, 20: 2.9} and by[2, "born"].value == 2.9
    assert by[2, "born"].user_attrs["end_event"] == "exploit"
    exploit = by[2, "exploit"]
    assert exploit.params == {"train.lr": 3.6e-3, "train.weight_decay": 0.05}   # hyperparameter genes only
    assert exploit.user_attrs["architecture"] == {"model.num_hidden_layers": 2}
    assert (exploit.user_attrs["parent"], exploit.user_attrs["start_step"], exploit.user_attrs["how"]) == (1, 20, "perturb")
    assert exploit.intermediate_values == {30: 2.5, 40: 2.3, 50: 2.0} and exploit.value == 2.0
    assert by[0, "restart"].intermediate_values == {40: 2.1, 50: 1.9}
    # member 2's restore (same hyperparameters) goes on in its segment, counted there only
    assert exploit.user_attrs["restores"] == 1
    assert exploit.user_attrs["last_restore"] == {"round": 3, "step": 30, "why": RESTORED_WHY, "source": "checkpoint"}
    assert [t.user_attrs.get("restores") for t in trials] == [None, None, None, 1, None]
    assert set(exploit.distributions) == {"train.lr", "train.weight_decay"}
    assert exploit.distributions["train.lr"].log
    # at the stop: the live segments were RUNNING, the ended ones finished
    assert [t.state for t in played["stopped"]] == [
        TrialState.FAIL, TrialState.RUNNING, TrialState.COMPLETE, TrialState.RUNNING, TrialState.RUNNING]
    assert json.loads(store.read_text(SEGMENTS_FILE))["segments"] == {}


def test_optuna_dashboard_serves_the_study(played, tmp_path):
    db = played["store"].local_path(DB_FILE)
    port = free_port()
    log = open(tmp_path / "dashboard.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        base, studies, deadline = f"http://127.0.0.1:{port}", None, time.monotonic() + 60
        while studies is None:
            assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=5) as r:
                    studies = json.load(r)["study_summaries"]
            except OSError:
                assert time.monotonic() < deadline, "optuna-dashboard did not answer within 60 s"
                time.sleep(0.5)
        assert [s["study_name"] for s in studies] == ["mon-run"]
        with urllib.request.urlopen(f"{base}/api/studies/{studies[0]['study_id']}", timeout=10) as r:
            detail = json.load(r)
        assert detail["name"] == "mon-run" and len(detail["trials"]) == 5
        assert [t["state"] for t in detail["trials"]].count("Complete") == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_optuna_on_a_remote_store_uses_a_journal(tmp_path):
    """On a non-local store (memory://) the study is an Optuna journal mirrored into the store."""
    storage, name = f"memory://evo-monitor-{uuid.uuid4().hex[:8]}", "remote-run"
    setup = make_setup(storage, name, wandb="disabled")
    store = RunStore(storage, name)
    store.create(setup.config)
    pop = Population(setup.space)
    monitor = Monitor(setup, store, resumed=False)
    monitor.start(pop.snapshot(), 0)
    play(monitor, pop, store, range(1, 3))
    monitor.close("stopped")
    monitor = Monitor(setup, store, resumed=True)
    monitor.start(pop.snapshot(), 2)
    play(monitor, pop, store, range(3, 4))
    monitor.close("finished")
    assert monitor.disabled == {} and not store.exists_path(DB_FILE)
    journal = tmp_path / "copy.journal"
    journal.write_text(store.read_text(JOURNAL_FILE))
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))
    got = [(t.user_attrs["member"], t.user_attrs["event"], t.state) for t in study.get_trials()]
    assert got == [(0, "born", TrialState.FAIL), (1, "born", TrialState.COMPLETE),
                   (2, "born", TrialState.COMPLETE), (2, "exploit", TrialState.COMPLETE),
                   (0, "restart", TrialState.PRUNED)]   # the restart's segment never got evaluated
    assert study.get_trials()[1].intermediate_values == {10: 2.8, 20: 2.4, 30: 2.2}


def test_optuna_catches_up_a_round_committed_while_no_monitor_watched(tmp_path):
    """A driver killed between a commit and on_round: the next session reports what it missed."""
    setup = make_setup(str(tmp_path), "gap", wandb="disabled")
    store = RunStore(str(tmp_path), "gap")
    store.create(setup.config)
    pop = Population(setup.space)
    first = Monitor(setup, store, resumed=False)
    first.start(pop.snapshot(), 0)
    play(first, pop, store, range(1, 3))          # killed after committing round 3: no close
    blind = Monitor(make_setup(str(tmp_path), "gap", wandb="disabled", optuna_on=False), store, resumed=False)
    play(blind, pop, store, range(3, 4))
    second = Monitor(setup, store, resumed=True)
    second.start(pop.snapshot(), 3)
    play(second, pop, store, range(4, 5))
    second.close("finished")
    study = optuna.load_study(study_name="gap", storage=f"sqlite:///{store.local_path(DB_FILE)}")
    got = [(t.user_attrs["member"], t.user_attrs["event"], t.state, t.user_attrs.get("end_event"),
            t.intermediate_values) for t in study.get_trials()]
    assert got == [
        (0, "born", TrialState.FAIL, "lost", {10: 3.0, 20: 2.6}),   # member 0 changed unseen
        (1, "born", TrialState.COMPLETE, "finished", {10: 2.8, 20: 2.4, 30: 2.2, 40: 2.0}),
        (2, "born", TrialState.COMPLETE, "exploit", {10: 3.2, 20: 2.9}),
        (2, "exploit", TrialState.COMPLETE, "finished", {30: 2.5, 40: 2.3}),
        (0, "resume", TrialState.COMPLETE, "finished", {40: 2.1}),
    ]


def test_a_failing_sink_is_switched_off_with_one_warning(tmp_path, caplog):
    setup = make_setup(str(tmp_path), "broken", wandb="disabled")
    store = RunStore(str(tmp_path), "broken")
    store.create(setup.config)
    pop = Population(setup.space)
    monitor = Monitor(setup, store, resumed=False)
    monitor.start(pop.snapshot(), 0)
    with caplog.at_level("WARNING", logger="population.monitor"):
        # a lineage record without a genome: the Optuna sink cannot open the segment
        monitor.on_round(1, pop.snapshot(), [{"event": "exploit", "round": 1, "member": 0, "parents": [1]}],
                         pop.train(1))
        monitor.on_round(2, pop.snapshot(), [], pop.train(2))
        monitor.close("finished")
    assert "optuna" not in [s.name for s in monitor.sinks] and list(monitor.disabled) == ["optuna"]
    assert "KeyError" in monitor.disabled["optuna"]
    assert len(caplog.records) == 1 and "optuna sink failed" in caplog.records[0].getMessage()

    # a sink that cannot even be built: optuna.db is a directory
    os.makedirs(RunStore(str(tmp_path), "unbuildable").local_path(DB_FILE))
    with caplog.at_level("WARNING", logger="population.monitor"):
        monitor = Monitor(make_setup(str(tmp_path), "unbuildable", wandb="disabled"),
                          RunStore(str(tmp_path), "unbuildable"), resumed=False)
    assert "optuna" not in [s.name for s in monitor.sinks] and "optuna" in monitor.disabled
    monitor.start(pop.snapshot(), 0)
    monitor.close("failed")
    with pytest.raises(ValueError, match="status"):
        monitor.close("done")


RAY_SCRIPT = """
import sys
from population.cluster import init_local_ray
init_local_ray(num_cpus=1, include_dashboard=False, _metrics_export_port=int(sys.argv[1]),
               log_to_driver=False, configure_logging=False)
from population.monitor import Monitor
from population.store import RunStore
from tests.population.test_monitor import Population, make_setup, play
setup = make_setup(sys.argv[2], "metrics-run", wandb="disabled", optuna_on=False)
store = RunStore(sys.argv[2], "metrics-run")
store.create(setup.config)
pop = Population(setup.space)
monitor = Monitor(setup, store, resumed=False)
print("SINKS", [s.name for s in monitor.sinks], flush=True)
monitor.start(pop.snapshot(), 0)
play(monitor, pop, store, range(1, 4))
print("READY", flush=True)
sys.stdin.readline()          # the test says when it has scraped
monitor.close("finished")
"""


def _scrape(port: int) -> dict[str, float]:
    """{'name{tags}': value} of the evo metrics on a Prometheus endpoint (run/member tags only)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_evo_\w+)\{(.*)\} (\S+)$", line)
        if m:
            tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            label = ",".join(f"{k}={tags[k]}" for k in ("run", "member") if k in tags)
            out[f"{m.group(1)}{{{label}}}"] = float(m.group(3))
    return out


def test_ray_metrics_reach_prometheus(tmp_path):
    port = free_port()
    env = dict(os.environ, RAY_metrics_report_interval_ms="1000", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", RAY_SCRIPT, str(port), str(tmp_path)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(240, proc.kill)   # a Ray that never starts fails the test, not the suite
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY"):
                break
        assert "SINKS ['ray-metrics']\n" in lines, "".join(lines)
        want = {
            "ray_evo_best_fitness{run=metrics-run}": 2.2,
            "ray_evo_median_fitness{run=metrics-run}": 2.2,
            "ray_evo_member_tokens_per_s{run=metrics-run,member=1}": 1010.0,
            "ray_evo_member_tokens_per_s{run=metrics-run,member=2}": 1020.0,
            "ray_evo_exploits_total{run=metrics-run}": 1.0,
            "ray_evo_restarts_total{run=metrics-run}": 1.0,
            "ray_evo_failures_total{run=metrics-run}": 1.0,
            "ray_evo_restores_total{run=metrics-run}": 1.0,
        }
        deadline, got = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            try:
                got = _scrape(port)
            except OSError:
                got = {}
            if all(k in got for k in want):
                break
            time.sleep(0.5)
        assert {k: got.get(k) for k in want} == want, got
        time.sleep(3)   # gauges outlive Ray's 2-interval expiry: the sink keeps recording them
        assert _scrape(port)["ray_evo_best_fitness{run=metrics-run}"] == 2.2
        out, _ = proc.communicate("\n", timeout=60)
        assert proc.returncode == 0, out
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
