"""Sleep-trainer members (population.trainer.kind: sleep, trainers/stub.py) on a real local Ray:
the driver, the actors, the exploits through the object store, the checkpoints and the resume
are evo's own; only the training is a sleep, so what moved can be checked exactly."""
from __future__ import annotations

import io
import json
import math
import os

import pytest
from rich.console import Console

from population.driver import run_search
from population.replay import replay_run
from population.store import RunStore
from tests.population.conftest import make_setup
from trainers import stub

SLEEP = {"kind": "sleep", "step_s": 0.01, "state_kb": 16}


@pytest.mark.slow
def test_sleep_members_exploit_through_the_object_store_and_resume(ray_local, cache_dir, tmp_path):
    quiet = Console(file=open(os.devnull, "w"))
    first = run_search(make_setup(tmp_path, "sleepy", cache_dir, size=4, interval=5, total=10, trainer=SLEEP),
                       console=quiet)
    assert first["status"] == "finished" and first["round"] == 2
    lineage = [json.loads(x) for x in (tmp_path / "sleepy" / "lineage.jsonl").read_text().splitlines()]
    born = {r["member"]: r["genome"] for r in lineage if r["event"] == "born"}
    exploits = [r for r in lineage if r["event"] == "exploit"]
    assert exploits and first["exploits"] == first["exploit_latency_s"]["count"] >= len(exploits)
    store = RunStore(str(tmp_path), "sleepy")
    state = store.read_state()
    history = {m["id"]: dict(map(tuple, m["history"])) for m in state["members"]}
    for rec in exploits:   # round 1: the receiver went on from the donor's progress at step 5
        assert rec["round"] == 1 and rec["latency_s"] > 0 and "read_s" in rec["receiver_s"]
        donor, genome = born[rec["parents"][0]], rec["genome"]
        progress = 5 * stub.gain(donor["train.lr"], donor["train.weight_decay"])
        if "val_loss_jump" in rec:   # a lossy architecture change came with it
            progress *= stub.LOSSY_KEEP
        progress += 5 * stub.gain(genome["train.lr"], genome["train.weight_decay"])
        assert history[rec["member"]][10] == pytest.approx(stub.val_bpb(progress, genome["train.lr"]), rel=1e-12)

    # resumable: a larger budget continues from the committed checkpoints, history appended
    more = run_search(make_setup(tmp_path, "sleepy", cache_dir, size=4, interval=5, total=20, trainer=SLEEP),
                      console=quiet)
    state = store.read_state()
    assert more["status"] == "finished" and state["round"] == 4
    assert all(m["alive"] and m["step"] == 20 and len(m["history"]) == 4 for m in state["members"])
    after = [json.loads(x) for x in (tmp_path / "sleepy" / "lineage.jsonl").read_text().splitlines()]
    assert after[:len(lineage)] == lineage
    for m in state["members"]:
        saved = store.load_checkpoint(m["checkpoint"])
        assert saved["format"] == stub.STATE_FORMAT and saved["step"] == 20
        assert saved["weights"].numel() * 4 == 16 * 1024
        assert history[m["id"]][10] > m["history"][-1][1] and math.isfinite(saved["progress"])
    # the best member's schedule, replayed by one fresh sleep trainer, gives its val_bpb
    replay = replay_run(str(tmp_path), "sleepy")
    assert replay["val_bpb"] == pytest.approx(replay["best_val_bpb"], rel=1e-12)


@pytest.mark.slow
def test_auto_ready_intervals_judges_a_long_run_every_few_intervals(ray_local, cache_dir, tmp_path):
    """16 intervals per member: strategy.ready_intervals 'auto' judges each member every 2
    (16 // evo.strategies.JUDGEMENTS), so every exploit follows an even round; the driver says so."""
    out = io.StringIO()
    setup = make_setup(tmp_path, "spaced", cache_dir, size=4, interval=2, total=32, trainer=SLEEP)
    assert setup.strategy.ready_intervals == "auto"
    summary = run_search(setup, console=Console(file=out, width=200))
    assert summary["status"] == "finished" and summary["round"] == 16
    lineage = [json.loads(x) for x in (tmp_path / "spaced" / "lineage.jsonl").read_text().splitlines()]
    rounds = [r["round"] for r in lineage if r["event"] == "exploit"]
    assert rounds and all(r % 2 == 0 for r in rounds) and len(set(rounds)) >= 2
    assert "spaced: each member is judged every 2 intervals (4 steps; strategy.ready_intervals: auto)" in out.getvalue()
